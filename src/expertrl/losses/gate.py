"""Gate-GRPO: the clipped GRPO objective applied to the router's choice of experts (MoE-GRPO Eq. 5, METHODS §3.4).

    r̂_{t,l}      = g^l_θ(E_{t,l}) / g^l_old(E_{t,l})          one ratio per (layer, token)
    L_Gate-GRPO  = −(1/(L |y|)) Σ_l Σ_t min( r̂ Â, clip(r̂, 1 − ε, 1 + ε) Â )

``g(E_{t,l})`` is the probability of the *set* of experts the rollout used, computed by one of
``expertrl.moe.setprob.SET_LOGPROBS`` (the same definition for θ and old). ``gate_grpo`` returns the per-token
term averaged over layers, ``(1/L) Σ_l``, so the caller aggregates it exactly like the token loss; with
``seq_mean_token_mean`` the total is Eq. 5's ``1/(L|y|) Σ_l Σ_t``. Not a registered token loss: its inputs are
set log-probs (L, B, T), not token log-probs.
"""

from __future__ import annotations

from torch import Tensor

from expertrl.losses.grpo import broadcast_advantages, clipped_surrogate, ratio_metrics


def gate_grpo(
    set_logp: Tensor,
    old_set_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gate-GRPO per-token loss, averaged over MoE layers (MoE-GRPO Eq. 5).

    Args:
        set_logp: (L, B, T) log g^l_θ of the rollout's expert set at each layer and completion token (gradient).
        old_set_logp: (L, B, T) the same under the old router (constant).
        advantages: (B,) one per completion (or (B, T) per token), shared by all layers.
        mask: (B, T) 1 = completion token that counts; used for the metrics (``aggregate`` masks the loss).
        eps_low: lower clip width (paper: same ε as Token-GRPO, value not given; METHODS §8 row 8: 0.2).
        eps_high: upper clip width.
    Returns:
        loss: (B, T) (1/L) Σ_l −min(r̂A, clip(r̂)A), not yet masked or aggregated.
        metrics: ``gate_clip_frac``, ``gate_ratio_mean``, ``gate_approx_kl``: detached 0-d tensors, masked means
            over (layer, token) pairs.
    """
    assert set_logp.shape == old_set_logp.shape and set_logp.dim() == 3, (set_logp.shape, old_set_logp.shape)
    assert set_logp.shape[1:] == mask.shape, (set_logp.shape, mask.shape)
    adv = broadcast_advantages(advantages, set_logp)  # (B, 1) or (B, T), broadcasts over L
    loss, log_ratio, clip_low, clip_high = clipped_surrogate(
        set_logp - old_set_logp.detach(), adv.detach(), eps_low, eps_high
    )  # (L, B, T)
    stats = ratio_metrics(log_ratio, clip_low, clip_high, mask)
    metrics = {
        "gate_clip_frac": stats["clip_frac"],
        "gate_ratio_mean": stats["ratio_mean"],
        "gate_approx_kl": stats["approx_kl"],
    }
    return loss.mean(0), metrics  # (B, T): (1/L) Σ_l
