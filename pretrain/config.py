"""``PretrainConfig``: every MOCA pretraining setting, with the paper's defaults, and presets.

Defaults are the paper's ViT-B/16 recipe (Sec. 3, App. C, Table 11: MOCA v0.9); where the
paper is silent they follow MOCA's public training script (valeoai/MOCA ``main_pretrain.py``),
which is named in the field's comment. Presets: ``vit_base`` (the paper), ``vit_base_release``
(the official script and README command, release v1.0, the public checkpoint) and ``tiny``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from moca_eval.errors import ConfigError
from moca_eval.models import ARCHS, ArchSpec
from moca_eval.pretrain.masking import check_rounds

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PretrainConfig:
    """MOCA pretraining settings. ``batch_size`` is the global batch (all processes)."""

    data_dir: str = ""
    output_dir: str = ""
    resume: bool = False
    resume_from: str = ""  # checkpoint to resume from ("" = output_dir/checkpoint-last.pth)
    # Backbone (student and teacher): a ViT from ``moca_eval.models.ARCHS`` at ``img_size``.
    arch: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    depth: int | None = None  # blocks; None = the arch's depth
    # Online codebook and teacher assignments (Sec. 3.1).
    num_words: int = 4096  # K
    num_new_words: int = 4  # K_new, summed over processes
    inv_delta: float = 10.0  # tau_T = mu_MSD / inv_delta
    mu_decay: float = 0.99  # EMA decay of mu_MSD
    border: int = 2  # rows/columns ignored by the image-wise average and codebook sampling
    # Student predictions (Sec. 3.2-3.3).
    kappa: float = 3.0  # inverse student temperature (1/3)
    pred_mlp_ratio: float = 2.0  # prototype-generator hidden width / input width
    img_weight: float = 0.5  # lambda in L = lambda L_IMG + (1 - lambda) L_LOC
    mask_ratios: tuple[float, ...] = (0.55, 0.75)  # one entry per masking round
    partial_decoding: float | None = 0.2  # masked tokens decoded, fraction of all; None = all
    # Condenser decoder (Sec. 3.3).
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    decoder_layer: int = 8  # 1-based block whose patch tokens feed the decoder
    # Optimisation (App. C).
    epochs: int = 200
    warmup_epochs: float = 30
    batch_size: int = 2048
    blr: float = 1.5e-4  # lr = blr * batch_size / 256 unless ``lr`` is set
    lr: float | None = None
    min_lr: float = 0.0
    lr_decay_epochs_mul: float = 1.25  # cosine reaches min_lr at this x epochs (MOCA script)
    lr_prototypes: float | None = 1e-4  # constant lr of the generators (MOCA script); None = lr
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine to this value (MOCA v1.0 uses 0.2)
    momentum: float = 0.99  # teacher EMA momentum, cosine to momentum_end
    momentum_end: float = 1.0
    clip_grad: float | None = 0.1  # max global gradient norm (MOCA script); None or 0 = off
    # Data.
    crop_min: float = 0.2
    # Runtime.
    seed: int = 0
    num_workers: int = 8
    device: str = "auto"
    precision: Precision = "auto"  # auto: bf16 on GPUs with bf16, else fp16 + scaler; fp32 on CPU
    save_every: int = 0  # also keep checkpoint-<epoch>.pth every N epochs (0: last only)
    progress: bool = True

    @property
    def arch_spec(self) -> ArchSpec:
        """The backbone architecture at the pretraining resolution."""
        base = ARCHS[self.arch]
        return replace(base, img_size=self.img_size, patch_size=self.patch_size,
                       depth=self.depth or base.depth)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def base_lr(self) -> float:
        """The peak learning rate (``lr`` or ``blr * batch_size / 256``)."""
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def validate(self) -> PretrainConfig:
        """Check cross-field constraints; raise ``ConfigError`` naming the field."""
        _check(self.arch in ARCHS, f"unknown arch {self.arch!r}; known: {', '.join(ARCHS)}")
        _check(self.img_size % self.patch_size == 0,
               f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.grid_size > 2 * self.border,
               f"a {self.grid_size}x{self.grid_size} token grid has nothing inside a border of "
               f"{self.border}; use larger images or a smaller patch_size")
        _check_rates(self)
        _check(self.num_words % self.num_new_words == 0,
               f"num_words {self.num_words} must be a multiple of num_new_words {self.num_new_words}")
        depth = self.arch_spec.depth
        _check(1 <= self.decoder_layer <= depth,
               f"decoder_layer {self.decoder_layer} outside 1..{depth} (the backbone's blocks)")
        _check(1 <= len(self.mask_ratios) <= 2 and all(0 < r < 1 for r in self.mask_ratios),
               f"mask_ratios {self.mask_ratios}: one or two ratios in (0, 1)")
        _check(0.0 <= self.img_weight <= 1.0, f"img_weight {self.img_weight} outside [0, 1]")
        _check(self.epochs > 0 and self.batch_size > 0, "epochs and batch_size must be positive")
        _check(self.decoder_dim % 4 == 0 and self.decoder_dim % self.decoder_heads == 0,
               f"decoder_dim {self.decoder_dim} must be divisible by 4 and by decoder_heads")
        _check(self.num_new_words <= self.batch_size,
               f"num_new_words {self.num_new_words} exceeds the batch size {self.batch_size} "
               "(one new codebook word per image)")
        check_rounds(self.grid_size**2, self.mask_ratios, self.partial_decoding)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples) for JSON and the checkpoint's ``args``."""
        out = asdict(self)
        out["mask_ratios"] = list(self.mask_ratios)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """Inverse of ``to_dict``; unknown keys (e.g. MOCA's own ``args``) are ignored."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        if "mask_ratios" in kept:
            kept["mask_ratios"] = tuple(kept["mask_ratios"])
        return cls(**kept)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_rates(cfg: PretrainConfig) -> None:
    """Learning rates positive and finite, momenta in [0, 1], counts positive (NaN fails every test)."""
    for name in ("lr", "blr", "lr_prototypes"):
        value = getattr(cfg, name)
        _check(value is None or (math.isfinite(value) and value > 0),
               f"{name} {value} must be a positive number")
    for name in ("momentum", "momentum_end"):
        value = getattr(cfg, name)
        _check(0.0 <= value <= 1.0, f"{name} {value} outside [0, 1] (teacher EMA momentum)")
    for name in ("weight_decay", "weight_decay_end", "warmup_epochs", "min_lr", "clip_grad"):
        value = getattr(cfg, name, None)
        _check(value is None or (math.isfinite(value) and value >= 0), f"{name} {value} must be >= 0")
    for name in ("num_words", "num_new_words", "img_size"):
        _check(getattr(cfg, name) >= 1, f"{name} {getattr(cfg, name)} must be >= 1")


# ``tiny``: the demo preset, a few minutes on 2 CPU cores on the 64-px demo data. ViT-Tiny
# width (192, 3 heads) with 2 blocks and 8-px patches (an 8x8 token grid, so the border is
# 1 token); the condenser reads block 1; a 1-block decoder of width 96; K = 256 codes, 16 new
# per step. Short runs need a teacher that keeps moving: momentum 0.9 -> 0.99 (the paper's
# 0.99 -> 1 freezes it before the features take off) and an lr that stays high (cosine to
# zero at 2x the epochs), and no gradient clipping. Measured on the demo data: k-NN top-1
# ~55% after 24 epochs (600 steps), from ~17% at initialisation (chance 10%).
#
# ``vit_base`` is the paper's Table 11 (v0.9): momentum 0.99 -> 1, weight decay 0.05. The paper
# says nothing of gradient clipping; both ViT-B presets clip at 0.1, the script's default.
# ``vit_base_release`` is the official script with its README command (v1.0, the released
# checkpoint): momentum 0.994 -> 1 and weight decay 0.05 -> 0.2 (cosine).
PRESETS: dict[str, PretrainConfig] = {
    "vit_base": PretrainConfig(),
    "vit_base_release": PretrainConfig(momentum=0.994, weight_decay_end=0.2),
    "tiny": PretrainConfig(
        arch="vit_tiny", depth=2, img_size=64, patch_size=8, border=1,
        num_words=256, num_new_words=16,
        decoder_dim=96, decoder_depth=1, decoder_heads=3, decoder_layer=1,
        epochs=24, warmup_epochs=2, batch_size=16, lr=1e-3, lr_prototypes=1e-3,
        lr_decay_epochs_mul=2.0, momentum=0.9, momentum_end=0.99, num_workers=2, crop_min=0.25,
        clip_grad=None,
    ),
}


def preset(name: str, **overrides: Any) -> PretrainConfig:
    """A preset with ``overrides`` applied (``None`` values are ignored), validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown pretraining config {name!r}; known: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown pretraining option(s): {', '.join(unknown)}")
    if "mask_ratios" in given:
        given["mask_ratios"] = tuple(given["mask_ratios"])
    return replace(PRESETS[name], **given).validate()
