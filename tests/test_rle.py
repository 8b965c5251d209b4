"""RLE: round trips, fast paths against the NumPy twin, validation messages, real Kaggle labels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.rle import (
    RLEError,
    encode_masks,
    rle_decode,
    rle_decode_batch,
    rle_encode,
    rle_encode_batch,
    rle_encode_numpy,
)

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ["C", "F"]


def random_masks(rng: np.random.Generator, count: int, shape: tuple[int, int]) -> np.ndarray:
    """Noise, rectangles, empty and full masks; a third with the first and/or last pixel set."""
    masks = np.zeros((count, *shape), bool)
    for m in masks:
        kind = rng.integers(4)
        if kind == 0:
            m[:] = rng.random(shape) < rng.uniform(0.05, 0.95)
        elif kind == 1:
            (y0, y1), (x0, x1) = (np.sort(rng.integers(0, s + 1, 2)) for s in shape)
            m[y0:y1, x0:x1] = True
        elif kind == 2:
            m[:] = rng.random() < 0.5  # empty or full
        if rng.random() < 0.33:
            m.flat[0] = m.flat[-1] = True
    return masks


def random_shapes(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    edge = [(1, 1), (1, 17), (17, 1), (1, 64), (64, 1), (2, 3), (8, 8)]
    return edge + [tuple(int(v) for v in rng.integers(1, 40, 2)) for _ in range(count)]


# ---------------------------------------------------------------- format and round trips


@pytest.mark.parametrize(
    ("order", "expected"), [("C", "1 1 6 2 12 1"), ("F", "1 1 5 1 8 1 12 1")], ids=["C", "F"]
)
def test_known_strings(order: str, expected: str) -> None:
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 0] = mask[2, 3] = 1  # first and last pixel
    mask[1, 1:3] = 7  # any non-zero value is foreground
    for encode in (rle_encode, rle_encode_numpy):
        assert encode(mask, order) == expected
    assert rle_encode_batch(mask[None], order) == [expected]
    assert rle_decode(expected, (3, 4), order).tolist() == (mask > 0).astype(np.uint8).tolist()


@pytest.mark.parametrize("order", ORDERS)
def test_empty_and_full(order: str) -> None:
    assert rle_encode(np.zeros((5, 7), bool), order) == ""
    assert rle_encode(np.ones((5, 7), bool), order) == "1 35"
    assert rle_encode_batch(np.zeros((2, 5, 7)), order) == ["", ""]
    for empty in ("", "   ", None, float("nan"), np.float32("nan")):
        decoded = rle_decode(empty, (5, 7), order)
        assert decoded.shape == (5, 7) and decoded.dtype == np.uint8 and not decoded.any()
    assert rle_decode("1 35", (5, 7), order).all()
    assert rle_encode(np.zeros((0, 4)), order) == "" and rle_decode("", (0, 4)).shape == (0, 4)


@pytest.mark.parametrize("order", ORDERS)
def test_round_trip_all_paths_agree(order: str) -> None:
    rng = np.random.default_rng(7)
    for shape in random_shapes(rng, 40):
        masks = random_masks(rng, 6, shape)
        ref = [rle_encode_numpy(m, order) for m in masks]
        assert [rle_encode(m, order) for m in masks] == ref
        assert rle_encode_batch(masks, order) == ref
        decoded = rle_decode_batch(ref, shape, order)
        assert decoded.dtype == np.uint8 and decoded.shape == (6, *shape)
        np.testing.assert_array_equal(decoded, masks)
        for m, s in zip(masks, ref):
            np.testing.assert_array_equal(rle_decode(s, shape, order), m)


def test_fortran_order_is_the_transpose() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 8, (9, 14))
    assert rle_encode_batch(masks, "F") == rle_encode_batch(masks.transpose(0, 2, 1).copy(), "C")


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_batch_dtypes_layouts_and_leading_axes(dtype: type) -> None:
    rng = np.random.default_rng(5)
    masks = (random_masks(rng, 12, (11, 13)) * 3).astype(dtype)
    grid = masks.reshape(3, 4, 11, 13)
    ref = [rle_encode_numpy(m) for m in masks]
    assert rle_encode_batch(grid) == ref  # (N, C, H, W) flattens N, C in C order
    strided = np.zeros((12, 22, 13), dtype)
    strided[:, ::2] = masks
    assert rle_encode_batch(strided[:, ::2]) == ref  # non-contiguous input
    if dtype in (bool, np.uint8):  # a contiguous buffer at an odd address
        odd = np.frombuffer(bytearray(b"\0" + masks.tobytes()), dtype, offset=1).reshape(masks.shape)
        assert odd.ctypes.data % 8
        assert rle_encode_batch(odd) == ref
    assert encode_masks(masks) == ref
    with pytest.raises(ValueError, match="expects"):
        rle_encode_batch(masks[0])
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(masks)


@pytest.mark.parametrize("order", ORDERS)
def test_masks_with_many_runs(order: str) -> None:
    """More runs than the kernels' initial run storage: it grows (batch) or is rescanned (single)."""
    rng = np.random.default_rng(11)
    masks = rng.random((5, 64, 48)) < 0.5
    masks[1] = False
    ref = [rle_encode_numpy(m, order) for m in masks]
    assert min(len(r.split()) // 2 for i, r in enumerate(ref) if i != 1) > 512
    assert rle_encode_batch(masks, order) == ref
    assert [rle_encode(m, order) for m in masks] == ref


@pytest.mark.parametrize("order", ORDERS)
def test_runs_at_word_and_block_edges(order: str) -> None:
    """Runs starting/ending on every byte around 8-byte words and 64-byte blocks, at every address."""
    rng = np.random.default_rng(13)
    masks = np.zeros((40, 9, 29), bool)  # 261 pixels: masks straddle words and blocks unevenly
    for i, m in enumerate(masks):
        a = int(rng.integers(0, m.size))
        m.flat[a : a + int(rng.integers(1, 140))] = True
        m.flat[(i * 7) % m.size] = True
    masks[3] = True  # full: one run crossing every column end in F order
    masks[4, :, ::2] = True  # F: whole columns, adjacent ones merge
    masks[5, ::2] = True  # C: whole rows
    ref = [rle_encode_numpy(m, order) for m in masks]
    for shift in range(9):
        buf = np.zeros(masks.nbytes + shift, np.uint8)
        moved = buf[shift:].reshape(masks.shape)
        moved[:] = masks
        assert rle_encode_batch(moved, order) == ref
        assert [rle_encode(m, order) for m in moved] == ref


@pytest.mark.parametrize("order", ORDERS)
def test_large_batch_split_across_threads(order: str) -> None:
    """A batch over the threading threshold gives the same strings, in order."""
    rng = np.random.default_rng(17)
    masks = np.zeros((300, 200, 160), bool)  # 9.6 MB
    for m in masks[rng.random(300) < 0.5]:
        y, x = rng.integers(0, 150, 2)
        m[y : y + 40, x : x + int(rng.integers(1, 40))] = True
    masks[7] = rng.random((200, 160)) < 0.5  # many runs: storage grows mid-batch
    ref = [rle_encode_numpy(m, order) for m in masks]
    assert rle_encode_batch(masks, order) == ref


def test_encode_masks_takes_cpu_tensors() -> None:
    torch = pytest.importorskip("torch")
    masks = random_masks(np.random.default_rng(2), 6, (10, 12))
    ref = [rle_encode_numpy(m, "F") for m in masks]
    assert encode_masks(torch.from_numpy(masks), "F") == ref
    assert encode_masks(torch.from_numpy(masks).float().requires_grad_(), "F") == ref


def test_adjacent_runs_decode_and_merge() -> None:
    decoded = rle_decode("1 2 3 2", (2, 3))
    assert decoded.sum() == 4
    assert rle_encode(decoded) == "1 4"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 5", "odd number of tokens (3)"),
        ("1 x", "token 1 ('x') is not an integer"),
        ("1.5 2", "token 0 ('1.5') is not an integer"),
        ("0 3", "run 0 has start 0 < 1"),
        ("2 1 -4 1", "run 1 has start -4 < 1"),
        ("1 0", "run 0 (start 1) has length 0"),
        ("3 1 5 -2", "run 1 (start 5) has length -2"),
        ("10 4", "run 0 (start 10, length 4) is out of bounds: it ends at pixel 13 but the 3x4 mask has 12"),
        ("13 1", "out of bounds"),
        ("99999999999999999999999 1", "integer too large"),
        ("8 1 2 1", "run 1 (start 2) begins before the previous run (start 8, length 1) ends"),
        ("1 5 3 1", "runs must be sorted and must not overlap"),
    ],
)
def test_decode_rejects_malformed(rle: str, message: str) -> None:
    where = "train.csv row 17 (case1_day0_slice_0001, stomach)"
    with pytest.raises(RLEError) as err:
        rle_decode(rle, (3, 4), where=where)
    assert str(err.value).startswith(where + ": ")
    assert message in str(err.value)
    with pytest.raises(RLEError, match=r"^sub\.csv item 1: RLE "):
        rle_decode_batch(["1 1", rle], (3, 4), where="sub.csv")
    assert isinstance(err.value, ValueError)


