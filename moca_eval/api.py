"""The Python API (``import moca_eval``): evaluate, load_backbone, extract_features, report.

A checkpoint is a file path, ``hf-hub:ORG/NAME[@REV]``, ``timm:NAME`` or an in-memory timm
``VisionTransformer`` (written once to a content-named safetensors file, then loaded through
the same strict layout table as a file).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from moca_eval.errors import ConfigError


def _source(checkpoint: Any, cache_dir: Path | None = None):
    from moca_eval.cli.common import default_cache_dir
    from moca_eval.sources import module_checkpoint, resolve

    if hasattr(checkpoint, "state_dict"):
        return module_checkpoint(checkpoint, (cache_dir or default_cache_dir()).parent / "modules")
    return resolve(checkpoint)


def _split(overrides: dict[str, Any], cls: type) -> dict[str, Any]:
    """Pop the keys of ``overrides`` that are fields of dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: overrides.pop(k) for k in list(overrides) if k in names}


def _configs(checkpoint: Any, data: str | Path | None, overrides: dict[str, Any]):
    from moca_eval.cli.common import default_cache_dir
    from moca_eval.features import ExtractConfig
    from moca_eval.pipeline import BackboneConfig, DataConfig

    backbone_kw = _split(overrides, BackboneConfig)
    backbone_kw.pop("ckpt", None)
    extract_kw = _split(overrides, ExtractConfig)
    extract_kw.setdefault("cache_dir", default_cache_dir())
    data_kw = _split(overrides, DataConfig)
    data_kw.pop("root", None)
    extract = ExtractConfig(**extract_kw)
    source = _source(checkpoint, extract.cache_dir)
    data_cfg = DataConfig(root=Path(data), **{"interpolation": None, **data_kw}) if data is not None else None
    return source, BackboneConfig(source.path, **backbone_kw), data_cfg, extract


def evaluate(checkpoint: Any, protocol: str, data: str | Path, *, output_dir: str | Path | None = None,
             **overrides: Any):
    """Run one protocol on one checkpoint; the ``Record``.

    Args:
        checkpoint: file, ``hf-hub:``/``timm:`` name, or an ``nn.Module`` (timm ViT).
        protocol: knn, lowshot, linear, finetune, seg or det.
        data: dataset root (ImageFolder ``train/`` + ``val/``; Cityscapes/COCO for seg/det).
        output_dir: run directory of the training protocols (checkpoints, resume).
        **overrides: any ``BackboneConfig``, ``DataConfig`` (e.g. ``limit``), ``ExtractConfig``
            (e.g. ``batch_size``, ``device``) or protocol config/recipe field (e.g. ``ks=(20,)``).

    Example:
        >>> record = moca_eval.evaluate("teacher.pth", "knn", "/data/imagenet", ks=(20,))
        >>> record.headline
    """
    from moca_eval.record import Record
    from moca_eval.suite import PROTOCOLS, build_config, run_protocol

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    spec = PROTOCOLS[protocol]
    source, backbone, data_cfg, extract = _configs(checkpoint, None if spec.dense else data, dict(overrides))
    # seg/det take no DataConfig but their own ``limit`` (images of each split)
    settings = {k: v for k, v in overrides.items() if k not in _all_fields() or spec.dense and k == "limit"}
    unknown = sorted(set(settings) - set(spec.setting_names()))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], spec.setting_names(), n=3)
        raise ConfigError(f"{protocol}: unknown setting {unknown[0]!r}" + (f" (close: {', '.join(close)})"
                                                                          if close else ""))
    if spec.dense:
        settings["data"] = Path(data)
    cfg = build_config(spec, settings, backbone=backbone, data=data_cfg, extract=extract,
                       run_dir=Path(output_dir) if output_dir else None)
    return Record(**run_protocol(spec, cfg, source))


def _all_fields() -> set[str]:
    from moca_eval.features import ExtractConfig
    from moca_eval.pipeline import BackboneConfig, DataConfig

    return {f.name for cls in (BackboneConfig, DataConfig, ExtractConfig) for f in fields(cls)}


def load_backbone(checkpoint: Any, **options: Any):
    """``checkpoints.load_backbone`` for any checkpoint source (see the module docstring)."""
    from moca_eval.checkpoints import load_backbone as load

    return load(_source(checkpoint).path, **options)


def extract_features(checkpoint: Any, data: str | Path, features: tuple[str, ...] = ("cls",), *,
                     split: str = "train", **overrides: Any):
    """Features ``features`` of every image of ``data/split`` (a ``FeatureSet``; cached).

    ``overrides``: ``BackboneConfig``, ``DataConfig`` and ``ExtractConfig`` fields.
    """
    from moca_eval.pipeline import FeatureJob, extract_splits

    _, backbone_cfg, data_cfg, extract = _configs(checkpoint, data, overrides)
    if overrides:
        raise ConfigError(f"extract_features: unknown option(s) {', '.join(sorted(overrides))}")
    job = FeatureJob(backbone_cfg, data_cfg, extract)
    train, val = extract_splits(job, list(features), backbone_cfg.load(), data_cfg.splits())
    if split not in (data_cfg.train_split, data_cfg.val_split):
        raise ConfigError(f"split must be {data_cfg.train_split!r} or {data_cfg.val_split!r}, got {split!r}")
    return train if split == data_cfg.train_split else val


def report(records: Any, out: str | Path, **options: Any) -> dict[str, Path]:
    """Tables and figures comparing result records (``reporting.write_report``)."""
    from moca_eval.reporting import write_report

    return write_report(records if isinstance(records, (list, tuple)) else [records], out, **options)
