"""`make download`: a stand-in ``kaggle`` executable on PATH (written here) serves archives in the
real Kaggle layouts; the stage unpacks them safely, finds the dataset's folder, checks it with the
dataset's own scanner, does not fetch a complete folder twice, refuses zip-slip members with nothing
written, and turns each failure of the CLI into one line. No network is used."""

from __future__ import annotations

import json
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest
from layout import write_dataset

from pipeline.datasets import get_dataset
from pipeline.kaggle import push as push_mod
from pipeline.kaggle.download import MARKER
from stages import download, make_data
from stages._cli import run_cli

# what the real CLI prints on these failures (kaggle 2.2.5: HTTPError text, then its hint)
FAILURES = {
    "403": "403 Client Error: Forbidden for url: https://www.kaggle.com/api/v1/competitions/data/download-all/x\n\n"
    "You don't have access to this resource.\nIf this is a competition, you may need to accept its rules first",
    "401": "Authentication required to call the Kaggle API.\n\nFirst, you will need a Kaggle account.",
    "offline": "ConnectionError: HTTPSConnectionPool(host='www.kaggle.com', port=443): Max retries exceeded with "
    "url: /api/v1/x (Caused by NameResolutionError(\"Failed to resolve 'www.kaggle.com' ([Errno -3] "
    'Temporary failure in name resolution)"))',
}


# --------------------------------------------------------------------------- the stand-in CLI


def stand_in(bin_dir: Path, archive: Path | None, mode: str = "ok") -> Path:
    """A ``kaggle`` that logs its arguments and writes ``archive`` as ``<slug>.zip`` into ``-p``
    (``partial``: its first half), or fails as the real one does (``403``, ``401``, ``offline``)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "calls.jsonl"
    cli = bin_dir / "kaggle"
    cli.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"mode, failures = {mode!r}, {FAILURES!r}\n"
        "if mode in failures:\n"
        "    print(failures[mode], file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "args = sys.argv[1:]\n"
        "slug = args[args.index('-c') + 1] if '-c' in args else args[args.index('-d') + 1].split('/')[-1]\n"
        f"data = open({str(archive)!r}, 'rb').read()\n"
        "if mode == 'partial':\n"
        "    data = data[: len(data) // 2]\n"
        "dest = args[args.index('-p') + 1]\n"
        "os.makedirs(dest, exist_ok=True)\n"
        "open(os.path.join(dest, slug + '.zip'), 'wb').write(data)\n"
        "print('Downloading ' + slug + '.zip: 100%')\n"
    )
    cli.chmod(cli.stat().st_mode | stat.S_IEXEC)
    return calls


def zip_folder(archive: Path, files: dict[str, Path | bytes]) -> Path:
    """A zip holding ``files`` (member name -> file or bytes)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            if isinstance(content, Path):
                zf.write(content, name)
            else:
                zf.writestr(name, content)
    return archive


def tree(folder: Path, under: str = "", skip: tuple[str, ...] = ()) -> dict[str, Path]:
    return {
        under + p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(skip)
    }


@pytest.fixture
def kaggle_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Credentials in ~/.kaggle/kaggle.json, the stand-in's folder first on PATH; returns that folder."""
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "KAGGLE_CLI"):
        monkeypatch.delenv(var, raising=False)
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(push_mod, "interpreter_bin", lambda: tmp_path / "no-bin")
    return bin_dir


