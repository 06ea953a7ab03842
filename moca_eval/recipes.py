"""Per-project evaluation defaults ("recipes"), from PROTOCOLS.md.

Each protocol looks up what it needs here by the recipe a checkpoint's format implies
(``LoadedBackbone.recipe``), and every default can be overridden flag by flag. Bump
``RECIPES_VERSION`` whenever a default that changes a metric changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from moca_eval.registry import Registry

RECIPES_VERSION = 2  # 2: the mae linear recipe uses LARS at batch 16384 (MAE main_linprobe)


@dataclass(frozen=True)
class Recipe:
    """Defaults of one project's published evaluations."""

    name: str
    knn_feature: str
    linear_feature: str
    description: str


RECIPES: Registry[Recipe] = Registry("recipe")
for _recipe in (
    Recipe("moca", "avg", "cls+avg", "MOCA: [AVG] token (mean of final-LN patch tokens)"),
    Recipe("dino", "cls", "cls-last4", "DINO: final-LN CLS; linear on last-4 CLS (ViT-S)"),
    Recipe("ibot", "cls", "cls+avg", "iBOT: final-LN CLS; linear on CLS+avg (ViT-B)"),
    Recipe("dinov2", "cls", "cls+avg", "DINOv2: final-LN CLS (registers excluded)"),
    Recipe("mae", "cls", "cls", "MAE: final-LN CLS (linear adds BatchNorm without affine)"),
    Recipe("msn", "cls", "cls", "MSN: target encoder CLS"),
    Recipe("mocov3", "cls", "cls", "MoCo-v3: base encoder CLS"),
):
    RECIPES.register(_recipe.name, _recipe)
