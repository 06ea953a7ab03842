"""``moca-eval recipes``: which recipe each family gets per protocol, and every recipe's settings."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

from moca_eval.results import format_table

PROTOCOL_TABLES = ("linear", "lowshot", "finetune")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="the family x protocol table of defaults, and each recipe's settings",
                       description="A checkpoint's family (from its layout, or --family) picks the recipe "
                       "of every protocol; every value shown can be overridden with the command's flags.")
    p.add_argument("protocol", nargs="?", choices=["families", *PROTOCOL_TABLES],
                   help="show one table only (families: the family x protocol table)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def registries() -> dict:
    from moca_eval.protocols.finetune import FINETUNE_RECIPES
    from moca_eval.protocols.linear import LINEAR_RECIPES
    from moca_eval.protocols.lowshot import LOWSHOT_RECIPES

    return {"linear": LINEAR_RECIPES, "lowshot": LOWSHOT_RECIPES, "finetune": FINETUNE_RECIPES}


def family_table() -> list[dict]:
    """One row per family: the feature and recipe every protocol uses by default."""
    from moca_eval.families import FAMILIES, SHARED_RECIPES, recipe_name

    rows = []
    for name in FAMILIES.names():
        family = FAMILIES.get(name)
        row = {"family": name, "knn/extract feature": family.feature}
        for protocol in (*PROTOCOL_TABLES, *SHARED_RECIPES):
            row[protocol] = recipe_name(protocol, name)[0]
        rows.append(row)
    return rows


def recipe_tables() -> dict[str, list[dict]]:
    """Protocol -> one row per recipe (every field)."""
    return {name: [asdict(reg.get(r)) for r in reg.names()] for name, reg in registries().items()}


def _cell(value: object) -> object:
    if isinstance(value, tuple) and len(value) > 6:
        return f"{len(value)} values {value[0]:g}..{value[-1]:g}"
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else value


def run(args: argparse.Namespace) -> int:
    from moca_eval.families import RECIPES_VERSION

    tables = {"families": family_table(), **recipe_tables()}
    chosen = [args.protocol] if args.protocol else list(tables)
    if args.json:
        print(json.dumps({"recipes_version": RECIPES_VERSION, **{k: tables[k] for k in chosen}}, indent=2))
        return 0
    for name in chosen:
        rows = tables[name]
        if name == "families":
            print("\nfamily x protocol (a layout several families share assumes the first; --family)")
            print(format_table(rows, list(rows[0])))
            continue
        recipe_type = type(registries()[name].get(rows[0]["name"]))
        columns = [f.name for f in fields(recipe_type) if f.name != "description"]
        print(f"\n{name} recipes")
        print(format_table([{k: _cell(v) for k, v in r.items()} for r in rows], columns))
        for r in rows:
            print(f"  {r['name']}: {r['description']}")
    return 0
