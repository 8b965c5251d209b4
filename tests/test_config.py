"""Configs: typed defaults, deltas, base inheritance, strict validation naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import (
    RENAMED_KEYS,
    ConfigError,
    DetConfig,
    EnsembleConfig,
    SegConfig,
    dump_config,
    load_config,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_delta_over_defaults_and_name_from_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "exp1.yaml", "stage: seg\ntrain: {epochs: 3}\n"))
    assert isinstance(cfg, SegConfig)
    assert cfg.name == "exp1"
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == SegConfig().train.batch_size
    assert cfg.data.img_size == (384, 384)


@pytest.mark.parametrize(
    ("text", "old", "new"),
    [
        ("stage: seg\ndata: {max_days: 2}\n", "data.max_days", "data.max_volumes"),
        ("stage: cls\ndata: {max_days: 2}\n", "data.max_days", "data.max_volumes"),
        ("stage: det\ndet: {slices_per_day: 4}\n", "det.slices_per_day", "det.slices_per_volume"),
        ("stage: ensemble\ndebug_train_days: 1\n", "debug_train_days", "debug_train_volumes"),
    ],
)
def test_a_renamed_key_fails_naming_its_new_name(tmp_path: Path, text: str, old: str, new: str) -> None:
    path = write(tmp_path / "old.yaml", text)
    with pytest.raises(ConfigError, match=rf"'{re.escape(old)}' was renamed to '{re.escape(new)}'"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"'{re.escape(old)}' was renamed to '{re.escape(new)}'"):
        load_config(write(tmp_path / "new.yaml", text.split("\n")[0] + "\n"), [f"{old}=1"])  # --set too


def test_every_renamed_key_names_a_key_of_the_schema() -> None:
    schemas = {"data": SegConfig().data, "det": DetConfig().det, "": EnsembleConfig()}
    for old, new in RENAMED_KEYS.items():
        section, _, key = new.rpartition(".")
        assert key in to_dict(schemas[section]), new
        assert old.rpartition(".")[2] not in to_dict(schemas[section]), old


def test_unknown_key_is_named_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "stage: seg\ntrain: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'epochs'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train: {epochs: three}", "train.epochs"),
        ("train: {lr: true}", "train.lr"),
        ("data: {img_size: [64]}", "data.img_size"),
        ("data: {crop: 1}", "data.crop"),
        ("augment: [{name: HorizontalFlip, params: 3}]", "augment[0].params"),
    ],
)
def test_wrong_type_is_named(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "bad.yaml", f"stage: seg\n{text}\n")
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(path)


def test_int_accepted_as_float_and_tuple_coercion(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "a.yaml", "stage: seg\ntrain: {lr: 1}\ndata: {img_size: [64, 96]}\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.img_size == (64, 96)


def test_base_inheritance_and_overrides(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", "stage: seg\nname: parent\ntrain: {epochs: 7, lr: 0.01}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\ntrain: {lr: 0.002}\n")
    cfg = load_config(child, overrides=["train.batch_size=4", "data.img_size=[32, 32]"])
    assert cfg.name == "child"
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (7, 0.002, 4)
    assert cfg.data.img_size == (32, 32)
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'train.batchsize'")):
        load_config(child, overrides=["train.batchsize=4"])


def test_stage_mismatch_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "stage: cls\n")
    with pytest.raises(ConfigError, match="'cls' config but the 'seg' stage"):
        load_config(path, stage="seg")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "r.yaml", "stage: seg\nloss: {tversky: 0.5}\n"))
    again = load_config(write(tmp_path / "r2.yaml", dump_config(cfg)))
    assert to_dict(again) == to_dict(cfg)
    assert again.loss.tversky == 0.5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
