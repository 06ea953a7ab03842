"""The command line's help: every option explained, no heavy import to print it."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from moca_eval.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, deeper in _subparsers(sub):
                    yield f"{name} {inner}", deeper


COMMANDS = dict(_subparsers(build_parser()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_text(command):
    missing = [action.option_strings[0] for action in COMMANDS[command]._actions
               if action.option_strings and not (action.help or "").strip()]
    assert not missing, f"moca-eval {command}: options without help: {missing}"


def test_help_imports_neither_torch_nor_numpy():
    """``moca-eval --help`` builds every subcommand's parser without importing the heavy stack
    (its start-up time is measured in bench/bench_help.py)."""
    code = ("import sys; from moca_eval.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'timm', 'PIL', 'mmengine') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_help_opens_with_user_facing_text(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    first = capsys.readouterr().out.split("\n\n")[1]
    assert "self-supervised" in first or "evaluate" in first.lower()


def test_pretrain_preset_names_are_the_presets():
    from moca_eval.cli.pretrain import PRESET_NAMES
    from moca_eval.pretrain.config import PRESETS

    assert sorted(PRESET_NAMES) == sorted(PRESETS)
