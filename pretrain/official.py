"""MOCA's own names (valeoai/MOCA ``models_moca.py``, ``main_pretrain.py``) for our training state.

``checkpoint-last.pth`` holds the official model's ``state_dict()`` keys, so MOCA's
``main_pretrain.py --resume`` reads our files and ``moca-eval pretrain --resume`` reads theirs:

- ``KEY_TABLE`` renames our modules to MOCA's, in the order MOCA's model registers its
  parameters; building the optimizer in that order (``official_order``) makes AdamW's
  ``state_dict()`` the one MOCA's script saves (same groups, same parameter indices).
- MOCA keeps three values we derive: ``_dist_norm_prev`` (equal to ``_dist_norm``, i.e.
  ``mu_MSD``, between steps) and the two predictors' ``scale`` (kappa, not trained).
- ``official_args`` / ``config_from_args`` translate settings to and from MOCA's argparse
  names (``batch_size`` per process, ``early_layer`` counted from the last block, ...).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.models import ARCHS
from moca_eval.pretrain.config import PretrainConfig

_BOW = "bow_extractor.bow_extractor.0."
# (our key or prefix, MOCA's), in MOCA's parameter registration order; a prefix ends with ".".
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("decoder.pos_embed", "decoder_pos_embed"),
    ("decoder.mask_token", "mask_token_cls_pt"),
    ("encoder.", "encoder."),
    ("encoder_pred.", "encoder_pred.layers_w.0."),
    ("encoder_teacher.", "encoder_teacher."),
    ("bow_extractor.codebook.words", _BOW + "_embedding"),
    ("bow_extractor.codebook.ptr", _BOW + "_embedding_ptr"),
    ("bow_extractor.num_updates", _BOW + "_track_num_batches"),
    ("bow_extractor.mu_msd", _BOW + "_dist_norm"),
    ("decoder.norm_in.", "norm_cls_pt."),
    ("decoder.embed.", "decoder_embed_cls_pt."),
    ("decoder.blocks.", "decoder_blocks_cls_pt."),
    ("decoder.norm.", "decoder_norm_cls_pt."),
    ("decoder_pred.", "decoder_pred.layers_w.0."),
)
MU_PREV = _BOW + "_dist_norm_prev"
SCALES = ("encoder_pred.scale", "decoder_pred.scale")
DECODER_HEADS = 16  # every model of models_moca.py; not in the model name
MOCA_EVAL_KEY = "moca_eval"  # our full config, an extra field of the saved Namespace


def _rename(key: str, table: Iterable[tuple[str, str]]) -> tuple[int, str] | None:
    for index, (src, dst) in enumerate(table):
        if key == src or (src.endswith(".") and key.startswith(src)):
            return index, dst + key.removeprefix(src)
    return None


def official_key(key: str) -> tuple[int, str]:
    """``(rank in MOCA's parameter order, MOCA's name)`` of one of our keys."""
    found = _rename(key, KEY_TABLE)
    if found is None:
        raise KeyError(f"no MOCA name for {key!r}")
    return found


def official_order(named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters sorted into MOCA's ``named_parameters()`` order (stable within a part)."""
    return sorted(named, key=lambda item: official_key(item[0])[0])


def to_official(state: Mapping[str, torch.Tensor], *, kappa: float) -> dict[str, torch.Tensor]:
    """Our ``MOCA.state_dict()`` with MOCA's keys, plus ``_dist_norm_prev`` and the scales."""
    out = {official_key(k)[1]: v for k, v in state.items()}
    out[MU_PREV] = state["bow_extractor.mu_msd"].clone()
    for key in SCALES:
        out[key] = torch.full((1,), float(kappa))
    return out


def from_official(state: Mapping[str, Any], *, expected: Iterable[str], source: str) -> dict[str, Any]:
    """MOCA's model ``state_dict`` -> ours; ``expected`` are our model's keys.

    Raises:
        CheckpointError: keys missing or left over (a different architecture or layout).
    """
    inverse = tuple((dst, src) for src, dst in KEY_TABLE)
    ours = {}
    for key, value in state.items():
        found = _rename(key, inverse)
        if found is not None:
            ours[found[1]] = value
        elif key not in (MU_PREV, *SCALES):
            ours[key] = value  # reported below as unexpected
    expected = set(expected)
    missing, extra = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or extra:
        what = "; ".join(f"{name} {keys[:3]}" for name, keys in (("missing", missing), ("unexpected", extra))
                         if keys)
        raise CheckpointError(f"{source}: not a MOCA training checkpoint of this model: {what}")
    return ours


def model_name(cfg: PretrainConfig) -> str:
    """MOCA's model name, e.g. ``moca_vit_base_patch16_dec512d2b``."""
    return f"moca_{cfg.arch}_patch{cfg.patch_size}_dec{cfg.decoder_dim}d{cfg.decoder_depth}b"


