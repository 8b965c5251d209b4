"""Model factories: shapes per architecture, loud unknown names, local pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, ModelCfg
from pipeline.models.classifier import EncoderClassifier, build_classifier
from pipeline.models.registry import PretrainedError, seg_arch, seg_archs
from pipeline.models.segmenter import build_segmenter

TINY = "tu-mobilenetv3_small_050"  # a ~0.6M-parameter timm encoder
ARCH_KWARGS = {
    "DPT": {
        "decoder_intermediate_channels": [16, 32, 64, 64],
        "decoder_fusion_channels": 32,
        "decoder_readout": "ignore",
    }
}
ARCH_SIZE = {"PAN": 128}  # PAN's pyramid attention pools the stride-32 map down further: >= 128 px


def make_seg(seed: int, in_channels: int = 3, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelCfg(**{"arch": "Unet", "encoder": TINY, **kw})
    return build_segmenter(cfg, in_channels=in_channels).eval()


def same(a: nn.Module, b: nn.Module, prefix: str = "") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    assert keys
    return all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN"])
@pytest.mark.parametrize("in_channels", [3, 5])
def test_segmenter_returns_logits_per_class(arch: str, in_channels: int) -> None:
    model = build_segmenter(ModelCfg(arch=arch, encoder=TINY), in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    assert out.min() < 0 < out.max()  # logits, no activation


def test_architectures_are_read_from_smp() -> None:
    import segmentation_models_pytorch as smp

    assert {a.lower() for a in seg_archs()} == set(smp.MODEL_ARCHITECTURES_MAPPING)
    assert {"Unet", "UnetPlusPlus", "FPN", "DPT"} <= set(seg_archs())  # canonical class names


@pytest.mark.parametrize("arch", seg_archs())
def test_every_smp_architecture_builds_and_keeps_the_input_size(arch: str) -> None:
    size = ARCH_SIZE.get(arch, 64)
    cfg = ModelCfg(arch=arch.lower(), encoder=TINY, kwargs=ARCH_KWARGS.get(arch, {}))
    model = build_segmenter(cfg, in_channels=3, classes=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 2, size, size)


def test_segmenter_kwargs_reach_the_constructor() -> None:
    cfg = ModelCfg(arch="Unet", encoder=TINY, kwargs={"decoder_channels": [32, 16, 8, 8, 4]})
    model = build_segmenter(cfg, in_channels=3)
    assert model.segmentation_head[0].in_channels == 4


@pytest.mark.parametrize(
    ("arch", "encoder"), [("timm", "resnet18"), ("timm", "mobilenetv3_small_050"), ("Unet", TINY)]
)
def test_classifier_returns_one_logit_per_class(arch: str, encoder: str) -> None:
    model = build_classifier(ModelCfg(arch=arch, encoder=encoder, dropout=0.2), in_channels=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 5, 64, 64))
    assert out.shape == (2, 3)


def test_unknown_names_list_the_valid_ones() -> None:
    assert seg_arch("unetplusplus") == "UnetPlusPlus"  # names are case-insensitive
    with pytest.raises(ConfigError, match=r"Unknet.*Unet, UnetPlusPlus, .*FPN"):
        build_segmenter(ModelCfg(arch="Unknet"), in_channels=3)
    with pytest.raises(ConfigError, match=r"valid: timm, Unet"):
        build_classifier(ModelCfg(arch="resnet"), in_channels=3)
    with pytest.raises(ValueError, match="no_such_encoder"):
        build_segmenter(ModelCfg(arch="Unet", encoder="tu-no_such_encoder"), in_channels=3)


def test_full_model_weights_round_trip(tmp_path: Path) -> None:
    source, fresh = make_seg(0), make_seg(1)
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(source(x), fresh(x))
    path = tmp_path / "full.pt"
    torch.save(source.state_dict(), path)
    loaded = make_seg(1, pretrained_path=str(path))
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_checkpoint_dict_and_encoder_only_files(tmp_path: Path) -> None:
    source = make_seg(0)
    torch.save({"model": source.state_dict(), "epoch": 3, "score": 0.5}, tmp_path / "best.pt")
    assert same(source, make_seg(1, pretrained_path=str(tmp_path / "best.pt")))
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pt")
    loaded = make_seg(1, pretrained_path=str(tmp_path / "encoder.pt"))
    assert same(source, loaded, "encoder.")
    assert not same(source, loaded, "decoder.")  # the decoder keeps its own init


def test_bare_timm_weights_fit_a_tu_encoder_with_other_in_channels(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    bare = timm.create_model(TINY.removeprefix("tu-"), pretrained=False)
    torch.save(bare.state_dict(), tmp_path / "timm.pt")
    model = make_seg(1, in_channels=5, pretrained_path=str(tmp_path / "timm.pt"))
    sd = model.state_dict()
    assert torch.equal(
        sd["encoder.model.blocks.0.0.conv_dw.weight"], bare.state_dict()["blocks.0.0.conv_dw.weight"]
    )
    assert sd["encoder.model.conv_stem.weight"].shape[1] == 5  # adapted from 3 input channels


def test_convnext_flattened_feature_names_match(tmp_path: Path) -> None:
    import timm

    bare = timm.create_model("convnext_atto", pretrained=False)
    torch.save(bare.state_dict(), tmp_path / "timm.pt")
    cfg = ModelCfg(arch="FPN", encoder="tu-convnext_atto", pretrained_path=str(tmp_path / "timm.pt"))
    model = build_segmenter(cfg, in_channels=3)
    key = "encoder.model.stages_1.downsample.1.weight"  # timm's features wrapper: stages.1 -> stages_1
    assert torch.equal(model.state_dict()[key], bare.state_dict()["stages.1.downsample.1.weight"])


def test_pretrained_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(PretrainedError, match=r"not found: .*nope\.pt"):
        make_seg(0, pretrained_path=str(missing))
    torch.manual_seed(0)
    other = build_segmenter(ModelCfg(arch="Unet", encoder="tu-resnet18"), in_channels=3)
    torch.save(other.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(PretrainedError, match=r"resnet\.pt: \d+ of the model's required weights are missing"):
        make_seg(0, pretrained_path=str(tmp_path / "resnet.pt"))


def test_timm_classifier_loads_backbone_and_skips_foreign_head(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    imagenet = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pt")
    cfg = ModelCfg(arch="timm", encoder="resnet18", pretrained_path=str(tmp_path / "resnet18.pt"))
    model = build_classifier(cfg, in_channels=3)
    assert model.get_classifier().weight.shape == (3, 512)
    assert same(imagenet, model, "layer4.")


def test_encoder_classifier_starts_from_a_segmenter(tmp_path: Path) -> None:
    seg = make_seg(0)
    torch.save({"model": seg.state_dict(), "epoch": 1, "score": 0.9}, tmp_path / "best.pt")
    cfg = ModelCfg(arch="Unet", encoder=TINY, pretrained_path=str(tmp_path / "best.pt"))
    cls = build_classifier(cfg, in_channels=3)
    assert isinstance(cls, EncoderClassifier)
    assert same(seg, cls, "encoder.")


# --------------------------------------------------------------------------- freeze_encoder


def frozen(model: nn.Module) -> set[str]:
    return {k for k, p in model.named_parameters() if not p.requires_grad}


def resnet_first_two(model: nn.Module) -> set[str]:
    """Stage 1 is the stem (stride 2), stage 2 is layer1 (stride 4)."""
    return {
        k
        for k, _ in model.named_parameters()
        if k.startswith(("encoder.conv1.", "encoder.bn1.", "encoder.layer1."))
    }


def vgg_first_two(model: nn.Module) -> set[str]:
    """Everything before the third max-pool: the stride-1, stride-2 and stride-4 convolutions."""
    pools = [i for i, m in enumerate(model.encoder.features) if isinstance(m, nn.MaxPool2d)]
    return {
        k
        for k, _ in model.named_parameters()
        if k.startswith("encoder.features.") and int(k.split(".")[2]) < pools[2]
    }


@pytest.mark.parametrize(("encoder", "expected"), [("resnet50", resnet_first_two), ("vgg16", vgg_first_two)])
def test_freeze_encoder_freezes_exactly_the_first_stages(encoder: str, expected) -> None:
    model = build_segmenter(ModelCfg(arch="Unet", encoder=encoder, freeze_encoder=2), in_channels=3)
    want = expected(model)
    assert want and frozen(model) == want  # every other parameter still trains
    assert not frozen(build_segmenter(ModelCfg(arch="Unet", encoder=encoder), in_channels=3))


def test_frozen_batch_norm_keeps_its_statistics_in_train_mode() -> None:
    model = build_segmenter(ModelCfg(arch="Unet", encoder="resnet18", freeze_encoder=1), in_channels=3)
    assert frozen(model) == {"encoder.conv1.weight", "encoder.bn1.weight", "encoder.bn1.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model.train()
    model(torch.randn(2, 3, 64, 64) * 3 + 1)
    after = model.state_dict()
    assert torch.equal(after["encoder.bn1.running_mean"], before["encoder.bn1.running_mean"])
    assert not torch.equal(
        after["encoder.layer1.0.bn1.running_mean"], before["encoder.layer1.0.bn1.running_mean"]
    )
    assert model.training and model.encoder.layer1.training


def test_freeze_encoder_out_of_range_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze_encoder is 6 but encoder 'resnet18' has 5 stages"):
        build_segmenter(ModelCfg(arch="Unet", encoder="resnet18", freeze_encoder=6), in_channels=3)
    with pytest.raises(ConfigError, match=r"model\.freeze_encoder must be >= 0"):
        build_segmenter(ModelCfg(arch="Unet", encoder=TINY, freeze_encoder=-1), in_channels=3)
    with pytest.raises(ConfigError, match=r"model\.freeze_encoder needs an smp encoder"):
        build_classifier(ModelCfg(arch="timm", encoder="resnet18", freeze_encoder=1), in_channels=3)


def test_encoder_classifier_freezes_the_same_stages_as_the_segmenter() -> None:
    cfg = ModelCfg(arch="Unet", encoder=TINY, freeze_encoder=3)
    seg, cls = build_segmenter(cfg, in_channels=5), build_classifier(cfg, in_channels=5)
    assert frozen(seg) and frozen(seg) == frozen(cls)
    assert all(k.startswith("encoder.") for k in frozen(seg))
