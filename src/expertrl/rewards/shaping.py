"""Length-based reward shaping and filtering (DAPO, arXiv 2503.14476 §3.4; METHODS.md §4.3). Pure functions."""

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