def test_decode_rejects_bad_arguments() -> None:
    with pytest.raises(RLEError, match="must be a string"):
        rle_decode(12, (3, 4))
    with pytest.raises(ValueError, match="order must be"):
        rle_decode("1 1", (3, 4), order="K")
    with pytest.raises(ValueError, match="shape must be"):
        rle_decode("1 1", (3, 4, 1))
    with pytest.raises(ValueError, match="order must be"):
        rle_encode_batch(np.zeros((1, 2, 2)), order="c")


# ---------------------------------------------------------------- real Kaggle labels


def test_uwmgi_real_labels_round_trip(shared_data: Path) -> None:
    """Every real train.csv row decodes row-major and re-encodes to the identical string."""
    df = pd.read_csv(shared_data / "uwmgi-real-labels" / "train_partial.csv")
    df["segmentation"] = df["segmentation"].fillna("")
    assert len(df) == 4032
    shapes = np.where(df["id"].str.startswith("case139_day0_"), 234, 276)
    for size in (234, 276):
        rows = df[shapes == size]
        where = f"train_partial.csv ({size}x{size} rows)"
        masks = rle_decode_batch(rows["segmentation"], (size, size), where=where)
        assert rle_encode_batch(masks) == rows["segmentation"].tolist()
        for (row, rle), mask in zip(rows["segmentation"].items(), masks):
            decoded = rle_decode(rle, (size, size), where=f"train_partial.csv row {row}")
            np.testing.assert_array_equal(decoded, mask)
            assert rle_encode(decoded) == rle
    assert (df["segmentation"] != "").sum() == 1674


