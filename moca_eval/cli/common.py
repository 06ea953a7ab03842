"""Options shared by every command, and their conversion into config dataclasses."""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from moca_eval.errors import ConfigError
from moca_eval.results import format_table, write_json_atomic

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch-heavy: imported when a command runs, so `--help` stays fast
    from moca_eval.features import ExtractConfig
    from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob


def default_run_dir(protocol: str, ckpt: Path) -> Path:
    """``runs/<protocol>/<checkpoint name>-<sha256[:8]>``: two checkpoints never share a run
    directory, even with the same file name (``runA/teacher.pth``, ``runB/teacher.pth``)."""
    from moca_eval.checkpoint_io import sha256_file

    if not Path(ckpt).is_file():
        raise ConfigError(f"{ckpt}: no such checkpoint file")
    return Path("runs") / protocol / f"{Path(ckpt).stem}-{sha256_file(Path(ckpt))[:8]}"


def default_cache_dir() -> Path:
    base = os.environ.get("MOCA_EVAL_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moca-eval"
    return Path(base) / "features"


def add_backbone_args(p: argparse.ArgumentParser, *, ckpt_required: bool = True,
                      img_size: bool = True) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--ckpt", type=Path, required=ckpt_required, help="checkpoint (.pth/.pt/.safetensors), "
                   "or hf-hub:ORG/NAME[@REV] or timm:NAME from the local hub cache (HF_HUB_OFFLINE honoured)")
    g.add_argument("--arch", help="architecture name (vit_tiny/small/base/large) to override the "
                   "head-count rule; width and depth are always read from the weights")
    g.add_argument("--num-heads", type=int, help="attention heads, for non-standard widths (the "
                   "weights cannot tell; default: 192:3, 384:6, 768:12, 1024:16, else width/64)")
    g.add_argument("--checkpoint-key", help="take the state dict under this top-level key")
    g.add_argument("--format", dest="fmt", help="force a checkpoint layout (see `moca-eval inspect`)")
    g.add_argument("--student", action="store_true",
                   help="evaluate the student/online weights of a training checkpoint")
    g.add_argument("--family", help="who trained the checkpoint (moca, dino, ibot, mae, msn, mocov3, "
                   "dinov2, timm): decides every default; needed only for layouts several families "
                   "share (see `moca-eval recipes`)")
    g.add_argument("--allow-nonfinite", action="store_true", help="evaluate weights holding NaN or "
                   "inf (listed in a warning) instead of refusing the checkpoint")
    if img_size:
        g.add_argument("--img-size", type=int, default=224, help="evaluation resolution (default 224)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, required=True, help="dataset root with train/ and val/")
    g.add_argument("--train-split", default="train", help="training folder under --data (default train)")
    g.add_argument("--val-split", default="val", help="evaluation folder under --data (default val)")
    g.add_argument("--resize", type=int, help="shorter side before the center crop "
                   "(default: img_size/0.875, i.e. 256 for 224)")
    g.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"],
                   help="resize filter (default bicubic; low-shot: the recipe's)")
    g.add_argument("--limit", type=float, help="smoke run: N images per class of every split, or a "
                   "fraction 0<x<1 (recorded; reports mark such results non-comparable)")


DENSE_LIMIT_HELP = ("smoke run: the first N images (or a fraction 0<x<1) of every training split and "
                    "of val (recorded; reports mark such results non-comparable)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, default=128,
                   help="images per forward pass of feature extraction, per process (default 128)")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image-decoding worker processes (default: min(8, CPU cores))")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="feature cache directory (default: %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    g.add_argument("--strict", action="store_true", help="an undecodable image is an error")
    g.add_argument("--verify-data", action="store_true", help="key the feature cache on the sha256 "
                   "of every image (reads each file) instead of its size and times")
    g.add_argument("--shard-images", type=int, default=8192, help="an extraction writes its "
                   "progress every N images; a rerun after an interruption continues from there")


def add_output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, help="write the results JSON here (atomically)")


def backbone_config(args: argparse.Namespace, **overrides: object) -> BackboneConfig:
    """The ``BackboneConfig`` of the checkpoint flags (every field has a flag of the same name)."""
    from moca_eval.pipeline import BackboneConfig

    values = {f.name: getattr(args, f.name) for f in fields(BackboneConfig) if hasattr(args, f.name)}
    return BackboneConfig(**{**values, **overrides})


