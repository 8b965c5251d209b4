"""`make kernel` / `make kernel-push`: the bundle's layout and metadata, the push command lines
and its refusals, and (test_built_kernel_runs_offline) the BUILT entry script run with no
network, read-only inputs and a fresh environment that gets the pipeline's extra packages only
from the bundled wheels."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata as importlib_metadata
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import dump_config, load_config
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import CLASSES
from pipeline.kaggle import push as push_mod
from pipeline.kaggle.bundle import (
    PLACEHOLDER_USER,
    BundleError,
    build_bundle,
    data_input,
    render_entry,
    resolve_user,
)
from pipeline.kaggle.wheels import KERNEL_PACKAGES, SUPPORT_PACKAGES, WheelSet, read_pins
from stages import kernel as kernel_stage

ROOT = Path(__file__).resolve().parents[1]
COMPETITION = "uw-madison-gi-tract-image-segmentation"  # the real data of the default dataset


def test_uwmgi_kaggle_source_is_the_competition() -> None:
    assert get_dataset("uwmgi").kaggle_source == ("competition", COMPETITION)
    assert data_input(get_dataset("uwmgi")) == COMPETITION  # mounted as /kaggle/input/<slug>


# --------------------------------------------------------------------------- toy runs


def write_configs(folder: Path) -> Path:
    """A det, cls, seg and ensemble config in ``folder``; returns the ensemble config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_det.yaml").write_text("stage: det\ndet: {imgsz: 64, epochs: 1}\n")
    (folder / "toy_base.yaml").write_text("stage: seg\ndata: {img_size: [64, 64], det_config: toy_det}\n")
    (folder / "toy_seg.yaml").write_text("base: toy_base.yaml\ntrain: {epochs: 1}\n")
    (folder / "toy_cls.yaml").write_text("stage: cls\ndata: {crop: false}\n")
    (folder / "toy_ens.yaml").write_text(
        "stage: ensemble\n"
        f"members: [{{config: {folder / 'toy_seg.yaml'}, folds: [0, 1]}}]\n"
        f"classifier: {folder / 'toy_cls.yaml'}\n"
        "det_config: null\n"
    )
    return folder / "toy_ens.yaml"


def write_toy_runs(runs: Path, configs: Path) -> list[Path]:
    """Run folders as the stages leave them, with extra files the bundle must not take."""
    made = []

    def put(path: Path, text: str = "x") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        made.append(path)

    seg = dump_config(load_config(configs / "toy_seg.yaml"))
    for fold in (0, 1, 2):  # fold 2 is trained but not a member
        for name in ("best.pt", "last.pt", "metrics.csv", "oof/case1_day0.npz"):
            put(runs / "seg" / "toy_seg" / f"fold_{fold}" / name)
        put(runs / "seg" / "toy_seg" / f"fold_{fold}" / "config.yaml", seg)
    cls = dump_config(load_config(configs / "toy_cls.yaml"))
    for fold in (0, 3):
        for name in ("best.pt", "last.pt", "oof.csv"):
            put(runs / "cls" / "toy_cls" / f"fold_{fold}" / name)
        put(runs / "cls" / "toy_cls" / f"fold_{fold}" / "config.yaml", cls)
    put(runs / "cls" / "toy_cls" / "fold_4" / "last.pt")  # no best.pt: not a finished fold
    for name in ("weights.pt", "model.yaml", "boxes_train.csv", "metrics.csv", "yolo/images/a.png"):
        put(runs / "det" / "toy_det" / name)
    put(runs / "det" / "toy_det" / "config.yaml", dump_config(load_config(configs / "toy_det.yaml")))
    put(runs / "ensemble" / "toy_ens" / "postprocess.json", json.dumps(toy_decisions(gate=0.3)))
    put(runs / "ensemble" / "toy_ens" / "report" / "cv_table.csv")
    return made


