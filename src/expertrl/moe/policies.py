"""Routing policies: how K experts are chosen from a router's distribution. Small frozen objects, one registry.

A policy sees the routing distribution of N tokens as log-probabilities ``logp (N, E)`` (the masked, tempered
softmax of the router logits; masked experts have ``-inf``) and returns ``experts (N, K)`` int64 in *draw order*.
It never computes expert weights or log-probabilities: ``expertrl.moe.hooks`` does that identically for every
policy, so the only thing a policy decides is the discrete choice.

Order convention: for ``Multinomial`` the k-th column is the k-th draw of sequential sampling without replacement
(``torch.multinomial(p, K, replacement=False)``), which is what the Plackett-Luce set probability
Π_k p_{e_k} / (1 - Σ_{j<k} p_{e_j}) of ``expertrl.moe.setprob`` assumes. ``TopK`` returns experts by decreasing
probability, which is the most likely draw order.

Flags (class attributes, read by ``hooks.route`` and by the trainer's start-up checks):

- ``stochastic``: the choice is random (needs a ``generator``; refused on sigmoid routers).
- ``has_set_probability``: the probability with which the policy picks its expert set is the closed-form set
  probability of ``expertrl.moe.setprob`` (Plackett-Luce of the routing softmax), so Gate-GRPO's ratio is defined.
  Only ``Multinomial``.
- ``causal``: a token's experts depend on that token alone. ``ExpertChoice`` and ``Sinkhorn`` are not causal (they
  balance over all N tokens of a router call, later tokens included); inside ``model.generate`` they fall back to
  ``TopK`` (see ``hooks.route``).
- ``fixed_k``: exactly K experts per token. ``ExpertChoice`` gives a token 0..E experts: it returns (N, K') with
  ``UNROUTED`` in the slots a token does not use, and ``hooks`` turns those into zero-weight slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from expertrl.types import UNROUTED, RoutingTrace


@dataclass(frozen=True)
class TopK:
    """Deterministic top-K: the router's native inference behaviour (and Det-FT)."""

    stochastic = False
    has_set_probability = False
    causal = True
    fixed_k = True

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        return logp.topk(k, dim=-1).indices  # (N, K)


@dataclass(frozen=True)
class Multinomial:
    """K distinct experts sampled sequentially from the routing softmax (MoE-GRPO rollouts, Stoch-FT-Multi)."""

    stochastic = True
    has_set_probability = True
    causal = True
    fixed_k = True

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        probs = logp.float().exp()  # (N, E); masked experts have probability 0
        return torch.multinomial(probs, k, replacement=False, generator=generator)  # (N, K) in draw order

    def select_keyed(self, logp: Tensor, k: int, uniform: Tensor) -> Tensor:
        """The same distribution from counter-based uniforms (N, E) (``gumbel.RouteSeeds``): Gumbel-top-k, whose
        descending order is the draw order (``gumbel`` module docstring)."""
        return (logp.double() - torch.log(-torch.log(uniform))).topk(k, dim=-1).indices  # (N, K)


@dataclass(frozen=True)
class NoisyTopK:
    """Top-K of Gaussian-noised logits (Stoch-FT-Noise after MoTE / V-MoE). ``noise_std`` None means 1/E.

    Noise on log-probs equals noise on logits (they differ by a per-token constant). The probability of the
    chosen set under this policy has no closed form, so use it for SFT baselines and exploration ablations; the
    trace still records the router-softmax log-probs of the chosen experts.
    """

    noise_std: float | None = None
    stochastic = True
    has_set_probability = False
    causal = True
    fixed_k = True

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        std = self.noise_std if self.noise_std is not None else 1.0 / logp.shape[-1]
        noise = torch.randn(logp.shape, generator=generator, device=logp.device, dtype=torch.float32)
        return (logp.float() + std * noise).topk(k, dim=-1).indices  # (N, K); -inf stays masked

    def select_keyed(self, logp: Tensor, k: int, uniform: Tensor) -> Tensor:
        """The same policy with standard normal noise from counter-based uniforms (N, E) (inverse CDF)."""
        std = self.noise_std if self.noise_std is not None else 1.0 / logp.shape[-1]
        noise = (torch.special.erfinv(2 * uniform - 1) * 2**0.5).float()  # (N, E) standard normal
        return (logp.float() + std * noise).topk(k, dim=-1).indices


