"""`make train-seg`: train a segmenter per fold; writes runs/seg/<config>/fold_<k>/ (weights, metrics, OOF)."""

from __future__ import annotations

from pathlib import Path

from pipeline.train.tasks import train_segmenter
from stages._cli import run_cli
from stages._fold_training import run_stage


def main(argv: list[str] | None = None) -> list[Path]:
    return run_stage(
        argv,
        stage="seg",
        default_config="configs/demo_seg.yaml",
        train=train_segmenter,
        outputs="oof/",
        description=__doc__,
    )


if __name__ == "__main__":
    raise SystemExit(run_cli("train_seg", main))
