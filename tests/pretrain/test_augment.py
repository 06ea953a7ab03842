"""The two view pipelines follow the paper's appendix C.4."""

import pytest
import torch
from PIL import Image

from moca_eval.pretrain.augment import RandomGaussianBlur, TwoViews


def _steps(pipeline):
    return {type(step).__name__: step for step in pipeline.transforms}


def test_pipelines_match_appendix_c4():
    views = TwoViews(224, crop_min=0.2)
    one, two = _steps(views.view1), _steps(views.view2)
    for steps in (one, two):
        assert steps["RandomResizedCrop"].size == (224, 224)
        assert steps["RandomResizedCrop"].scale == (0.2, 1.0)
        jitter = steps["RandomApply"]
        assert jitter.p == 0.8
        cj = jitter.transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
            (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert steps["RandomGrayscale"].p == 0.2
        assert steps["RandomHorizontalFlip"].p == 0.5
        assert steps["Normalize"].mean == (0.485, 0.456, 0.406)
        assert steps["RandomGaussianBlur"].radius == (0.1, 2.0)
    assert one["RandomGaussianBlur"].p == 1.0 and "RandomSolarize" not in one
    assert two["RandomGaussianBlur"].p == 0.1 and two["RandomSolarize"].p == 0.2
    assert two["RandomSolarize"].threshold == 128


def test_blur_radius_scales_with_the_crop_size():
    low, high = _steps(TwoViews(64).view1)["RandomGaussianBlur"].radius
    assert (low, high) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))


def test_blur_probability_zero_and_one():
    img = Image.new("RGB", (16, 16))
    img.putpixel((8, 8), (255, 255, 255))
    assert RandomGaussianBlur(0.0, (1.0, 1.0))(img) is img
    blurred = RandomGaussianBlur(1.0, (1.0, 1.0))(img)
    assert blurred.getpixel((8, 8))[0] < 255 and blurred.getpixel((9, 8))[0] > 0


def test_views_are_normalised_tensors_of_the_crop_size():
    torch.manual_seed(0)
    v1, v2 = TwoViews(32)(Image.new("RGB", (50, 40), (120, 30, 200)))
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
