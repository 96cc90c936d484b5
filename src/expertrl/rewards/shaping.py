"""Completion-shape statistics: length-based reward shaping and filtering (DAPO, arXiv 2503.14476 §3.4; METHODS.md
§4.3) and the loop detector of RO-GRPO's degeneration statistic. Pure functions."""

from __future__ import annotations

import torch
from torch import Tensor


def soft_overlong_punishment(lengths: Tensor, *, max_len: int, cache: int) -> Tensor:
    """DAPO's soft overlong punishment R_len, added to the task reward.

    R_len = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache inside the cache window; -1 beyond L_max.

    Args:
        lengths: (B,) completion lengths in tokens.
        max_len: L_max, the generation budget.
        cache: L_cache, the width of the linearly punished window (0 < cache <= max_len).
    Returns:
        (B,) float32 rewards in [-1, 0].
    """
    assert 0 < cache <= max_len, (cache, max_len)
    lengths = lengths.float()
    start = max_len - cache
    linear = (start - lengths) / cache  # (B,) in (-1, 0] inside the window
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_len, linear, -1.0))


def truncated(mask: Tensor, completion: Tensor, eos_token_id: int) -> Tensor:
    """(B,) bool: completions that never emitted EOS (cut by the length budget)."""
    return ~((completion == eos_token_id) & (mask > 0)).any(-1)


@torch.no_grad()
def repetition_rate(
    token_ids: Tensor, mask: Tensor, *, min_ngram: int = 1, max_ngram: int = 8, min_repeats: int = 3
) -> tuple[Tensor, Tensor]:
    """Which completions end in a loop, and the share of them.

    Rule: a completion (its first ``mask.sum()`` tokens) is looping when its last ``n · min_repeats`` tokens are
    ``min_repeats`` consecutive copies of one n-gram, for some ``min_ngram <= n <= max_ngram``. A degenerate loop
    repeats until the length budget cuts it, so it shows at the tail; a completion that ends in EOS (the rollout mask
    includes the EOS token) has stopped and is never looping. Short runs such as "...000" at a cut tail count with
    ``min_ngram=1, min_repeats=3``: raise ``min_repeats`` or ``min_ngram`` for a stricter detector.

    Args:
        token_ids: (B, C) integer completion tokens.
        mask: (B, C) right-padded completion mask (1 = token of the completion, then 0s).
    Returns:
        is_looping: (B,) bool.
        rate: 0-d float32, mean of ``is_looping`` over the batch.
    """
    if token_ids.dim() != 2 or mask.shape != token_ids.shape:
        raise ValueError(f"token_ids and mask must both be (B, C); got {tuple(token_ids.shape)}, {tuple(mask.shape)}")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram; got min_ngram={min_ngram}, max_ngram={max_ngram}")
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be >= 2 (one copy is not a repetition); got {min_repeats}")
    B, C = token_ids.shape
    if C == 0:
        return torch.zeros(B, dtype=torch.bool, device=token_ids.device), torch.zeros((), device=token_ids.device)
    lengths = (mask > 0).long().sum(-1)  # (B,)
    pos = torch.arange(C, device=token_ids.device)  # (C,)
    if not torch.equal(mask > 0, pos[None] < lengths[:, None]):
        raise ValueError("mask must be right-padded: 1s for the completion's tokens first, then only 0s")
    W = max_ngram * min_repeats
    idx = lengths[:, None] - W + torch.arange(W, device=token_ids.device)  # (B, W) right-aligned tail positions
    tail = token_ids.gather(1, idx.clamp(min=0))  # (B, W); positions < 0 are excluded below
    is_looping = torch.zeros(B, dtype=torch.bool, device=token_ids.device)
    for n in range(min_ngram, max_ngram + 1):
        span = tail[:, W - n * min_repeats :]  # (B, n·r) the last n·r tokens
        periodic = (span[:, :-n] == span[:, n:]).all(-1)  # (B,) period n <=> r copies of the last n tokens
        is_looping |= periodic & (lengths >= n * min_repeats)
    return is_looping, is_looping.float().mean()
