"""Registry: names and aliases, helpful unknown-name errors, lazy ``module:attr`` entries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moca_eval.errors import ConfigError
from moca_eval.registry import Registry


def _registry() -> Registry:
    reg: Registry = Registry("protocol")
    reg.register("knn", 1, aliases=("k-nn",))
    reg.register("linear", 2)
    reg.register("lowshot", 3)
    return reg


def test_get_by_name_and_alias_and_names_in_registration_order() -> None:
    reg = _registry()
    assert (reg.get("knn"), reg.get("k-nn"), reg.get("linear")) == (1, 1, 2)
    assert reg.names() == ["knn", "linear", "lowshot"] == list(reg)
    assert "k-nn" in reg and "knn" in reg and "mlp" not in reg
    assert reg.canonical("k-nn") == "knn"


@pytest.mark.parametrize("name", ["knn", "k-nn", "linear"])
def test_registering_a_taken_name_or_alias_is_an_error(name: str) -> None:
    reg = _registry()
    with pytest.raises(ValueError, match=f"^protocol '{name}' is registered twice$"):
        reg.register(name, 9)
    with pytest.raises(ValueError, match=f"^protocol '{name}' is registered twice$"):
        reg.register("fresh", 9, aliases=(name,))
    assert "fresh" not in reg


def test_unknown_name_suggests_close_matches_and_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"^unknown protocol 'linaer'; did you mean linear\? "
                       r"\(known: knn, linear, lowshot\)$"):
        _registry().get("linaer")


def test_unknown_name_without_close_match_only_lists_known() -> None:
    known = r"\(known: knn, linear, lowshot\)$"
    with pytest.raises(ConfigError, match=rf"^unknown protocol 'segmentation' {known}"):
        _registry().get("segmentation")


def test_lazy_entry_is_imported_on_first_get_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lazy_registry_target.py").write_text("VALUE = {'imported': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_registry_target", raising=False)
    reg: Registry = Registry("thing")
    reg.register("lazy", "lazy_registry_target:VALUE")
    assert "lazy_registry_target" not in sys.modules  # registering imports nothing

    value = reg.get("lazy")

    assert value == {"imported": True}
    assert value is sys.modules["lazy_registry_target"].VALUE
    assert reg.get("lazy") is value


def test_plain_string_without_colon_is_returned_as_is() -> None:
    reg: Registry = Registry("thing")
    reg.register("text", "just a string")
    assert reg.get("text") == "just a string"
