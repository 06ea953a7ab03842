"""COCO detection and instance segmentation (Cascade Mask R-CNN on mmdet), any checkpoint.

One mmengine run in ``work_dir``: training (resumable from its per-epoch checkpoints) then one
evaluation on val (COCO box and mask AP, AP50, AP75, APs/m/l through mmdet's ``CocoMetric``),
or only the evaluation of given weights (``eval_only``). ``result.json`` (or ``eval.json``)
records the figures with a fingerprint of everything they depend on, so a finished run is
reused instead of trained again. The val predictions stay in ``work_dir/predictions/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moca_eval import outputs
from moca_eval.checkpoint_io import read_checkpoint, sha256_file
from moca_eval.detection import coco
from moca_eval.errors import ConfigError
from moca_eval.families import SHARED_RECIPES, announce, recipe_name
from moca_eval.mm_utils import as_backbone_config, mmengine_checkpoints
from moca_eval.pipeline import BackboneConfig, check_limit, limit_count
from moca_eval.record import Clock, Record, checkpoint_block, dataset_block, metrics_block, recipe_block
from moca_eval.runtime import fingerprint, make_plan, read_finished, write_finished

log = logging.getLogger(__name__)

CONFIG_FILE = Path(__file__).parent / "configs" / "cascade_mask_rcnn_vit_fpn_1x_coco.py"
# 1x: lr /10 after epochs 8 and 11 of 12; other lengths keep the same fractions.
MILESTONE_FRACTIONS = (8 / 12, 11 / 12)
# mmdet's CocoMetric keys (fractions, 3 decimals) -> the figures reported (percent).
AP_KEYS = {"AP": "mAP", "AP50": "mAP_50", "AP75": "mAP_75", "APs": "mAP_s", "APm": "mAP_m", "APl": "mAP_l"}
IOU_TYPES = ("bbox", "segm")


@dataclass(frozen=True)
class DetConfig:
    """One ``moca-eval det`` run (defaults: PROTOCOLS.md's COCO recipe, iBOT's setup)."""

    backbone: BackboneConfig  # which weights (a checkpoint path is accepted too)
    data: Path
    epochs: int = 12
    lr: float = 2e-4  # the paper; iBOT's recipe: 1e-4
    layer_decay: float = 0.75  # iBOT's ViT-B detection command
    weight_decay: float = 0.05
    drop_path_rate: float = 0.2
    batch_size: int = 16  # global, over processes and gradient-accumulation steps
    per_gpu_batch: int = 2
    warmup_iters: int = 500  # optimizer steps
    train_short_sides: tuple[int, ...] = tuple(range(480, 801, 32))
    max_long_side: int = 1333
    test_short_side: int = 800  # the crop branch's 400-600 / 384-600 scale with it (/800)
    random_crop: bool = True  # the DETR-style crop branch (chosen for half of the images)
    with_cp: bool = False  # activation checkpointing over the ViT blocks
    work_dir: Path = Path("runs/det")
    resume: bool = False
    eval_only: bool = False
    weights: Path | None = None  # eval_only: an mmengine checkpoint of this detector
    num_workers: int = 4
    num_preview: int = 4  # val images drawn with their predictions
    seed: int = 0
    cfg_options: dict | None = None  # mmengine overrides by dotted key, applied last
    limit: float | None = None  # smoke runs: the first N images (or a fraction) of train and of val

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone", as_backbone_config(self.backbone))

    def validate(self) -> DetConfig:
        check_limit(self.limit, "images")
        for name in ("epochs", "batch_size", "per_gpu_batch", "max_long_side", "test_short_side"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_iters < 0 or self.num_preview < 0:
            raise ConfigError("warmup_iters and num_preview cannot be negative")
        if not self.train_short_sides or min(self.train_short_sides) < 1:
            raise ConfigError(f"train_short_sides must be positive sizes, got {self.train_short_sides}")
        if self.lr <= 0 or not 0 < self.layer_decay <= 1:
            raise ConfigError(f"lr must be positive and layer_decay in (0, 1], got {self.lr}, "
                              f"{self.layer_decay}")
        if self.eval_only != (self.weights is not None):
            raise ConfigError("--eval-only and --weights W.pth go together (evaluate the detector in W.pth)")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"{self.weights}: no such weights file")
        return self

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """``(images per process and step, accumulation steps)`` that make ``batch_size``."""
        try:
            plan = make_plan(self.batch_size, self.per_gpu_batch, world_size)
        except ConfigError:
            raise ConfigError(f"batch size {self.batch_size} cannot be split over {world_size} process(es) "
                              f"with {self.per_gpu_batch} image(s) each per step (use a multiple of "
                              f"{self.per_gpu_batch * world_size})") from None
        return plan.micro_batch, plan.accum

    def milestones(self) -> list[int]:
        return [max(1, round(self.epochs * f)) for f in MILESTONE_FRACTIONS]


@dataclass
class DetResult:
    bbox: dict[str, float]  # AP, AP50, AP75, APs, APm, APl in percent (-1: no such ground truth)
    segm: dict[str, float]
    epochs: int
    work_dir: str
    record: Record
    eval_only: bool = False
    preview: str | None = None  # PNG of a few val images with the predictions drawn

    def to_dict(self) -> dict:
        return self.record.to_dict()


def ap_table(metrics: dict[str, float], iou_type: str) -> dict[str, float]:
    """mmdet's ``coco/<type>_mAP...`` fractions as AP figures in percent (-1 stays -1)."""
    out = {}
    for name, key in AP_KEYS.items():
        value = float(metrics[f"coco/{iou_type}_{key}"])
        out[name] = -1.0 if value < 0 else round(value * 100, 1)
    return out