def phantom(tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"phantom-{name}"
    get_dataset(name).phantom().generate(out, "tiny", seed=0, workers=1)
    return out


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert run_cli("download", download.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("download: error: ")]
    assert len(errors) == 1
    return errors[0]


# --------------------------------------------------------------------------- real layouts


@pytest.mark.parametrize("top", ["", "lgg-mri-segmentation/"])
def test_lgg_dataset_zip_unpacks_reads_and_is_not_fetched_twice(
    tmp_path: Path, kaggle_env: Path, capsys, top: str
) -> None:
    source = phantom(tmp_path, "lgg")
    archive = zip_folder(tmp_path / "lgg.zip", tree(source / "kaggle_3m", f"{top}kaggle_3m/"))
    calls = stand_in(kaggle_env, archive)
    out = tmp_path / "data" / "lgg"
    assert download.main(["--dataset", "lgg", "--out", str(out)]) == out
    printed = capsys.readouterr().out
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        [
            "datasets",
            "download",
            "-d",
            "mateuszbuda/lgg-mri-segmentation",
            "-p",
            str(out.parent / ".lgg.download"),
        ]
    ]
    spec = get_dataset("lgg")
    expected = spec.load_split(source, "train")
    got = spec.load_split(out, "train")
    assert list(got["id"]) == list(expected["id"]) and (out / "kaggle_3m").is_dir()
    assert (out / MARKER).is_file() and not (out.parent / ".lgg.download").exists()
    groups = expected["group"].nunique()
    assert f"train: {groups} groups, {groups} volumes, {len(expected)} images" in printed
    assert "test : no images" in printed

    download.main(["--dataset", "lgg", "--out", str(out)])  # complete: the CLI is not called again
    assert len(calls.read_text().splitlines()) == 1
    assert make_data.main(["--dataset", "lgg", "--out", str(out)]) == out  # `make data` leaves it alone
    assert not (out / "dataset.json").exists()


def test_nerve_competition_zip_of_zips(tmp_path: Path, kaggle_env: Path, capsys) -> None:
    source = phantom(tmp_path, "nerve")
    parts = tmp_path / "parts"
    inner = {
        "train.zip": zip_folder(parts / "train.zip", tree(source / "train", "train/")),  # a folder inside
        "test.zip": zip_folder(parts / "test.zip", tree(source / "test")),  # loose files
        "train_masks.csv.zip": zip_folder(parts / "m.zip", {"train_masks.csv": source / "train_masks.csv"}),
        "sample_submission.csv.zip": zip_folder(
            parts / "s.zip", {"sample_submission.csv": source / "sample_submission.csv"}
        ),
    }
    stand_in(kaggle_env, zip_folder(tmp_path / "nerve.zip", inner))
    out = tmp_path / "nerve"
    download.main(["--dataset", "nerve", "--out", str(out)])
    spec = get_dataset("nerve")
    assert list(spec.load_split(out, "train")["id"]) == list(spec.load_split(source, "train")["id"])
    assert list(spec.scan(out, "test")["id"]) == list(spec.scan(source, "test")["id"])
    assert not list(out.rglob("*.zip"))
    printed = capsys.readouterr().out
    assert "with a label (" in printed and "test : 1 groups" in printed


def test_uwmgi_competition_zip(tmp_path: Path, kaggle_env: Path) -> None:
    source = write_dataset(tmp_path / "uw", {1: [0], 2: [0, 1]}, n_slices=3)
    calls = stand_in(kaggle_env, zip_folder(tmp_path / "uw.zip", tree(source)))
    out = tmp_path / "uwmgi"
    download.main(["--dataset", "uwmgi", "--out", str(out)])
    assert json.loads(calls.read_text().splitlines()[0])[:4] == [
        "competitions",
        "download",
        "-c",
        "uw-madison-gi-tract-image-segmentation",
    ]
    assert len(get_dataset("uwmgi").load_split(out, "train")) == 9


# --------------------------------------------------------------------------- refusals


def _outer_with_inner(tmp_path: Path, member: str) -> dict[str, Path | bytes]:
    inner = zip_folder(tmp_path / "inner.zip", {member: b"evil", "train/ok.txt": b"fine"})
    return {"train.zip": inner, "train_masks.csv": b"subject,img,pixels\n"}


