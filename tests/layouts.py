"""Checkpoints in every documented layout (PROTOCOLS.md), built from random timm ViTs."""

from __future__ import annotations

import argparse

import torch

from moca_eval.models import ArchSpec, build_vit, sincos_pos_embed

SMALL = ArchSpec(embed_dim=96, depth=2, num_heads=3, patch_size=8, img_size=32)
LAYERSCALE = ArchSpec(embed_dim=96, depth=2, num_heads=3, patch_size=8, img_size=32, init_values=0.1)
REGISTERS = ArchSpec(embed_dim=96, depth=2, num_heads=3, patch_size=8, img_size=32, init_values=0.1,
                     reg_tokens=4, no_embed_class=True)
MOCOV3 = ArchSpec(embed_dim=384, depth=1, num_heads=12, patch_size=16, img_size=32)


def random_vit(arch: ArchSpec, seed: int, *, sincos: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_vit(arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # make every parameter matter
        if sincos:
            model.pos_embed.copy_(sincos_pos_embed(arch.embed_dim, arch.grid_size))
    return model


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _ibot_names(sd: dict) -> dict:
    return {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()}


def _dinov2_names(sd: dict, *, chunked: bool) -> dict:
    """timm reg model -> DINOv2 naming: register_tokens, CLS row in pos_embed, chunked blocks."""
    out = {}
    for k, v in sd.items():
        if chunked and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 1}.{i}." + k.split(".", 2)[2]
        out[k] = v
    row = torch.randn(1, 1, sd["cls_token"].shape[-1])
    out["register_tokens"] = out.pop("reg_token")
    out["pos_embed"] = torch.cat([row, sd["pos_embed"]], dim=1)
    out["cls_token"] = sd["cls_token"] - row
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


NS = argparse.Namespace(arch="vit_tiny", lr=1e-3)
HEAD = {"head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10)}


def layout_checkpoint(fmt: str, teacher: dict, student: dict) -> tuple[dict, dict]:
    """A checkpoint in ``fmt``'s documented layout, plus load_backbone kwargs."""
    t, s = teacher, student
    builders = {
        "moca-full": lambda: {"model": {**prefixed(t, "encoder_teacher."), **prefixed(s, "encoder."),
                                        "decoder_pos_embed": torch.zeros(1, 5, 8),
                                        "bow_extractor.bow_extractor.0._embedding": torch.zeros(4, 96),
                                        "encoder_pred.scale": torch.ones(1),
                                        "mask_token_cls_pt": torch.zeros(1, 1, 8)},
                              "optimizer": {"state": {}, "param_groups": []}, "epoch": 199, "args": NS,
                              "scaler": {"scale": 65536.0}},
        "mae-full": lambda: {"model": {**t, "mask_token": torch.zeros(1, 1, 8),
                                       "decoder_embed.weight": torch.zeros(8, 32),
                                       "decoder_pred.weight": torch.zeros(4, 8)},
                             "epoch": 799, "args": NS, "scaler": {}},
        "model-wrapped": lambda: {"model": t},
        "dino-full": lambda: {"teacher": {**prefixed(t, "backbone."),
                                          "head.mlp.0.weight": torch.zeros(4, 96)},
                              "student": {**prefixed(s, "module.backbone."),
                                          "module.head.mlp.0.weight": torch.zeros(4, 96)},
                              "epoch": 100, "args": NS, "dino_loss": {"center": torch.zeros(1, 4)}},
        "ibot-full": lambda: {"teacher": {**prefixed(_ibot_names(t), "backbone."),
                                          "backbone.masked_embed": torch.zeros(96),
                                          "head.mlp.0.weight": torch.zeros(4, 96)},
                              "student": {**prefixed(_ibot_names(s), "module.backbone."),
                                          "module.backbone.masked_embed": torch.zeros(96)},
                              "ibot_loss": {"center": torch.zeros(1, 4)}, "args": NS},
        "dinov2-train": lambda: {"teacher": {**prefixed(_dinov2_names(t, chunked=True), "backbone."),
                                             "dino_head.mlp.0.weight": torch.zeros(4, 96),
                                             "ibot_head.mlp.0.weight": torch.zeros(4, 96)}},
        "state-dict-wrapped": lambda: {"state_dict": {**_ibot_names(t), **HEAD}},
        "mocov3": lambda: {"state_dict": {**prefixed(t, "module.base_encoder."),
                                          **prefixed(s, "module.momentum_encoder."),
                                          "module.predictor.0.weight": torch.zeros(4, 4)},
                           "arch": "vit_small", "epoch": 300},
        "msn": lambda: {"target_encoder": {**prefixed(t, "module."),
                                           "module.fc.fc1.weight": torch.zeros(4, 96)},
                        "encoder": {**prefixed(s, "module."), "module.fc.fc1.weight": torch.zeros(4, 96)},
                        "prototypes": torch.zeros(8, 4), "epoch": 1},
        "dinov2-hub": lambda: _dinov2_names(t, chunked=False),
        "bare": lambda: {**t, **HEAD},
    }
    return builders[fmt](), {}


LAYOUT_ARCH = {"ibot-full": LAYERSCALE, "state-dict-wrapped": LAYERSCALE, "dinov2-train": REGISTERS,
               "dinov2-hub": REGISTERS, "mocov3": MOCOV3}