def _scaled(size: int, cfg: DetConfig) -> int:
    return max(1, round(size * cfg.test_short_side / 800))


def _train_pipeline(c, cfg: DetConfig) -> None:
    scales = [(s, cfg.max_long_side) for s in cfg.train_short_sides]
    choice = next(step for step in c.train_dataloader.dataset.pipeline if step.type == "RandomChoice")
    plain, crop = choice.transforms
    plain[0].scales = scales
    crop[0].scales = [(_scaled(s, cfg), cfg.max_long_side) for s in (400, 500, 600)]
    crop[1].crop_size = (_scaled(384, cfg), _scaled(600, cfg))
    crop[2].scales = scales
    if not cfg.random_crop:
        choice.transforms = [plain]


def mm_config(cfg: DetConfig, *, embed_dim: int, classes: tuple[str, ...], world_size: int,
              ann_files: dict[str, Path] | None = None):
    """The mmengine ``Config`` of this run: the config file with this run's values
    (``ann_files``: split -> annotation file instead of the official ones, e.g. ``--limit``'s)."""
    from mmengine.config import Config

    from moca_eval.mm_utils import on_cuda

    c = Config.fromfile(str(CONFIG_FILE))
    work_dir = Path(cfg.work_dir)
    c.work_dir = str(work_dir)
    c.experiment_name = f"{work_dir.name}_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    c.resume = cfg.resume and not cfg.eval_only
    c.load_from = str(cfg.weights) if cfg.eval_only else None
    c.randomness = dict(seed=cfg.seed)
    c.launcher = "pytorch" if world_size > 1 else "none"
    m = c.model
    m.backbone.update(checkpoint=cfg.backbone.to_dict(), drop_path_rate=cfg.drop_path_rate,
                      with_cp=cfg.with_cp)
    m.neck.in_channels = [embed_dim] * 4
    for head in m.roi_head.bbox_head:
        head.num_classes = len(classes)
    m.roi_head.mask_head.num_classes = len(classes)
    if not on_cuda():  # SyncBN needs GPUs once a process group exists; same maths on one process
        for norm in [m.backbone.norm_cfg, *(h.norm_cfg for h in m.roi_head.bbox_head)]:
            norm.type = "BN"
    _train_pipeline(c, cfg)
    for step in c.val_dataloader.dataset.pipeline:
        if step.type == "Resize":
            step.scale = (cfg.max_long_side, cfg.test_short_side)
    per_step, accumulate = cfg.batch_split(world_size)
    anns = {split: Path(path).resolve() for split, path in
            (ann_files or {split: coco.ann_file(cfg.data, split) for split in coco.SPLITS}).items()}
    for loader, split in ((c.train_dataloader, "train"), (c.val_dataloader, "val")):
        loader.dataset.update(data_root=str(cfg.data), ann_file=str(anns[split]),
                              data_prefix=dict(img=f"{coco.image_dir(Path(), split)}/"),
                              metainfo=dict(classes=classes))
        loader.num_workers = cfg.num_workers
        loader.persistent_workers = cfg.num_workers > 0
    c.test_dataloader = c.val_dataloader
    c.train_dataloader.batch_size = per_step
    c.val_evaluator.update(ann_file=str(anns["val"]),
                           outfile_prefix=str(work_dir / "predictions" / "val"))
    c.test_evaluator = c.val_evaluator
    _optimizer(c, cfg, accumulate)
    c.default_hooks.logger.interval = 50
    if cfg.cfg_options:
        c.merge_from_dict(dict(cfg.cfg_options))
    return c


