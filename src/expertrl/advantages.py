"""Group-relative advantages (GRPO; METHODS.md §0 "Advantage", §4.2 Dr.GRPO).

A rollout batch holds B = (number of prompts) × G completions, the G samples of a prompt in one contiguous block.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("group", "none")


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6
) -> tuple[Tensor, dict[str, Tensor]]:
    """Â_i = (R_i − mean_group R) / (std_group R + eps), or R_i − mean_group R with ``scale="none"`` (Dr.GRPO).

    The std is the *population* std (``unbiased=False``): no paper specifies it (METHODS.md §0); it is the
    maximum-likelihood estimate, is defined for G = 1, and for a binary reward with success rate q it is
    sqrt(q(1 − q)). TRL and verl use the sample std (larger by sqrt(G/(G−1)), so advantages are smaller by that
    factor); switch only when matching those numbers. Groups whose rewards are all equal get Â = 0 exactly (not
    the rounding residue of R − mean), so they contribute no gradient.

    Args:
        rewards: (B,) one scalar reward per completion; groups are contiguous blocks of ``group_size``.
        group_size: G; must divide B.
        scale: ``"group"`` divides by the group std; ``"none"`` only centres (Dr.GRPO, METHODS.md §4.2).
        eps: δ added to the std (METHODS.md §0: ≈ 1e-6; TRL uses 1e-4).
    Returns:
        advantages: (B,) float32 at least.
        metrics: ``reward/frac_zero_std`` (fraction of groups whose rewards are all equal) and ``reward/group_std``
            (mean within-group population std); detached 0-d tensors.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose from {list(SCALES)}")
    assert rewards.dim() == 1 and rewards.shape[0] % group_size == 0, (rewards.shape, group_size)
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # (B/G, G)
    mean = r.mean(-1, keepdim=True)  # (B/G, 1)
    std = r.std(-1, unbiased=False, keepdim=True)  # (B/G, 1)
    adv = r - mean  # (B/G, G)
    if scale == "group":
        adv = adv / (std + eps)
    zero_std = r.amax(-1) == r.amin(-1)  # (B/G,) all rewards equal: exact test, std may round to ~1e-8
    adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    metrics = {"reward/frac_zero_std": zero_std.to(r.dtype).mean(), "reward/group_std": std.mean()}
    return adv.reshape(-1), metrics  # (B,)
