"""Prototype generators: L2Norm -> Linear -> BN over codebook items -> ReLU -> Linear, skip, L2Norm."""

import torch
import torch.nn.functional as F

from moca_eval.pretrain.prototypes import PrototypeGenerator, prototype_logits


def test_generator_matches_its_definition():
    torch.manual_seed(0)
    gen = PrototypeGenerator(6, 4, hidden=12).train()
    words = torch.randn(10, 6) * 3
    out = gen(words)
    x = F.normalize(words, dim=1)
    h = x @ gen.generator[0].weight.t()
    # BatchNorm over the 10 codebook items (training statistics, biased variance)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    h = h * gen.generator[1].weight + gen.generator[1].bias
    h = torch.relu(h) @ gen.generator[3].weight.t() + gen.generator[3].bias
    skip = x @ gen.skip.weight.t() + gen.skip.bias  # widths differ: a Linear skip
    assert torch.allclose(out, F.normalize(h + skip, dim=1), atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(10), atol=1e-5)


def test_skip_is_identity_when_widths_match():
    gen = PrototypeGenerator(8, 8, hidden=16)
    assert isinstance(gen.skip, torch.nn.Identity)


def test_logits_are_kappa_times_dot_products():
    feats = torch.tensor([[1.0, 2.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert torch.allclose(prototype_logits(feats, protos, kappa=3.0), torch.tensor([[3.0, 6.0, 6.6]]))
