# Segmenter's Cityscapes recipe (PROTOCOLS.md "Cityscapes semantic segmentation") on mmseg 1.x.
# moca_eval.segmentation.run fills in the data root, split file, checkpoint, widths and the
# number of iterations; every other value here is the recipe's.
default_scope = "mmseg"
custom_imports = dict(imports=["moca_eval.segmentation.mm_modules"], allow_failed_imports=False)

crop_size = (768, 768)
resize_scale = (2048, 1024)
num_classes = 19
data_root = "data/cityscapes"

data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics, as the SSL backbones were trained
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(type="MocaEvalViT", checkpoint=None, img_size=crop_size[0]),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(512, 512)),
)

# LoadImageOrFail: mmcv's LoadImageFromFile, an unreadable image a one-line error (moca_eval.mm_utils)
train_pipeline = [
    dict(type="LoadImageOrFail"),
    dict(type="LoadAnnotations"),
    dict(type="RandomResize", scale=resize_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageOrFail"),
    dict(type="Resize", scale=resize_scale, keep_ratio=True),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=8,  # per process; run() divides the global batch by the number of processes
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type="CityscapesDataset", data_root=data_root, ann_file="",
                 data_prefix=dict(img_path="leftImg8bit/train", seg_map_path="gtFine/train"),
                 pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type="CityscapesDataset", data_root=data_root,
                 data_prefix=dict(img_path="leftImg8bit/val", seg_map_path="gtFine/val"),
                 pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="PerClassIoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

# SGD 0.9, weight decay 0, poly (power 0.9) per iteration down to 1e-5.
max_iters = 80_000
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0))
param_scheduler = [dict(type="PolyLR", eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1,
                 val_begin=max_iters + 1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=2000, max_keep_ckpts=1, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
