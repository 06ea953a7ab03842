"""``load_backbone``: any supported SSL checkpoint -> a timm ViT with exactly its weights.

Pipeline: read safely (``checkpoint_io``) -> pick the layout (``checkpoint_formats``,
exactly one must match) -> pure dict rewrite to timm names -> infer the architecture from
the tensors -> resize the position table to the eval resolution -> strict load.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from moca_eval.checkpoint_checks import block_depth, check_tensors, require_shape, shape_problems
from moca_eval.checkpoint_formats import (
    FORMATS,
    FORMATS_BY_NAME,
    CheckpointFormat,
    StateDict,
    custom_key_extract,
    normalize_vit_keys,
    top_level_keys,
)
from moca_eval.checkpoint_io import read_checkpoint, sha256_file
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.families import GENERIC, FamilyChoice, check_family_name, choose_family
from moca_eval.models import (
    ARCHS,
    ArchSpec,
    build_vit,
    default_num_heads,
    is_sincos,
    resize_pos_embed,
    with_img_size,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedBackbone:
    """A loaded backbone and what was learned while loading it."""

    model: VisionTransformer
    format: str
    family: str
    arch: ArchSpec
    sha256: str
    path: Path
    dropped: tuple[str, ...]
    pos_embed: str  # "sincos" | "learned"
    student: bool = False
    checkpoint_key: str | None = None
    family_choice: FamilyChoice | None = None  # how ``family`` was chosen
    nonfinite: tuple[str, ...] = ()  # tensors holding NaN/inf (loaded with allow_nonfinite)

    def summary(self) -> str:
        """One line for logs: format, architecture, weights chosen."""
        which = "student" if self.student else "teacher/eval weights"
        return (
            f"{self.path.name}: format {self.format} ({which}), family {self.family}, "
            f"{self.arch.describe()}, "
            f"{self.pos_embed} pos-embed, {len(self.dropped)} non-backbone keys dropped"
        )


def detect_format(ckpt: Mapping[str, Any], *, path: Path) -> CheckpointFormat:
    """The one layout that matches ``ckpt``; zero or several matches is an error."""
    matches = [fmt for fmt in FORMATS if fmt.detect(ckpt)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(f.name for f in matches)
        raise CheckpointError(f"{path}: ambiguous checkpoint layout ({names}); pick one with --format")
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; top-level keys: {top_level_keys(ckpt)}; "
        f"known layouts: {', '.join(FORMATS_BY_NAME)} "
        "(use --checkpoint-key KEY for a state dict stored under another key)"
    )


def infer_arch(sd: StateDict, *, num_heads: int | None = None) -> ArchSpec:
    """Architecture from tensor shapes (width, depth, patch, MLP, LayerScale, registers)."""
    absent = [k for k in ("patch_embed.proj.weight", "cls_token", "pos_embed") if k not in sd]
    if absent:
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"not a ViT backbone: no {', '.join(absent)} (keys: {sample} ...)")
    embed_dim, in_chans, patch, _ = require_shape(sd, "patch_embed.proj.weight", 4)
    if in_chans != 3:
        raise CheckpointError(f"patch_embed.proj.weight takes {in_chans} input channel(s); "
                              "moca-eval feeds RGB images (3 channels)")
    depth = block_depth(sd)
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError("unsupported ViT block layout: no blocks.N.mlp.fc1 (SwiGLU FFN?)")
    reg_tokens = require_shape(sd, "reg_token", 3)[1] if "reg_token" in sd else 0
    rows = require_shape(sd, "pos_embed", 3)[1]
    no_embed_class = reg_tokens > 0 or _is_square(rows)
    if not _is_square(rows - (0 if no_embed_class else 1)):
        raise CheckpointError(f"pos_embed has {rows} rows: neither a square grid of patches nor "
                              "1 + a square grid")
    grid = round((rows - (0 if no_embed_class else 1)) ** 0.5)
    return ArchSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or default_num_heads(embed_dim),
        patch_size=patch,
        img_size=grid * patch,
        mlp_ratio=require_shape(sd, "blocks.0.mlp.fc1.weight", 2)[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        in_chans=in_chans,
    )


def _is_square(n: int) -> bool:
    return n > 0 and round(n**0.5) ** 2 == n


def resolve_arch(inferred: ArchSpec, arch: str | None, *, path: Path) -> ArchSpec:
    """Apply a user's ``--arch`` name, checking that it fits the weights."""
    if arch is None:
        return inferred
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
    named = ARCHS[arch]
    if (named.embed_dim, named.depth) != (inferred.embed_dim, inferred.depth):
        raise CheckpointError(
            f"{path}: --arch {arch} expects width {named.embed_dim} and depth {named.depth}, "
            f"the checkpoint has width {inferred.embed_dim} and depth {inferred.depth}"
        )
    return replace(inferred, num_heads=named.num_heads)


