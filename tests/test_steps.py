"""The post-processing steps as records: one registry that apply, search, postprocess.json and the
report iterate, in order; a toy step registered inside a test runs through all of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from test_tune import write_designed, write_member

from pipeline.config import EnsembleConfig, MemberCfg, TuneCfg
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.infer import steps as steps_module
from pipeline.infer.masks import (
    gate_keep,
    keep_large_components,
    prob_gate_keep,
    remove_small_components,
    threshold_probs,
    z_keep,
)
from pipeline.infer.postprocess import apply_class, read_decisions
from pipeline.infer.step_base import (
    Axis,
    ClassInput,
    ClassParams,
    Step,
    StepError,
    StepValue,
    Variant,
    final_mask,
    run_steps,
)
from pipeline.infer.steps import REGISTRY, Registry, registry, with_value
from pipeline.infer.tune import run_tune

WIDE = TuneCfg(
    pixel_thresholds=(0.3, 0.5, 0.7),
    gate_thresholds=(0.0, 0.1, 0.5, 0.9),
    min_component_sizes=(0, 1, 2, 3, 8, 1000),
    prob_gate_pixels=(0, 1, 2, 3, 50),
    prob_gate_levels=(0.5, 0.6, 0.9),
    z_runs=(0, 1, 2, 3, 5),
    component_fractions=(0.0, 0.05, 0.3, 0.5, 1.0),
)


def _probs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(S, H, W) uint8 blobs of varied strength on some slices, and (S,) gate probabilities."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((9, 16, 16), np.uint8)
    for s in (1, 2, 3, 5, 7, 8):
        y, x = rng.integers(0, 12, 2)
        probs[s, y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = rng.integers(100, 256)
        probs[s, rng.integers(0, 16), rng.integers(0, 16)] = rng.integers(100, 256)
    return probs, np.linspace(0, 1, len(probs))


def test_apply_class_is_the_steps_in_registry_order() -> None:
    """A brute-force twin: the kernels composed by hand in the documented order."""
    probs, gate = _probs()
    params = ClassParams(
        0.5, 0.3, 3, prob_gate_pixels=1, prob_gate_level=0.6, z_run=2, component_fraction=0.3
    )
    mask = threshold_probs(probs, 0.5)
    for keep in (gate_keep(gate, 0.3, len(mask)), prob_gate_keep(probs, 1, 0.6)):
        mask[~keep] = False
    mask[~z_keep(mask, 2)] = False
    want = keep_large_components(remove_small_components(mask, 3), 0.3)
    assert np.array_equal(apply_class(probs, gate, params), want)
    x = ClassInput(probs, gate)
    chained = None
    for step in registry():  # each record applied in turn gives the same mask
        chained = step.apply(chained, x, params)
    assert np.array_equal(final_mask(chained), want)


@pytest.mark.parametrize("step", REGISTRY.steps, ids=lambda s: s.name)
def test_every_step_sets_its_fields_and_varies_like_apply(step: Step) -> None:
    """get/set round trip on its own fields only; each candidate's shared-work mask equals apply_class."""
    base = ClassParams(
        0.55, 0.3, 3, prob_gate_pixels=2, prob_gate_level=0.6, z_run=2, component_fraction=0.05
    )
    values = registry().candidates(step, WIDE)
    assert values and (step.off is None or values[0] == step.off)
    probs, gate = _probs(1)
    by_key: dict = {}
    variants = registry().variants(ClassInput(probs, gate), base, step, values)
    for value, (key, mask) in zip(values, variants, strict=True):
        changed = step.set(base, value)
        assert step.get(step.set(changed, step.get(changed))) == step.get(changed)
        others = [f.name for f in dataclasses.fields(ClassParams) if f.name not in step.fields]
        assert all(getattr(changed, f) == getattr(base, f) for f in others)
        if mask is None:
            mask = by_key[key]
        elif key is not None:
            by_key[key] = mask
        assert np.array_equal(mask, apply_class(probs, gate, changed)), (step.name, value)


