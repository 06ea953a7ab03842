"""Masking rounds and partial decoding: counts and the complementary second round."""

import pytest
import torch

from moca_eval.errors import ConfigError
from moca_eval.pretrain.masking import make_masks, token_counts


# MOCA's main_pretrain.py / util/misc.py: mask_ratio (0.55, 0.75), dec_mask_ratio (0.35, 0.55),
# visible = int(L * (1 - mask_ratio)), decoded = int(L * (1 - dec_mask_ratio)), in float64:
#  6x6,   L=36: int(16.2)=16, int(23.4)=23 | int(9.0)=9,   int(16.2)=16
#  8x8,   L=64: int(28.8)=28, int(41.6)=41 | int(16.0)=16, int(28.8)=28
# 10x10, L=100: 1 - 0.55 = 0.44999999999999996, so int(44.999...)=44; int(65.00000000000001)=65
#               | int(25.0)=25, int(44.999...)=44
# 14x14, L=196: int(88.2)=88, int(127.4)=127 | int(49.0)=49, int(88.2)=88
@pytest.mark.parametrize(
    ("grid", "round1", "round2"),
    [(6, (16, 23), (9, 16)), (8, (28, 41), (16, 28)), (10, (44, 65), (25, 44)),
     (14, (88, 127), (49, 88))],
)
def test_token_counts_follow_mocas_formula(grid, round1, round2):
    tokens = grid * grid
    assert token_counts(tokens, 0.55, 0.2) == round1
    assert token_counts(tokens, 0.75, 0.2) == round2
    assert token_counts(tokens, 0.55, None) == (round1[0], tokens)  # full decoding
    first, second = make_masks(torch.rand(2, tokens), (0.55, 0.75), partial=0.2)
    assert (first.visible, first.decoded, second.visible, second.decoded) == (*round1, *round2)


def test_second_round_on_8x8_decodes_the_first_12_of_the_13_shared_tokens():
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(2))
    first, second = make_masks(noise, (0.55, 0.75), partial=0.2)
    shared = first.ids[:, 28:41]  # decoded, not seen, in round 1
    assert torch.equal(second.ids[:, 16:28], shared[:, :12])
    for row in range(3):
        assert not set(second.ids_visible[row].tolist()) & set(first.ids_decoded[row].tolist())


def test_partial_decoding_that_decodes_no_masked_token_is_a_config_error():
    with pytest.raises(ConfigError, match="decodes no masked token"):
        token_counts(36, 0.55, 0.01)  # int(36 * 0.46) = 16 = visible


def test_one_round_is_the_argsort_of_the_noise():
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(0))
    (mask,) = make_masks(noise, (0.55,), partial=0.2)
    assert torch.equal(mask.ids, torch.argsort(noise, dim=1))
    assert (mask.visible, mask.decoded) == (88, 127)
    assert mask.ids_visible.shape == (3, 88) and mask.ids_decoded.shape == (3, 127)


def test_second_round_is_complementary_and_decodes_the_same_extra_tokens():
    noise = torch.rand(4, 196, generator=torch.Generator().manual_seed(1))
    first, second = make_masks(noise, (0.55, 0.75), partial=0.2)
    assert (second.visible, second.decoded) == (49, 88)
    for row in range(4):
        assert sorted(second.ids[row].tolist()) == list(range(196))  # a permutation
        seen1 = set(first.ids_visible[row].tolist())
        decoded1 = set(first.ids_decoded[row].tolist())
        seen2 = set(second.ids_visible[row].tolist())
        extra1 = decoded1 - seen1
        extra2 = set(second.ids_decoded[row].tolist()) - seen2
        assert not seen2 & decoded1  # round-2 visible tokens were neither seen nor decoded
        assert extra2 == extra1 and len(extra1) == 39  # 20% of 196 decoded beyond the visible
        # 75% of the tokens are hidden from the encoder in round 2
        assert 196 - len(seen2) == 147


def test_second_round_that_does_not_fit_is_a_config_error():
    noise = torch.rand(2, 64)
    with pytest.raises(ConfigError, match="second round needs"):
        make_masks(noise, (0.55, 0.75), partial=None)
