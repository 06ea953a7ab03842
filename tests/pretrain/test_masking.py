"""Masking rounds and partial decoding: counts and the complementary second round."""

import pytest
import torch

from moca_eval.errors import ConfigError
from moca_eval.pretrain.masking import make_masks, token_counts


@pytest.mark.parametrize(
    ("tokens", "ratio", "partial", "expected"),
    [
        (196, 0.55, 0.2, (88, 127)),  # ViT-B/16 at 224, round 1: MOCA's dec_mask_ratio 0.35
        (196, 0.75, 0.2, (49, 88)),  # round 2: dec_mask_ratio 0.55
        (196, 0.55, None, (88, 196)),  # full decoding
        (64, 0.55, 0.2, (28, 40)),
        (64, 0.75, 0.2, (16, 28)),
    ],
)
def test_token_counts_match_moca_flooring(tokens, ratio, partial, expected):
    assert token_counts(tokens, ratio, partial) == expected


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
