"""Where results go: never over an input, never over a file moca-eval did not write, checked first.

- ``check_output_file`` / ``check_output_dir``: before any work, an output must be writable (not a
  directory where a file is meant, not under a file, its nearest existing folder writable), must
  not be an input (checkpoint, dataset, split file) or lie inside an input folder, and an existing
  output file must be one moca-eval writes (a result record, an ``extract`` archive, a plot).
- ``claim_run_dir``: a run directory holds ``MARKER`` naming the command that owns it; another
  command (or a folder without the marker holding files the command does not write) is refused,
  and the run's stale temporary files (``.<name>.*.tmp`` of ``results.atomic_path``, left by a
  kill) are removed.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from moca_eval.errors import ConfigError
from moca_eval.results import remove_stale_temps as remove_temp_files
from moca_eval.results import utc_now, write_json_atomic

log = logging.getLogger(__name__)
MARKER = ".moca-eval-run.json"
EXTRACT_MEMBERS = {"features.npy", "labels.npy", "paths.npy", "classes.npy"}


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_writable(path: Path, what: str) -> None:
    """``path`` (which may not exist yet) can be created: no file on the way, a writable folder."""
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise ConfigError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moca-eval-probe.", dir=folder)
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def _same_or_inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def _check_not_input(path: Path, inputs: Iterable[Path], what: str) -> None:
    for source in inputs:
        if source is not None and source.exists() and _same_or_inside(path, source):
            kind = "folder" if source.is_dir() else "file"
            raise ConfigError(f"{what} {path} would overwrite the input {kind} {source}; "
                              "choose another path")


def written_by_moca_eval(path: Path, *, protocol: str | None = None) -> bool:
    """A result record (JSON; of ``protocol`` when given), an ``extract`` archive (.npz) or a
    matplotlib figure."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            record = isinstance(data, dict) and {"schema_version", "protocol"} <= data.keys()
            return record and protocol in (None, data["protocol"])
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                return set(archive.namelist()) == EXTRACT_MEMBERS
        with open(path, "rb") as handle:
            return b"matplotlib" in handle.read(8192).lower()
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def check_output_file(path: Path, *, inputs: Iterable[Path] = (), what: str = "--output",
                      protocol: str | None = None) -> None:
    """Raise ConfigError unless ``path`` can take a result file without destroying anything.

    Raises:
        ConfigError: ``path`` is a directory, under a file, unwritable, an input or inside an
            input folder, or an existing file moca-eval did not write (a result record of
            another ``protocol`` included).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a directory; give a file name")
    _check_not_input(path, inputs, what)
    _check_writable(path, what)
    if path.exists() and not written_by_moca_eval(path, protocol=protocol):
        owner = f"moca-eval {protocol}" if protocol else "moca-eval"
        raise ConfigError(f"{what} {path}: exists and was not written by {owner}; remove it or "
                          "choose another path")


def check_output_dir(path: Path, *, inputs: Iterable[Path] = (), what: str = "--output-dir") -> None:
    """Raise ConfigError unless ``path`` is (or can become) a writable folder holding no input."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: is a file, not a folder")
    _check_not_input(path, inputs, what)
    _check_writable(path / ".probe", what)


def claim_run_dir(path: Path, command: str, *, own_files: tuple[str, ...] = ()) -> None:
    """Make ``path`` the run directory of ``command`` (main process only), or refuse it.

    A folder without the marker is taken when it is empty, or when it holds ``command``'s
    checkpoint (``own_files[0]``, a glob) and nothing but ``own_files`` (a run from before markers).

    Raises:
        ConfigError: the folder belongs to another command, or holds files ``command`` did not write.
    """
    from moca_eval import distributed

    path = Path(path)
    check_output_dir(path)
    owner = run_dir_owner(path)
    if owner is not None and owner != command:
        raise ConfigError(f"{path}: a `moca-eval {owner}` run directory; `{command}` will not write "
                          "into it, choose another --output-dir")
    if owner is None and not _adoptable(path, own_files):
        raise ConfigError(f"{path}: not empty and not a moca-eval {command} run directory (no {MARKER});"
                          " choose a new or empty --output-dir")
    if not distributed.current().is_main:
        return
    remove_stale_temps(path)
    if owner is None:
        write_json_atomic(path / MARKER, {"command": command, "created_utc": utc_now()})


def _adoptable(path: Path, own_files: tuple[str, ...]) -> bool:
    names = [p.name for p in path.iterdir() if not p.name.endswith(".tmp")] if path.is_dir() else []
    if not names:
        return True
    ours = all(any(fnmatch.fnmatch(n, pattern) for pattern in own_files) for n in names)
    return bool(own_files) and ours and any(fnmatch.fnmatch(n, own_files[0]) for n in names)


def run_dir_owner(path: Path) -> str | None:
    """The command named by ``path``'s marker (None: no marker)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        owner = json.loads(marker.read_text(encoding="utf-8"))["command"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{marker}: unreadable run-directory marker; remove it if the folder "
                          "is yours") from None
    return str(owner)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete unfinished atomic writes (``.<name>.*.tmp``) directly in ``path``, saying so."""
    stale = remove_temp_files(path)
    if stale:
        log.warning("removed %d unfinished temporary file(s) from %s: %s", len(stale), path,
                    ", ".join(t.name for t in stale[:5]))
    return stale
