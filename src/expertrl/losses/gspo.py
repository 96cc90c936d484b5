"""GSPO: one importance ratio per sequence (Zheng et al., Qwen, arXiv:2507.18071; METHODS.md §4.4).

    s_i = (π_θ(y_i|x) / π_old(y_i|x))^{1/|y_i|} = exp( (1/|y_i|) Σ_t log ρ_{i,t} )
    J   = (1/G) Σ_i min( s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i )

Per token (STYLE.md §2, §12) the sequence ratio is written with the stop-gradient trick of GSPO-token,

    log s_{i,t} = sg[ (1/|y_i|) Σ_t' log ρ_{i,t'} ] + logp_θ(y_{i,t}) − sg[ logp_θ(y_{i,t}) ],

which has the value log s_i at every token and the gradient ∇logp_θ(y_{i,t}) at token t. Every token of sequence i
then carries the loss −min(s_i Â_i, clip(s_i) Â_i), and ``aggregate(..., "seq_mean_token_mean")`` gives GSPO
exactly, value and gradient: (1/|y_i|) Σ_t s_i Â_i ∇logp_t = Â_i ∇s_i. The clip decision is per sequence, because
all of a sequence's tokens share s_i. Paper aggregation: ``seq_mean_token_mean``. (With per-sequence advantages
``token_mean`` gives the same gradient weights up to the normaliser: Σ_i |y_i| instead of |y_i|·B.)

``gspo`` takes one advantage per sequence, as the paper does; ``gspo_token`` (GSPO-token, the paper's §4.3) also
takes per-token advantages Â_{i,t} and equals ``gspo`` when they are constant over each sequence.
"""

from __future__ import annotations

from torch import Tensor

from expertrl.losses import register_loss
from expertrl.losses.grpo import broadcast_advantages, clipped_surrogate, ratio_metrics
from expertrl.ops import masked_mean


def _gspo(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (logp.shape, old_logp.shape, mask.shape)
    adv = broadcast_advantages(advantages, logp).detach()  # (B, 1) or (B, T)
    token_log_ratio = logp - old_logp.detach()  # (B, T)
    seq_log_ratio = masked_mean(token_log_ratio.detach(), mask, dim=-1)  # (B,) log s_i; 0 for an empty sequence
    log_s = seq_log_ratio[:, None] + logp - logp.detach()  # (B, T): value log s_i, gradient ∇logp_t
    loss, log_s, clip_low, clip_high = clipped_surrogate(log_s, adv, eps_low, eps_high)
    # Token-weighted: a clipped sequence counts |y_i| times (GSPO Fig. 4 reports the fraction of clipped tokens).
    metrics = ratio_metrics(log_s, clip_low, clip_high, mask)
    # approx_kl of the token ratios, the same definition as grpo's, so runs of different losses compare.
    metrics["approx_kl"] = ratio_metrics(token_log_ratio.detach(), clip_low, clip_high, mask)["approx_kl"]
    return loss, metrics


@register_loss("gspo")
def gspo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO sequence-ratio clipped objective, broadcast over tokens (arXiv:2507.18071).

    Aggregate with ``seq_mean_token_mean`` (the paper's (1/G) Σ_i).

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        old_logp: (B, T) log π_old of the same tokens (constant).
        advantages: (B,) one per completion (constant). For per-token advantages use ``gspo_token``.
        mask: (B, T) 1 = completion token; defines |y_i| and the tokens averaged into log s_i.
        eps_low: lower clip width of s_i (paper §5.1: 3e-4).
        eps_high: upper clip width of s_i (paper §5.1: 4e-4).
    Returns:
        loss: (B, T) −min(s_i Â_i, clip(s_i) Â_i) at every token of sequence i, not yet masked or aggregated.
        metrics: ``clip_frac``, ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``ratio_max`` of s_i
            weighted by tokens; ``approx_kl`` of the token ratios. Detached 0-d tensors.
    Raises:
        ValueError: per-token (B, T) advantages.
    """
    if advantages.dim() != 1:
        raise ValueError(
            f"gspo takes one advantage per sequence, shape (B,), got {tuple(advantages.shape)}; "
            "use gspo_token for per-token advantages"
        )
    return _gspo(logp, old_logp, advantages, mask, eps_low, eps_high)


@register_loss("gspo_token")
def gspo_token(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token: the GSPO ratio s_i with per-token advantages Â_{i,t} (arXiv:2507.18071 §4.3).

    Token t carries −min(s_{i,t} Â_{i,t}, clip(s_{i,t}) Â_{i,t}) with log s_{i,t} as in the module docstring;
    aggregate with ``seq_mean_token_mean``. Equals ``gspo`` (value and gradient) when Â_{i,t} = Â_i.

    Args:
        logp: (B, T) log π_θ of the sampled tokens (gradient).
        old_logp: (B, T) log π_old (constant).
        advantages: (B,) or (B, T) (constant).
        mask: (B, T) 1 = completion token.
        eps_low: lower clip width of s (3e-4).
        eps_high: upper clip width of s (4e-4).
    Returns:
        loss: (B, T) per-token loss; metrics as ``gspo`` (the clip is per token here, as the sign of Â_{i,t} decides
        which side clips).
    """
    return _gspo(logp, old_logp, advantages, mask, eps_low, eps_high)
