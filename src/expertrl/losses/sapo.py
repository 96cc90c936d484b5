"""SAPO: a soft, temperature-controlled gate instead of a hard clip (Gao et al., Qwen, arXiv:2511.20347; §4.6).

    J      = (1/G) Σ_i (1/|y_i|) Σ_t f_{i,t}(ρ_{i,t}) Â_{i,t}
    f(ρ)   = (4/τ) σ( τ (ρ − 1) ),       τ = τ_pos if Â > 0 else τ_neg
    ∂f/∂logp_θ = w ρ,   w = 4 p (1 − p),   p = σ(τ(ρ − 1))

At ρ = 1, w = 1 for any τ, so on-policy SAPO has the REINFORCE gradient −Â; as ρ leaves 1 the weight decays
smoothly instead of dropping to 0 at a clip edge. τ_neg > τ_pos damps negative-advantage updates faster (they spread
probability over many unsampled tokens). No clip, so ``clip_frac`` is 0 by definition. The loss *value* at ρ = 1 is
−2Â/τ, not −Â (an offset with no gradient). Paper aggregation: ``seq_mean_token_mean``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.losses import register_loss
from expertrl.losses.grpo import LOG_RATIO_CLAMP, broadcast_advantages, ratio_metrics
from expertrl.ops import masked_mean


@register_loss("sapo")
def sapo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO per-token loss −f(ρ) Â with the soft gate f(ρ) = (4/τ) σ(τ(ρ − 1)).

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        old_logp: (B, T) log π_old (constant).
        advantages: (B,) or (B, T) (constant); τ is chosen per token by the sign of its advantage.
        mask: (B, T) 1 = completion token (metrics only).
        tau_pos: temperature where Â > 0 (paper / TRL default 1.0).
        tau_neg: temperature where Â <= 0 (paper / TRL default 1.05).
    Returns:
        loss: (B, T) −f(ρ) Â, not yet masked or aggregated.
        metrics: ``clip_frac`` (0: nothing is clipped), ``ratio_mean``, ``ratio_max``, ``approx_kl`` and
            ``soft_weight_mean``, the masked mean of the gradient weight w = 4p(1 − p) ∈ (0, 1]. Detached 0-d.
    """
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (logp.shape, old_logp.shape, mask.shape)
    assert tau_pos > 0 and tau_neg > 0, f"SAPO temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}"
    adv = broadcast_advantages(advantages, logp).detach()  # (B, 1) or (B, T)
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    tau = torch.where(adv > 0, tau_pos, tau_neg).to(ratio.dtype)  # (B, 1) or (B, T)
    gate = torch.sigmoid(tau * (ratio - 1.0))  # (B, T) p
    loss = -(4.0 / tau) * gate * adv  # (B, T)
    no_clip = torch.zeros_like(log_ratio, dtype=torch.bool)
    metrics = ratio_metrics(log_ratio.detach(), no_clip, no_clip, mask)
    del metrics["clip_frac_low"], metrics["clip_frac_high"]  # there is no clip; keep only the shared clip_frac = 0
    with torch.no_grad():
        metrics["soft_weight_mean"] = masked_mean(4.0 * gate * (1.0 - gate), mask.to(gate.dtype))
    return loss, metrics
