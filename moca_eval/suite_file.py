"""Suite files (TOML or YAML) and command-line suites, checked completely before any work.

Keys (README "Suite files"); relative paths are relative to the suite file::

    name = "paper"                   # shown in the overview
    output = "runs/paper"            # run directories go under it (default runs/<name>)
    data = "/datasets/imagenet"      # ImageFolder root; also train_split, val_split, resize,
    interpolation = "bicubic"        #   interpolation (default: each recipe's), limit
    checkpoints = ["moca.pth", "hf-hub:ORG/NAME", {path = "dino.pth", family = "dino", label = "dino"}]
    protocols = ["knn", "lowshot", "linear_cached"]
    [backbone]                       # BackboneConfig fields for every checkpoint (img_size, ...)
    [runtime]                        # ExtractConfig fields: batch_size, num_workers, device, ...
    [protocol.linear_cached]         # settings of one entry: the protocol config's fields and,
    protocol = "linear"              #   for linear/finetune, recipe fields; `protocol` names the
    mode = "cached"                  #   protocol when the entry's name is not one

An unknown key, protocol or checkpoint is one ``ConfigError`` line naming the file, the line and
the close matches.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from moca_eval.errors import ConfigError, MocaEvalError
from moca_eval.suite import PROTOCOLS, CheckpointEntry, Entry, Suite, build_config

TOP_KEYS = ("name", "output", "data", "train_split", "val_split", "resize", "interpolation", "limit",
            "checkpoints", "protocols", "backbone", "runtime", "protocol")
CHECKPOINT_KEYS = ("path", "label")
PATH_KEYS = ("data", "cache_dir", "split_dir", "names_file", "weights")  # in [runtime], [protocol.*]


class SuiteText:
    """The text of a suite file, to name the line of a key or value in error messages."""

    def __init__(self, name: str, text: str = "") -> None:
        self.name, self.lines = name, text.splitlines()

    def error(self, what: str, needle: str | None = None, *, section: str | None = None,
              choices: list[str] | tuple[str, ...] = ()) -> ConfigError:
        line = self.line_of(needle, section=section) if needle is not None else None
        where = f"{self.name}:{line}" if line else self.name
        close = difflib.get_close_matches(str(needle), list(choices), n=3, cutoff=0.5) if choices else []
        hint = f" (close: {', '.join(close)})" if close else (
            f" (known: {', '.join(choices)})" if choices and len(choices) <= 12 else "")
        return ConfigError(f"{where}: {what}{hint}")

    def line_of(self, needle: str, *, section: str | None = None) -> int | None:
        start = 0
        if section:
            last = re.escape(section.split(".")[-1])
            header = re.compile(rf"^\s*\[+\s*{re.escape(section)}\s*\]+|^\s*{last}\s*:")
            start = next((i for i, line in enumerate(self.lines) if header.search(line)), 0)
        key = re.compile(rf"""(^|[\s{{,])["']?{re.escape(needle)}["']?\s*[=:]""")
        quoted = (f'"{needle}"', f"'{needle}'")
        for match in (lambda t: key.search(t) or any(q in t for q in quoted), lambda t: needle in t):
            found = next((i + 1 for i in range(start, len(self.lines)) if match(self.lines[i])), None)
            if found:
                return found
        return None


def read_suite_file(path: Path) -> tuple[dict[str, Any], SuiteText]:
    """Parse a ``.toml`` or ``.yaml``/``.yml`` suite file (relative paths: relative to it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such suite file")
    text = path.read_text()
    source = SuiteText(str(path), text)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            import tomllib

            raw = tomllib.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is bad input
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a table of keys at the top level")
    return _relative_to(raw, path.parent), source


def _relative_to(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)
    for key in ("output", "data"):
        if isinstance(out.get(key), str):
            out[key] = str(base / out[key])
    checkpoints = []
    for ck in out.get("checkpoints") or []:
        if isinstance(ck, str) and not ck.startswith(("hf-hub:", "timm:")):
            ck = str(base / ck)
        elif isinstance(ck, dict) and isinstance(ck.get("path"), str) and ":" not in ck["path"]:
            ck = {**ck, "path": str(base / ck["path"])}
        checkpoints.append(ck)
    if "checkpoints" in out:
        out["checkpoints"] = checkpoints
    tables = [out.get("runtime"), *(out.get("protocol") or {}).values()]
    for table in (t for t in tables if isinstance(t, dict)):
        for key in PATH_KEYS:
            if isinstance(table.get(key), str):
                table[key] = str(base / table[key])
    return out


def build_suite(raw: dict[str, Any], source: SuiteText) -> Suite:
    """Check every key, protocol, setting and checkpoint of ``raw``; the ``Suite`` to run."""
    from moca_eval.features import ExtractConfig
    from moca_eval.pipeline import BackboneConfig, DataConfig

    for key in raw:
        if key not in TOP_KEYS:
            raise source.error(f"unknown key {key!r}", key, choices=TOP_KEYS)
    backbone_keys = [f.name for f in fields(BackboneConfig) if f.name != "ckpt"]
    backbone = _table(raw, "backbone", source, backbone_keys)
    runtime = _table(raw, "runtime", source, [f.name for f in fields(ExtractConfig)])
    if runtime.get("cache_dir") is not None:
        runtime["cache_dir"] = Path(runtime["cache_dir"])
    entries = _entries(raw, source)
    name = str(raw.get("name") or "suite")
    if raw.get("data") is None and any(not PROTOCOLS[e.protocol].dense for e in entries):
        raise source.error("no dataset: set `data` (or pass --data)")
    try:
        data = DataConfig(root=Path(raw.get("data") or "."), train_split=raw.get("train_split", "train"),
                          val_split=raw.get("val_split", "val"), resize=raw.get("resize"),
                          interpolation=raw.get("interpolation"), limit=raw.get("limit"))
        extract = ExtractConfig(**runtime)
    except (MocaEvalError, TypeError, ValueError) as err:
        raise source.error(str(err)) from None
    if raw.get("data") is not None and not data.root.is_dir():
        raise source.error(f"{data.root}: no such dataset directory", "data")
    checkpoints = _checkpoints(raw, source, backbone, backbone_keys)
    suite = Suite(checkpoints, entries, data, extract, Path(raw.get("output") or Path("runs") / name), name)
    for entry in entries:  # the configs' own checks, before any work
        try:
            build_config(PROTOCOLS[entry.protocol], entry.settings, run_dir=None, data=data, extract=extract,
                         backbone=BackboneConfig(checkpoints[0].source.path, **checkpoints[0].options))
        except (MocaEvalError, TypeError, ValueError) as err:
            raise source.error(f"[protocol.{entry.name}]: {err}", entry.name) from None
    return suite


def _table(raw: dict[str, Any], name: str, source: SuiteText, allowed: list[str]) -> dict[str, Any]:
    table = raw.get(name) or {}
    if not isinstance(table, dict):
        raise source.error(f"{name} must be a table", name)
    for key in table:
        if key not in allowed:
            raise source.error(f"unknown key {key!r} in [{name}]", key, section=name, choices=allowed)
    return dict(table)


def _entries(raw: dict[str, Any], source: SuiteText) -> list[Entry]:
    tables = raw.get("protocol") or {}
    names = raw.get("protocols") or list(tables)
    if isinstance(names, str):
        names = [names]
    if not names:
        raise source.error("no protocols: list them in `protocols` (or pass --protocols)",
                           choices=list(PROTOCOLS))
    entries = []
    for name in names:
        settings = dict(tables.get(name) or {})
        protocol = settings.pop("protocol", name)
        if protocol not in PROTOCOLS:
            raise source.error(f"unknown protocol {protocol!r}", protocol,
                               choices=[*PROTOCOLS, *tables])
        spec = PROTOCOLS[protocol]
        if spec.needs and importlib.util.find_spec(spec.needs) is None:
            raise source.error(f"protocol {protocol} needs {spec.needs} (pip install -e '.[dense]')", name)
        allowed = spec.setting_names()
        for key in settings:
            if key not in allowed:
                raise source.error(f"unknown {protocol} setting {key!r}", key, section=f"protocol.{name}",
                                   choices=allowed)
        entries.append(Entry(name, protocol, settings))
    return entries


def _checkpoints(raw: dict[str, Any], source: SuiteText, backbone: dict[str, Any],
                 backbone_keys: list[str]) -> list[CheckpointEntry]:
    from moca_eval.sources import resolve

    items = raw.get("checkpoints") or []
    if isinstance(items, str):
        items = [items]
    if not items:
        raise source.error("no checkpoints: list them in `checkpoints` (or pass --ckpt)")
    out: list[CheckpointEntry] = []
    for item in items:
        item = {"path": item} if isinstance(item, str) else dict(item)
        for key in item:
            if key not in (*CHECKPOINT_KEYS, *backbone_keys):
                raise source.error(f"unknown checkpoint key {key!r}", key,
                                   choices=[*CHECKPOINT_KEYS, *backbone_keys])
        spec = str(item.pop("path", ""))
        label = item.pop("label", None)
        try:
            resolved = resolve(spec)
        except MocaEvalError as err:
            raise source.error(str(err), Path(spec).name if ":" not in spec else spec,
                               choices=_siblings(spec)) from None
        entry = CheckpointEntry(resolved, {**backbone, **item}, label)
        if any(e.source.path == resolved.path and e.options == entry.options for e in out):
            raise source.error(f"checkpoint {spec} is listed twice", Path(spec).name)
        out.append(entry)
    return out


def _siblings(spec: str) -> list[str]:
    """File names next to a missing checkpoint, for close matches."""
    parent = Path(spec).parent
    return sorted(p.name for p in parent.iterdir()) if ":" not in spec and parent.is_dir() else []