def test_nerve_labels_are_column_major(shared_data: Path) -> None:
    root = shared_data / "nerve-real-mini"
    df = pd.read_csv(root / "train_masks_subject1.csv")
    rle = df.loc[(df["subject"] == 1) & (df["img"] == 1), "pixels"].item()
    truth = cv2.imread(str(root / "1_1_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert truth.shape == (420, 580) and truth.sum() == 4616
    np.testing.assert_array_equal(rle_decode(rle, (420, 580), order="F"), truth)
    assert not np.array_equal(rle_decode(rle, (420, 580), order="C"), truth)
    assert rle_encode(truth, order="F") == rle
    assert rle_encode_batch(truth[None], order="F") == [rle]


# ---------------------------------------------------------------- CUDA kernels


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_imports_leave_numba_cuda_alone() -> None:
    out = run_python("import sys, pipeline.rle, pipeline.rle_cuda; print('numba.cuda' in sys.modules)")
    assert out.strip() == "False"


def test_cuda_kernels_match_reference_in_simulator() -> None:
    """The CUDA kernels, run by the numba CUDA simulator (enabled before numba.cuda is imported)."""
    out = run_python(
        """
        import numpy as np
        from numba import cuda
        from pipeline.rle import encode_masks, rle_encode_numpy
        from pipeline.rle_cuda import rle_encode_cuda

        rng = np.random.default_rng(0)
        masks = rng.random((4, 9, 13)) < 0.4
        masks[0] = False
        masks[1] = True
        masks[2, 0, 0] = masks[2, -1, -1] = True
        masks[3] = False
        masks[3, 0, 0] = masks[3, -1, -1] = True
        for order in "CF":
            ref = [rle_encode_numpy(m, order) for m in masks]
            # tiles of 16 positions: every mask spans several blocks, runs cross tile edges
            assert rle_encode_cuda(masks, order, threads=4, chunk=4) == ref, order
            assert rle_encode_cuda(cuda.to_device(masks.view(np.uint8)), order, threads=8, chunk=3) == ref
            assert rle_encode_cuda(masks[:2, None].astype(np.float32), order, threads=32, chunk=8) == ref[:2]
        assert rle_encode_cuda(np.zeros((2, 5, 3), bool)) == ["", ""]
        assert rle_encode_cuda(np.zeros((0, 5, 3), bool)) == []
        print("OK")
        """,
        NUMBA_ENABLE_CUDASIM="1",
    )
    assert out.strip().endswith("OK")


@pytest.mark.gpu
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_tensors_on_gpu(order: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(1)
    masks = np.concatenate([random_masks(rng, 16, (276, 276)), rng.random((4, 276, 276)) < 0.5])
    ref = [rle_encode_numpy(m, order) for m in masks]
    gpu = torch.from_numpy(masks).cuda()
    assert encode_masks(gpu, order) == ref
    assert encode_masks(gpu.to(torch.uint8) * 255, order) == ref
    assert encode_masks(gpu.float().reshape(4, 5, 276, 276), order) == ref
    assert encode_masks(gpu.transpose(1, 2).contiguous().transpose(1, 2), order) == ref  # strided view
