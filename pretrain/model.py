"""The MOCA training module: student, EMA teacher, codebook, generators, decoder (paper Sec. 3).

Parts are named as in MOCA's checkpoints so that its loaders (and ours) read the file:
``encoder.`` (student ViT), ``encoder_teacher.`` (teacher ViT, timm keys), ``bow_extractor.``
(codebook and ``mu_MSD``), ``encoder_pred.`` (``G^b``), ``decoder.`` and ``decoder_pred.``
(condenser decoder and ``G^d``). The teacher is the one evaluated downstream.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moca_eval.models import build_vit, sincos_pos_embed
from moca_eval.pretrain.assign import TeacherAssigner, border_average
from moca_eval.pretrain.codebook import OnlineCodebook, pick_new_words
from moca_eval.pretrain.config import PretrainConfig
from moca_eval.pretrain.decoder import CondenserDecoder
from moca_eval.pretrain.losses import image_loss, local_loss, total_loss
from moca_eval.pretrain.masking import MaskRound, make_masks
from moca_eval.pretrain.prototypes import PrototypeGenerator, prototype_logits


@dataclass(frozen=True)
class BatchSlice:
    """Where this process's images sit in the global batch (one process: all of it)."""

    offset: int = 0
    global_batch: int | None = None


@dataclass
class StepOutput:
    """The loss to minimise and detached statistics of one training step."""

    loss: torch.Tensor
    loss_img: torch.Tensor
    loss_loc: torch.Tensor
    tau: float
    codebook_usage: int


def build_backbone(cfg: PretrainConfig) -> VisionTransformer:
    """A timm ViT with MOCA's initialisation and a fixed sin-cos ``pos_embed``."""
    vit = build_vit(cfg.arch_spec)
    init_moca_weights(vit)
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(vit.embed_dim, cfg.grid_size, cls_token=True))
    vit.pos_embed.requires_grad_(False)
    return vit


def init_moca_weights(module: nn.Module) -> None:
    """MAE/MOCA init: xavier-uniform Linear (and flattened patch projection), zero biases,
    unit LayerNorm, ``N(0, 0.02)`` class and mask tokens."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
    for name, param in module.named_parameters():
        if name.endswith("patch_embed.proj.weight"):
            nn.init.xavier_uniform_(param.data.view(param.shape[0], -1))
        elif name.endswith(("cls_token", "mask_token")):
            nn.init.normal_(param, std=0.02)


def encode_visible(vit: VisionTransformer, images: torch.Tensor, ids_visible: torch.Tensor, *,
                   early_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student forward on the visible tokens only.

    Returns:
        ``(early, last)``: the visible patch tokens after block ``early_block`` (1-based,
        no CLS) ``[N, V, D]`` and the final-LayerNorm tokens ``[N, 1 + V, D]``.
    """
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = vit.norm_pre(torch.cat([cls, x], dim=1))
    early = x[:, 1:]
    for index, block in enumerate(vit.blocks, start=1):
        x = block(x)
        if index == early_block:
            early = x[:, 1:]
    return early, vit.norm(x)