def toy_decisions(gate: float) -> dict:
    """postprocess.json as `make tune` writes it: members toy_seg folds 0 and 1, classifier folds 0 and 3."""
    params = {"pixel_threshold": 0.5, "gate_threshold": 0.0, "min_component_size": 0}
    classes = {name: dict(params) for name in CLASSES}
    classes["stomach"]["gate_threshold"] = gate
    return {
        "classes": classes,
        "weights": {"toy_seg": 1.0},
        "members": [{"config": "toy_seg", "folds": [0, 1]}],
        "classifier": {"config": "toy_cls", "folds": [0, 3]},
        "ensemble": "toy_ens",
    }


def fake_wheels(folder: Path) -> WheelSet:
    """Empty files named like the pinned wheels: enough for the layout, not for pip."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = read_pins()
    files = []
    for name in KERNEL_PACKAGES + SUPPORT_PACKAGES:
        path = folder / f"{name.replace('-', '_')}-{pins[name]}-py3-none-any.whl"
        path.write_bytes(b"")
        files.append(path)
    pick = lambda names: {n: pins[n] for n in names}  # noqa: E731
    return WheelSet(pick(KERNEL_PACKAGES), pick(SUPPORT_PACKAGES), tuple(files))


@pytest.fixture
def toy(isolated_dirs: Path):
    configs = isolated_dirs / "configs"
    ensemble = write_configs(configs)
    write_toy_runs(isolated_dirs / "runs", configs)
    return load_config(ensemble, stage="ensemble"), fake_wheels(isolated_dirs / "wheels")


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the bundle


def test_bundle_layout_and_metadata(toy, tmp_path: Path) -> None:
    cfg, wheels = toy
    bundle = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "kaggle", user="alice", wheels=wheels)
    out = bundle.root
    assert sorted(p.name for p in out.iterdir()) == ["code", "kernel", "weights", "wheels"]

    # weights: exactly what inference loads, laid out as runs/...
    fold = lambda stage, name, k: {f"runs/{stage}/{name}/fold_{k}/{f}" for f in ("best.pt", "config.yaml")}  # noqa: E731
    expected = fold("seg", "toy_seg", 0) | fold("seg", "toy_seg", 1) | fold("cls", "toy_cls", 0)
    expected |= fold("cls", "toy_cls", 3)
    expected |= {
        f"runs/det/toy_det/{f}" for f in ("weights.pt", "config.yaml", "model.yaml", "boxes_train.csv")
    }
    expected |= {f"runs/ensemble/toy_ens/{f}" for f in ("postprocess.json", "config.yaml")}
    assert files_under(out / "weights") == expected | {"BUNDLE.json", "dataset-metadata.json"}

    # code: sources only, the configs resolved and named by bare name
    code = files_under(out / "code")
    assert "pipeline/kaggle/bundle.py" in code and "stages/kernel.py" in code and "stages/folds.py" in code
    assert not [f for f in code if "__pycache__" in f or f.endswith(".pyc")]
    assert {f for f in code if f.startswith("configs/")} == {
        f"configs/{n}.yaml" for n in ("toy_ens", "toy_seg", "toy_cls", "toy_det")
    }
    seg = load_config(out / "code" / "configs" / "toy_seg.yaml", stage="seg")
    assert seg.data.img_size == (64, 64) and seg.train.epochs == 1  # the base was folded in
    ens = load_config(out / "code" / "configs" / "toy_ens.yaml", stage="ensemble")
    assert [m.config for m in ens.members] == ["toy_seg"] and ens.classifier == "toy_cls"
    assert ens.members[0].folds == (0, 1)
    assert load_config(out / "weights" / "runs" / "ensemble" / "toy_ens" / "config.yaml") == ens

    # wheels
    assert files_under(out / "wheels") == {p.name for p in wheels.files} | {
        "manifest.json",
        "dataset-metadata.json",
    }
    manifest = json.loads((out / "wheels" / "manifest.json").read_text())
    assert manifest["packages"]["segmentation-models-pytorch"] == "0.6.0"
    assert manifest["packages"]["ultralytics"] == "8.4.190"

    # metadata
    for part in ("code", "weights", "wheels"):
        meta = json.loads((out / part / "dataset-metadata.json").read_text())
        assert meta["id"] == f"alice/gi-tract-{part}" and meta["title"] == f"gi-tract-{part}"
        assert meta["licenses"] == [{"name": "CC0-1.0"}]
    kmeta = json.loads((out / "kernel" / "kernel-metadata.json").read_text())
    assert kmeta["id"] == "alice/gi-tract-submit" and kmeta["title"] == "gi-tract-submit"
    assert kmeta["code_file"] == "kaggle_submit.py" and (out / "kernel" / kmeta["code_file"]).is_file()
    assert (kmeta["language"], kmeta["kernel_type"]) == ("python", "script")
    assert kmeta["is_private"] is True and kmeta["enable_gpu"] is True and kmeta["enable_internet"] is False
    assert kmeta["competition_sources"] == [COMPETITION]
    assert kmeta["dataset_sources"] == [
        "alice/gi-tract-code",
        "alice/gi-tract-weights",
        "alice/gi-tract-wheels",
    ]

    # the entry script knows the same slugs, ensemble, pins and build id as the datasets
    settings = script_settings(out / "kernel" / "kaggle_submit.py")
    assert settings["datasets"] == {
        "code": "gi-tract-code",
        "weights": "gi-tract-weights",
        "wheels": "gi-tract-wheels",
    }
    assert settings["ensemble"] == "toy_ens" and settings["packages"] == manifest["packages"]
    assert settings["dataset"] == "uwmgi" and settings["data_input"] == COMPETITION
    for part in ("code", "weights"):
        assert json.loads((out / part / "BUNDLE.json").read_text())["build_id"] == settings["build_id"]


def script_settings(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SETTINGS":
            return ast.literal_eval(node.value)
    raise AssertionError(f"no SETTINGS in {path}")


def test_build_id_follows_content_and_rebuild_replaces(toy, tmp_path: Path) -> None:
    cfg, wheels = toy
    first = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels)
    (first.root / "weights" / "stale.txt").write_text("left over")
    again = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels)
    assert again.build_id == first.build_id
    assert not (again.root / "weights" / "stale.txt").exists()
    best = Path(os.environ["RUNS_DIR"]) / "seg" / "toy_seg" / "fold_0" / "best.pt"
    best.write_text("retrained")
    assert (
        build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels).build_id
        != first.build_id
    )


def test_missing_run_names_the_file_and_target(toy, tmp_path: Path) -> None:
    cfg, wheels = toy
    tuned = Path(os.environ["RUNS_DIR"]) / "ensemble" / "toy_ens" / "postprocess.json"
    tuned.rename(tuned.with_suffix(".bak"))
    with pytest.raises(
        BundleError, match=r"postprocess\.json not found: run `make tune ENSEMBLE=configs/toy_ens.yaml`"
    ):
        build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels)
    assert not (tmp_path / "k").exists()
    tuned.with_suffix(".bak").rename(tuned)
    (Path(os.environ["RUNS_DIR"]) / "seg" / "toy_seg" / "fold_1" / "best.pt").unlink()
    with pytest.raises(
        BundleError,
        match=r"fold_1/best\.pt not found: run `make train-seg CONFIG=configs/toy_seg.yaml FOLDS=1`",
    ):
        build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels)


def test_ungated_classifier_is_not_shipped(toy, tmp_path: Path) -> None:
    cfg, wheels = toy
    tuned = Path(os.environ["RUNS_DIR"]) / "ensemble" / "toy_ens" / "postprocess.json"
    tuned.write_text(json.dumps(toy_decisions(gate=0.0)))
    out = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels).root
    assert not (out / "weights" / "runs" / "cls").exists()
    assert (out / "weights" / "runs" / "seg" / "toy_seg" / "fold_1" / "best.pt").is_file()


def test_render_entry_replaces_only_the_settings_block() -> None:
    template = ROOT / "kernels" / "kaggle_submit.py"
    settings = {
        "dataset": "uwmgi",
        "data_input": COMPETITION,
        "datasets": {"code": "c"},
        "ensemble": "e",
        "build_id": "b",
    }
    text = render_entry(settings, template)
    assert script_settings_text(text) == settings
    assert text.replace(script_block(text), "") == template.read_text().replace(
        script_block(template.read_text()), ""
    )


def script_block(text: str) -> str:
    start = text.index("# --- settings")
    return text[start : text.index("# --- end settings ---")]


def script_settings_text(text: str) -> dict:
    block = script_block(text)
    return ast.literal_eval(block[block.index("=") + 1 :].strip())


def test_user_name_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USER", "KAGGLE_USERNAME", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_user() is None
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "fromfile", "key": "k"}))
    assert resolve_user() == "fromfile"
    monkeypatch.setenv("KAGGLE_USERNAME", "fromenv")
    assert resolve_user() == "fromenv"
    monkeypatch.setenv("KAGGLE_USER", "fromuser")
    assert resolve_user() == "fromuser"
    assert resolve_user("explicit") == "explicit"


def test_build_without_user_uses_placeholder(toy, tmp_path: Path, monkeypatch, caplog) -> None:
    cfg, wheels = toy
    bundle = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user=None, wheels=wheels)
    meta = json.loads((bundle.root / "kernel" / "kernel-metadata.json").read_text())
    assert meta["id"] == f"{PLACEHOLDER_USER}/gi-tract-submit"
    assert "placeholder" in caplog.text


# --------------------------------------------------------------------------- push


@pytest.fixture
def built(toy, tmp_path: Path) -> Path:
    cfg, wheels = toy
    return build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "kaggle", user="alice", wheels=wheels).root


@pytest.fixture
def bare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials and no kaggle CLI anywhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    for var in (
        "KAGGLE_USER",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_API_TOKEN",
        "KAGGLE_CONFIG_DIR",
        "KAGGLE_CLI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(push_mod, "interpreter_bin", lambda: tmp_path / "empty-bin")
    return home


def push_failure(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        kernel_stage.main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


def test_push_says_what_is_missing(built: Path, bare_home: Path) -> None:
    message = push_failure(["push", "--out", str(built)])
    assert "kaggle CLI is not installed" in message and "pip install kaggle==2.2.5" in message
    assert f"{bare_home}/.kaggle/kaggle.json is missing" in message
    assert "KAGGLE_USERNAME" in message and "KAGGLE_KEY" in message
    assert "https://www.kaggle.com/settings" in message and "Create New Token" in message


def fake_cli(folder: Path, existing: tuple[str, ...]) -> Path:
    """A ``kaggle`` that logs its arguments; ``datasets status`` fails for unknown datasets."""
    folder.mkdir(parents=True, exist_ok=True)
    cli = folder / "kaggle"
    cli.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(folder / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:3] == ['datasets', 'status']:\n"
        f"    known = {list(existing)!r}\n"
        "    if sys.argv[3] not in known and sys.argv[3] not in open(__file__ + '.created').read():\n"
        "        print('404 - Not Found', file=sys.stderr); sys.exit(1)\n"
        "    print('ready')\n"
        "if sys.argv[1:3] == ['datasets', 'create']:\n"
        "    meta = json.load(open(sys.argv[sys.argv.index('-p') + 1] + '/dataset-metadata.json'))\n"
        "    open(__file__ + '.created', 'a').write(meta['id'] + '\\n')\n"
    )
    (folder / "kaggle.created").write_text("")
    cli.chmod(cli.stat().st_mode | stat.S_IEXEC)
    return folder / "calls.jsonl"


def test_push_creates_then_versions_then_pushes_kernel(
    built: Path, bare_home: Path, tmp_path, monkeypatch
) -> None:
    log = fake_cli(tmp_path / "bin", existing=("alice/gi-tract-wheels",))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (bare_home / ".kaggle").mkdir()
    (bare_home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "k"}))
    kernel_stage.main(["push", "--out", str(built), "--message", "v2"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    uploads = [c for c in calls if c[:2] != ["datasets", "status"]]
    assert uploads == [
        ["datasets", "create", "-p", str(built / "code"), "--dir-mode", "zip"],
        ["datasets", "create", "-p", str(built / "weights"), "--dir-mode", "zip"],
        ["datasets", "version", "-p", str(built / "wheels"), "-m", "v2", "--dir-mode", "zip"],
        ["kernels", "push", "-p", str(built / "kernel")],
    ]
    # the kernel goes only after every dataset reported ready
    last_status = max(i for i, c in enumerate(calls) if c[:2] == ["datasets", "status"])
    assert calls.index(["kernels", "push", "-p", str(built / "kernel")]) > last_status

    log.write_text("")  # a second push versions all three
    kernel_stage.main(["push", "--out", str(built), "--no-wait"])
    uploads = [json.loads(line)[:2] for line in log.read_text().splitlines()]
    assert [u for u in uploads if u[1] != "status"] == [["datasets", "version"]] * 3 + [["kernels", "push"]]


def test_push_refuses_placeholder_and_other_owner(toy, bare_home: Path, tmp_path, monkeypatch) -> None:
    cfg, wheels = toy
    fake_cli(tmp_path / "bin", existing=())
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("KAGGLE_API_TOKEN", "t")
    out = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user=None, wheels=wheels).root
    message = push_failure(["push", "--out", str(out)])
    assert "built without a Kaggle user name" in message and "KAGGLE_USER=" in message
    assert "not installed" not in message and "credentials" not in message
    out = build_bundle(cfg, get_dataset(cfg.dataset), tmp_path / "k", user="alice", wheels=wheels).root
    assert "built for 'alice', not 'bob'" in push_failure(["push", "--out", str(out), "--user", "bob"])
    assert not (tmp_path / "bin" / "calls.jsonl").exists()  # nothing was uploaded


# --------------------------------------------------------------------------- offline kernel run

SITECUSTOMIZE = '''\
"""Test harness: any network use is logged to $NET_AUDIT_LOG and fails."""
import os
import sys

_LOG = os.environ.get("NET_AUDIT_LOG")
_EVENTS = {"socket.connect", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}


def _hook(event, args):
    if event not in _EVENTS:
        return
    if event in ("socket.connect", "socket.sendto") and not isinstance(args[-1], tuple):
        return  # AF_UNIX: local inter-process plumbing, not the network
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {event} {args[1:] if event.startswith('socket.c') else args}\\n")
    raise OSError(f"network use in an offline kernel test: {event}")


if _LOG:
    sys.addaudithook(_hook)
'''


def kaggle_image(dest: Path, exclude: set[str]) -> Path:
    """A fresh venv standing in for the Kaggle image; returns its python.

    It sees every package of the project's environment (through a ``.pth`` to a folder of
    symlinks) except the distributions in ``exclude``, whose files (from their RECORD) are
    left out, so those can only come from the bundled wheels. A ``sitecustomize`` logs and
    refuses any network use.
    """
    import sysconfig
    import venv

    from packaging.utils import canonicalize_name

    venv.EnvBuilder(with_pip=False, symlinks=True).create(dest / "venv")
    python = dest / "venv" / "bin" / "python"
    source = Path(sysconfig.get_paths()["purelib"])
    excluded: set[Path] = set()
    for dist in importlib_metadata.distributions(path=[str(source)]):
        if canonicalize_name(dist.metadata["Name"] or "") in exclude:
            excluded |= {Path(os.path.normpath(f)) for f in dist.files or () if not str(f).startswith("..")}
    mixed = {parent for rel in excluded for parent in rel.parents if parent != Path(".")}
    image = dest / "image"

    def mirror(rel: Path) -> None:
        if rel in excluded:
            return
        if rel in mixed:  # a folder shared with an excluded distribution: link its other files
            for child in sorted((source / rel).iterdir()):
                if child.name != "__pycache__":
                    mirror(rel / child.name)
            return
        (image / rel).parent.mkdir(parents=True, exist_ok=True)
        (image / rel).symlink_to(source / rel)

    for child in sorted(source.iterdir()):
        mirror(Path(child.name))
    site_packages = (
        dest / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    (site_packages / "kaggle_image.pth").write_text(f"{image}\n")
    (site_packages / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return python


def unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode == 0


def run_offline(python: Path, script: Path, kaggle_root: Path, log: Path) -> subprocess.CompletedProcess:
    """Run ``script`` with no network (a network namespace when possible) and read-only inputs."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(kaggle_root.parent / "home"),
        "TMPDIR": str(kaggle_root / "tmp"),
        "KAGGLE_ROOT": str(kaggle_root),
        "PIP_CONFIG_FILE": os.devnull,
        "NET_AUDIT_LOG": str(log),
        "OMP_NUM_THREADS": "2",
        "PYTHONUNBUFFERED": "1",
    }
    for folder in ("home", "tmp"):
        Path(env["HOME" if folder == "home" else "TMPDIR"]).mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(script)]
    if unshare_works():
        inputs = str(kaggle_root / "input")
        shell = f'mount --bind "{inputs}" "{inputs}" && mount -o remount,bind,ro "{inputs}" && exec "$@"'
        cmd = ["unshare", "--net", "--mount", "--", "sh", "-c", shell, "sh", *cmd]
    return subprocess.run(cmd, env=env, cwd=kaggle_root / "working", capture_output=True, text=True)


