"""The MOCA module: EMA teacher, masked student forward, decoder, and checkpoint keys."""

import pytest
import torch

from moca_eval.models import sincos_pos_embed
from moca_eval.pretrain.model import MOCA, encode_visible


@pytest.fixture
def make_model(micro_cfg):
    def make(**overrides) -> MOCA:
        torch.manual_seed(0)
        return MOCA(micro_cfg(**overrides))

    return make


def test_teacher_starts_as_a_frozen_copy_of_the_student_with_fixed_sincos_positions(make_model):
    model = make_model()
    for (name, s), t in zip(model.encoder.named_parameters(), model.encoder_teacher.parameters()):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    table = sincos_pos_embed(192, 4, cls_token=True)
    assert torch.equal(model.encoder.pos_embed, table)
    assert not model.encoder.pos_embed.requires_grad


def test_ema_update_by_hand(make_model):
    model = make_model()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = {k: v.clone() for k, v in model.encoder_teacher.state_dict().items()}
    student = model.encoder.state_dict()
    model.update_teacher(0.9)
    after = model.encoder_teacher.state_dict()
    for key, old in before.items():
        if key == "pos_embed":  # fixed: never averaged
            assert torch.equal(after[key], old)
        else:
            assert torch.allclose(after[key], 0.9 * old + 0.1 * student[key], atol=1e-6), key
    snapshot = {k: v.clone() for k, v in after.items()}
    model.update_teacher(1.0)  # momentum 1 keeps the teacher
    assert all(torch.equal(snapshot[k], v) for k, v in model.encoder_teacher.state_dict().items())


def test_masked_forward_with_every_token_visible_equals_timm_forward_features(make_model):
    model = make_model().eval()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.arange(16).repeat(3, 1)
    _, last = encode_visible(model.encoder, images, ids, early_block=1)
    assert torch.allclose(last, model.encoder.forward_features(images), atol=1e-5)


def test_masked_forward_sees_only_the_visible_tokens(make_model):
    model = make_model().eval()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[3, 7, 1], [0, 15, 8]])
    early, last = encode_visible(model.encoder, images, ids, early_block=1)
    assert early.shape == (2, 3, 192) and last.shape == (2, 4, 192)
    changed = images.clone()
    changed[:, :, 8:16, 8:16] += 5.0  # token 5 (row 1, col 1) is hidden in both images
    _, last2 = encode_visible(model.encoder, changed, ids, early_block=1)
    assert torch.allclose(last, last2)


def test_decoder_returns_one_feature_per_decoded_token_in_order(make_model):
    model = make_model().eval()
    avg, early = torch.randn(2, 192), torch.randn(2, 3, 192)
    ids = torch.tensor([[3, 7, 1, 9, 4], [0, 15, 8, 2, 6]])
    out = model.decoder(avg, early, ids)
    assert out.shape == (2, 5, 32)
    # swapping two masked (mask-token) positions swaps the outputs: positions come from ids
    swapped = model.decoder(avg, early, ids[:, [0, 1, 2, 4, 3]])
    assert torch.allclose(swapped[:, 3], out[:, 4], atol=1e-5)
    assert torch.allclose(swapped[:, 4], out[:, 3], atol=1e-5)


def test_step_updates_codebook_and_mu_and_returns_finite_losses(make_model):
    model = make_model()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    words = model.bow_extractor.codebook.words.clone()
    out = model(x1, x2, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    new = model.bow_extractor.codebook.words
    assert int(model.bow_extractor.codebook.ptr) == 4
    assert not torch.equal(new[:4], words[:4]) and torch.equal(new[4:], words[4:])
    assert float(model.bow_extractor.mu_msd) != 0.5
    assert torch.isfinite(out.loss) and 1 <= out.codebook_usage <= 32
    assert model.encoder.cls_token.grad is not None
    assert all(p.grad is None for p in model.encoder_teacher.parameters())


def test_state_dict_names_follow_mocas_checkpoint_layout(make_model):
    keys = make_model().state_dict().keys()
    prefixes = ("encoder.", "encoder_teacher.", "bow_extractor.", "encoder_pred.", "decoder.",
                "decoder_pred.")
    assert all(k.startswith(prefixes) for k in keys)
    teacher = {k.removeprefix("encoder_teacher.") for k in keys if k.startswith("encoder_teacher.")}
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}
    expected |= {f"blocks.{i}.{p}" for i in range(2) for p in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")}
    assert teacher == expected