@dataclass(frozen=True)
class Replay:
    """Force recorded choices (MoE-GRPO's training forward, R3 routing replay).

    Attributes:
        experts: (L, N, K) recorded expert ids for the L MoE layers and the N flattened tokens of the forward
            (``trace.experts`` reshaped). ``UNROUTED`` entries (positions the rollout never routed, such as the last
            token of a generated sequence, which predicts nothing that is scored) fall back to top-K of the live
            router, so no sentinel ever reaches the experts.
    """

    experts: Tensor
    stochastic = False
    has_set_probability = False
    causal = True
    fixed_k = True

    def select_layer(self, logp: Tensor, k: int, layer_pos: int, fallback=None) -> Tensor:
        """Recorded experts of layer ``layer_pos``; unrouted rows take ``fallback()`` (default: top-K of ``logp``)."""
        recorded = self.experts[layer_pos]  # (N, K)
        assert recorded.shape == (logp.shape[0], k), (
            f"replayed routes {tuple(recorded.shape)} do not match this forward's {logp.shape[0]} tokens x K={k}; "
            "replay the trace of exactly this batch (same sequences, same padding)"
        )
        recorded = recorded.to(device=logp.device, dtype=torch.long)
        unrouted = recorded == UNROUTED  # (N, K)
        if unrouted.any():
            missing = unrouted[:, :1]  # (N, 1) a position is recorded whole or not at all
            if (unrouted != missing).any():
                raise ValueError(
                    "replayed routes have positions with some experts and some UNROUTED slots (an ExpertChoice "
                    "trace); only fixed-K traces can be replayed, so route ExpertChoice live"
                )
            native = logp.topk(k, dim=-1).indices if fallback is None else fallback()
            recorded = torch.where(missing, native, recorded)
        return recorded  # (N, K)


def replay_policy_for(trace: RoutingTrace) -> Replay:
    """A ``Replay`` of ``trace`` for a forward over exactly the trace's (B, S) tokens."""
    L, B, S, K = trace.experts.shape
    return Replay(trace.experts.reshape(L, B * S, K))


@dataclass(frozen=True)
class ExpertChoice:
    """Expert Choice routing (Zhou et al. arXiv:2202.09368; METHODS.md §6.3): each expert picks its top-C tokens.

    Over the N tokens of one router call, expert e takes the C tokens with the highest routing probability
    ``p[τ, e]`` (column-wise top-C of ``logp``), ``C = min(N, ceil(N·c/E))`` with c = ``capacity_factor``, the
    average number of experts per token (the paper's k = n·c/e; c = 2 costs what top-2 costs, so set c = K to
    match a top-K model's compute). The ceiling is taken after subtracting 1e-9, so an integral N·c/E computed
    with float round-off (10·0.3/3 = 1.0000000000000002) gives exactly N·c/E, and every expert then takes exactly
    C tokens. Experts masked for a token (``-inf``) never take it, so under a mask an expert may take fewer.

    Contract with ``hooks`` (``fixed_k = False``): a token gets 0..E experts, so ``select`` returns (N, K') with
    K' = the most experts any token of this call got (>= 1; it varies between calls and layers), the token's
    experts first by decreasing probability, then ``UNROUTED`` (-1). ``hooks`` points every ``UNROUTED`` slot at
    the token's top-1 expert with weight exactly 0 (the fused experts modules take any K' and need a real index;
    all three kernels, eager, batched_mm and grouped_mm, are tested), records the slot as ``UNROUTED`` with
    log-prob 0, and pads traces to the widest K' of the block. A token with no expert gets an all-zero MoE output
    (only the residual passes), as in the paper. Weights are the router softmax ``S[τ, e]`` gathered at the
    chosen pairs (the paper's gate), divided by their sum over the token's experts only where the family
    renormalises (``norm_topk_prob``, Mixtral), like every other policy. Compute is N·K' expert rows: the
    kernels run the zero-weight slots too.

    Not causal: a token's experts depend on the other tokens of the call, later ones included, and on padding
    (pad tokens compete for capacity like any token; the router never sees the attention mask). Inside
    ``model.generate`` (prefill and every decode step) ``hooks.route`` therefore routes with ``TopK``, the
    paper's inference setting. Meant for SFT (MoE-GRPO Table 7) and for the live-routing training forward of
    token-loss methods; Gate-GRPO is undefined (``has_set_probability = False``) and the trace cannot be replayed
    (``Replay`` expects K columns). ``k`` is ignored: capacity, not K, sets how many experts a token gets.
    """

    capacity_factor: float = 2.0
    stochastic = False
    has_set_probability = False
    causal = False
    fixed_k = False

    def __post_init__(self) -> None:
        if not self.capacity_factor > 0:
            raise ValueError(
                f"ExpertChoice capacity_factor must be > 0 (average experts per token), got {self.capacity_factor}"
            )

    def capacity(self, num_tokens: int, num_experts: int) -> int:
        """C = min(N, ceil(N·c/E)), the number of tokens each expert takes."""
        return min(num_tokens, math.ceil(num_tokens * self.capacity_factor / num_experts - 1e-9))

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        n, e = logp.shape
        top = logp.topk(self.capacity(n, e), dim=0).indices  # (C, E) the tokens each expert takes
        chosen = torch.zeros(n, e, dtype=torch.bool, device=logp.device).scatter_(0, top, True)  # (N, E)
        chosen &= torch.isfinite(logp)  # an expert never takes a token masked for it
        width = max(1, int(chosen.sum(-1).max()))  # K' = most experts any token got
        ranked = logp.masked_fill(~chosen, float("-inf")).topk(width, dim=-1).indices  # (N, K') chosen first
        return torch.where(chosen.gather(1, ranked), ranked, UNROUTED)  # (N, K')


