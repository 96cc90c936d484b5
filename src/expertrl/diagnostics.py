"""Routing diagnostics: pure functions from router probabilities, expert choices and loads to numbers (METHODS §6.6).

Two entropies that papers both call "routing entropy" are kept apart by name (METHODS ambiguity 18):

- ``router_entropy``: the per-token entropy of the router's softmax, ``H_τ = −Σ_e p_{τ,e} ln p_{τ,e}``, averaged
  over tokens (nats; ``normalize=True`` divides by ln E, RO-GRPO's H_norm). Low = a confident router. Logged as
  ``moe/router_entropy``.
- ``usage_entropy``: the entropy of the *aggregate* expert-usage distribution ``u_e`` = share of the routed (token, k)
  slots that went to expert e (nats). High = diverse use of experts. Logged as ``moe/usage_entropy``; MoE-GRPO's
  1.05 → 1.82 (Fig. 4) is this quantity.

Jensen–Shannon divergences use log base 2 unless told otherwise (ambiguity 19), so they lie in [0, 1];
``base=math.e`` gives nats (≤ ln 2). MoE-GRPO's task-wise JSD (0.06 → 0.20, Fig. 5) is the mean over task pairs.

Shape letters: ``E`` experts, ``K`` experts per token, ``A`` distributions compared (tasks), ``P`` token positions;
``...`` any leading token dimensions (e.g. ``(B, S)``). Expert ids < 0 (``types.UNROUTED``) never count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from expertrl.ops import entropy


def token_entropy(probs: Tensor) -> Tensor:
    """Per-token entropy in nats of router probabilities: (..., E) -> (...), with 0 · ln 0 = 0."""
    return entropy(probs)  # (...) the same function as the training metric moe/router_entropy


def router_entropy(probs: Tensor, mask: Tensor | None = None, *, normalize: bool = False) -> Tensor:
    """Mean per-token router entropy ``H_τ`` over the tokens where ``mask`` is 1 (nats, or / ln E if ``normalize``).

    Args:
        probs: (..., E) routing probabilities of each token (rows sum to 1).
        mask: (...) 1 = the token counts; None = all tokens.
    Returns:
        0-d tensor.
    """
    h = token_entropy(probs)  # (...)
    mask = torch.ones_like(h) if mask is None else mask.to(h.dtype).expand_as(h)  # (...)
    if mask.sum() <= 0:
        raise ValueError("router_entropy: mask selects no token; pass a mask with at least one 1")
    mean = (h * mask).sum() / mask.sum()
    return mean / math.log(probs.shape[-1]) if normalize else mean


def expert_counts(experts: Tensor, mask: Tensor | None, num_experts: int) -> Tensor:
    """How many routed (token, k) slots chose each expert: experts (..., K) int, mask (...) -> (E,) float.

    Slots with a negative id (unrouted) are skipped; tokens where ``mask`` is 0 are skipped.
    """
    ids = experts.long()  # (..., K)
    weight = (ids >= 0).float()  # (..., K)
    if mask is not None:
        weight = weight * mask.float().expand(ids.shape[:-1])[..., None]  # (..., K)
    return torch.bincount(ids.clamp(min=0).reshape(-1), weights=weight.reshape(-1), minlength=num_experts).float()


def usage_distribution(experts: Tensor, mask: Tensor | None, num_experts: int) -> Tensor:
    """Aggregate expert usage ``u_e = (1/(T·K)) Σ_τ 1{e ∈ S_τ}``: experts (..., K) int, mask (...) -> (E,) summing
    to 1."""
    counts = expert_counts(experts, mask, num_experts)  # (E,)
    total = counts.sum()
    if total <= 0:
        raise ValueError("usage_distribution: no routed token under the mask; pass a mask with at least one 1")
    return counts / total


def usage_entropy(usage: Tensor) -> Tensor:
    """Entropy in nats of an aggregate expert-usage distribution: (..., E) -> (...). Rows are renormalised first
    (logged loads are rounded), so uniform over E gives ln E and a single expert gives 0."""
    u = usage.float()
    u = u / u.sum(-1, keepdim=True)  # (..., E)
    return -torch.special.xlogy(u, u).sum(-1)  # (...)


def jensen_shannon(p: Tensor, q: Tensor, *, base: float = 2.0) -> Tensor:
    """Jensen–Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = (p+q)/2``, in log ``base`` (2 → [0, 1]).

    Args:
        p, q: (..., E) non-negative weights (renormalised to distributions along the last dim).
    Returns:
        (...) divergence; 0 for identical distributions, 1 (base 2) for disjoint supports.
    """
    assert p.shape == q.shape, (p.shape, q.shape)
    p = p.double() / p.double().sum(-1, keepdim=True)  # (..., E)
    q = q.double() / q.double().sum(-1, keepdim=True)  # (..., E)
    m = 0.5 * (p + q)  # (..., E)
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)  # (...) nats; 0 where p = 0
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)  # (...)
    jsd = (0.5 * (kl_pm + kl_qm)).clamp(min=0.0) / math.log(base)  # (...) clamp: rounding can give -1e-17
    return jsd.float()


def pairwise_jsd(dists: Tensor, *, base: float = 2.0) -> tuple[Tensor, Tensor]:
    """All pairwise Jensen–Shannon divergences between A distributions (log ``base``, default 2).

    Args:
        dists: (A, E) one expert-usage distribution per task, A >= 2.
    Returns:
        matrix (A, A), symmetric with a zero diagonal, and the mean over the pairs i < j (0-d).
    """
    A = dists.shape[0]
    if dists.dim() != 2 or A < 2:
        raise ValueError(f"pairwise_jsd: dists must be (A, E) with A >= 2 distributions, got {tuple(dists.shape)}")
    matrix = jensen_shannon(dists[:, None, :].expand(A, A, -1), dists[None, :, :].expand(A, A, -1), base=base)
    matrix = 0.5 * (matrix + matrix.T)  # (A, A) exactly symmetric
    matrix.fill_diagonal_(0.0)
    i, j = torch.triu_indices(A, A, offset=1)
    return matrix, matrix[i, j].mean()


def _shares(load: Tensor) -> Tensor:
    load = load.float()
    return load / load.sum(-1, keepdim=True)  # (..., E)


def max_violation(load: Tensor) -> Tensor:
    """Load imbalance ``max_e load_e / mean_e load_e − 1`` (verl's max_vio): (..., E) -> (...); 0 when balanced."""
    load = load.float()
    return load.amax(-1) / load.mean(-1) - 1.0


def dead_fraction(load: Tensor, threshold: float = 1e-3) -> Tensor:
    """Fraction of experts whose share of the load is below ``threshold``: (..., E) -> (...)."""
    return (_shares(load) < threshold).float().mean(-1)


def coefficient_of_variation(load: Tensor) -> Tensor:
    """Population std / mean of the expert loads: (..., E) -> (...); 0 when balanced."""
    load = load.float()
    return load.std(-1, correction=0) / load.mean(-1)


def expert_counts_by_position(
    experts: Tensor, positions: Tensor, mask: Tensor, num_experts: int, max_positions: int
) -> Tensor:
    """Counts of routed slots per (token position, expert) — MoE-GRPO Fig. 4's experts × token positions.

    Args:
        experts: (B, S, K) int expert ids of one layer.
        positions: (B, S) int position of each token in its sequence (0 = first real token).
        mask: (B, S) 1 = the token counts.
        max_positions: positions >= this are left out.
    Returns:
        (P, E) float counts, ``P = max_positions``; row p / row p's sum is the usage at position p.
    """
    assert experts.shape[:-1] == positions.shape == mask.shape, (experts.shape, positions.shape, mask.shape)
    ids = experts.long()  # (B, S, K)
    pos = positions.long()[..., None].expand_as(ids)  # (B, S, K)
    keep = (ids >= 0) & (pos < max_positions) & mask.bool()[..., None]  # (B, S, K)
    flat = pos[keep] * num_experts + ids[keep]  # (n,)
    counts = torch.bincount(flat, minlength=max_positions * num_experts).float()  # (P * E,)
    return counts.reshape(max_positions, num_experts)  # (P, E)
