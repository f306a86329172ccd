"""LPIPS perceptual distance, VGG16 variant with the v0.1 linear layers ("The Unreasonable Effectiveness
of Deep Features as a Perceptual Metric", Zhang et al., CVPR 2018), as used in the stage-1 loss of VQGAN
and RQ-VAE.

Both images go through a frozen VGG16; at five taps (relu1_2 .. relu5_3) the features are unit-normalised
over channels, their squared difference is weighted per channel by a learned 1x1 convolution and averaged
over space, and the five terms are summed. Nothing is downloaded: the backbone comes from a
torchvision-format VGG16 state dict and the linear layers from the LPIPS repo's `weights/v0.1/vgg.pth`
(taming's `vgg.pth` is the same file).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from vqar.utils.safe_load import load_checkpoint

__all__ = ["LPIPS", "VGG16Features", "build_perceptual_loss"]

PathLike = str | os.PathLike[str]

_log = logging.getLogger("vqar.train")

# (index in torchvision's vgg16().features, in_channels, out_channels); other indices are ReLU or max-pool.
_VGG_CONVS: tuple[tuple[int, int, int], ...] = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)  # fmt: skip
_VGG_POOLS = (4, 9, 16, 23)
# The ReLUs relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3. The last max-pool (index 30) is never
# reached, so it is left out; it holds no parameters, so state dicts are unaffected.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)

# Backbone keys: torchvision `features.N.*`, the lpips package `net.sliceK.N.*` (same N), or our own
# `net.features.N.*`; optionally under the prefixes a DataParallel wrapper or a taming VQGAN checkpoint adds.
_PREFIX = r"^(?:module\.)?(?:(?:loss\.)?perceptual_loss\.)?"
_BACKBONE_RE = re.compile(_PREFIX + r"(?:net\.)?(?:features|slice[1-5])\.(\d+)\.(weight|bias)$")
_LIN_RE = re.compile(_PREFIX + r"(?:lin(\d)|lins\.(\d))\.model\.1\.weight$")

_warned_no_vgg = False


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` (same layer indices, so its state dict loads unchanged),
    returning the five feature maps LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3
    (64, 128, 256, 512, 512 channels).
    """

    def __init__(self) -> None:
        super().__init__()
        convs = {idx: (cin, cout) for idx, cin, cout in _VGG_CONVS}
        layers: list[nn.Module] = []
        for idx in range(_TAPS[-1] + 1):
            if idx in convs:
                layers.append(nn.Conv2d(*convs[idx], kernel_size=3, padding=1))
            elif idx in _VGG_POOLS:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps: list[torch.Tensor] = []
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in _TAPS:
                taps.append(x)
        return taps


