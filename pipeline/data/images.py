"""Reading TIFF images and their sizes (LGG and Ultrasound Nerve store their slices as TIFF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError


def tiff_shape(path: Path) -> tuple[int, ...]:
    """The array shape of a TIFF from its header (no pixel data read)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.pages[0].shape)
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise DataError(
            f"{path}: not a readable TIFF ({exc}); replace the file or remove the slice"
        ) from None


def read_tiff(path: str | Path) -> np.ndarray:
    """The pixels of a TIFF; compressed files (the real nerve frames are LZW) need ``imagecodecs``."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image is missing: {path}")
    try:
        return tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        if "imagecodecs" in str(exc):  # tifffile decodes compressed TIFF only through that package
            raise DataError(
                f"{path}: a compressed TIFF ({exc}): install the codecs pinned in requirements.txt "
                "(`make install`, or `pip install imagecodecs`)"
            ) from None
        raise DataError(
            f"{path}: not a readable TIFF ({exc}); replace the file or remove the slice"
        ) from None
