"""``moca-eval recipes``: the named evaluation recipes (feature defaults, linear probe, fine-tuning)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

from moca_eval.results import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the named recipes and their settings",
                       description="Every value shown can be overridden with the command's flags.")
    p.add_argument("protocol", nargs="?", choices=["features", "linear", "finetune", "lowshot"],
                   help="show one table only")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def recipe_tables() -> dict[str, list[dict]]:
    """Protocol -> one row per recipe (every field)."""
    from moca_eval.protocols.finetune import FINETUNE_RECIPES
    from moca_eval.protocols.linear import LINEAR_RECIPES
    from moca_eval.protocols.lowshot import LOWSHOT_RECIPES
    from moca_eval.recipes import RECIPES

    def rows(registry) -> list[dict]:
        return [asdict(registry.get(name)) for name in registry.names()]

    return {"features": rows(RECIPES), "linear": rows(LINEAR_RECIPES), "finetune": rows(FINETUNE_RECIPES),
            "lowshot": rows(LOWSHOT_RECIPES)}


def _cell(value: object) -> object:
    if isinstance(value, tuple) and len(value) > 6:
        return f"{len(value)} values {value[0]:g}..{value[-1]:g}"
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else value


def run(args: argparse.Namespace) -> int:
    from moca_eval.recipes import RECIPES_VERSION

    tables = recipe_tables()
    chosen = [args.protocol] if args.protocol else list(tables)
    if args.json:
        print(json.dumps({"recipes_version": RECIPES_VERSION, **{k: tables[k] for k in chosen}}, indent=2))
        return 0
    for name in chosen:
        rows = tables[name]
        columns = [f.name for f in fields(type_of(name)) if f.name != "description"]
        print(f"\n{name} recipes")
        print(format_table([{k: _cell(v) for k, v in r.items()} for r in rows], columns))
        for r in rows:
            print(f"  {r['name']}: {r['description']}")
    return 0


def type_of(name: str) -> type:
    from moca_eval.protocols.finetune import FinetuneRecipe
    from moca_eval.protocols.linear import LinearRecipe
    from moca_eval.protocols.lowshot import LowshotRecipe
    from moca_eval.recipes import Recipe

    return {"features": Recipe, "linear": LinearRecipe, "finetune": FinetuneRecipe,
            "lowshot": LowshotRecipe}[name]
