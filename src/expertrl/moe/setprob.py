"""Log-probability of the set of experts a router chose, computed from all E router scores.

MoE-GRPO's Gate-GRPO (Eq. 5, METHODS.md §3.4) needs ``g(E_{t,l})``, the probability of the K-set of experts the
rollout used for one token at one layer. The paper does not say how to compute it; METHODS.md §8 row 7 picks the
ordered Plackett-Luce probability as the default and keeps the two alternatives behind ``SET_LOGPROBS``.

Every function takes the sufficient statistics of the full routing distribution ``p = softmax(s)``:

    chosen: (..., K)  the scores s_{e_k} of the chosen experts, in draw order
    rest:   (...)     log Σ_{j not chosen} exp(s_j), the log-sum-exp of every other expert's score

``s`` is any common shift of the log-probabilities (raw masked, tempered logits work; so do log-probs). Nothing is
ever subtracted from 1: the mass left before draw k is ``exp(rest) + Σ_{j>=k} exp(chosen_j)``, a log-sum-exp of
terms that are all present. The result is therefore as accurate as the scores themselves (float32 round-off of
the logits, ~1e-6 nats) however peaked the router is: at 1 − p_top = 1e-9 an approach that rebuilds
log(1 − Σ p) from the chosen experts' float32 log-probs is off by nats, this one is not. The gradient is finite
everywhere. ``set_statistics`` gathers both from an (N, E) score matrix; ``expertrl.moe.hooks`` calls it inside
every router call, where all E scores exist. The same definition must be used for the numerator and the
denominator of a ratio (``Sampling.set_logprob``).

Pure functions of tensors; ``torch`` only.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

MAX_UNORDERED_K = 6
"""``unordered`` enumerates K! orders; 6! = 720 is the most it takes (beyond that it is the wrong algorithm)."""


def logsumexp_or_neg_inf(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.logsumexp`` whose gradient stays finite (0) where every entry is -inf (the result is then -inf)."""
    empty = torch.isneginf(x).all(dim, keepdim=True)  # (..., 1) nothing left to sum
    safe = torch.where(empty, torch.zeros_like(x), x)  # keeps -inf - (-inf) out of the backward
    return torch.where(empty.squeeze(dim), torch.full_like(safe.sum(dim), -math.inf), torch.logsumexp(safe, dim))


def set_statistics(scores: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """The chosen experts' scores and the log-sum-exp of the others', the inputs of every set log-prob.

    Args:
        scores: (N, E) routing scores (masked experts -inf), any common shift of log p; float32 or float64.
        experts: (N, K) chosen expert ids in draw order, distinct per row.
    Returns:
        chosen: (N, K) ``scores`` at ``experts``.
        rest: (N,) log Σ over the experts not in the row's ``experts`` of exp(score); -inf if there are none (K = E).
    """
    experts = experts.long()
    chosen = scores.gather(-1, experts)  # (N, K)
    others = scores.scatter(-1, experts, -math.inf)  # (N, E) the chosen ones removed (no gradient to them here)
    return chosen, logsumexp_or_neg_inf(others)  # (N, K), (N,)


def _mass_left(chosen: Tensor, rest: Tensor) -> Tensor:
    """(..., K) log of the probability mass left before draw k: rest plus the chosen experts not yet drawn."""
    tail = torch.logcumsumexp(chosen.flip(-1), dim=-1).flip(-1)  # (..., K) log Σ_{j>=k} exp(chosen_j)
    return torch.logaddexp(tail, rest.unsqueeze(-1))  # (..., K)


def plackett_luce_logp(chosen: Tensor, rest: Tensor) -> Tensor:
    """Log-probability of the ordered tuple of experts drawn without replacement (Plackett-Luce).

    This is exactly the probability that ``torch.multinomial(softmax(s), K, replacement=False)`` returns
    ``(e_1..e_K)`` in that order: each draw renormalises over the experts not yet drawn (METHODS.md §3.4, option 1):

        log g(e_1..e_K) = Σ_k [ s_{e_k} − log( Σ_{j not drawn before k} exp(s_j) ) ]

    Args:
        chosen: (..., K) scores of the chosen experts in draw order.
        rest: (...) log-sum-exp of the scores of every expert not chosen.
    Returns:
        (...) log-probability of the ordered tuple (<= 0).
    """
    return (chosen - _mass_left(chosen, rest)).sum(-1)  # (...)


def unordered_set_logp(chosen: Tensor, rest: Tensor) -> Tensor:
    """Log-probability of the unordered set {e_1..e_K}: the Plackett-Luce probability summed over all K! orders.

    METHODS.md §3.4 option 2; for K = 2, ``g = p_a p_b (1/(1 − p_a) + 1/(1 − p_b))``. Order-free, at the cost of
    K! Plackett-Luce evaluations (enumerated; K <= ``MAX_UNORDERED_K``).

    Args:
        chosen: (..., K) scores of the chosen experts, any order.
        rest: (...) log-sum-exp of the scores of every expert not chosen.
    Returns:
        (...) log-probability of the set.
    """
    k = chosen.shape[-1]
    assert k <= MAX_UNORDERED_K, (
        f"unordered_set_logp enumerates all K! orders; K={k} > {MAX_UNORDERED_K} is too many. "
        "Use set_logprob='plackett_luce' (the default) instead."
    )
    orders = torch.tensor(list(itertools.permutations(range(k))), device=chosen.device)  # (K!, K)
    permuted = chosen[..., orders]  # (..., K!, K)
    return torch.logsumexp(plackett_luce_logp(permuted, rest.unsqueeze(-1)), dim=-1)  # (...)


def independent_logp(chosen: Tensor, rest: Tensor) -> Tensor:
    """Σ_k log p_{e_k}: product of the chosen experts' marginals (METHODS.md §3.4 option 3).

    Not a normalised probability of the sampled set; it differs from Plackett-Luce by
    ``Π_k (1 − Σ_{j<k} p^old) / (1 − Σ_{j<k} p^θ)`` in a ratio. The cheapest choice, and what a naive
    implementation does.

    Args:
        chosen: (..., K) scores of the chosen experts.
        rest: (...) log-sum-exp of the scores of every expert not chosen.
    Returns:
        (...) sum of the chosen experts' log-probabilities.
    """
    total = torch.logaddexp(torch.logsumexp(chosen, dim=-1), rest)  # (...) log Σ_e exp(s_e)
    return (chosen - total.unsqueeze(-1)).sum(-1)  # (...)


SET_LOGPROBS = {
    "plackett_luce": plackett_luce_logp,
    "unordered": unordered_set_logp,
    "independent": independent_logp,
}
"""Set log-probability by name (``Sampling.set_logprob``); all map (chosen (..., K), rest (...)) -> (...)."""


def set_logprob(name: str, scores: Tensor, experts: Tensor) -> Tensor:
    """(N,) log-probability, by the definition ``name``, of each row's expert set ``experts`` (N, K) under
    ``softmax(scores)`` (N, E)."""
    if name not in SET_LOGPROBS:
        raise ValueError(f"unknown set log-probability {name!r}; choose from {sorted(SET_LOGPROBS)}")
    return SET_LOGPROBS[name](*set_statistics(scores, experts))