class MOCA(nn.Module):
    """Student/teacher ViTs with MOCA's codebook targets and prediction heads."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, hidden = cfg.arch_spec.embed_dim, int(cfg.arch_spec.embed_dim * cfg.pred_mlp_ratio)
        self.encoder = build_backbone(cfg)
        codebook = OnlineCodebook(cfg.num_words, dim, num_new=cfg.num_new_words)
        self.bow_extractor = TeacherAssigner(codebook, inv_delta=cfg.inv_delta, decay=cfg.mu_decay)
        self.encoder_pred = PrototypeGenerator(dim, dim, hidden=hidden)
        self.decoder = CondenserDecoder(dim, cfg.decoder_dim, depth=cfg.decoder_depth,
                                        num_heads=cfg.decoder_heads, grid=cfg.grid_size)
        self.decoder_pred = PrototypeGenerator(dim, cfg.decoder_dim, hidden=hidden)
        for part in (self.encoder_pred, self.decoder, self.decoder_pred):
            init_moca_weights(part)
        self.encoder_teacher = copy.deepcopy(self.encoder).requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher <- m * teacher + (1 - m) * student`` (fixed parameters skipped).

        The training loop calls it at the start of a step, before the teacher's forward, as
        MOCA's ``extract_targets``; a momentum of 1 or more leaves the teacher as it is.
        """
        if momentum >= 1.0:
            return
        for student, teacher in zip(self.encoder.parameters(), self.encoder_teacher.parameters()):
            if student.requires_grad:
                teacher.mul_(momentum).add_(student.detach(), alpha=1.0 - momentum)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *, generator: torch.Generator,
                where: BatchSlice = BatchSlice()) -> StepOutput:
        """One MOCA step on two views ``[n, 3, H, W]`` (targets, codebook update, losses)."""
        images = torch.cat([x1, x2])  # view 1 then view 2
        words = self.bow_extractor.codebook.words.clone()
        tau = float(self.bow_extractor.tau)  # the temperature of this step's targets
        codes, avg_codes, usage = self._teacher_targets(images, words, generator, where)
        rounds = self._masks(x1.shape[0], generator, where, device=x1.device)
        protos_img, protos_loc = self.encoder_pred(words), self.decoder_pred(words)
        losses_img, losses_loc = [], []
        for mask in rounds:
            early, last = encode_visible(self.encoder, images, mask.ids_visible,
                                         early_block=self.cfg.decoder_layer)
            avg = last[:, 1:].mean(dim=1)
            logits_img = prototype_logits(avg, protos_img, kappa=self.cfg.kappa)
            losses_img.append(image_loss(logits_img, avg_codes))
            decoded = self.decoder(avg, early, mask.ids_decoded)
            logits_loc = prototype_logits(decoded, protos_loc, kappa=self.cfg.kappa)
            losses_loc.append(local_loss(logits_loc, codes, mask.ids_decoded))
        loss_img, loss_loc = torch.stack(losses_img).mean(), torch.stack(losses_loc).mean()
        loss = total_loss(loss_img, loss_loc, img_weight=self.cfg.img_weight)
        return StepOutput(loss, loss_img.detach(), loss_loc.detach(), tau, usage)

    @torch.no_grad()
    def _teacher_targets(self, images: torch.Tensor, words: torch.Tensor, generator: torch.Generator,
                         where: BatchSlice) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Teacher assignments of both views, then the codebook and ``mu_MSD`` updates."""
        cfg = self.cfg
        tokens = self.encoder_teacher.forward_features(images)[:, 1:]
        codes, gaps = self.bow_extractor(tokens, words)
        avg_codes = border_average(codes, grid=cfg.grid_size, border=cfg.border)
        usage = codebook_usage(codes)
        n = images.shape[0] // 2
        view = int(torch.randint(2, (1,), generator=generator))
        new_words = pick_new_words(
            tokens[view * n : (view + 1) * n], num_new=cfg.num_new_words, grid=cfg.grid_size,
            border=cfg.border, generator=generator, offset=where.offset,
            global_batch=where.global_batch,
        )
        self.bow_extractor.update(new_words, gaps)
        return codes, avg_codes, usage

    def _masks(self, n: int, generator: torch.Generator, where: BatchSlice, *,
               device: torch.device) -> list[MaskRound]:
        """Masks of both views, drawn for the global batch and sliced to this process."""
        total = where.global_batch or n
        num_tokens = self.cfg.grid_size**2
        noise = [torch.rand(total, num_tokens, generator=generator)[where.offset : where.offset + n]
                 for _ in range(2)]
        rounds = make_masks(torch.cat(noise), self.cfg.mask_ratios, partial=self.cfg.partial_decoding)
        return [MaskRound(r.ids.to(device), r.visible, r.decoded) for r in rounds]


@torch.no_grad()
def codebook_usage(codes: torch.Tensor) -> int:
    """Distinct codes among the argmax assignments of all tokens (all processes)."""
    counts = torch.bincount(codes.argmax(dim=-1).flatten(), minlength=codes.shape[-1])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return int((counts > 0).sum())
