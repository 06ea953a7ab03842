"""The mmdet backbone wrapper, the layer-decay groups, the recipe config and the COCO metric path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("mmdet", reason="the [dense] extra is not installed")
import torch  # noqa: E402
from torch import nn  # noqa: E402

from moca_eval.checkpoints import load_backbone  # noqa: E402
from moca_eval.detection import coco  # noqa: E402
from moca_eval.detection.mm_modules import MocaEvalViTDet, default_out_indices  # noqa: E402
from moca_eval.detection.run import DetConfig, annotation_files, ap_table, mm_config  # noqa: E402
from moca_eval.errors import ConfigError  # noqa: E402
from moca_eval.features import compute_features  # noqa: E402
from moca_eval.mm_utils import ViTLayerDecayOptimizerConstructor, build_dense_vit, patch_token_map  # noqa: E402

# Patch 16 as the real models (so the strides are 4/8/16/32), four blocks to tap.
BN = dict(type="BN", requires_grad=True)


def test_backbone_gives_four_strides_of_width_d_for_a_non_square_input(det_checkpoint):
    backbone = MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 2, 3), norm_cfg=BN).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 96, 160))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 96 // s, 160 // s) for s in (4, 8, 16, 32)]
    stride4 = backbone.adapters[0]
    assert [type(m) for m in stride4] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert isinstance(backbone.adapters[2], nn.Identity) and isinstance(backbone.adapters[3], nn.MaxPool2d)


def test_default_taps_are_ibots():
    assert default_out_indices(12) == (3, 5, 7, 11)  # after blocks 4, 6, 8, 12
    assert default_out_indices(24) == (7, 11, 15, 23)  # iBOT's ViT-L
    assert default_out_indices(4) == (0, 1, 1, 3)


def test_stride16_map_is_the_feature_extractors_patch_tokens(det_checkpoint):
    reference = load_backbone(det_checkpoint, img_size=64).model.eval()
    x = torch.randn(2, 3, 64, 64)
    normed = MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 3, 3), out_norm=True, norm_cfg=BN).eval()
    raw = MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 2, 3), norm_cfg=BN).eval()
    with torch.no_grad():
        tokens = reference.forward_features(x)[:, reference.num_prefix_tokens:]
        avg = compute_features(reference, x, ["avg"])["avg"]
        stride16 = normed(x)[2]
        (block3,) = reference.forward_intermediates(x, indices=[2], norm=False, intermediates_only=True)
        raw16 = raw(x)[2]
    assert torch.allclose(stride16.flatten(2).transpose(1, 2), tokens, atol=1e-5)
    assert torch.allclose(stride16.mean((2, 3)), avg, atol=1e-5)
    assert torch.allclose(raw16, block3, atol=1e-5)  # iBOT's default: the block output, no final norm
    # non-square: the same as the dynamic-size ViT's final-LN patch-token map
    y = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        expected = patch_token_map(build_dense_vit(det_checkpoint, img_size=None).eval(), y)
        assert torch.allclose(normed(y)[2], expected, atol=1e-5)


def test_checkpointing_and_frozen_unused_parameters(det_checkpoint):
    plain = MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 1, 2), norm_cfg=BN, drop_path_rate=0.0)
    cp = MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 1, 2), norm_cfg=BN, drop_path_rate=0.0,
                        with_cp=True)
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    grads = []
    for model in (plain, cp):
        model.train()
        sum(m.square().mean() for m in model(x)).backward()
        grads.append(model.vit.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    frozen = {n for n, p in plain.named_parameters() if not p.requires_grad} - {"vit.pos_embed"}  # sin-cos
    assert frozen == {n for n, _ in plain.named_parameters() if n.startswith(("vit.blocks.3.", "vit.norm."))}
    with pytest.raises(ValueError, match="out_indices"):
        MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 4, 3), norm_cfg=BN)


def expected_layer(name: str, depth: int) -> int:
    if not name.startswith("backbone.vit."):
        return depth + 1
    name = name.removeprefix("backbone.vit.")
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    block = re.match(r"blocks\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else depth + 1


def test_layer_decay_groups_follow_the_rule_for_every_parameter(det_checkpoint, det_arch):
    model = nn.Module()
    model.backbone = MocaEvalViTDet(str(det_checkpoint), out_indices=(0, 1, 2, 3), norm_cfg=BN)
    model.neck = nn.Sequential(nn.Conv2d(32, 8, 1), nn.BatchNorm2d(8), nn.Linear(8, 3))
    lr, wd, decay, depth = 1e-3, 0.05, 0.6, det_arch.depth
    wrapper = ViTLayerDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=lr, weight_decay=wd)),
        dict(layer_decay=decay))(model)
    where = {}
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in where, "a parameter in two groups"
            where[id(p)] = (group["lr"], group["weight_decay"])
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the unused final norm, a fixed sin-cos table
            assert id(p) not in where and name in ("backbone.vit.norm.weight", "backbone.vit.norm.bias",
                                                   "backbone.vit.pos_embed"), name
            continue
        layer = expected_layer(name, depth)
        no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        expected = (pytest.approx(lr * decay ** (depth + 1 - layer)), 0.0 if no_decay else wd)
        assert where[id(p)] == expected, name
        checked += 1
    assert checked == len(where) and checked > 4 * 10


def test_config_is_the_recipe(det_checkpoint, tiny_coco):
    c = mm_config(DetConfig(det_checkpoint, tiny_coco), embed_dim=768, classes=tuple("abc"), world_size=8)
    m = c.model
    assert m.backbone.type == "MocaEvalViTDet" and m.backbone.out_indices is None
    assert m.backbone.drop_path_rate == 0.2 and not m.backbone.out_norm
    assert (m.neck.in_channels, m.neck.out_channels, m.neck.num_outs) == ([768] * 4, 256, 5)
    assert m.type == "CascadeRCNN" and m.roi_head.num_stages == 3
    for head in m.roi_head.bbox_head:
        assert head.type == "Shared4Conv1FCBBoxHead" and head.reg_decoded_bbox and head.num_classes == 3
        assert head.loss_bbox.type == "GIoULoss"
    assert m.roi_head.mask_head.type == "FCNMaskHead" and m.roi_head.mask_head.num_classes == 3
    choice = c.train_dataloader.dataset.pipeline[3]
    assert [s[0] for s in choice.transforms[0][0].scales] == list(range(480, 801, 32))
    assert {s[1] for s in choice.transforms[0][0].scales} == {1333}
    assert choice.transforms[1][1].crop_size == (384, 600)
    assert c.train_dataloader.batch_size == 2 and c.optim_wrapper.accumulative_counts == 1
    opt = c.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay, c.optim_wrapper.paramwise_cfg.layer_decay) == ("AdamW", 2e-4,
                                                                                                0.05, 0.75)
    warmup, steps = c.param_scheduler
    assert warmup.end == 500 and steps.milestones == [8, 11] and c.train_cfg.max_epochs == 12
    assert c.val_evaluator.metric == ["bbox", "segm"] and c.launcher == "pytorch"
    one = mm_config(DetConfig(det_checkpoint, tiny_coco), embed_dim=768, classes=("a",), world_size=1)
    assert one.train_dataloader.batch_size == 2 and one.optim_wrapper.accumulative_counts == 8
    assert one.param_scheduler[0].end == 500 * 8  # warm-up counted in optimizer steps
    with pytest.raises(ConfigError, match="cannot be split over 3"):
        DetConfig(det_checkpoint, tiny_coco).batch_split(3)


def _val_parts(det_checkpoint: Path, root: Path, tmp_path: Path, limit: float | None = None):
    """The val dataset and evaluator exactly as ``run()`` configures them."""
    from mmdet.registry import DATASETS
    from mmengine.evaluator import Evaluator
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    cfg = DetConfig(det_checkpoint, root, work_dir=tmp_path, test_short_side=128, max_long_side=256,
                    limit=limit)
    layout = coco.check_layout(root)
    c = mm_config(cfg, embed_dim=32, classes=layout["train"].classes, world_size=1,
                  ann_files=annotation_files(cfg, layout, tmp_path))
    dataset = DATASETS.build(c.val_dataloader.dataset)
    evaluator = Evaluator(c.val_evaluator)
    evaluator.dataset_meta = dataset.metainfo
    return dataset, evaluator


@pytest.mark.parametrize("limit", [None, 0.5])
def test_ground_truth_as_predictions_scores_ap_100(det_checkpoint, tiny_coco, tmp_path, limit):
    """With --limit the metric's ground truth is the kept images': an image left out of the
    dataset but not of the metric would be unmatched ground truth, AP < 100."""
    from mmengine.structures import InstanceData

    dataset, evaluator = _val_parts(det_checkpoint, tiny_coco, tmp_path, limit)
    assert len(dataset) == (2 if limit is None else 1)
    for i in range(len(dataset)):
        sample = dataset[i]["data_samples"]
        gt = sample.gt_instances
        assert sample.img_shape != sample.ori_shape  # resized for the model, boxes in original pixels
        sample.pred_instances = InstanceData(bboxes=gt.bboxes.tensor, labels=gt.labels,
                                             scores=torch.ones(len(gt.labels)),
                                             masks=torch.from_numpy(gt.masks.to_ndarray()).bool())
        evaluator.process(data_samples=[sample])
    metrics = evaluator.evaluate(len(dataset))
    for iou_type in ("bbox", "segm"):
        assert ap_table(metrics, iou_type) == {k: 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert (tmp_path / "predictions" / "val.segm.json").is_file()


def test_no_predictions_score_zero_not_silence(det_checkpoint, tiny_coco, tmp_path):
    from mmengine.structures import InstanceData

    dataset, evaluator = _val_parts(det_checkpoint, tiny_coco, tmp_path)
    for i in range(len(dataset)):
        sample = dataset[i]["data_samples"]
        h, w = sample.ori_shape
        sample.pred_instances = InstanceData(bboxes=torch.zeros(0, 4), scores=torch.zeros(0),
                                             labels=torch.zeros(0, dtype=torch.long),
                                             masks=torch.zeros(0, h, w, dtype=torch.bool))
        evaluator.process(data_samples=[sample])
    metrics = evaluator.evaluate(len(dataset))
    assert ap_table(metrics, "bbox") == ap_table(metrics, "segm") == dict.fromkeys(
        ("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.0)


def test_limited_annotation_files_keep_the_first_images_and_their_annotations(tiny_coco, tmp_path):
    layout = coco.check_layout(tiny_coco)
    for split, limit, kept in (("train", 3, 3), ("train", 0.3, 2), ("val", 5, 2), ("val", 0.1, 1)):
        path = coco.limited_ann_file(layout[split], limit, tmp_path / "out")
        assert path == coco.ann_file(tmp_path / "out", split)
        full, cut = (json.loads(p.read_text()) for p in (layout[split].ann_file, path))
        first = sorted(img["id"] for img in full["images"])[:kept]
        assert [img["id"] for img in cut["images"]] == first
        assert cut["annotations"] == [a for a in full["annotations"] if a["image_id"] in first]
        assert cut["annotations"] and cut["categories"] == full["categories"]