def sinkhorn_balance(logp: Tensor, *, tol: float = 1e-4, eps: float = 1e-8, max_iters: int = 100) -> Tensor:
    """Balance the N x E routing matrix with Sinkhorn iterations (BASE / S-BASE; METHODS.md §6.4).

    C = exp(logp - row max) (the same balanced matrix as exp(logits): Sinkhorn is invariant to row scaling, and
    the row max keeps every row in (0, 1]). Alternately ``d0 = (1/N) / (C d1 + eps)`` (rows to mass 1/N) and
    ``d1 = (1/E) / (d0ᵀ C + eps)`` (columns to mass 1/E), Megatron/GPT-NeoX's updates, until
    ``mean|Δd1| / mean d1 < tol`` or ``max_iters``. The stop test is Megatron's ``mean|Δd1| < tol`` made relative:
    d1 has an arbitrary scale that grows to ~1e3 on skewed routers, where float32 round-off alone exceeds 1e-4.

    Args:
        logp: (N, E) routing log-probabilities; ``-inf`` = masked (stays 0).
    Returns:
        (N, E) float32 ``d0[:, None] * C * d1[None, :]``: columns sum to 1/E, rows to 1/N once converged.
    """
    n, e = logp.shape
    scores = logp.float()
    cost = torch.exp(scores - scores.amax(-1, keepdim=True))  # (N, E) in [0, 1]
    d0 = cost.new_ones(n)  # (N,)
    d1 = cost.new_ones(e)  # (E,)
    for _ in range(max_iters):
        d0 = (1.0 / n) / (cost @ d1 + eps)  # (N,) rows to 1/N
        d1_new = (1.0 / e) / (d0 @ cost + eps)  # (E,) columns to 1/E
        change = (d1_new - d1).abs().mean() / d1_new.mean()
        d1 = d1_new
        if change < tol:
            break
    return d0[:, None] * cost * d1[None, :]  # (N, E)


@dataclass(frozen=True)
class Sinkhorn:
    """Balanced optimal-transport routing (S-BASE, Clark et al. 2022; METHODS.md §6.4): top-K of a Sinkhorn-balanced
    routing matrix over the N tokens of one router call.

    The choice is made under no_grad from ``sinkhorn_balance(logp)``; the expert weights stay the router's softmax
    gathered at the chosen experts (``hooks``, renormalised per family), so the router gets gradient through them.
    Megatron uses a sigmoid gate when K = 1; we keep the family's softmax convention for every K. Not causal (the
    balance spans the whole call), so ``model.generate`` inside ``hooks.route`` routes with ``TopK`` (plain top-K
    at inference, as in Megatron). If balancing is infeasible (an expert masked for every token) or slow, the
    iteration cap stops it and the partially balanced matrix is used.
    """

    tol: float = 1e-4
    max_iters: int = 100
    eps: float = 1e-8
    stochastic = False
    has_set_probability = False
    causal = False
    fixed_k = True

    def __post_init__(self) -> None:
        if not (self.tol > 0 and self.eps >= 0 and self.max_iters >= 1):
            raise ValueError(
                f"Sinkhorn needs tol > 0, eps >= 0 and max_iters >= 1; got tol={self.tol}, eps={self.eps}, "
                f"max_iters={self.max_iters}"
            )

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        balanced = sinkhorn_balance(logp, tol=self.tol, eps=self.eps, max_iters=self.max_iters)  # (N, E)
        balanced = balanced.masked_fill(~torch.isfinite(logp), -1.0)  # masked experts last even if rows underflow
        return balanced.topk(k, dim=-1).indices  # (N, K) by decreasing balanced score


POLICIES = {
    "topk": TopK,
    "multinomial": Multinomial,
    "noisy_topk": NoisyTopK,
    "expert_choice": ExpertChoice,
    "sinkhorn": Sinkhorn,
}
"""Policies selectable by name in config (``Replay`` is built from a trace, not chosen by name)."""

Policy = TopK | Multinomial | NoisyTopK | ExpertChoice | Sinkhorn | Replay


def make_policy(name: str, **options: float | int | None) -> TopK | Multinomial | NoisyTopK | ExpertChoice | Sinkhorn:
    """The policy called ``name``, built with ``options`` (its dataclass fields).

    An option set to None means "the policy's default", so a config can always pass every field
    (``make_policy(cfg.policy, noise_std=cfg.noise_std)`` works for every name). A non-None option the policy does
    not have is an error, as is an unknown name.

    Options: ``noisy_topk``: noise_std; ``expert_choice``: capacity_factor; ``sinkhorn``: tol, max_iters, eps.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}")
    cls = POLICIES[name]
    accepted = {f.name for f in fields(cls)}
    given = {key: value for key, value in options.items() if value is not None}
    wrong = sorted(set(given) - accepted)
    if wrong:
        raise ValueError(
            f"routing policy {name!r} has no option {', '.join(map(repr, wrong))}; its options are "
            f"{sorted(accepted) or 'none'} (options of all policies: "
            f"{ {n: sorted(f.name for f in fields(c)) for n, c in POLICIES.items()} })"
        )
    return cls(**given)