def load_backbone(
    path: str | Path,
    *,
    arch: str | None = None,
    checkpoint_key: str | None = None,
    fmt: str | None = None,
    student: bool = False,
    img_size: int | None = 224,
    num_heads: int | None = None,
    family: str | None = None,
    allow_nonfinite: bool = False,
) -> LoadedBackbone:
    """Load the evaluation backbone (teacher by default) of any supported checkpoint.

    Every key, tensor and shape is checked against the inferred architecture before any
    model is built (``checkpoint_checks``): a malformed file costs no memory.

    Args:
        path: ``.pth``/``.pt``/``.safetensors`` file.
        arch: architecture name from ``ARCHS`` to override the head count rule.
        checkpoint_key: take the state dict under this top-level key instead of detecting.
        fmt: force a layout from ``FORMATS`` (when detection is ambiguous).
        student: load the student/online weights of a training checkpoint.
        img_size: evaluation resolution; the position table is resized to it (None: the
            checkpoint's own resolution).
        num_heads: attention heads, for widths the head-count rule does not know (shapes
            cannot tell it); overrides the rule, the layout's hint and ``arch``.
        family: who trained the checkpoint (``FAMILIES``), for layouts several families
            share; it decides every protocol's defaults. None: the layout's first family.
        allow_nonfinite: evaluate weights holding NaN/inf (reported) instead of refusing them.
    """
    path = Path(path)
    check_family_name(family)
    ckpt = read_checkpoint(path)
    try:
        chosen, sd, dropped = _extract(ckpt, path=path, checkpoint_key=checkpoint_key, fmt=fmt,
                                       student=student)
        nonfinite = check_tensors(sd, allow_nonfinite=allow_nonfinite)
        sd = normalize_vit_keys(sd)
        spec = _checked_arch(sd, chosen, arch=arch, num_heads=num_heads, path=path)
    except CheckpointError as err:
        msg = str(err)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if nonfinite:
        log.warning("%s: %d tensor(s) hold NaN or inf values (--allow-nonfinite): %s", path,
                    len(nonfinite), ", ".join(nonfinite[:10]))
    choice = choose_family(chosen.name, chosen.families, family)
    img_size = img_size or spec.img_size
    if img_size % spec.patch_size:
        raise ConfigError(f"image size {img_size} is not a multiple of the patch size {spec.patch_size}")
    prefix = 0 if spec.no_embed_class else 1
    sincos = is_sincos(sd["pos_embed"], num_prefix=prefix)
    sd["pos_embed"] = resize_pos_embed(
        sd["pos_embed"], new_grid=img_size // spec.patch_size, num_prefix=prefix, sincos=sincos,
        dinov2_offset=choice.family == "dinov2" and spec.reg_tokens == 0)
    spec = with_img_size(spec, img_size)
    model = build_vit(spec)
    strict_load(model, sd, path=path)
    model.pos_embed.requires_grad_(not sincos)
    model.eval()
    log.info("loaded %s", path)
    return LoadedBackbone(
        model=model, format=chosen.name, family=choice.family, arch=spec, sha256=sha256_file(path),
        path=path, dropped=tuple(dropped), pos_embed="sincos" if sincos else "learned",
        student=student, checkpoint_key=checkpoint_key, family_choice=choice, nonfinite=nonfinite,
    )


def _checked_arch(sd: StateDict, chosen: CheckpointFormat, *, arch: str | None,
                  num_heads: int | None, path: Path) -> ArchSpec:
    """The architecture of ``sd``, after checking every key and shape against it (no model built)."""
    hint = chosen.num_heads_hint(sd["cls_token"].shape[-1]) if (
        chosen.num_heads_hint and "cls_token" in sd) else None
    spec = resolve_arch(infer_arch(sd, num_heads=hint), arch, path=path)
    if num_heads is not None:
        if num_heads < 1 or spec.embed_dim % num_heads:
            raise ConfigError(f"--num-heads {num_heads} does not divide the width {spec.embed_dim}")
        spec = replace(spec, num_heads=num_heads)
    if spec.embed_dim % spec.num_heads:
        divisors = [d for d in range(1, spec.embed_dim + 1) if spec.embed_dim % d == 0][:8]
        raise CheckpointError(
            f"width {spec.embed_dim} is not divisible by the {spec.num_heads} heads the default rule "
            f"gives; pass --num-heads N (a divisor of {spec.embed_dim}: {', '.join(map(str, divisors))} ...)")
    problems = shape_problems(_expected_shapes(spec), sd)
    if problems:
        raise CheckpointError(f"backbone does not match the architecture: {'; '.join(problems)}")
    return spec


@functools.lru_cache(maxsize=8)
def _expected_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``spec``'s ViT, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_vit(spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _extract(
    ckpt: Mapping[str, Any], *, path: Path, checkpoint_key: str | None, fmt: str | None, student: bool
) -> tuple[CheckpointFormat, StateDict, list[str]]:
    if checkpoint_key is not None:
        if student:
            raise ConfigError("--student cannot be combined with --checkpoint-key (the key already "
                              "says which weights to take)")
        custom = CheckpointFormat("custom-key", f"state dict under {checkpoint_key!r}", (GENERIC,),
                                  lambda c: True, lambda c, s: custom_key_extract(c, checkpoint_key))
        sd, dropped = custom.extract(ckpt, student)
        return custom, sd, dropped
    if fmt is not None and fmt not in FORMATS_BY_NAME:
        raise ConfigError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS_BY_NAME)}")
    chosen = FORMATS_BY_NAME[fmt] if fmt else detect_format(ckpt, path=path)
    if fmt and not chosen.detect(ckpt):
        raise CheckpointError(f"--format {fmt} does not fit this checkpoint ({chosen.description}); "
                              f"top-level keys: {top_level_keys(ckpt)}")
    if student and not chosen.has_student:
        raise ConfigError(f"{path}: --student given, but a {chosen.name} checkpoint has no student")
    try:
        sd, dropped = chosen.extract(ckpt, student)
    except KeyError as err:  # e.g. an MSN checkpoint without the 'encoder' that --student needs
        raise CheckpointError(f"{chosen.name} checkpoint has no {err} entry") from None
    return chosen, sd, dropped


def strict_load(model: torch.nn.Module, sd: StateDict, *, path: Path) -> None:
    """Load ``sd`` into ``model``; any missing, unexpected or mis-shaped key is an error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_problems(expected, sd)
    if problems:
        raise CheckpointError(f"{path}: backbone does not match the architecture: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True)
