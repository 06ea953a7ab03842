"""The table of checkpoint layouts: how to recognise each and how to get its ViT backbone.

Every converter is a pure dict rewrite returning ``(backbone_state_dict, dropped_keys)``.
Keys that belong to neither the backbone nor a declared drop pattern are an error, never
silently ignored. Facts come from ``PROTOCOLS.md`` ("Checkpoint layouts").
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moca_eval.errors import CheckpointError

StateDict = dict[str, torch.Tensor]
Extracted = tuple[StateDict, list[str]]


@dataclass(frozen=True)
class CheckpointFormat:
    """One layout: ``detect(ckpt)`` says whether a loaded file has it; ``extract`` converts."""

    name: str
    description: str
    families: tuple[str, ...]  # who saves files of this shape; the first is assumed
    detect: Callable[[Mapping[str, Any]], bool]
    extract: Callable[[Mapping[str, Any], bool], Extracted]
    has_student: bool = False
    num_heads_hint: Callable[[int], int | None] | None = None


def top_level_keys(ckpt: Mapping[str, Any], *, limit: int = 8) -> str:
    """The first ``limit`` keys of a checkpoint for error messages (``(none)`` when empty)."""
    keys = [str(k) for k in ckpt]
    return (", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")) or "(none)"


def _looks_like_vit(sd: Mapping[str, Any], prefix: str = "") -> bool:
    return f"{prefix}patch_embed.proj.weight" in sd


def _has_prefix(sd: Mapping[str, Any], prefix: str) -> bool:
    return any(isinstance(k, str) and k.startswith(prefix) for k in sd)


def check_keys(sd: Mapping[object, Any]) -> None:
    """Every key of a state dict must be a string (a parameter name)."""
    bad = next((k for k in sd if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"key {bad!r} ({type(bad).__name__}) is not a string parameter name")


def split_backbone(sd: Mapping[str, torch.Tensor], prefix: str, drops: tuple[str, ...]) -> Extracted:
    """Keys under ``prefix`` (stripped) form the backbone; the rest must match ``drops``.

    Drop patterns are ``fnmatch`` patterns on the full key (before stripping) and are
    also applied to backbone keys (e.g. ``head.*`` of a bare state dict).
    """
    check_keys(sd)
    backbone: StateDict = {}
    dropped: list[str] = []
    stray: list[str] = []
    for key, value in sd.items():
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in drops):
            dropped.append(key)
        elif key.startswith(prefix):
            backbone[key.removeprefix(prefix)] = value
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"{len(stray)} key(s) are neither under {prefix!r} nor a known non-backbone part: "
            f"{', '.join(stray[:5])}"
        )
    return backbone, dropped


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def normalize_vit_keys(sd: StateDict) -> StateDict:
    """Rewrite project-specific ViT key names to timm's (idempotent).

    - DINOv2 chunked blocks ``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``;
    - iBOT/BEiT-style LayerScale ``gamma_1``/``gamma_2`` -> ``ls1.gamma``/``ls2.gamma``;
    - DINOv2 ``register_tokens`` -> ``reg_token``; since DINOv2 adds the CLS position to the
      CLS token only and registers get none, the CLS row is folded into ``cls_token`` and the
      table keeps patch rows only (timm's ``no_embed_class``), which is the same function.
    """
    out: StateDict = {}
    for key, value in sd.items():
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _model(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    model = ckpt.get("model")
    return model if isinstance(model, Mapping) else {}


HEAD_DROPS = ("head.*", "fc_norm.*")


def _moca_full(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    prefix, other = ("encoder.", "encoder_teacher.*") if student else ("encoder_teacher.", "encoder.*")
    drops = (other, "decoder*", "bow_extractor*", "encoder_pred*", "mask_token*", "norm_cls_pt*")
    return split_backbone(_model(ckpt), prefix, drops)


def _mae_full(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    return split_backbone(_model(ckpt), "", ("decoder*", "mask_token", *HEAD_DROPS))


def _model_wrapped(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    return split_backbone(_model(ckpt), "", HEAD_DROPS)


def _dino_like(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    key, prefix = ("student", "module.backbone.") if student else ("teacher", "backbone.")
    sd = ckpt[key]
    if not _has_prefix(sd, prefix):  # students saved without DDP
        prefix = prefix.removeprefix("module.")
    head = prefix.replace("backbone.", "head.") + "*"
    return split_backbone(sd, prefix, (head, f"{prefix}masked_embed", f"{prefix}mask_token"))


def _dinov2_train(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    drops = ("dino_head.*", "ibot_head.*", "backbone.mask_token", "head.*")
    return split_backbone(ckpt["teacher"], "backbone.", drops)


def _state_dict_wrapped(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    return split_backbone(ckpt["state_dict"], "", (*HEAD_DROPS, "masked_embed"))


def _mocov3(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    drops = ("module.momentum_encoder.*", "module.predictor.*", "module.base_encoder.head.*")
    return split_backbone(ckpt["state_dict"], "module.base_encoder.", drops)


def _msn(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    sd = ckpt["encoder" if student else "target_encoder"]
    prefix = "module." if _has_prefix(sd, "module.") else ""
    return split_backbone(sd, prefix, (f"{prefix}fc.*", f"{prefix}head.*"))


def _dinov2_hub(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    return split_backbone(ckpt, "", ("mask_token", *HEAD_DROPS))


def _bare(ckpt: Mapping[str, Any], student: bool) -> Extracted:
    return split_backbone(ckpt, "", HEAD_DROPS)


def _is_ibot(ckpt: Mapping[str, Any]) -> bool:
    return "ibot_loss" in ckpt or "backbone.masked_embed" in ckpt.get("teacher", {})


def _has_teacher_student(ckpt: Mapping[str, Any]) -> bool:
    return isinstance(ckpt.get("teacher"), Mapping) and isinstance(ckpt.get("student"), Mapping)


def _is_dinov2_bare(ckpt: Mapping[str, Any]) -> bool:
    return _looks_like_vit(ckpt) and ("mask_token" in ckpt or "register_tokens" in ckpt)


FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat(
        "moca-full", "MOCA training checkpoint {'model': encoder_teacher./encoder./decoder...}",
        ("moca",), lambda c: _has_prefix(_model(c), "encoder_teacher."), _moca_full, has_student=True,
    ),
    CheckpointFormat(
        "mae-full", "MAE training checkpoint {'model': encoder + decoder}",
        ("mae",), lambda c: _looks_like_vit(_model(c)) and "decoder_embed.weight" in _model(c),
        _mae_full,
    ),
    CheckpointFormat(
        "model-wrapped", "{'model': backbone}: MOCA extracted teacher, MAE release, timm",
        ("moca", "mae", "timm"),
        lambda c: _looks_like_vit(_model(c)) and "decoder_embed.weight" not in _model(c),
        _model_wrapped,
    ),
    CheckpointFormat(
        "dino-full", "DINO training checkpoint {'teacher': backbone./head., 'student': ...}",
        ("dino",), lambda c: _has_teacher_student(c) and not _is_ibot(c), _dino_like,
        has_student=True,
    ),
    CheckpointFormat(
        "ibot-full", "iBOT training checkpoint {'teacher', 'student', 'ibot_loss'}",
        ("ibot",), lambda c: _has_teacher_student(c) and _is_ibot(c), _dino_like, has_student=True,
    ),
    CheckpointFormat(
        "dinov2-train", "DINOv2 teacher_checkpoint.pth {'teacher': backbone./dino_head./ibot_head.}, "
        "or a DINO teacher-only file",
        ("dinov2", "dino"),
        lambda c: isinstance(c.get("teacher"), Mapping) and "student" not in c
        and _looks_like_vit(c["teacher"], "backbone."),
        _dinov2_train,
    ),
    CheckpointFormat(
        "state-dict-wrapped", "{'state_dict': backbone}: iBOT extracted, timm",
        ("ibot", "timm"),
        lambda c: isinstance(c.get("state_dict"), Mapping) and _looks_like_vit(c["state_dict"]),
        _state_dict_wrapped,
    ),
    CheckpointFormat(
        "mocov3", "MoCo-v3 checkpoint {'state_dict': module.base_encoder./momentum_encoder.}",
        ("mocov3",),
        lambda c: isinstance(c.get("state_dict"), Mapping)
        and _looks_like_vit(c["state_dict"], "module.base_encoder."),
        _mocov3, num_heads_hint=lambda width: 12 if width == 384 else None,
    ),
    CheckpointFormat(
        "msn", "MSN checkpoint {'target_encoder': module.*, 'encoder', 'prototypes'}",
        ("msn",), lambda c: isinstance(c.get("target_encoder"), Mapping), _msn, has_student=True,
    ),
    CheckpointFormat(
        "dinov2-hub", "DINOv2 hub state dict (mask_token, ls1/ls2, register_tokens)",
        ("dinov2",), _is_dinov2_bare, _dinov2_hub,
    ),
    CheckpointFormat(
        "bare", "plain backbone state dict: DINO release, timm, safetensors",
        ("dino", "timm"), lambda c: _looks_like_vit(c) and not _is_dinov2_bare(c), _bare,
    ),
)

FORMATS_BY_NAME = {fmt.name: fmt for fmt in FORMATS}


def custom_key_extract(ckpt: Mapping[str, Any], key: str) -> Extracted:
    """``--checkpoint-key``: take ``ckpt[key]``, strip ``module.``/``backbone.``, drop heads."""
    if key not in ckpt or not isinstance(ckpt[key], Mapping):
        raise CheckpointError(f"no state dict under key {key!r}; top-level keys: {top_level_keys(ckpt)}")
    check_keys(ckpt[key])
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in ckpt[key].items()}
    drops = (*HEAD_DROPS, "dino_head.*", "ibot_head.*", "mask_token", "masked_embed")
    return split_backbone(sd, "", drops)