def _optimizer(c, cfg: DetConfig, accumulate: int) -> None:
    from moca_eval.mm_utils import set_device_options

    ow = c.optim_wrapper
    ow.optimizer.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    ow.paramwise_cfg.layer_decay = cfg.layer_decay
    ow.accumulative_counts = accumulate
    set_device_options(c)
    warmup, steps = c.param_scheduler
    warmup.end = cfg.warmup_iters * accumulate  # scheduler steps count micro-batches
    if not cfg.warmup_iters:
        c.param_scheduler = [steps]
    steps.update(end=cfg.epochs, milestones=cfg.milestones())
    c.train_cfg.update(max_epochs=cfg.epochs, val_begin=cfg.epochs + 1)  # evaluated once, after training


def require_stack() -> None:
    """mmdet, mmcv with its compiled ops, pycocotools: importable, or a ``ConfigError`` saying how."""
    from moca_eval.install_dense import dense_stack

    with dense_stack("detection"):
        import mmcv.ops  # noqa: F401
        import mmdet  # noqa: F401
        import pycocotools.mask  # noqa: F401


def train_and_evaluate(c, *, train: bool = True) -> dict[str, float]:
    """mmengine's training loop (resuming when ``c.resume``) then its val loop; or only the val
    loop on ``c.load_from``. Either way mmengine reads only its own checkpoints here."""
    from mmengine.runner import Runner

    from moca_eval.mm_utils import mmengine_checkpoints, one_line_dataset_errors

    runner = Runner.from_cfg(c)
    with mmengine_checkpoints(), one_line_dataset_errors():
        if train:
            runner.train()
        return runner.val()


def run(cfg: DetConfig) -> DetResult:
    """Train (unless ``eval_only``) and evaluate; see the module docstring."""
    cfg = cfg.validate()
    require_stack()
    if cfg.weights is not None:  # a refused pickle global is one line here, before mmengine reads it
        with mmengine_checkpoints():
            read_checkpoint(cfg.weights)
    from mmengine.dist import get_world_size, is_main_process

    from moca_eval.mm_utils import join_cpu_process_group

    clock = Clock()
    layout = coco.check_layout(cfg.data)
    world_size = max(int(os.environ.get("WORLD_SIZE", "1")), get_world_size())
    cfg.batch_split(world_size)
    join_cpu_process_group()
    backbone = cfg.backbone.load(img_size=None)
    announce("det", backbone.family_choice, *recipe_name("det", backbone.family))
    work_dir = Path(cfg.work_dir)
    outputs.claim_run_dir(work_dir, "det")
    anns = annotation_files(cfg, layout, work_dir)
    done = work_dir / ("eval.json" if cfg.eval_only else "result.json")
    key = run_fingerprint(cfg, ckpt_sha=backbone.sha256, data_sha=_data_digest(layout))
    stored = _stored_figures(read_finished(done, key))
    if stored is not None:
        log.info("already evaluated, reusing %s", done)
        bbox, segm = stored
    else:
        work_dir.mkdir(parents=True, exist_ok=True)
        c = mm_config(cfg, embed_dim=backbone.arch.embed_dim, classes=layout["train"].classes,
                      world_size=world_size, ann_files=anns)
        metrics = train_and_evaluate(c, train=not cfg.eval_only)
        bbox, segm = ap_table(metrics, "bbox"), ap_table(metrics, "segm")
        write_finished(done, {"bbox": bbox, "segm": segm}, key)
    preview = _preview(cfg, work_dir, anns["val"]) if is_main_process() else None
    settings = {k: v for k, v in asdict(cfg).items() if k != "backbone"}
    recipe = {k: settings[k] for k in RECIPE_FIELDS}
    record = Record(
        "det", checkpoint_block(backbone),
        dataset_block(cfg.data, splits=_image_counts(cfg, layout),
                      n_classes=len(layout["train"].classes), name="coco",
                      classes=list(layout["train"].classes), annotations_sha256=_data_digest(layout),
                      **({"limit": cfg.limit} if cfg.limit is not None else {})),
        {"recipe": recipe_block(SHARED_RECIPES["det"], recipe, why="det uses one recipe for every family"),
         **settings, "world_size": world_size, "preview": str(preview) if preview else None},
        metrics_block("AP box", bbox["AP"], values={"bbox": bbox, "segm": segm, "AP_box": bbox["AP"],
                                                    "AP_mask": segm["AP"]},
                      rows=[{"task": task, **figures} for task, figures in (("bbox", bbox), ("segm", segm))]),
        clock.provenance())
    return DetResult(bbox, segm, cfg.epochs, str(work_dir), record, cfg.eval_only,
                     str(preview) if preview else None)