def official_args(cfg: PretrainConfig, *, world_size: int) -> argparse.Namespace:
    """The ``args`` MOCA's script would save for this run, plus our config under ``moca_eval``."""
    depth = cfg.arch_spec.depth
    dec = [0.0 if cfg.partial_decoding is None else round(r - cfg.partial_decoding, 10)
           for r in cfg.mask_ratios]
    return argparse.Namespace(
        model=model_name(cfg), input_size=cfg.img_size, kappa=cfg.kappa, inv_delta=cfg.inv_delta,
        num_words=cfg.num_words, img_weight=cfg.img_weight, loc_weight=1.0 - cfg.img_weight,
        num_new_words=cfg.num_new_words * world_size, early_layer=depth - cfg.decoder_layer,
        pred_mlp_ratio=cfg.pred_mlp_ratio, avg_pooling=True, mask_ratio=list(cfg.mask_ratios),
        dec_mask_ratio=dec, num_mviews=len(cfg.mask_ratios), seed=cfg.seed,
        batch_size=cfg.batch_size // world_size, accum_iter=1, world_size=world_size,
        max_epochs=cfg.epochs, lr_epochs_mul=cfg.lr_decay_epochs_mul,
        lr_epochs=int(cfg.epochs * cfg.lr_decay_epochs_mul), warmup_epochs=cfg.warmup_epochs,
        lr=cfg.base_lr(), blr=cfg.blr, lr_wgen=cfg.lr_prototypes if cfg.lr_prototypes is not None
        else cfg.base_lr(), weight_decay=cfg.weight_decay, weight_decay_end=cfg.weight_decay_end,
        alpha=cfg.momentum, alpha_cos=cfg.momentum_end == 1.0, clip_grad=cfg.clip_grad,
        no_fp16=cfg.precision != "fp16", crop_min=cfg.crop_min, num_workers=cfg.num_workers,
        data_path=cfg.data_dir, output_dir=cfg.output_dir, **{MOCA_EVAL_KEY: cfg.to_dict()},
    )


_MODEL = re.compile(  # moca_vit_base_patch16_dec512d2b, or the alias moca_vit_base_patch16_dec2
    r"moca_(?P<arch>vit_[a-z]+)_patch(?P<patch>\d+)_dec(?:(?P<dim>\d+)d(?P<depth>\d+)b|(?P<alias>\d+))")


def config_from_args(args: argparse.Namespace, *, source: str) -> dict[str, Any]:
    """The ``PretrainConfig`` fields a saved ``args`` fixes (ours exactly; MOCA's translated).

    Raises:
        ConfigError: a MOCA setting moca-eval cannot reproduce (named).
    """
    values = vars(args)
    if isinstance(values.get(MOCA_EVAL_KEY), dict):
        return PretrainConfig.from_dict(values[MOCA_EVAL_KEY]).to_dict()
    try:
        return _translate(values)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: cannot read MOCA's training args: {err}") from None


def _translate(a: dict[str, Any]) -> dict[str, Any]:
    match = _MODEL.fullmatch(str(a["model"]))
    if match is None or match["arch"] not in ARCHS:
        raise ValueError(f"unknown model {a['model']!r}")
    depth = ARCHS[match["arch"]].depth
    _require(abs(a["img_weight"] + a["loc_weight"] - 1.0) < 1e-9 and a.get("avg_pooling", True),
             "loc_weight must be 1 - img_weight and avg_pooling on")
    partial = {round(m - d, 10) if d else None for m, d in zip(a["mask_ratio"], a["dec_mask_ratio"])}
    _require(len(partial) == 1, f"dec_mask_ratio {a['dec_mask_ratio']} is not mask_ratio minus one value")
    world = int(a.get("world_size", 1))
    return {
        "arch": match["arch"], "patch_size": int(match["patch"]), "img_size": a["input_size"],
        "decoder_dim": int(match["dim"] or 512), "decoder_depth": int(match["depth"] or match["alias"]),
        "decoder_heads": DECODER_HEADS, "decoder_layer": depth - a["early_layer"], "border": 2,
        "kappa": a["kappa"], "inv_delta": a["inv_delta"], "num_words": a["num_words"],
        # each process pushes num_new_words // world_size words; DDP keeps rank 0's buffers
        "num_new_words": a["num_new_words"] // world, "mu_decay": 0.99,
        "img_weight": a["img_weight"], "pred_mlp_ratio": a["pred_mlp_ratio"],
        "mask_ratios": list(a["mask_ratio"]), "partial_decoding": partial.pop(),
        "batch_size": a["batch_size"] * a.get("accum_iter", 1) * world, "seed": a["seed"],
        "epochs": a["max_epochs"], "warmup_epochs": a["warmup_epochs"], "lr": a["lr"],
        "blr": a["blr"], "lr_prototypes": a["lr_wgen"], "min_lr": 0.0,
        "lr_decay_epochs_mul": a["lr_epochs_mul"], "weight_decay": a["weight_decay"],
        "weight_decay_end": a["weight_decay_end"], "momentum": a["alpha"],
        "momentum_end": 1.0 if a.get("alpha_cos", True) else a["alpha"],
        "clip_grad": a["clip_grad"], "crop_min": a["crop_min"],
    }


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