def test_registry_fails_loudly_on_a_bad_record() -> None:
    steps = REGISTRY.steps
    with pytest.raises(StepError, match=r"unknown post-processing step 'zrun'.*z_run"):
        registry().named("zrun")
    with pytest.raises(StepError, match="unique"):
        Registry((*steps, steps[-1]))
    with pytest.raises(StepError, match="first step"):
        Registry((steps[1], steps[0], *steps[2:]))
    with pytest.raises(StepError, match="fields"):
        Registry(steps[:-1])  # min_component_size would be set by no step
    bad_key = dataclasses.replace(steps[-1], grid_keys=("min_sizes",))
    with pytest.raises(StepError, match="min_sizes"):
        Registry((*steps[:-1], bad_key))


def test_probability_gate_off_is_one_state_and_z_run_refuses_2d_images() -> None:
    base = ClassParams(0.5, 0.0, 0)
    assert with_value(base, "prob_gate", (0, 0.7)) == with_value(base, "prob_gate", (-3, 0.2)) == base
    probs, _ = _probs()
    with pytest.raises(ValueError, match=r"z_run = 3.*set tune\.z_runs: \[0\]"):
        apply_class(probs, None, with_value(base, "z_run", 3), volumetric=False)
    assert apply_class(probs, None, with_value(base, "z_run", 1), volumetric=False).any()  # k <= 1 is off


# --------------------------------------------------------------------------- a toy step, end to end


@dataclasses.dataclass(frozen=True)
class ToyParams(ClassParams):
    dilate: int = 0  # the toy step's field: dilate each slice's mask this many pixels (0 = off)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DilateStep(Step):
    """Grows each slice's mask by k pixels (8-connected): undoes a member that draws organs too thin."""

    def apply(self, mask: np.ndarray | None, x: ClassInput, params: ClassParams) -> np.ndarray:
        assert mask is not None
        k = int(self.checked(x, params))
        if k <= 0 or not mask.any():
            return mask
        square = np.zeros((3, 3, 3), bool)
        square[1] = True
        return ndimage.binary_dilation(mask, structure=square, iterations=k)

    def candidates(self, tune: TuneCfg, params: type = ClassParams) -> list[StepValue]:
        return [0, 1]  # its own grid: no TuneCfg key needed for a toy

    def variants(
        self,
        before: np.ndarray | None,
        x: ClassInput,
        base: ClassParams,
        values: Sequence[StepValue],
        after: Sequence[Step],
    ) -> Iterator[Variant]:
        for value in values:
            params = self.set(base, value)
            assert before is not None
            yield None, final_mask(run_steps(after, self.apply(before.copy(), x, params), x, params))


TOY = DilateStep(
    name="dilate",
    fields=("dilate",),
    grid_keys=(),
    label="+ toy dilation",
    title="dilation (pixels)",
    start=0,
    off_upto=0,
    axis=Axis.CATEGORICAL,
)


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    toy = Registry((*REGISTRY.steps, TOY), ToyParams)
    monkeypatch.setattr(steps_module, "REGISTRY", toy)
    return toy


