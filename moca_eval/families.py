"""Checkpoint families: who trained a checkpoint decides every protocol's defaults.

A checkpoint's layout (``checkpoint_formats``) names the families that save files of that shape;
the first is assumed unless ``--family`` says otherwise (``{'model': backbone}`` is both MOCA's
extracted teacher and MAE's release). A family's recipe for each protocol is registered under the
family's own name in that protocol's recipe registry (``LINEAR_RECIPES``, ``LOWSHOT_RECIPES``,
``FINETUNE_RECIPES``); families that published no recipe for a protocol get a recipe of that name
whose description says which generic settings it uses. Bump ``RECIPES_VERSION`` whenever a default
that changes a metric changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from moca_eval.errors import ConfigError
from moca_eval.registry import Registry

log = logging.getLogger(__name__)

# 2: the mae linear recipe uses LARS at batch 16384; 3: defaults follow the checkpoint's family
# (new low-shot, linear and fine-tuning recipes for dino, mae, dinov2, mocov3, msn and timm).
RECIPES_VERSION = 3
GENERIC = "timm"
# Protocols whose recipes are registered per family (the others use one recipe for every family).
FAMILY_PROTOCOLS = ("linear", "lowshot", "finetune")
SHARED_RECIPES = {"seg": "segmenter", "det": "cascade-mask-rcnn"}


@dataclass(frozen=True)
class Family:
    """One self-supervised project; ``feature`` is its k-NN / ``extract`` embedding."""

    name: str
    feature: str
    description: str


FAMILIES: Registry[Family] = Registry("family")
for _f in (
    Family("moca", "avg", "MOCA: [AVG] token (mean of final-LN patch tokens), teacher"),
    Family("dino", "cls", "DINO: final-LN CLS of the teacher"),
    Family("ibot", "cls", "iBOT: final-LN CLS of the teacher"),
    Family("mae", "cls", "MAE: final-LN CLS of the encoder"),
    Family("msn", "cls", "MSN: final-LN CLS of the target encoder"),
    Family("mocov3", "cls", "MoCo-v3: final-LN CLS of the base encoder"),
    Family("dinov2", "cls", "DINOv2: final-LN CLS (registers excluded)"),
    Family(GENERIC, "cls", "timm or unknown training: generic defaults (final-LN CLS)"),
):
    FAMILIES.register(_f.name, _f, aliases=("unknown",) if _f.name == GENERIC else ())


@dataclass(frozen=True)
class FamilyChoice:
    """The family a run uses and why (for the log line and the record)."""

    family: str
    source: str  # "layout" | "assumed" | "--family"
    reason: str


def choose_family(layout: str, candidates: tuple[str, ...], requested: str | None = None) -> FamilyChoice:
    """The family of a checkpoint of ``layout`` whose possible families are ``candidates``."""
    if requested is not None:
        family = FAMILIES.canonical(requested)
        if family not in candidates:
            log.warning("--family %s overrides layout %s, which is saved by %s", family, layout,
                        ", ".join(candidates))
        return FamilyChoice(family, "--family", f"--family {family}")
    if len(candidates) == 1:
        return FamilyChoice(candidates[0], "layout", f"layout {layout} is {candidates[0]}'s")
    others = ", ".join(candidates[1:])
    return FamilyChoice(candidates[0], "assumed",
                        f"layout {layout} is saved by {', '.join(candidates)}; assumed {candidates[0]} "
                        f"(pass --family {candidates[1]} or --family {GENERIC} if it is {others})")


def recipe_name(protocol: str, family: str, requested: str | None = None) -> tuple[str, str]:
    """``(recipe, why)`` for ``protocol``: ``requested`` (``--recipe``) or the family's."""
    if protocol in SHARED_RECIPES:
        return SHARED_RECIPES[protocol], f"{protocol} uses one recipe for every family"
    if requested is not None:
        return requested, "--recipe"
    return family, f"family {family}"


def resolve_recipe(registry: Registry, protocol: str, backbone: object, requested: object = None,
                   overrides: dict | None = None) -> tuple[object, str]:
    """The recipe object a run uses, and why; prints the run's family/recipe line.

    ``requested``: a recipe object (used as given), a name (``--recipe``) or None (the family's).
    ``overrides``: field values replacing the recipe's (``None`` values are ignored).
    """
    if requested is not None and not isinstance(requested, str):
        recipe, why = requested, "given"
    else:
        name, why = recipe_name(protocol, backbone.family, requested)
        recipe = registry.get(name)
    changed = {k: v for k, v in (overrides or {}).items() if v is not None}
    if changed:
        recipe = replace(recipe, **changed)
        why += f"; overridden: {', '.join(sorted(changed))}"
    announce(protocol, backbone.family_choice, recipe.name, why)
    return recipe, why


def announce(protocol: str, choice: FamilyChoice | None, recipe: str, why: str) -> str:
    """The one line every run prints: which family and recipe, and why."""
    family = f"family {choice.family} ({choice.reason})" if choice else "family unknown"
    line = f"{protocol}: {family}; recipe {recipe} ({why})"
    log.info(line)
    return line


def check_family_name(name: str | None) -> str | None:
    """Validate a ``--family`` value early (one line listing the known families)."""
    if name is None:
        return None
    try:
        return FAMILIES.canonical(name)
    except ConfigError as err:
        raise ConfigError(f"--family: {err}") from None
