"""``moca-eval pretrain``: train MOCA on a folder of images and write teacher checkpoints.

Presets: ``vit_base`` is the paper's ViT-B/16 recipe (Table 11, v0.9: teacher momentum
0.99, weight decay 0.05); ``vit_base_release`` is the official script and README command
(v1.0, the released checkpoint: momentum 0.994, weight decay 0.05 -> 0.2); both clip the
gradient norm at 0.1 (the script's default; the paper is silent). ``tiny`` runs on a CPU.
Distributed: ``torchrun --nproc_per_node N -m moca_eval pretrain ...`` (``--batch-size`` is
the global batch, split between the processes).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from moca_eval.results import format_table

# ``moca_eval.pretrain.config.PRESETS``'s names, spelt out so ``--help`` imports no torch (tested).
PRESET_NAMES = ("tiny", "vit_base", "vit_base_release")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from None


def _partial(text: str) -> float | str:
    return "none" if text.lower() == "none" else float(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain MOCA (teacher checkpoints for every protocol)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True,
                   help="folder of images (recursive; DIR/train is used when it exists); labels unused")
    p.add_argument("--config", default="tiny", choices=PRESET_NAMES,
                   help="preset: vit_base (the paper, Table 11), vit_base_release (the official "
                   "script and README, v1.0: momentum 0.994, weight decay 0.05 -> 0.2) or tiny (CPU demo)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="run directory: checkpoint-last.pth, teacher.pth, log.jsonl, summary.json "
                   "(the result record)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from OUTPUT_DIR/checkpoint-last.pth, or from CHECKPOINT (ours or an "
                   "official MOCA checkpoint-*.pth: its codebook, optimizer and schedule)")
    g = p.add_argument_group("overrides (default: the preset's value)")
    g.add_argument("--batch-size", type=int, help="global batch size (all processes)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: blr * batch / 256)")
    g.add_argument("--blr", type=float, help="base lr, scaled by batch / 256 (replaces the preset's lr)")
    g.add_argument("--warmup-epochs", type=float, help="linear lr warm-up, in epochs (30)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.05)")
    g.add_argument("--weight-decay-end", type=float, help="cosine end of the weight decay (release: 0.2)")
    g.add_argument("--clip-grad", type=float,
                   help="max gradient norm (ViT-B presets: 0.1, as MOCA's script; 0: off)")
    g.add_argument("--momentum", type=float, help="initial teacher EMA momentum (0.99)")
    g.add_argument("--momentum-end", type=float, help="final teacher EMA momentum (1.0; cosine)")
    g.add_argument("--mask-ratios", type=_ratios, help="comma-separated, one per round (0.55,0.75)")
    g.add_argument("--partial-decoding", type=_partial,
                   help="masked tokens decoded, as a fraction of all tokens (0.2), or 'none' for all")
    g.add_argument("--num-words", type=int, help="codebook size K")
    g.add_argument("--num-new-words", type=int, help="codebook words replaced per step")
    g.add_argument("--img-weight", type=float, help="lambda: weight of L_IMG (0.5)")
    g.add_argument("--img-size", type=int, help="training resolution in pixels (224)")
    g.add_argument("--seed", type=int, help="seed of the data order, views, masks and codebook picks")
    g.add_argument("--save-every", type=int, help="also keep checkpoint-<epoch>.pth every N epochs")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="auto (default: this process's GPU if any, else the CPU), cpu, cuda")
    r.add_argument("--num-workers", type=int, help="data-loading worker processes per training process")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs that have it (no loss scaling needed), else fp16 with a "
                   "grad scaler (MOCA's own setting); fp32 on CPU")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--strict", action="store_true",
                   help="an undecodable image is an error (default: left out, listed in summary.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.pretrain import preset
    from moca_eval.pretrain import train as pretrain

    overrides = {name: getattr(args, name) for name in (
        "epochs", "batch_size", "lr", "blr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
        "momentum", "momentum_end", "mask_ratios", "num_words", "num_new_words", "img_weight", "img_size",
        "seed", "save_every", "device", "num_workers", "precision")}
    fixed = {"data_dir": str(args.data), "output_dir": str(args.output_dir),
             "resume": args.resume is not None, "resume_from": args.resume or "",
             "progress": not args.no_progress}
    if args.blr is not None and args.lr is None:
        fixed["lr"] = None  # the preset's absolute lr would override blr
    if args.partial_decoding is not None:
        fixed["partial_decoding"] = None if args.partial_decoding == "none" else args.partial_decoding
    cfg = replace(preset(args.config, **overrides), **fixed)
    result = pretrain.run(cfg.validate(), strict=args.strict)
    if result.history:
        columns = ["epoch", "loss", "loss_img", "loss_loc", "codebook_usage", "tau", "imgs_per_s"]
        print(format_table([{**h, "epoch": int(h["epoch"]) + 1} for h in result.history], columns))
        print(f"teacher: {result.teacher}\ncheckpoint: {result.checkpoint}\nlog: {result.log_file}\n"
              f"record: {result.output_dir / 'summary.json'}")
    return 0