@pytest.mark.parametrize(
    "members",
    [
        {"kaggle_3m/ok.txt": b"fine", "../evil.txt": b"evil"},
        {"kaggle_3m/ok.txt": b"fine", "kaggle_3m/../../../evil.txt": b"evil"},
        {"kaggle_3m/ok.txt": b"fine", "/tmp/evil.txt": b"evil"},
        "nested",
    ],
    ids=["dotdot", "deep-dotdot", "absolute", "nested-dotdot"],
)
def test_zip_slip_member_refuses_the_archive(tmp_path: Path, kaggle_env: Path, capsys, members) -> None:
    dataset = "lgg"
    if members == "nested":
        members, dataset = _outer_with_inner(tmp_path, "../../evil.txt"), "nerve"
    archive = tmp_path / "src" / "evil.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:  # writestr keeps the names as given
        for name, content in members.items():
            zf.writestr(name, content.read_bytes() if isinstance(content, Path) else content)
    stand_in(kaggle_env, archive)
    out = tmp_path / "data" / dataset
    line = one_line_error(capsys, ["--dataset", dataset, "--out", str(out)])
    assert "refusing the whole archive" in line and "evil.txt" in line
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/evil.txt").exists()
    assert not out.exists()


def test_cli_failures_are_one_line(tmp_path: Path, kaggle_env: Path, capsys) -> None:
    source = phantom(tmp_path, "lgg")
    archive = zip_folder(tmp_path / "lgg.zip", tree(source / "kaggle_3m", "kaggle_3m/"))
    out = ["--dataset", "uwmgi", "--out", str(tmp_path / "uw")]
    stand_in(kaggle_env, archive, "403")
    line = one_line_error(capsys, out)
    assert (
        "403" in line
        and "https://www.kaggle.com/competitions/uw-madison-gi-tract-image-segmentation/rules" in line
    )
    stand_in(kaggle_env, archive, "401")
    assert "refused the credentials" in one_line_error(capsys, out)
    stand_in(kaggle_env, archive, "offline")
    assert "no network" in one_line_error(capsys, out)

    stand_in(kaggle_env, archive, "partial")
    lgg = ["--dataset", "lgg", "--out", str(tmp_path / "lgg")]
    assert "partial or damaged archive" in one_line_error(capsys, lgg)
    (tmp_path / ".lgg.download" / "lgg-mri-segmentation.zip").unlink()  # as the message says
    stand_in(kaggle_env, archive)
    download.main(lgg)  # fetched whole this time
    assert (tmp_path / "lgg" / MARKER).is_file()


def test_layouts_that_do_not_scan(tmp_path: Path, kaggle_env: Path, capsys) -> None:
    stand_in(kaggle_env, zip_folder(tmp_path / "a.zip", {"images/x.tif": b"x"}))
    line = one_line_error(capsys, ["--dataset", "lgg", "--out", str(tmp_path / "a")])
    assert "holds no 'kaggle_3m/' folder" in line and "images" in line
    stand_in(kaggle_env, zip_folder(tmp_path / "b.zip", {"kaggle_3m/not_a_patient/x.tif": b"x"}))
    line = one_line_error(capsys, ["--dataset", "lgg", "--out", str(tmp_path / "b")])
    assert "does not read as LGG" in line and "TCGA_" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_credentials_cli_and_occupied_folder(
    tmp_path: Path, kaggle_env: Path, capsys, monkeypatch
) -> None:
    argv = ["--dataset", "nerve", "--out", str(tmp_path / "nerve")]
    (Path(os.environ["HOME"]) / ".kaggle" / "kaggle.json").unlink()
    stand_in(kaggle_env, None)
    line = one_line_error(capsys, argv)
    assert "no Kaggle credentials" in line and ".kaggle/kaggle.json" in line and "KAGGLE_KEY" in line
    monkeypatch.setenv("KAGGLE_USERNAME", "u")
    monkeypatch.setenv("KAGGLE_KEY", "k")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "kaggle CLI is not installed" in one_line_error(capsys, argv)

    phantom_folder = phantom(tmp_path, "nerve")  # the phantom of `make data` is never replaced
    line = one_line_error(capsys, ["--dataset", "nerve", "--out", str(phantom_folder)])
    assert "synthetic phantom" in line and (phantom_folder / "dataset.json").is_file()
