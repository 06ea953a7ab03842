"""Error types: each message says what was expected, what was found and how to fix it.

Only the CLI catches these broadly; it prints the message on one line and exits 2.
"""

from __future__ import annotations


class MocaEvalError(Exception):
    """Base class for every error a user can cause and fix."""


class CheckpointError(MocaEvalError):
    """A checkpoint cannot be read, recognised or mapped onto a ViT."""


class DatasetError(MocaEvalError):
    """A dataset directory, image or split file is missing or malformed."""


class ConfigError(MocaEvalError):
    """A configuration value or command-line option is invalid."""
