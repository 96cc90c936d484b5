"""CISPO: clip the importance-sampling weight, not the update (MiniMax-M1, arXiv:2506.13585; METHODS.md §4.7).

    J = (1/Σ_i |y_i|) Σ_i Σ_t sg[ clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high) ] · Â_{i,t} · log π_θ(y_{i,t})

The gradient of every token is the REINFORCE term Â ∇logp, weighted by the truncated, constant IS weight. Unlike
PPO's clip, truncation never removes a token's gradient (tokens far off-policy, often the rare "fork" tokens, keep
contributing). ``clip_frac`` therefore counts the tokens whose *weight* is truncated (ρ outside
[1 − ε_low, 1 + ε_high]); their gradient is bounded, not removed. Defaults: ε_low = 1.0, i.e. the lower bound is off
(ρ >= 0 always), ε_high = 5.0 (ScaleRL via TRL ``loss_type="cispo", epsilon_high=5.0``).
Paper aggregation: ``token_mean`` (1/Σ|y_i|). The loss *value* is −w Â logp, not a surrogate of the objective value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.losses import register_loss
from expertrl.losses.grpo import LOG_RATIO_CLAMP, broadcast_advantages, ratio_metrics


@register_loss("cispo")
def cispo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 1.0,
    eps_high: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO per-token loss −sg[clip(ρ, 1 − ε_low, 1 + ε_high)] Â logp_θ.

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        old_logp: (B, T) log π_old (constant).
        advantages: (B,) or (B, T) (constant).
        mask: (B, T) 1 = completion token (metrics only).
        eps_low: lower truncation width, weight >= 1 − eps_low (1.0 = off).
        eps_high: upper truncation width, weight <= 1 + eps_high (5.0).
    Returns:
        loss: (B, T) per-token loss, not yet masked or aggregated.
        metrics: ``clip_frac``, ``clip_frac_low``, ``clip_frac_high`` (fractions of tokens whose IS weight is
            truncated, whatever the sign of Â), ``ratio_mean``, ``ratio_max``, ``approx_kl``. Detached 0-d.
    """
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (logp.shape, old_logp.shape, mask.shape)
    adv = broadcast_advantages(advantages, logp).detach()  # (B, 1) or (B, T)
    log_ratio = (logp - old_logp.detach()).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T), constant
    ratio = torch.exp(log_ratio)  # (B, T)
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # (B, T) sg[clip(ρ)]
    loss = -weight * adv * logp  # (B, T)
    clip_low = ratio < 1.0 - eps_low
    clip_high = ratio > 1.0 + eps_high
    return loss, ratio_metrics(log_ratio, clip_low, clip_high, mask)
