"""GMPO: geometric mean of token ratios, clipped per token in log space (Zhao et al., arXiv:2507.20673; METHODS §4.5).

    ℓ_{i,t} = logp_θ − logp_old                                         token log-ratio
    ℓ̃_{i,t} = sgn(Â_i) · min( sgn(Â_i) ℓ_{i,t}, sgn(Â_i) clip(ℓ_{i,t}, −ε_low, ε_high) )
    J       = (1/G) Σ_i Â_i · exp( (1/|y_i|) Σ_t ℓ̃_{i,t} )

The min is pessimistic per sign: for Â > 0 a token with ℓ > ε_high is held at ε_high, for Â < 0 a token with
ℓ < −ε_low is held at −ε_low; in both cases the token gets no gradient (the official ``callsys/GMPO`` form, which
equals the product-of-|min(ρÂ, clip(ρ)Â)| formula of the paper). Clipping happens per token, before the geometric
mean; ε_low = ε_high = 0.4 (ratio range ≈ (0.67, 1.49)).

GMPO is a sequence-level objective: ``gmpo`` computes the per-sequence loss −J_i and broadcasts it over the
sequence's tokens, so **the aggregation must be a mean over sequences of the per-token mean**,
``seq_mean_token_mean`` (then (1/|y_i|) Σ_t of a constant is the constant: value and gradient are GMPO's exactly).
``token_mean`` would weight sequence i by |y_i|, which GMPO does not do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.losses import register_loss
from expertrl.losses.grpo import LOG_RATIO_CLAMP, ratio_metrics
from expertrl.ops import masked_mean


@register_loss("gmpo")
def gmpo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO per-sequence loss −Â_i exp(mean_t ℓ̃_{i,t}), broadcast over tokens; aggregate with seq_mean_token_mean.

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        old_logp: (B, T) log π_old (constant).
        advantages: (B,) one per completion (constant); GMPO has no per-token form.
        mask: (B, T) 1 = completion token; only these enter the geometric mean.
        eps_low: lower clip width in log space, ℓ >= −eps_low (paper: 0.4).
        eps_high: upper clip width in log space, ℓ <= eps_high (paper: 0.4).
    Returns:
        loss: (B, T) −J_i at every token of sequence i, not yet masked or aggregated.
        metrics: ``clip_frac``, ``clip_frac_low``, ``clip_frac_high`` (fraction of tokens whose gradient the clip
            removes), ``ratio_mean``, ``ratio_max``, ``approx_kl`` of the token ratios, and ``seq_ratio_mean``, the
            mean over non-empty sequences of the clipped geometric-mean ratio exp(mean_t ℓ̃). Detached 0-d tensors.
    Raises:
        ValueError: per-token (B, T) advantages.
    """
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (logp.shape, old_logp.shape, mask.shape)
    if advantages.dim() != 1:
        raise ValueError(f"gmpo takes one advantage per sequence, shape (B,), got {tuple(advantages.shape)}")
    assert advantages.shape[0] == logp.shape[0], (advantages.shape, logp.shape)
    adv = advantages.detach()  # (B,)
    sgn = torch.sign(adv)[:, None]  # (B, 1); 0 for Â = 0, which makes ℓ̃ = 0 and the loss 0
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    clipped = log_ratio.clamp(-eps_low, eps_high)  # (B, T)
    log_ratio_pess = sgn * torch.minimum(sgn * log_ratio, sgn * clipped)  # (B, T) ℓ̃
    seq_log_ratio = masked_mean(log_ratio_pess, mask, dim=-1)  # (B,) mean_t ℓ̃ over the completion tokens
    seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # guard exp (METHODS §4.5)
    loss_seq = -adv * torch.exp(seq_log_ratio)  # (B,) −J_i
    loss = loss_seq[:, None].expand_as(logp)  # (B, T); seq_mean_token_mean gives (1/B) Σ_i −J_i
    # The clip removes a token's gradient exactly where ℓ̃ took the clipped branch strictly.
    clip_low = (adv[:, None] < 0) & (log_ratio < -eps_low)  # (B, T)
    clip_high = (adv[:, None] > 0) & (log_ratio > eps_high)  # (B, T)
    metrics = ratio_metrics(log_ratio.detach(), clip_low, clip_high, mask)
    with torch.no_grad():
        nonempty = (mask.sum(-1) > 0).to(logp.dtype)  # (B,)
        metrics["seq_ratio_mean"] = masked_mean(torch.exp(seq_log_ratio), nonempty)
    return loss, metrics
