"""Per-token estimators of KL(π_θ || π_ref) on the sampled tokens (Schulman's k1/k2/k3; METHODS.md §4.1).

With r = π_ref / π_θ = exp(ref_logp − logp) on tokens sampled from π_θ (≈ π_old):

    k1 = −log r = logp − ref_logp            unbiased, can be negative, high variance
    k2 = ½ (log r)²                          biased, low variance, >= 0
    k3 = r − log r − 1                       unbiased, >= 0 (GRPO / DeepSeekMath's D̂_KL)

Not a policy loss (not registered): the caller adds ``β · kl_penalty(...)`` to the per-token loss before
``aggregate``. Gradient flows through ``logp``; ``ref_logp`` is a constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.losses.grpo import LOG_RATIO_CLAMP

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k3") -> Tensor:
    """Per-token KL(π_θ || π_ref) estimate.

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        ref_logp: (B, T) log π_ref of the same tokens (constant).
        estimator: ``k1`` | ``k2`` | ``k3`` (default, GRPO).
    Returns:
        (B, T) per-token estimate, not yet masked or aggregated.
    Raises:
        ValueError: unknown ``estimator`` (lists the valid ones).
    """
    assert logp.shape == ref_logp.shape, (logp.shape, ref_logp.shape)
    log_r = ref_logp.detach() - logp  # (B, T) log(π_ref / π_θ)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        # Clamp before exp as the ratio losses do: a token with π_θ ≪ π_ref must not overflow to inf.
        log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_r) - log_r - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose from {list(KL_ESTIMATORS)}")
