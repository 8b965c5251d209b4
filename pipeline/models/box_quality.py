"""How good a detector's crop boxes are, and a figure of them (the boxes file: :mod:`pipeline.data.boxes`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import DetParams
from pipeline.data.boxes import SOURCES
from pipeline.data.geometry import Box, box_iou, normalize, volume_threshold_box
from pipeline.data.volumes import VolumeStore
from pipeline.io import write_with


@dataclass
class Panel:
    """One slice of a volume drawn with its crop box (and the threshold box, for comparison)."""

    title: str
    image: np.ndarray  # (H, W) uint16
    mask: np.ndarray | None  # (H, W) bool, any class
    box: Box
    threshold: Box | None


def mask_inside(mask: np.ndarray, box: Box) -> tuple[int, int]:
    """(organ pixels inside ``box``, all organ pixels) of masks (..., H, W)."""
    mask = np.asarray(mask, dtype=bool)
    return int(mask[(..., *box.slices())].sum()), int(mask.sum())


def evaluate_boxes(
    store: VolumeStore, boxes: dict[str, tuple[Box, str]], params: DetParams, n_panels: int = 6
) -> tuple[dict[str, float], list[Panel]]:
    """Box quality over every volume of ``store``, and figure panels of up to ``n_panels`` volumes.

    ``mask_inside_fraction`` is the share of mask pixels inside the volume boxes: cropping
    must lose nothing, so it should be 1.0. ``iou_vs_threshold_*`` compares each volume box with
    the volume's threshold box; ``box_area_fraction`` is the share of the frame a crop keeps.
    """
    volume_ids = list(boxes)
    picks = np.linspace(0, len(volume_ids) - 1, min(n_panels, len(volume_ids))).round().astype(int)
    drawn = {volume_ids[i] for i in picks}
    ious, areas, panels = [], [], []
    inside = total = thr_inside = 0
    volume_fractions = []
    for volume_id in tqdm(volume_ids, desc="box quality", unit="vol"):
        volume = store[volume_id]
        box, _ = boxes[volume_id]
        thr = volume_threshold_box(
            volume.gray(), params.margin, quantile=params.threshold_quantile, scale=params.threshold_scale
        )
        if thr is not None:
            ious.append(box_iou(box, thr))
        areas.append(box.height * box.width / (volume.shape[0] * volume.shape[1]))
        organ = None if volume.mask is None else np.asarray(np.asarray(volume.mask).any(axis=1))
        if organ is not None:
            kept, count = mask_inside(organ, box)
            inside, total = inside + kept, total + count
            if count:
                volume_fractions.append(kept / count)
            if thr is not None:
                thr_inside += mask_inside(organ, thr)[0]
        if volume_id in drawn:
            s = (
                int(organ.sum(axis=(1, 2)).argmax())
                if organ is not None and organ.any()
                else len(volume) // 2
            )
            panels.append(
                Panel(
                    f"{volume_id} s{s}: {boxes[volume_id][1]}",
                    np.asarray(volume.gray()[s]),
                    None if organ is None else organ[s],
                    box,
                    thr,
                )
            )
    sources = [source for _, source in boxes.values()]
    quality = {
        "volumes": len(volume_ids),
        **{f"source_{name}": sources.count(name) for name in SOURCES},
        "iou_vs_threshold_mean": float(np.mean(ious)) if ious else float("nan"),
        "iou_vs_threshold_min": float(np.min(ious)) if ious else float("nan"),
        "box_area_fraction_mean": float(np.mean(areas)) if areas else float("nan"),
        "mask_pixels": total,
        "mask_inside_fraction": inside / total if total else 1.0,
        "mask_inside_fraction_min_volume": float(min(volume_fractions)) if volume_fractions else 1.0,
        "threshold_mask_inside_fraction": thr_inside / total if total else 1.0,
    }
    return quality, panels


def plot_volume_boxes(path: Path, panels: list[Panel]) -> Path:
    """A grid of slices: volume box (green), threshold box (red, dashed), organ outline (cyan)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(4 * cols, 4 * rows))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.clip(normalize(panel.image), 0, 1), cmap="gray", vmin=0, vmax=1)
        if panel.mask is not None and panel.mask.any():
            ax.contour(panel.mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        for box, color, style in ((panel.threshold, "red", "--"), (panel.box, "lime", "-")):
            if box is not None:
                ax.add_patch(
                    Rectangle(
                        (box.x0 - 0.5, box.y0 - 0.5),
                        box.width,
                        box.height,
                        fill=False,
                        ec=color,
                        ls=style,
                        lw=1.5,
                    )
                )
        ax.set_title(panel.title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return write_with(path, lambda p: fig.savefig(p, dpi=80, format="png"))