def write_tiny_configs(folder: Path) -> Path:
    """A 1-epoch, 2-step, 64 px detector, classifier and 2.5D segmenter, and their ensemble."""
    folder.mkdir(parents=True, exist_ok=True)
    train = (
        "train: {epochs: 1, batch_size: 4, max_steps_per_epoch: 2, num_workers: 0, device: cpu, amp: false}\n"
    )
    data = "data: {img_size: [64, 64], det_config: k_det}\n"
    (folder / "k_det.yaml").write_text(
        "stage: det\ndet: {imgsz: 64, epochs: 1, batch: 8, slices_per_volume: 4, device: cpu, train_args: {nbs: 8}}\n"
    )
    (folder / "k_seg.yaml").write_text(
        "stage: seg\n" + data + train + "model: {arch: Unet, encoder: tu-mobilenetv3_small_050, "
        "kwargs: {decoder_channels: [32, 16, 8, 8, 4]}}\n"
    )
    (folder / "k_cls.yaml").write_text(
        "stage: cls\n" + data + train + "model: {arch: timm, encoder: mobilenetv3_small_050}\n"
    )
    (folder / "k_ens.yaml").write_text(
        "stage: ensemble\n"
        f"members: [{{config: {folder / 'k_seg.yaml'}}}]\n"
        f"classifier: {folder / 'k_cls.yaml'}\n"
        "det_config: k_det\n"
        "tta: {hflip: true}\n"
        "tune: {pixel_thresholds: [0.05], gate_thresholds: [0.0], min_component_sizes: [0], blend_steps: 1}\n"
        "device: cpu\namp: false\nbatch_size: 8\n"
    )
    return folder / "k_ens.yaml"


