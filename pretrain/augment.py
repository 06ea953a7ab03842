"""The two augmentation pipelines of the paper's appendix C.4 (BYOL/MoCo-v3 style).

Both views: RandomResizedCrop (scale ``crop_min``-1), colour jitter (0.4, 0.4, 0.2, 0.1)
with probability 0.8, grayscale 0.2, Gaussian blur, horizontal flip, ImageNet
normalisation. View 1 is always blurred; view 2 is blurred with probability 0.1 and
solarised with probability 0.2. The blur radius is drawn in (0.1, 2.0) pixels at 224 px
and scaled with the crop size, so smaller crops are blurred alike relative to their size.

Every random choice uses torch's global generator, so seeding it before a call (as
``data.TwoViewDataset`` does per image and epoch) makes the views reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moca_eval.data import IMAGENET_MEAN, IMAGENET_STD

ViewPair = tuple[torch.Tensor, torch.Tensor]


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and a radius uniform in ``radius``."""

    def __init__(self, p: float, radius: tuple[float, float]) -> None:
        self.p = p
        self.radius = radius

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        low, high = self.radius
        radius = low + (high - low) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def view_transform(size: int, *, crop_min: float, blur_p: float, solarize_p: float
                   ) -> Callable[[Image.Image], torch.Tensor]:
    """One view's pipeline (C.4): crop, jitter, grayscale, blur, [solarise], flip, normalise."""
    scale = size / 224
    steps: list[Callable] = [
        T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomGaussianBlur(blur_p, (0.1 * scale, 2.0 * scale)),
    ]
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class TwoViews:
    """Callable image -> (view 1, view 2) with the two pipelines of appendix C.4."""

    def __init__(self, size: int, *, crop_min: float = 0.2) -> None:
        self.view1 = view_transform(size, crop_min=crop_min, blur_p=1.0, solarize_p=0.0)
        self.view2 = view_transform(size, crop_min=crop_min, blur_p=0.1, solarize_p=0.2)

    def __call__(self, img: Image.Image) -> ViewPair:
        return self.view1(img), self.view2(img)
