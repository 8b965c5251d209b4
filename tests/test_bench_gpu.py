"""`make bench-gpu` in its tiny CPU mode: every measure runs (RLE, training, submit with and without TTA,
sliding window, DDP in a 1-process gloo group), the figures are positive, and table and JSON agree."""

from __future__ import annotations

import json
from pathlib import Path

from stages import bench_gpu


def test_bench_gpu_tiny_cpu_mode(tmp_path: Path, capsys) -> None:
    result = bench_gpu.main(["--cpu-tiny", "--device", "cpu", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(result))
    assert result["mode"] == "tiny" and result["device"].startswith("cpu")
    figures = [
        result["rle"]["masks_per_s"],
        result["ddp"]["plain_images_per_s"],
        result["ddp"]["ddp_images_per_s"],
    ]
    figures += [row["images_per_s"] for row in result["train"]]
    figures += [row[k] for row in result["submit"] for k in ("no_tta", "tta")]
    figures += [result["sliding"][f"volumes_per_s_{k}"] for k in ("no_tta", "tta")]
    assert all(f > 0 for f in figures)
    assert [row["config"] for row in result["train"]] == ["demo_seg", "demo_seg3d"]
    assert result["train"][1]["size"] == [8, 32, 32] and result["ddp"]["backend"] == "gloo"
    assert [row["config"] for row in result["submit"]] == ["demo_seg"]  # the 3D member: the sliding figure
    table = capsys.readouterr().out
    assert table.count("\ntrain ") == 2 and table.count("\nsubmit ") == 2 and "DDP, 1 process (gloo)" in table