@pytest.fixture
def thin_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two cases of 6 slices with 4x4 (and 5x6) organs; the member's probabilities cover each organ
    eroded by one pixel, so only a dilation by one pixel gives the truth back."""
    truth = np.zeros((6, 3, 16, 16), bool)
    truth[1:4, 0, 2:6, 2:6] = True
    truth[2:5, 1, 8:13, 8:14] = True
    truth[2:4, 2, 9:13, 1:5] = True
    root = write_designed(isolated_dirs / "data", {1: truth, 2: truth})
    monkeypatch.setenv("DATA_DIR", str(root))
    square = np.zeros((3, 3, 3), bool)
    square[1, :, :] = True
    thin = np.stack([ndimage.binary_erosion(truth[:, c], square) for c in range(3)], axis=1)
    probs = np.where(thin, 220, 0).astype(np.uint8)
    spec = get_dataset("uwmgi")
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    write_member("m", dict.fromkeys(store.volume_ids, probs), {v: store[v].ids for v in store.volume_ids})
    return root


def test_a_toy_step_runs_through_apply_search_json_and_report(toy_registry: Registry, thin_oof: Path) -> None:
    from stages import cv

    probs = np.zeros((1, 8, 8), np.uint8)
    probs[0, 3:5, 3:5] = 200
    one = ToyParams(0.5, 0.0, 0, dilate=1)
    assert (
        apply_class(probs, None, one).sum() == 16
        and apply_class(probs, None, ToyParams(0.5, 0.0, 0)).sum() == 4
    )

    config = thin_oof.parent / "toy_ensemble.yaml"
    config.write_text(
        "stage: ensemble\nmembers: [{config: m}]\nreport_slices: 1\n"
        "tune: {pixel_thresholds: [0.5], gate_thresholds: [0.0], min_component_sizes: [0], holdout: 0.0}\n"
    )
    cfg = EnsembleConfig(
        name="toy_ensemble",
        members=(MemberCfg(config="m"),),
        tune=TuneCfg(pixel_thresholds=(0.5,), gate_thresholds=(0.0,), min_component_sizes=(0,), holdout=0.0),
    )
    decisions = read_decisions(
        "toy_ensemble", run_tune(cfg, get_dataset("uwmgi"), thin_oof, workers=1, progress=False)
    )
    assert all(isinstance(p, ToyParams) and p.dilate == 1 for p in decisions.params())
    rows = [s["step"] for s in decisions.steps]
    assert rows[rows.index("blend_raw") + 1 :][: len(toy_registry.steps)] == toy_registry.names()
    steps = {s["step"]: s for s in decisions.steps}
    assert steps["dilate"]["score"] == pytest.approx(1.0) and steps["dilate"]["gain"] > 0
    assert list(decisions.oof.grids.steps) == toy_registry.names() and decisions.curves["dilate"]
    report = cv.main(["--config", str(config), "--workers", "1"])
    assert (report / "dilate.png").is_file()
    table = pd.read_csv(report / "cv_table.csv")
    assert table["dilate"].iloc[:3].tolist() == [1, 1, 1] and table["score"].iloc[-1] == pytest.approx(1.0)


def test_steps_are_searched_and_written_in_registry_order(thin_oof: Path) -> None:
    cfg = EnsembleConfig(
        name="order", members=(MemberCfg(config="m"),), tune=TuneCfg(holdout=0.0, z_runs=(0, 2))
    )
    decisions = read_decisions(
        "order", run_tune(cfg, get_dataset("uwmgi"), thin_oof, workers=1, progress=False)
    )
    rows = [s["step"] for s in decisions.steps]
    names = registry().names()
    assert rows[rows.index("blend_raw") + 1 :][: len(names)] == names
    assert list(decisions.oof.grids.steps) == names
    assert [k for k in decisions.curves if k in names] == [n for n in names if n in decisions.curves]
    owned = [f for step in registry() for f in step.fields]
    assert sorted(owned) == sorted(dataclasses.asdict(decisions.params()[0]))


@pytest.mark.parametrize("volumetric", [True, False])
def test_keep_large_components_equals_a_brute_force_twin(volumetric: bool) -> None:
    """Against scipy labelling and a plain loop: the volume's largest (3D) or each image's largest (2D)."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    mask = rng.random((6, 20, 20)) < 0.25
    for fraction in (0.0, 0.1, 0.5, 1.0):
        want = np.zeros_like(mask)
        planes = [mask] if volumetric else list(mask)
        outs = [want] if volumetric else list(want)
        structure = np.ones((3,) * planes[0].ndim)
        for plane, out in zip(planes, outs):
            labels, n = ndimage.label(plane, structure=structure)
            sizes = [int((labels == i).sum()) for i in range(1, n + 1)]
            for i, size in enumerate(sizes, start=1):
                if fraction == 0 or size >= fraction * max(sizes):
                    out[labels == i] = True
        got = keep_large_components(mask, fraction, volumetric)
        assert np.array_equal(got, want), fraction
    assert keep_large_components(mask, 1.0, volumetric).sum() < mask.sum()  # the test can fail