def data_config(args: argparse.Namespace) -> DataConfig:
    from moca_eval.pipeline import DataConfig

    return DataConfig(root=args.data, train_split=args.train_split, val_split=args.val_split,
                      resize=args.resize, interpolation=args.interpolation,
                      limit=getattr(args, "limit", None))


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    from moca_eval.features import ExtractConfig

    return ExtractConfig(batch_size=args.batch_size, num_workers=args.num_workers,
                         device=args.device, precision=args.precision,
                         cache_dir=None if args.no_cache else args.cache_dir, strict=args.strict,
                         verify_data=args.verify_data, shard_images=args.shard_images)


def feature_job(args: argparse.Namespace) -> FeatureJob:
    from moca_eval import distributed
    from moca_eval.pipeline import FeatureJob

    distributed.init_from_env(args.device)
    return FeatureJob(backbone_config(args), data_config(args), extract_config(args))


def is_main_process() -> bool:
    from moca_eval import distributed

    return distributed.current().is_main


def emit(table_rows: list[dict], columns: list[str], payload: dict, output: Path | None,
         *, title: str) -> None:
    """Print the table (main process only) and write the JSON atomically if asked."""
    if not is_main_process():
        return
    print(title)
    print(format_table(table_rows, columns))
    if output is not None:
        write_json_atomic(output, payload)
        print(f"results written to {output}")


def add_training_run_args(g: argparse._ArgumentGroup, protocol: str) -> None:
    """``--seed``, ``--output-dir`` and ``--resume`` of the training protocols."""
    g.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order and augmentation (default 0)")
    g.add_argument("--output-dir", type=Path, help="checkpoint, log.jsonl and results.json "
                   f"(default: runs/{protocol}/<checkpoint name>)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")



# ----------------------------------------------------------------------------- checks before any work
INPUT_ARGS = ("ckpt", "data", "split_dir", "names", "weights", "path", "results")
FILE_OUTPUT_ARGS = {"output": "--output", "plot": "--plot"}
DIR_OUTPUT_ARGS = {"output_dir": "--output-dir", "work_dir": "--output-dir", "cache_dir": "--cache-dir"}
MIN_VALUES = {"batch_size": ("--batch-size", 1), "num_workers": ("--num-workers", 0),
              "img_size": ("--img-size", 1), "resize": ("--resize", 1)}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_hub_checkpoint(args: argparse.Namespace) -> None:
    """``--ckpt hf-hub:...`` / ``timm:...``: replaced by the file in the local hub cache (downloaded
    unless ``HF_HUB_OFFLINE``), which then loads through the same layout table as any file."""
    spec = getattr(args, "ckpt", None)
    if not isinstance(spec, Path):
        return
    from moca_eval.sources import is_remote, resolve

    if is_remote(str(spec)):
        source = resolve(str(spec))
        log.info("%s: %s (revision %s)", spec, source.path, source.revision)
        args.ckpt = source.path


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad shared options in one line before anything is loaded or computed.

    Raises:
        ConfigError: a size, count or device that cannot work, or an output path that is a
            directory/file where the other is meant, unwritable, an input, or a foreign file.
    """
    from moca_eval import outputs

    resolve_hub_checkpoint(args)
    ckpt = getattr(args, "ckpt", None)
    if isinstance(ckpt, Path) and ckpt.is_dir():  # said before outputs are judged against it
        from moca_eval.errors import CheckpointError

        raise CheckpointError(f"{ckpt}: is a directory, expected a checkpoint file")
    for dest, (flag, low) in MIN_VALUES.items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    check_device(getattr(args, "device", None))
    inputs = [Path(p) for name in INPUT_ARGS for p in _as_list(getattr(args, name, None))]
    # A command names its other outputs with set_defaults(file_outputs=..., dir_outputs=...):
    # dests, or {dest: flag} when the flag is not named after the dest.
    files = {**FILE_OUTPUT_ARGS, **_flags(getattr(args, "file_outputs", ()))}
    dirs = {**DIR_OUTPUT_ARGS, **_flags(getattr(args, "dir_outputs", ()))}
    for dest, flag in files.items():
        if getattr(args, dest, None) is not None:
            outputs.check_output_file(getattr(args, dest), inputs=inputs, what=flag,
                                      protocol=getattr(args, "command", None))
    for dest, flag in dirs.items():
        skip = dest == "cache_dir" and getattr(args, "no_cache", False)
        if getattr(args, dest, None) is not None and not skip:
            outputs.check_output_dir(getattr(args, dest), inputs=inputs, what=flag)


def _flags(dests: dict[str, str] | tuple[str, ...]) -> dict[str, str]:
    """dest -> flag: a mapping as given, else each dest's own flag name."""
    return dict(dests) if isinstance(dests, dict) else {d: _flag(d) for d in dests}


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_device(device: str | None) -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` of a GPU this machine has."""
    if device is None or device == "auto":
        return
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count()
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s)")
