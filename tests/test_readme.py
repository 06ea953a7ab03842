"""The README's tables describe what the code does: layouts, families and their recipes, records."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moca_eval.checkpoint_formats import FORMATS
from moca_eval.families import FAMILIES, SHARED_RECIPES, recipe_name
from moca_eval.record import HEADLINES, schema

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_after(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading`` (header row dropped)."""
    text = README[README.index(heading):]
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows[2:]]


def test_layouts_table_names_every_layout_once():
    named = [name for row in table_after("### Checkpoints") for name in re.findall(r"`([^`]+)`", row[0])]
    assert sorted(named) == sorted(f.name for f in FORMATS)


def test_families_table_gives_each_familys_feature_and_recipes():
    rows = {row[0]: row for row in table_after("### Families")}
    assert list(rows) == FAMILIES.names()
    for family, (_, feature, linear, lowshot, finetune, seg, det) in rows.items():
        assert feature == FAMILIES.get(family).feature
        for protocol, cell in (("linear", linear), ("lowshot", lowshot), ("finetune", finetune)):
            assert cell.split()[0] == recipe_name(protocol, family)[0], (family, protocol)
        assert (seg, det) == (SHARED_RECIPES["seg"], SHARED_RECIPES["det"])


@pytest.mark.parametrize("protocol", sorted(HEADLINES))
def test_result_records_section_names_every_protocol(protocol):
    section = README[README.index("### Result records"):README.index("### Several GPUs")]
    assert f"`{protocol}`" in section


def test_result_records_table_lists_the_schemas_top_level_keys():
    keys = [row[0].strip("`") for row in table_after("### Result records")]
    assert keys == list(schema()["properties"])