class _LinearLayer(nn.Module):
    """One tap's per-channel weighting; slot 0 held dropout in the reference, kept so keys read `model.1`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def _normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance between images in [-1, 1]; a frozen metric that passes gradients to its inputs.

    Build it with `LPIPS.from_files`; a bare `LPIPS()` has random weights and measures nothing meaningful.
    """

    def __init__(self) -> None:
        super().__init__()
        # Non-persistent: fixed constants of the metric, not weights, so they stay out of state dicts.
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, channels in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _LinearLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode: the metric is fixed, so a parent's `.train()` must not change it."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image, shape (B, 1, 1, 1) as in the reference implementation."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"LPIPS expects two (B, 1 or 3, H, W) images of the same shape, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        both = (torch.cat([x, y]) - self.shift) / self.scale
        total = torch.zeros((), device=x.device, dtype=x.dtype)
        for i, feats in enumerate(self.net(both)):
            fx, fy = feats.chunk(2)
            diff = (_normalize(fx) - _normalize(fy)).pow(2)
            lin: _LinearLayer = getattr(self, f"lin{i}")
            total = total + lin.model(diff).mean(dim=(2, 3), keepdim=True)
        return total

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image, shape (B,)."""
        return self.forward(x, y).flatten()

    @classmethod
    def from_files(cls, vgg_path: PathLike, lin_path: PathLike | None = None) -> LPIPS:
        """Load the VGG16 backbone from `vgg_path` and the linear layers from `lin_path`.

        `vgg_path` may be a torchvision VGG16 state dict (`classifier.*` is ignored), the lpips
        package's layout (`net.slice{k}.{idx}.*`), or a combined file that also holds the linear layers
        (then `lin_path` may be None). Linear layers are read as `lin{i}.model.1.weight` or
        `lins.{i}.model.1.weight`. Files are `torch.load`-ed with weights_only=True, or read with
        safetensors when named `*.safetensors`.
        """
        vgg_tensors = _load_tensors(vgg_path, "the VGG16 weights (loss.lpips_vgg)")
        backbone = _pick_backbone(vgg_tensors)
        if lin_path is None:
            lin = _pick_lin(vgg_tensors)
            if not lin:
                raise ValueError(
                    f"{vgg_path} holds no LPIPS linear-layer weights (lin0..lin4.model.1.weight), and LPIPS "
                    "needs them: pass lin_path (config key loss.lpips_lin), e.g. the LPIPS repo's "
                    "weights/v0.1/vgg.pth or taming's vgg.pth"
                )
            lin_source: PathLike = vgg_path
        else:
            lin, lin_source = _pick_lin(_load_tensors(lin_path, "the LPIPS linear layers (loss.lpips_lin)")), lin_path

        model = cls()
        expected_backbone = {k: v.shape for k, v in model.net.state_dict().items()}
        expected_lin = {k: v.shape for k, v in model.state_dict().items() if k.startswith("lin")}
        _check(vgg_path, backbone, expected_backbone)
        _check(lin_source, lin, expected_lin)
        model.load_state_dict({**{f"net.{k}": v for k, v in backbone.items()}, **lin})
        return model


def _load_tensors(path: PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor dict, unwrapping a `state_dict` or `model` entry; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{what}: {path} is not a safetensors file: {err}") from None
    else:
        try:
            obj = load_checkpoint(path)
        except ValueError as err:  # not a checkpoint, damaged, or asking for more than tensors: said by the reader
            raise ValueError(f"{what}: {err}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _pick_backbone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors renamed to `features.{idx}.{weight,bias}`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _BACKBONE_RE.match(key)
        if match:
            out.setdefault(f"features.{match[1]}.{match[2]}", value)
    return out


def _pick_lin(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear-layer tensors renamed to `lin{i}.model.1.weight`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _LIN_RE.match(key)
        if match:
            out.setdefault(f"lin{match[1] or match[2]}.model.1.weight", value)
    return out


def _check(path: PathLike, found: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    missing = [k for k in expected if k not in found]
    wrong = [
        f"{k} (expected {tuple(shape)}, got {tuple(found[k].shape)})"
        for k, shape in expected.items()
        if k in found and found[k].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if wrong:
        problems.append(f"wrong shape for {', '.join(wrong)}")
    if problems:
        raise ValueError(f"LPIPS weights in {path} do not fit: {'; '.join(problems)}")


def build_perceptual_loss(vgg_path: PathLike | None, lin_path: PathLike | None, weight: float) -> LPIPS | None:
    """The LPIPS module the trainer should use, or None when the perceptual loss is off.

    Without VGG weights (nothing is fetched from the internet) a positive `weight` is ignored with one warning
    per process rather than an error, so that configs written for machines with the weights still run.
    """
    global _warned_no_vgg
    if weight <= 0:
        return None
    if not vgg_path:
        if not _warned_no_vgg:
            _warned_no_vgg = True
            _log.warning(
                "perceptual (LPIPS) loss is off although its weight is %g: no VGG16 weights were given. "
                "Set loss.lpips_vgg to a torchvision VGG16 state dict and loss.lpips_lin to the LPIPS v0.1 "
                "linear layers (weights/v0.1/vgg.pth) to enable it.",
                weight,
            )
        return None
    return LPIPS.from_files(vgg_path, lin_path)
