"""Random token masks for the student: two masking rounds and partial decoding (Sec. 3.3-3.4).

A mask is a per-image permutation of the token ids, ``ids [N, L]``: the first ``visible``
ids are the tokens the student encoder sees, the first ``decoded`` ids (visible ones
included) are the tokens the condenser decoder predicts. With partial decoding only a
random 20% of all tokens is decoded beyond the visible ones, instead of every masked token.

The second masking round (75%) re-uses the teacher targets of the first one (55%) and is
built as in MOCA's code: its visible tokens are drawn from the tokens that the first round
neither showed nor decoded, and it decodes the first round's extra masked tokens (as many of
them as its own count allows: on 14x14 and 6x6 grids all of them, on 8x8 12 of 13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moca_eval.errors import ConfigError


@dataclass(frozen=True)
class MaskRound:
    """One masking round: ``ids`` ``[N, L]`` (visible first, then decoded, then the rest)."""

    ids: torch.Tensor
    visible: int
    decoded: int

    @property
    def ids_visible(self) -> torch.Tensor:
        return self.ids[:, : self.visible]

    @property
    def ids_decoded(self) -> torch.Tensor:
        return self.ids[:, : self.decoded]


def token_counts(num_tokens: int, mask_ratio: float, partial: float | None) -> tuple[int, int]:
    """``(visible, decoded)`` counts for one round, by MOCA's formula (196 tokens: 88, 127).

    MOCA's script takes a decoder mask ratio per round (``dec_mask_ratio``, 0.35 and 0.55 for
    the masks 0.55 and 0.75) and truncates: ``visible = int(L * (1 - mask_ratio))``,
    ``decoded = int(L * (1 - dec_mask_ratio))``. Here ``dec_mask_ratio = mask_ratio - partial``,
    rounded to 10 decimals so that it is the same float as MOCA's literal (0.55 - 0.2 is
    0.35000000000000003, which would lose a token at 100 tokens).

    Args:
        num_tokens: patch tokens per image ``L``.
        mask_ratio: fraction of tokens hidden from the encoder.
        partial: fraction of all tokens decoded beyond the visible ones; ``None`` decodes all.
    """
    visible = int(num_tokens * (1.0 - mask_ratio))
    if visible < 1:
        raise ConfigError(f"mask ratio {mask_ratio} leaves no visible token out of {num_tokens}")
    if partial is None:
        return visible, num_tokens
    decoded = min(num_tokens, int(num_tokens * (1.0 - round(mask_ratio - partial, 10))))
    if decoded <= visible:
        raise ConfigError(f"partial decoding {partial} with mask ratio {mask_ratio} decodes no "
                          f"masked token out of {num_tokens}")
    return visible, decoded


def check_rounds(num_tokens: int, mask_ratios: tuple[float, ...], partial: float | None) -> None:
    """Raise ``ConfigError`` unless the rounds fit in ``num_tokens`` (see ``make_masks``)."""
    make_masks(torch.zeros(1, num_tokens), mask_ratios, partial=partial)


def make_masks(
    noise: torch.Tensor, mask_ratios: tuple[float, ...], *, partial: float | None
) -> list[MaskRound]:
    """The masks of every round for a batch, from uniform ``noise [N, L]`` (lowest visible).

    Taking the noise as input keeps this a pure function: the caller draws it from a
    generator shared by all processes, so a distributed run masks exactly as one process.

    Raises:
        ConfigError: a second round that does not fit in the tokens the first one left.
    """
    num_tokens = noise.shape[1]
    ids = torch.argsort(noise, dim=1)
    visible1, decoded1 = token_counts(num_tokens, mask_ratios[0], partial)
    rounds = [MaskRound(ids, visible1, decoded1)]
    if len(mask_ratios) == 1:
        return rounds
    visible2, decoded2 = token_counts(num_tokens, mask_ratios[1], partial)
    shared = ids[:, visible1:decoded1]  # masked tokens decoded in round 1, first in round 2
    unused = ids[:, decoded1:]  # neither seen nor decoded in round 1
    if unused.shape[1] < visible2:
        raise ConfigError(
            f"masking rounds {mask_ratios} with partial decoding {partial}: the second round "
            f"needs {visible2} visible tokens outside the {decoded1} the first round decodes "
            f"(of {num_tokens}); lower the ratios or use partial decoding"
        )
    ids2 = torch.cat([unused[:, :visible2], shared, unused[:, visible2:], ids[:, :visible1]], dim=1)
    rounds.append(MaskRound(ids2, visible2, decoded2))
    return rounds