def test_built_kernel_runs_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real stages train a tiny ensemble; `stages.kernel build` bundles it; the built entry
    script runs in a stand-in Kaggle image with no network and read-only inputs, installs the
    bundled wheels, and writes the same submission as `make submit`."""
    import pandas as pd

    from pipeline.datasets.uwmgi_files import scan_split
    from pipeline.kaggle.wheels import WheelError, collect_wheels
    from pipeline.rle import rle_decode
    from stages import folds, make_data, submit, train_cls, train_det, train_seg, tune

    try:
        collect_wheels()  # into build/wheels-cache: downloaded once, reused afterwards
    except WheelError as exc:
        pytest.skip(f"the pinned wheels are not at hand and cannot be downloaded: {exc}")
    data = tmp_path / "data"
    for var, folder in (
        ("DATA_DIR", data),
        ("RUNS_DIR", tmp_path / "runs"),
        ("CACHE_DIR", tmp_path / "cache"),
    ):
        monkeypatch.setenv(var, str(folder))
    ensemble = write_tiny_configs(tmp_path / "configs")
    configs = ensemble.parent
    make_data.main(["--out", str(data), "--preset", "tiny"])
    folds.main(["--set", "n_folds=2"])
    train_det.main(["--config", str(configs / "k_det.yaml")])
    train_cls.main(["--config", str(configs / "k_cls.yaml"), "--folds", "0"])
    train_seg.main(["--config", str(configs / "k_seg.yaml"), "--folds", "0"])
    tuned = tune.main(["--config", str(ensemble)])
    decisions = json.loads(tuned.read_text())
    # a gate above 0 makes submit load the classifier; one this low gates nothing
    decisions["classes"]["stomach"]["gate_threshold"] = 1e-6
    tuned.write_text(json.dumps(decisions))
    reference = submit.main(["--config", str(ensemble), "--out", str(tmp_path / "reference.csv")])

    bundle = kernel_stage.main(
        ["build", "--config", str(ensemble), "--user", "tester", "--out", str(tmp_path / "b")]
    )
    kaggle = tmp_path / "kaggle"
    settings = script_settings(bundle / "kernel" / "kaggle_submit.py")
    for part, slug in settings["datasets"].items():
        shutil.copytree(bundle / part, kaggle / "input" / slug)
    mounted = kaggle / "input" / settings["data_input"]
    mounted.mkdir(parents=True)
    for name in ("train", "test", "train.csv", "sample_submission.csv"):  # what Kaggle mounts, no more
        copy = shutil.copytree if (data / name).is_dir() else shutil.copy2
        copy(data / name, mounted / name)
    (kaggle / "working").mkdir()
    manifest = json.loads((bundle / "wheels" / "manifest.json").read_text())
    python = kaggle_image(tmp_path / "image", set(manifest["packages"]) | set(manifest["support"]))
    lacking = subprocess.run([str(python), "-c", "import segmentation_models_pytorch"], capture_output=True)
    assert lacking.returncode != 0, "the stand-in image must lack what the wheels bring"

    net_log = tmp_path / "network.log"
    result = run_offline(python, bundle / "kernel" / "kaggle_submit.py", kaggle, net_log)
    assert result.returncode == 0, f"kernel failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    assert not net_log.exists(), f"the kernel used the network:\n{net_log.read_text()}"
    assert "1 classifier folds" in result.stderr and "detectors ['k_det']" in result.stderr
    installed = next(line for line in result.stdout.splitlines() if "installing from" in line)
    assert all(f"{name}=={version}" in installed for name, version in manifest["packages"].items())

    written = pd.read_csv(kaggle / "working" / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(written.columns) == ["id", "class", "predicted"]
    assert written[["id", "class"]].equals(sample[["id", "class"]])
    shapes = {row.id: (row.height, row.width) for row in scan_split(data, "test").itertuples()}
    for row in written.itertuples():
        rle_decode(row.predicted, shapes[row.id], where=f"{row.id} {row._2}")  # raises when invalid
    assert (written["predicted"] != "").any(), "an all-empty submission proves little"
    assert written.equals(pd.read_csv(reference, dtype=str, keep_default_na=False))


# --------------------------------------------------------------------------- members from the weights cache


def write_pretrained_configs(folder: Path) -> Path:
    """A 64 px segmenter from ImageNet (its first encoder stage frozen), no crop, and its ensemble."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "k_seg.yaml").write_text(
        "stage: seg\ndata: {img_size: [64, 64], crop: false}\n"
        "train: {epochs: 1, batch_size: 4, max_steps_per_epoch: 2, num_workers: 0, device: cpu, amp: false}\n"
        "model: {arch: Unet, encoder: tu-mobilenetv3_small_050, encoder_weights: imagenet, freeze_encoder: 1, "
        "kwargs: {decoder_channels: [32, 16, 8, 8, 4]}}\n"
    )
    (folder / "k_ens.yaml").write_text(
        f"stage: ensemble\nmembers: [{{config: {folder / 'k_seg.yaml'}}}]\nclassifier: null\ndet_config: null\n"
        "tta: {hflip: true}\ndevice: cpu\namp: false\nbatch_size: 8\n"
        "tune: {pixel_thresholds: [0.05], gate_thresholds: [0.0], min_component_sizes: [0], blend_steps: 1}\n"
    )
    return folder / "k_ens.yaml"


