"""GRPO / PPO clipped policy loss (DeepSeekMath arXiv:2402.03300; METHODS.md §4.1; MoE-GRPO Eq. 4).

Per token, with ρ = π_θ / π_old and advantage Â (maximised objective J, loss = −J):

    loss_t = −min( ρ_t Â, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â )

``ε_low = ε_high`` is PPO/GRPO; ``ε_high > ε_low`` is DAPO's clip-higher (a preset, not a separate loss).
``dual_clip = c`` adds the dual clip of Ye et al. 2020 (arXiv:1912.09729): for Â < 0 the loss is bounded by −c·Â,
so a token whose ratio has exploded (ρ > c) on a bad sample stops pushing (its gradient is 0).
``clipped_surrogate`` holds the math and is shared with Gate-GRPO (``losses.gate``), whose ratio is over expert
sets instead of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.losses import register_loss
from expertrl.ops import masked_mean

LOG_RATIO_CLAMP = 20.0
"""|log ρ| is clamped to 20 (ρ ∈ [2e-9, 4.9e8]) before exp: a diverged token cannot produce inf/NaN. Where the
clamp bites, its gradient is 0; at such ratios the clip has normally zeroed it already (the exception, ρ ≫ 1 with
Â < 0, is exactly the blow-up the clamp exists to stop)."""


def clipped_surrogate(
    log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PPO clipped surrogate loss, elementwise: −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high) A).

    Args:
        log_ratio: (...) log ρ = log π_θ − log π_old (gradient flows through it).
        adv: advantages broadcastable to ``log_ratio`` (constant).
        eps_low: lower clip width, ρ >= 1 − eps_low.
        eps_high: upper clip width, ρ <= 1 + eps_high.
    Returns:
        loss: (...) per-element loss.
        log_ratio: (...) the clamped log ρ (for metrics).
        clip_low: (...) bool, the lower clip is active (ρ < 1 − ε_low and A < 0): the element gets no gradient.
        clip_high: (...) bool, the upper clip is active (ρ > 1 + ε_high and A > 0): the element gets no gradient.
    """
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # see LOG_RATIO_CLAMP
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    # The min picks the clipped branch (zero gradient) only on the side where clipping lowers the objective.
    clip_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clip_high = (ratio > 1.0 + eps_high) & (adv > 0)
    return loss, log_ratio, clip_low, clip_high


def ratio_metrics(log_ratio: Tensor, clip_low: Tensor, clip_high: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Masked diagnostics of a ratio: clip fractions, ratio mean/max and the k3 KL estimate; detached 0-d tensors.

    ``approx_kl`` is the mean of ρ − 1 − log ρ (Schulman's k3 estimator of KL(π_old || π_θ), >= 0).
    ``mask`` broadcasts against ``log_ratio`` (e.g. (B, T) against (L, B, T)).
    """
    with torch.no_grad():
        ratio = log_ratio.exp()
        m = mask.to(ratio.dtype).expand_as(ratio)
        low = masked_mean(clip_low.to(ratio.dtype), m)
        high = masked_mean(clip_high.to(ratio.dtype), m)
        return {
            "clip_frac": low + high,  # the two events are disjoint
            "clip_frac_low": low,
            "clip_frac_high": high,
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": (ratio * m).max(),  # ρ > 0, so masked entries (0) never win unless all are masked
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
        }


def broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """(B,) per-sequence advantages -> (B, 1); (B, T) per-token advantages unchanged. ``like`` is (..., B, T)."""
    if advantages.dim() == 1:
        assert advantages.shape[0] == like.shape[-2], (advantages.shape, like.shape)
        return advantages[:, None]  # (B, 1)
    assert advantages.shape == like.shape[-2:], (advantages.shape, like.shape)
    return advantages  # (B, T)


@register_loss("grpo")
def grpo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped objective per token (METHODS.md §4.1; MoE-GRPO Eq. 4 with replayed routes).

    Paper aggregation: ``seq_mean_token_mean`` (GRPO); DAPO uses ``token_mean``, Dr.GRPO ``seq_mean_token_sum_norm``.

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        old_logp: (B, T) log π_old of the same tokens (constant).
        advantages: (B,) one per completion, or (B, T) per token (constant).
        mask: (B, T) 1 = completion token that counts; used here for the metrics only (``aggregate`` applies it
            to the loss).
        eps_low: lower clip width.
        eps_high: upper clip width (DAPO clip-higher: 0.28).
        dual_clip: c > 1 (typically 3) turns on the dual clip: where A < 0 the loss is min(loss, −c·A);
            None = off.
    Returns:
        loss: (B, T) per-token loss −min(ρA, clip(ρ)A), not yet masked or aggregated.
        metrics: ``clip_frac``, ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``ratio_max``,
            ``approx_kl``: detached 0-d tensors, masked means over tokens. With ``dual_clip`` also
            ``clip_frac_dual`` (A < 0 and ρ > c), which is then included in ``clip_frac``.
    """
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (logp.shape, old_logp.shape, mask.shape)
    assert dual_clip is None or dual_clip > 1, f"dual_clip must be > 1 (typically 3) or None, got {dual_clip}"
    adv = broadcast_advantages(advantages, logp).detach()  # (B, 1) or (B, T)
    loss, log_ratio, clip_low, clip_high = clipped_surrogate(logp - old_logp.detach(), adv, eps_low, eps_high)
    metrics = ratio_metrics(log_ratio, clip_low, clip_high, mask)
    if dual_clip is not None:
        # For A < 0 and ρ > c > 1 the clipped surrogate is ρ|A| > c|A|: replace it by the constant −cA (no gradient).
        bound = -dual_clip * adv  # (B, 1) or (B, T)
        dual = (adv < 0) & (loss > bound)  # (B, T); disjoint from clip_low (ρ < 1 − ε_low < c) and clip_high (A > 0)
        loss = torch.where(dual, bound.expand_as(loss), loss)
        with torch.no_grad():
            frac_dual = masked_mean(dual.to(loss.dtype), mask.to(loss.dtype))
        metrics["clip_frac_dual"] = frac_dual
        metrics["clip_frac"] = metrics["clip_frac"] + frac_dual
    return loss, metrics
