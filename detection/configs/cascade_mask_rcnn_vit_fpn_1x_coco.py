# Cascade Mask R-CNN on a ViT (PROTOCOLS.md "COCO detection"; iBOT's setup, from the Swin
# detection code) on mmdet 3.x: the ViT's maps after blocks 4/6/8/12 -> strides 4/8/16/32 ->
# FPN (256 channels, 5 levels) -> three cascade stages of 4conv1fc box heads with GIoU loss and
# an FCN mask head; DETR-style multi-scale training with the random-crop branch; AdamW with
# layer-wise lr decay; 1x schedule; batch 16 (2 images x 8 GPUs).
# moca_eval.detection.run fills in the data root, checkpoint, width, classes, batch split and
# schedule length; every other value here is the recipe's. The model, dataset and runtime
# defaults not changed here are mmdet's own (_base_ below).
_base_ = [
    "mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["moca_eval.detection.mm_modules"], allow_failed_imports=False)

embed_dim = 768
num_classes = 80
data_root = "data/coco/"
norm_cfg = dict(type="SyncBN", requires_grad=True)  # iBOT / BEiT; run() uses BN without CUDA


def _box_head(stds):
    return dict(
        type="Shared4Conv1FCBBoxHead",  # ConvFCBBoxHead: 4 shared convs + 1 fc
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=num_classes,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=norm_cfg,
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=10.0),
    )


model = dict(
    backbone=dict(
        _delete_=True,
        type="MocaEvalViTDet",
        checkpoint=None,
        img_size=None,  # the checkpoint's own table, resampled to every input on the fly
        out_indices=None,  # after blocks depth/3, depth/2, 2 depth/3, depth: 4, 6, 8, 12 for ViT-B
        out_norm=False,
        drop_path_rate=0.2,
        with_cp=False,
        norm_cfg=norm_cfg,
    ),
    neck=dict(in_channels=[embed_dim] * 4, out_channels=256, num_outs=5),
    roi_head=dict(
        bbox_head=[
            _box_head([0.1, 0.1, 0.2, 0.2]),
            _box_head([0.05, 0.05, 0.1, 0.1]),
            _box_head([0.033, 0.033, 0.067, 0.067]),
        ],
        mask_head=dict(num_classes=num_classes),
    ),
)

# Multi-scale training, short side 480-800 (step 32), long side <= 1333, or (DETR / Sparse R-CNN)
# resize to 400-600, random crop 384-600, resize to 480-800.
# LoadImageOrFail: mmcv's LoadImageFromFile, an unreadable image a one-line error (moca_eval.mm_utils)
train_scales = [(short, 1333) for short in range(480, 801, 32)]
train_pipeline = [
    dict(type="LoadImageOrFail"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=train_scales, keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 1333), (500, 1333), (600, 1333)],
                     keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600),
                     allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=train_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageOrFail"),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2,  # per process; run() keeps the global batch with gradient accumulation
    num_workers=4,
    dataset=dict(data_root=data_root, pipeline=train_pipeline),
)
val_dataloader = dict(num_workers=4, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    type="CocoAPMetric",
    ann_file=data_root + "annotations/instances_val2017.json",
    metric=["bbox", "segm"],
    format_only=False,
)
test_evaluator = val_evaluator

# AdamW lr 2e-4 (paper; iBOT's recipe 1e-4), weight decay 0.05, layer decay 0.75 (iBOT ViT-B).
optim_wrapper = dict(
    type="OptimWrapper",
    constructor="ViTLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(layer_decay=0.75),
    optimizer=dict(_delete_=True, type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
)
# 1x: 12 epochs, lr /10 after epochs 8 and 11, 500 iterations of linear warm-up.
max_epochs = 12
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=max_epochs + 1)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)
default_hooks = dict(checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=2))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