def test_bundle_of_pretrained_members_runs_without_the_weights_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member that started from the weights cache (an "ImageNet" entry made here from a random timm
    model) is bundled with configs naming no starting weights; with the cache gone, `make submit`
    over the bundled runs writes the submission the original runs wrote (the checkpoints carry every
    weight)."""
    import pandas as pd
    import timm

    from pipeline.models.weights import WeightsRequest, store
    from stages import folds, make_data, submit, train_seg, tune

    for var, folder in (
        ("DATA_DIR", "data"),
        ("RUNS_DIR", "runs"),
        ("CACHE_DIR", "cache"),
        ("WEIGHTS_DIR", "w"),
    ):
        monkeypatch.setenv(var, str(tmp_path / folder))
    store(WeightsRequest("timm", "mobilenetv3_small_050", "imagenet"),
          timm.create_model("mobilenetv3_small_050").state_dict(), "made in this test")  # fmt: skip
    configs = tmp_path / "configs"
    ensemble = write_pretrained_configs(configs)
    make_data.main(["--out", str(tmp_path / "data"), "--preset", "tiny"])
    folds.main(["--set", "n_folds=2"])
    train_seg.main(["--config", str(configs / "k_seg.yaml"), "--folds", "0"])
    tune.main(["--config", str(ensemble)])
    reference = submit.main(["--config", str(ensemble), "--out", str(tmp_path / "reference.csv")])

    out = build_bundle(
        load_config(ensemble),
        get_dataset("uwmgi"),
        tmp_path / "b",
        user="t",
        wheels=fake_wheels(tmp_path / "wh"),
    ).root
    shipped = load_config(out / "weights" / "runs" / "seg" / "k_seg" / "fold_0" / "config.yaml", stage="seg")
    start = shipped.model
    assert (start.encoder_weights, start.pretrained_path, start.freeze_encoder) == (None, None, 0)
    assert load_config(out / "code" / "configs" / "k_seg.yaml", stage="seg").model.encoder_weights is None
    trained = load_config(tmp_path / "runs" / "seg" / "k_seg" / "fold_0" / "config.yaml", stage="seg")
    assert dataclasses.replace(shipped, model=trained.model) == trained  # nothing else changed

    shutil.rmtree(tmp_path / "w")  # no weights cache where the kernel runs
    monkeypatch.setenv("RUNS_DIR", str(out / "weights" / "runs"))
    bundled = submit.main(
        ["--config", str(out / "code" / "configs" / "k_ens.yaml"), "--out", str(tmp_path / "k.csv")]
    )
    read = lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)  # noqa: E731
    assert read(bundled).equals(read(reference)) and (read(reference)["predicted"] != "").any()
