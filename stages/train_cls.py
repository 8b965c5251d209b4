"""`make train-cls`: train the slice classifier per fold; writes runs/cls/<config>/fold_<k>/ (weights, metrics, oof.csv)."""

from __future__ import annotations

from pathlib import Path

from pipeline.train.tasks import train_classifier
from stages._cli import run_cli
from stages._fold_training import run_stage


def main(argv: list[str] | None = None) -> list[Path]:
    return run_stage(
        argv,
        stage="cls",
        default_config="configs/demo_cls.yaml",
        train=train_classifier,
        outputs="oof.csv",
        description=__doc__,
    )


if __name__ == "__main__":
    raise SystemExit(run_cli("train_cls", main))
