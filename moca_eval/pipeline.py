"""The shared first half of every protocol: checkpoint -> backbone -> features per split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moca_eval.checkpoints import LoadedBackbone, load_backbone
from moca_eval.data import ImageFolderIndex, eval_transform, load_split
from moca_eval.errors import ConfigError
from moca_eval.features import ExtractConfig, FeatureSet, extract_features


@dataclass(frozen=True)
class BackboneConfig:
    """Which weights to evaluate (see ``load_backbone``)."""

    ckpt: Path
    arch: str | None = None
    checkpoint_key: str | None = None
    fmt: str | None = None
    student: bool = False
    img_size: int = 224
    num_heads: int | None = None

    def load(self) -> LoadedBackbone:
        return load_backbone(self.ckpt, arch=self.arch, checkpoint_key=self.checkpoint_key,
                             fmt=self.fmt, student=self.student, img_size=self.img_size,
                             num_heads=self.num_heads)


@dataclass(frozen=True)
class DataConfig:
    """An ImageFolder dataset and its eval transform (Resize + CenterCrop + ImageNet norm)."""

    root: Path
    train_split: str = "train"
    val_split: str = "val"
    resize: int | None = None  # default: crop / 0.875 (256 for 224)
    interpolation: str = "bicubic"

    def splits(self) -> tuple[ImageFolderIndex, ImageFolderIndex]:
        """Train and val indexes, labelled with the train classes."""
        train = load_split(self.root, self.train_split)
        return train, load_split(self.root, self.val_split, classes=train.classes)


@dataclass(frozen=True)
class FeatureJob:
    """Everything needed to turn a checkpoint into train/val features."""

    backbone: BackboneConfig
    data: DataConfig
    extract: ExtractConfig = field(default_factory=ExtractConfig)


def extract_splits(job: FeatureJob, names: Sequence[str], backbone: LoadedBackbone, *,
                   min_train: int = 0, why: str = "") -> tuple[FeatureSet, FeatureSet]:
    """Train and val features for ``names`` (cached: a second protocol reuses them).

    A train split of fewer than ``min_train`` images is a ConfigError (``why`` says what needs
    them), raised before any image goes through the backbone.
    """
    transform = eval_transform(backbone.arch.img_size, resize=job.data.resize,
                               interpolation=job.data.interpolation)
    train_index, val_index = job.data.splits()
    if len(train_index) < min_train:
        raise ConfigError(f"{why} exceeds the {len(train_index)} training images of {job.data.root}")
    train = extract_features(backbone, train_index, names, job.extract, transform=transform)
    val = extract_features(backbone, val_index, names, job.extract, transform=transform)
    return train, val
