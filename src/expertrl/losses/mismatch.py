"""Engine/trainer mismatch: per-token correction weights of the token loss (TIS, MIS, IcePop) and mismatch metrics.

A rollout engine (vLLM) computes token probabilities with other kernels than the trainer, so the policy that sampled,
π_engine, is not exactly the trainer's π_train at the same weights. With

    k_t = π_train,old(y_t) / π_engine(y_t)         (constant: no gradient)

(the first inner update's log-prob, which runs at the rollout's weights, over the engine's recorded log-prob), the
token loss of every token is multiplied by a weight w(k) (METHODS.md §4.7, §5.3):

    tis     w = min(k, C)                           truncated importance sampling (C ≈ 2)
    mis     w = k if k <= C else 0                  masked IS: drop tokens whose ratio exceeds C (TRL's *_mask)
    icepop  w = k if α <= k <= β else 0             IcePop's double-sided mask, α = 0.5, β = 5

With the hf engine k ≈ 1 (both sides are the trainer's own forward, ≤ 1e-5 apart). Pure functions of tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.ops import masked_mean

MISMATCH_CORRECTIONS = ("none", "tis", "mis", "icepop")
"""``loss.mismatch`` choices."""


def tis_weight(log_k: Tensor, *, cap: float = 2.0) -> tuple[Tensor, Tensor]:
    """Truncated IS: ``min(k, cap)``. Returns the weight and where it bit (k > cap), both (B, T)."""
    k = log_k.exp()
    return k.clamp(max=cap), k > cap


def mis_weight(log_k: Tensor, *, cap: float = 2.0) -> tuple[Tensor, Tensor]:
    """Masked IS: ``k`` where ``k <= cap``, else 0. Returns the weight and the dropped tokens, both (B, T)."""
    k = log_k.exp()
    dropped = k > cap
    return torch.where(dropped, torch.zeros_like(k), k), dropped


def icepop_weight(log_k: Tensor, *, low: float = 0.5, high: float = 5.0) -> tuple[Tensor, Tensor]:
    """IcePop: ``k`` where ``low <= k <= high``, else 0. Returns the weight and the dropped tokens, both (B, T)."""
    k = log_k.exp()
    dropped = (k < low) | (k > high)
    return torch.where(dropped, torch.zeros_like(k), k), dropped


def mismatch_weight(
    kind: str, train_logp: Tensor, engine_logp: Tensor, mask: Tensor, *, cap: float = 2.0, low: float = 0.5,
    high: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The detached per-token weight of the token loss for correction ``kind``, and its metrics.

    Args:
        kind: ``tis``, ``mis`` or ``icepop`` (``MISMATCH_CORRECTIONS`` without ``none``).
        train_logp: (B, T) log π_train,old of the sampled tokens.
        engine_logp: (B, T) log π_engine of the same tokens (``Rollout.sample_logp``).
        mask: (B, T) 1 = completion token (metrics only).
        cap: C of ``tis`` and ``mis``; low, high: α and β of ``icepop``.
    Returns:
        weight: (B, T) float, no gradient.
        metrics: ``mismatch_weight_mean`` (mean weight) and ``mismatch_frac`` (share of tokens truncated by TIS or
            dropped by MIS / IcePop); detached 0-d tensors over ``mask``.
    """
    log_k = (train_logp - engine_logp).detach().float()
    if kind == "tis":
        weight, hit = tis_weight(log_k, cap=cap)
    elif kind == "mis":
        weight, hit = mis_weight(log_k, cap=cap)
    elif kind == "icepop":
        weight, hit = icepop_weight(log_k, low=low, high=high)
    else:
        raise ValueError(f"unknown mismatch correction {kind!r}; choose from {list(MISMATCH_CORRECTIONS)}")
    m = mask.float()
    return weight, {"mismatch_weight_mean": masked_mean(weight, m), "mismatch_frac": masked_mean(hit.float(), m)}


def mismatch_metrics(train_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the engine's token log-probs are from the trainer's at the same weights, over ``mask``'s tokens.

    Returns detached 0-d tensors: ``logp_diff`` (mean |log π_train − log π_engine|), ``logp_diff_max`` (its max) and
    ``prob_corr`` (Pearson correlation of the token probabilities; 1 when there is nothing to correlate, i.e. fewer
    than two tokens or no spread on either side).
    """
    with torch.no_grad():
        m = mask.bool()
        diff = (train_logp.float() - engine_logp.float()).abs()
        a, b = train_logp.float()[m].exp(), engine_logp.float()[m].exp()  # (N,) token probabilities
        if a.numel() < 2:
            corr = torch.ones((), device=diff.device)
        else:
            a, b = a - a.mean(), b - b.mean()
            den = (a.square().sum() * b.square().sum()).sqrt()
            corr = torch.where(den > 0, (a * b).sum() / den.clamp(min=1e-30), torch.ones((), device=den.device))
        return {
            "logp_diff": masked_mean(diff, mask.float()),
            "logp_diff_max": (diff * m).max() if m.any() else torch.zeros((), device=diff.device),
            "prob_corr": corr,
        }
