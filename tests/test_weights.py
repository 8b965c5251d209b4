"""Pretrained starting weights, offline: a weights file made here and placed in a temporary cache
(with its manifest) is loaded into the encoder (tensors equal afterwards); a damaged one is caught by
its sha256; a missing entry stops the stage before any data is read, naming the encoder, the cache
and the command; freezing random stages and ImageNet for MONAI's 3D networks are refused at load;
`make weights` (its library calls stubbed: no network here) fills the cache once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_errors import one_line_error

from pipeline.config import ConfigError, DetParams, ModelCfg, load_config
from pipeline.models import fetch_weights as fetch_mod
from pipeline.models.classifier import build_classifier
from pipeline.models.detector import det_request, pretrained_net, transfer_weights
from pipeline.models.registry import check_model, model_request
from pipeline.models.segmenter import build_segmenter
from pipeline.models.segmenter3d import build_segmenter3d
from pipeline.models.weights import MANIFEST, WeightsError, WeightsRequest, read_manifest, sha256_file, store
from stages import train_seg
from stages import weights as weights_stage

TINY = "mobilenetv3_small_050"  # a ~0.6M-parameter timm model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "weights"
    monkeypatch.setenv("WEIGHTS_DIR", str(root))
    return root


def timm_state(name: str = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()


def smp_state(name: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    return smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=None).state_dict()


# --------------------------------------------------------------------------- loading from the cache


def test_tu_encoder_and_timm_classifier_start_from_the_cached_model(cache: Path) -> None:
    saved = timm_state()
    entry = store(WeightsRequest("timm", TINY, "imagenet"), saved, "made in this test", cache)
    assert (
        entry["sha256"] == sha256_file(cache / entry["file"]) and read_manifest(cache)[entry["key"]] == entry
    )

    cfg = ModelCfg(arch="Unet", encoder=f"tu-{TINY}", encoder_weights="imagenet")
    seg = build_segmenter(cfg, in_channels=5).state_dict()
    shared = [k for k in saved if f"encoder.model.{k}" in seg and not k.startswith("conv_stem")]
    assert len(shared) > 100 and all(torch.equal(seg[f"encoder.model.{k}"], saved[k]) for k in shared)
    stem, rgb = seg["encoder.model.conv_stem.weight"], saved["conv_stem.weight"]
    assert torch.allclose(stem, torch.cat([rgb, rgb], 1)[:, :5] * 3 / 5)  # timm's rule: repeated, rescaled
    fresh = build_segmenter(cfg, in_channels=5, pretrained=False).state_dict()  # random: cache not read
    key = "blocks.0.0.conv_dw.weight"
    assert not torch.equal(fresh[f"encoder.model.{key}"], saved[key])

    cls = build_classifier(ModelCfg(arch="timm", encoder=TINY, encoder_weights="imagenet"), in_channels=3)
    got = cls.state_dict()
    body = [k for k in saved if not k.startswith("classifier")]
    assert all(torch.equal(got[k], saved[k]) for k in body)
    assert got["classifier.weight"].shape[0] == 3  # its own head, not ImageNet's 1000 classes


def test_smp_encoder_starts_from_the_cached_encoder(cache: Path) -> None:
    saved = smp_state("resnet18")
    store(WeightsRequest("smp", "resnet18", "imagenet"), saved, "made in this test", cache)
    model = build_segmenter(
        ModelCfg(arch="FPN", encoder="resnet18", encoder_weights="imagenet"), in_channels=3
    )
    got = model.state_dict()
    assert all(torch.equal(got[f"encoder.{k}"], v) for k, v in saved.items())
    assert (
        model_request(ModelCfg(encoder="resnet18", encoder_weights="imagenet"), "seg").key
        == "smp/resnet18.imagenet"
    )
    assert model_request(ModelCfg(encoder="resnet18"), "seg") is None


def test_damaged_cache_file_is_caught_by_its_sha256(cache: Path) -> None:
    entry = store(WeightsRequest("timm", TINY, "imagenet"), timm_state(), "made in this test", cache)
    path = cache / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    cfg = ModelCfg(arch="Unet", encoder=f"tu-{TINY}", encoder_weights="imagenet")
    with pytest.raises(WeightsError, match=r"are damaged \(size or sha256 differs"):
        build_segmenter(cfg, in_channels=3)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(WeightsError, match="damaged"):
        check_model(cfg, "seg")


def test_missing_cache_stops_the_stage_before_any_data(
    cache: Path, isolated_dirs: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("DATA_DIR", str(isolated_dirs / "nothing-here"))
    argv = ["--config", "demo_seg", "--set", "model.encoder_weights=imagenet", "model.encoder=tu-resnet10t"]
    line = one_line_error(capsys, "train_seg", train_seg.main, argv)
    for part in ("demo_seg: ", "model.encoder_weights", "timm 'resnet10t'", str(cache), "make weights"):
        assert part in line, part
    assert "WEIGHTS_DIR=/kaggle/input/" in line and "kaggle datasets create" in line
    assert not (isolated_dirs / "cache").exists() and "folds" not in line  # before the data was looked at


# --------------------------------------------------------------------------- refused at load


def test_freeze_needs_pretrained_weights(tmp_path: Path) -> None:
    frozen = ["model.freeze_encoder=2", "model.encoder=resnet50", "model.arch=Unet"]
    with pytest.raises(ConfigError, match=r"'model.freeze_encoder' = 2 would freeze randomly initialised"):
        load_config("demo_seg", frozen)
    assert load_config("demo_seg", [*frozen, "model.encoder_weights=imagenet"]).model.freeze_encoder == 2
    assert load_config("demo_seg", [*frozen, f"model.pretrained_path={tmp_path / 'own.pt'}"])
    assert load_config("lgg_full_unet_vgg16_frozen").model.encoder_weights == "imagenet"
    with pytest.raises(ConfigError, match="both set"):
        load_config("demo_seg", ["model.encoder_weights=imagenet", "model.pretrained_path=/w.pt"])
    with pytest.raises(ConfigError, match=r"'model.encoder_weights' = 'ssl' must be one of imagenet"):
        load_config("demo_seg", ["model.encoder_weights=ssl"])


def test_monai_3d_networks_refuse_imagenet() -> None:
    with pytest.raises(ConfigError, match="MONAI's 3D networks have no ImageNet weights"):
        load_config("demo_seg3d", ["model.encoder_weights=imagenet"])
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_segmenter3d(
            ModelCfg(arch="SegResNet", spatial_dims=3, encoder_weights="imagenet"), 1, 3, (16, 32, 32)
        )


def test_full_configs_start_from_imagenet_demo_configs_stay_random() -> None:
    from pipeline.datasets import load_config as load

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        cfg = load(path)
        full = path.name.startswith(("full_", "t4x2_", "lgg_full_", "nerve_full_"))
        if cfg.stage in ("seg", "cls") and cfg.model.spatial_dims == 2:
            assert cfg.model.encoder_weights == ("imagenet" if full else None), path.name
        elif cfg.stage == "det":
            assert cfg.det.pretrained == ("coco" if full else None), path.name


# --------------------------------------------------------------------------- the detector


def test_detector_starts_from_cached_coco_weights(cache: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    params = DetParams(model="yolov8n.yaml", pretrained="coco")
    request = det_request(params)
    assert request.key == "ultralytics/yolov8n.coco"
    torch.manual_seed(0)
    coco = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    store(request, coco.state_dict(), "made in this test", cache)
    net = pretrained_net(params)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in coco.state_dict().items())
    body = DetectionModel("yolov8n.yaml", nc=1, verbose=False)  # what the trainer builds for one class
    fresh = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    copied = transfer_weights(body, net)
    own, src = body.state_dict(), coco.state_dict()
    same = [k for k in own if k in src and own[k].shape == src[k].shape]
    assert copied == len(same) and len(same) < len(own)  # the class branch stays the trainer's own
    assert all(own[k].shape == v.shape for k, v in fresh.state_dict().items())  # what model.yaml rebuilds
    assert all(torch.equal(own[k], src[k].to(own[k].dtype)) for k in same)


def test_train_det_starts_from_cached_coco_weights(cache: Path, isolated_dirs: Path) -> None:
    """1 epoch through ultralytics' trainer: its new 1-class model takes the cached weights first, and
    the exported net still rebuilds from its model.yaml (BodyDetector.load inside train_det)."""
    from test_detector import write_body_dataset
    from ultralytics.nn.tasks import DetectionModel

    from stages import train_det

    store(
        WeightsRequest("ultralytics", "yolov8n", "coco"),
        DetectionModel("yolov8n.yaml", nc=80, verbose=False).state_dict(),
        "test",
        cache,
    )
    data = write_body_dataset(isolated_dirs / "data")
    sets = [f"data.data_dir={data}", "det.epochs=1", "det.imgsz=64", "det.batch=4", "det.slices_per_volume=4"]
    out = train_det.main(["--config", "demo_det", "--set", *sets, "det.pretrained=coco"])
    assert json.loads((out / "metrics.json").read_text())["pretrained_tensors"] > 300


# --------------------------------------------------------------------------- `make weights`, stubbed


def write_configs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w_det.yaml").write_text("stage: det\ndet: {model: yolov8n.yaml, pretrained: coco}\n")
    (folder / "w_seg.yaml").write_text(
        f"stage: seg\ndata: {{det_config: {folder / 'w_det.yaml'}}}\n"
        f"model: {{arch: Unet, encoder: tu-{TINY}, encoder_weights: imagenet}}\n"
    )
    (folder / "w_seg2.yaml").write_text(
        "stage: seg\nmodel: {arch: FPN, encoder: resnet18, encoder_weights: imagenet}\n"
    )
    (folder / "w_cls.yaml").write_text(
        f"stage: cls\nmodel: {{arch: timm, encoder: {TINY}, encoder_weights: imagenet}}\n"
    )
    (folder / "w_ens.yaml").write_text(
        f"stage: ensemble\nmembers: [{{config: {folder / 'w_seg.yaml'}}}, {{config: {folder / 'w_seg2.yaml'}}}]\n"
        f"classifier: {folder / 'w_cls.yaml'}\ndet_config: null\n"
    )
    return folder / "w_ens.yaml"


@pytest.fixture
def stubbed_libraries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """smp's, timm's and ultralytics' download calls answered locally (random weights); logs those that
    would download (weights named, pretrained=True, a .pt file)."""
    import segmentation_models_pytorch as smp
    import timm
    import ultralytics

    calls: list[str] = []
    real_encoder, real_timm, real_yolo = smp.encoders.get_encoder, timm.create_model, ultralytics.YOLO

    def get_encoder(name, in_channels=3, depth=5, weights=None, **kw):
        if weights is not None:
            calls.append(f"smp {name} {weights}")
        return real_encoder(name, in_channels=in_channels, depth=depth, weights=None, **kw)

    def create_model(name, pretrained=False, **kw):
        if pretrained:
            calls.append(f"timm {name} {pretrained}")
        return real_timm(name, pretrained=False, **kw)

    def yolo(model, task=None):
        if str(model).endswith(".pt"):  # the .pt download: a fresh net of that size instead
            calls.append(f"ultralytics {Path(model).name}")
            return real_yolo(Path(model).stem + ".yaml", task=task)
        return real_yolo(model, task=task)

    monkeypatch.setattr(smp.encoders, "get_encoder", get_encoder)
    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(ultralytics, "YOLO", yolo)
    monkeypatch.setattr(fetch_mod, "allow_downloads", lambda: None)  # the test process stays offline
    monkeypatch.setattr(weights_stage, "allow_downloads", lambda: None)
    return calls


def test_make_weights_fills_the_cache_once(
    tmp_path: Path, cache: Path, stubbed_libraries: list[str], capsys
) -> None:
    ensemble = write_configs(tmp_path / "configs")
    assert weights_stage.main([str(ensemble)]) == cache
    assert sorted(stubbed_libraries) == [
        "smp resnet18 imagenet",
        f"timm {TINY} True",
        "ultralytics yolov8n.pt",
    ]
    manifest = json.loads((cache / MANIFEST).read_text())["entries"]
    assert sorted(manifest) == ["smp/resnet18.imagenet", f"timm/{TINY}.imagenet", "ultralytics/yolov8n.coco"]
    for entry in manifest.values():
        path = cache / entry["file"]
        assert entry["sha256"] == sha256_file(path) and entry["size"] == path.stat().st_size
    assert manifest["smp/resnet18.imagenet"]["source"].startswith("huggingface.co/smp-hub/resnet18.imagenet")
    printed = capsys.readouterr().out
    assert printed.count("fetched") == 3

    # what it wrote is what the builders read
    seg = load_config(tmp_path / "configs" / "w_seg.yaml")
    check_model(seg.model, "seg")
    build_segmenter(seg.model, in_channels=3)

    weights_stage.main([str(ensemble)])  # complete: nothing fetched again
    assert len(stubbed_libraries) == 3 and capsys.readouterr().out.count("cached") == 3
    weights_stage.main([str(tmp_path / "configs" / "w_cls.yaml"), "--force"])
    assert stubbed_libraries[-1] == f"timm {TINY} True"


def test_make_weights_without_network_is_one_line(
    tmp_path: Path, cache: Path, stubbed_libraries, capsys, monkeypatch
) -> None:
    import timm

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm, "create_model", offline)
    write_configs(tmp_path / "configs")
    line = one_line_error(capsys, "weights", weights_stage.main, [str(tmp_path / "configs" / "w_cls.yaml")])
    assert f"could not fetch the imagenet weights of timm '{TINY}'" in line and "needs internet" in line
    assert not (cache / MANIFEST).exists()
