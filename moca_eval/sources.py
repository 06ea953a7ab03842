"""Where a checkpoint comes from: a file, the Hugging Face hub, a timm pretrained name, or a module.

Every source ends as a local file loaded through the same strict layout table
(``checkpoints.load_backbone``):

- ``path/to/file.pth``: the file itself;
- ``hf-hub:ORG/NAME[@REVISION]``: ``model.safetensors`` (else ``pytorch_model.bin``) of that hub
  repository, downloaded into (or, with ``HF_HUB_OFFLINE=1``, read from) the local hub cache;
- ``timm:NAME`` (``timm:vit_base_patch16_224.dino``): the hub repository timm's pretrained
  config names for that model;
- an in-memory ``nn.Module`` (Python API only): its state dict written once to a content-named
  safetensors file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moca_eval.errors import CheckpointError

HUB_PREFIX = "hf-hub:"
TIMM_PREFIX = "timm:"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint: the local file and where it came from."""

    spec: str  # as the user wrote it
    path: Path
    kind: str  # "file" | "hf-hub" | "timm" | "module"
    revision: str | None = None  # hub commit of the snapshot

    @property
    def label(self) -> str:
        """A short human name: the file stem, or the hub/timm name."""
        if self.kind == "file":
            return self.path.stem
        return self.spec.split(":", 1)[1].split("@")[0].replace("/", "_") if ":" in self.spec else self.spec

    def record_fields(self) -> dict[str, Any]:
        """Added to a record's ``checkpoint`` block."""
        return {"source": self.spec, "source_kind": self.kind, "revision": self.revision}


def is_remote(spec: str) -> bool:
    return spec.startswith((HUB_PREFIX, TIMM_PREFIX))


def resolve(spec: str | os.PathLike) -> CheckpointSource:
    """The local file of ``spec`` (see the module docstring).

    Raises:
        CheckpointError: a missing file, an unknown timm name, a hub repository without a
            weights file, or one that is not cached while ``HF_HUB_OFFLINE`` is set (one line).
    """
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        repo, _, revision = text[len(HUB_PREFIX):].partition("@")
        path, commit = hub_file(repo, revision or None, spec=text)
        return CheckpointSource(text, path, "hf-hub", commit)
    if text.startswith(TIMM_PREFIX):
        path, commit = hub_file(timm_hub_id(text[len(TIMM_PREFIX):]), None, spec=text)
        return CheckpointSource(text, path, "timm", commit)
    path = Path(text)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return CheckpointSource(text, path, "file")


def timm_hub_id(name: str) -> str:
    """The hub repository timm downloads ``name``'s pretrained weights from."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except (RuntimeError, ValueError) as err:
        cfg, detail = None, str(err)
    else:
        detail = ""
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        close = timm.list_pretrained(f"{name.split('.')[0]}*")[:5]
        raise CheckpointError(f"timm:{name}: no pretrained weights on the hub under that name"
                              f"{' (' + detail + ')' if detail else ''}"
                              f"{'; close: ' + ', '.join(close) if close else ''}")
    return hub_id


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_file(repo: str, revision: str | None, *, spec: str) -> tuple[Path, str | None]:
    """Download (or, offline, find in the cache) the weights file of hub repository ``repo``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for filename in HUB_FILES:
        try:
            local = hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline)
        except EntryNotFoundError:
            continue
        except LocalEntryNotFoundError:
            if offline:
                continue
            raise CheckpointError(f"{spec}: cannot reach the hub and not in the local cache") from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{spec}: no such hub repository (or it is private)") from None
        return Path(local), hub_origin(local).get("revision")
    where = "in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "in the repository"
    raise CheckpointError(f"{spec}: no {' or '.join(HUB_FILES)} {where}")


def hub_origin(path: str | os.PathLike) -> dict[str, Any]:
    """``source``/``source_kind``/``revision`` of a file in a hub cache
    (``models--ORG--NAME/snapshots/<commit>/<file>``), so every record of a hub checkpoint says
    where it came from, whichever way it was named; ``{}`` for any other file."""
    parts = Path(path).parts
    if "snapshots" not in parts[:-2]:
        return {}
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    repo = parts[at - 1]
    if not repo.startswith("models--"):
        return {}
    name = repo.removeprefix("models--").replace("--", "/")
    return {"source": f"{HUB_PREFIX}{name}", "source_kind": "hf-hub", "revision": parts[at + 1]}


def module_checkpoint(module: Any, cache_dir: Path) -> CheckpointSource:
    """An in-memory ViT as a safetensors file named by its content (written once)."""
    from safetensors.torch import save_file

    from moca_eval.results import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    path = Path(cache_dir) / f"module-{digest.hexdigest()[:16]}.safetensors"
    if not path.exists():
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
    return CheckpointSource(f"module:{type(module).__name__}", path, "module")
