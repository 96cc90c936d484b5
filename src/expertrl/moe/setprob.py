"""Log-probability of the set of experts a router chose, from the log-probs of the chosen experts.

MoE-GRPO's Gate-GRPO (Eq. 5, METHODS.md §3.4) needs ``g(E_{t,l})``, the probability of the K-set of experts the
rollout used for one token at one layer. The paper does not say how to compute it; METHODS.md §8 row 7 picks the
ordered Plackett-Luce probability as the default and keeps the two alternatives behind ``SET_LOGPROBS``.

Every function takes ``expert_logp: (..., K)``: log p_{e_k} of the k-th chosen expert under the *full* routing
distribution (already softmaxed, masked and tempered exactly as when sampling), in **draw order**. Each returns
``(...)``. The same definition must be used for the numerator and the denominator of the ratio.

Pure functions of tensors; ``torch`` only.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

_MAX_UNORDERED_K = 6  # 6! = 720 orders; beyond that the enumeration is the wrong algorithm
_LOG_HALF = -math.log(2.0)
_MAX_LOG_EXCL = -1e-30  # log of the drawn mass is clamped below 0 so that log(1 - mass) stays finite


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 at least (router log-probs may arrive in bf16); float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012: switch at x = -log 2).

    Both branches are evaluated on inputs clamped into their own safe range, so the branch that ``torch.where``
    discards has a finite gradient (a NaN there would leak through ``where``'s backward as 0 * inf).
    """
    near_zero = x > _LOG_HALF
    a = torch.log(-torch.expm1(torch.where(near_zero, x, _LOG_HALF)))  # x in (-log 2, 0)
    b = torch.log1p(-torch.exp(torch.where(near_zero, _LOG_HALF, x)))  # x <= -log 2, -inf included
    return torch.where(near_zero, a, b)


def plackett_luce_logp(expert_logp: Tensor) -> Tensor:
    """Log-probability of the ordered tuple of experts drawn without replacement (Plackett-Luce).

    This is exactly the probability that ``torch.multinomial(p, K, replacement=False)`` returns ``(e_1..e_K)``
    in that order: each draw renormalises over the experts not yet drawn (METHODS.md §3.4, option 1):

        log g(e_1..e_K) = Σ_k [ log p_{e_k} − log(1 − Σ_{j<k} p_{e_j}) ]

    Computed in log space: the drawn mass ``Σ_{j<k} p_{e_j}`` is an exclusive ``logcumsumexp`` of the inputs and
    ``log(1 − mass)`` uses ``log1mexp``, which keeps full precision when the drawn mass is close to 1 (a dominant
    expert with log p ≈ -1e-7 gives 1 − p ≈ 1e-7 exactly, where ``1 - p.cumsum()`` in float32 would give 0).

    Clamp: the mass left before draw k contains p_{e_k} itself, so ``log(1 − mass) >= log p_{e_k}`` and each
    term is a conditional probability <= 1. Rounding can break that when the drawn mass is ~1; we enforce it with
    ``maximum(log(1 − mass), log p_{e_k})``. The same clamp makes padded rows finite: a slot stored as log p = 0
    (``types.UNROUTED`` positions) contributes 0, and a row of all-zero log-probs gives 0 rather than NaN.

    Args:
        expert_logp: (..., K) log p of the chosen experts under the full routing distribution, in draw order.
    Returns:
        (...) log-probability of the ordered tuple; float32 at least.
    """
    logp = expert_logp.to(_compute_dtype(expert_logp))  # (..., K)
    # log Σ_{j<k} p_{e_j}: shift the inclusive logcumsumexp right by one, -inf (no mass drawn) before draw 1.
    log_incl = torch.logcumsumexp(logp, dim=-1)  # (..., K)
    log_excl = torch.cat([torch.full_like(logp[..., :1], -math.inf), log_incl[..., :-1]], dim=-1)  # (..., K)
    log_rest = _log1mexp(log_excl.clamp(max=_MAX_LOG_EXCL))  # (..., K) log(1 − Σ_{j<k} p_{e_j})
    log_rest = torch.maximum(log_rest, logp)  # a conditional probability is <= 1 (see docstring)
    return (logp - log_rest).sum(-1)  # (...)


def unordered_set_logp(expert_logp: Tensor) -> Tensor:
    """Log-probability of the unordered set {e_1..e_K}: the Plackett-Luce probability summed over all K! orders.

    METHODS.md §3.4 option 2; for K = 2, ``g = p_a p_b (1/(1 − p_a) + 1/(1 − p_b))``. Order-free, so it does not
    need the draw order, at the cost of K! Plackett-Luce evaluations (enumerated; fine for K <= 4).

    Args:
        expert_logp: (..., K) log p of the chosen experts under the full routing distribution, any order.
    Returns:
        (...) log-probability of the set; float32 at least.
    """
    k = expert_logp.shape[-1]
    assert k <= _MAX_UNORDERED_K, (
        f"unordered_set_logp enumerates all K! orders; K={k} > {_MAX_UNORDERED_K} is too many. "
        "Use set_logprob='plackett_luce' (the default) instead."
    )
    orders = torch.tensor(list(itertools.permutations(range(k))), device=expert_logp.device)  # (K!, K)
    permuted = expert_logp[..., orders]  # (..., K!, K)
    return torch.logsumexp(plackett_luce_logp(permuted), dim=-1)  # (...)


def independent_logp(expert_logp: Tensor) -> Tensor:
    """Σ_k log p_{e_k}: product of the chosen experts' marginals (METHODS.md §3.4 option 3).

    Not a normalised probability of the sampled set; it differs from Plackett-Luce by
    ``Π_k (1 − Σ_{j<k} p^old) / (1 − Σ_{j<k} p^θ)`` in a ratio. The cheapest choice, and what a naive
    implementation does.

    Args:
        expert_logp: (..., K) log p of the chosen experts.
    Returns:
        (...) sum of the log-probs; float32 at least.
    """
    return expert_logp.to(_compute_dtype(expert_logp)).sum(-1)  # (...)


SET_LOGPROBS = {
    "plackett_luce": plackett_luce_logp,
    "unordered": unordered_set_logp,
    "independent": independent_logp,
}
"""Set log-probability by name (config ``set_logprob``); all map (..., K) -> (...)."""