# The Cascade Mask R-CNN recipe's values (PROTOCOLS.md); the other fields say what to run and where.
RECIPE_FIELDS = ("epochs", "lr", "layer_decay", "weight_decay", "drop_path_rate", "batch_size",
                 "warmup_iters", "train_short_sides", "max_long_side", "test_short_side", "random_crop")


def annotation_files(cfg: DetConfig, layout: dict[str, coco.CocoSplit], work_dir: Path) -> dict[str, Path]:
    """Split -> the annotation file trained / evaluated on: the official one, or with ``limit``
    its first images, written under ``work_dir/limited/`` (main process; the others wait)."""
    if cfg.limit is None:
        return {name: split.ann_file for name, split in layout.items()}
    from mmengine.dist import barrier, is_main_process

    root = work_dir / "limited"
    if is_main_process():
        for split in layout.values():
            coco.limited_ann_file(split, cfg.limit, root)
    barrier()
    return {name: coco.ann_file(root, name) for name in layout}


def _image_counts(cfg: DetConfig, layout: dict[str, coco.CocoSplit]) -> dict[str, int]:
    """Split -> the number of images trained / evaluated on."""
    return {name: split.n_images if cfg.limit is None else limit_count(cfg.limit, split.n_images)
            for name, split in layout.items()}


def _preview(cfg: DetConfig, work_dir: Path, val_ann: Path) -> Path | None:
    """Draw the val predictions mmdet's metric wrote (``predictions/val.segm.json``), if any."""
    from moca_eval.detection.plot import plot_predictions

    predictions = work_dir / "predictions" / "val.segm.json"
    if not cfg.num_preview or not predictions.is_file():
        return None
    return plot_predictions(val_ann, coco.image_dir(cfg.data, "val"), predictions,
                            work_dir / "predictions.png", n_images=cfg.num_preview)


# Settings that do not change what is trained and evaluated.
RUNTIME_FIELDS = ("work_dir", "resume", "num_workers", "num_preview", "with_cp")


def run_fingerprint(cfg: DetConfig, *, ckpt_sha: str, data_sha: str) -> str:
    """What the figures depend on: the checkpoint, the annotations, the weights, every setting."""
    skip = (*RUNTIME_FIELDS, "backbone", "data")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    settings["backbone"] = cfg.backbone.options()  # the path may move; the sha256 identifies it
    if cfg.weights is not None:
        settings["weights"] = sha256_file(Path(cfg.weights))
    return fingerprint(settings, ckpt_sha, data_sha)


def _data_digest(layout: dict[str, coco.CocoSplit]) -> str:
    return hashlib.sha256("".join(sha256_file(s.ann_file) for s in layout.values()).encode()).hexdigest()


def _stored_figures(stored: dict | None) -> tuple[dict, dict] | None:
    """``(bbox, segm)`` of a stored result (None when absent or malformed)."""
    try:
        return ({k: float(stored["bbox"][k]) for k in AP_KEYS},
                {k: float(stored["segm"][k]) for k in AP_KEYS})
    except (KeyError, TypeError, ValueError):
        return None
