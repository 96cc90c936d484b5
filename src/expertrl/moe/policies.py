"""Routing policies: how K experts are chosen from a router's distribution. Small frozen objects, one registry.

A policy sees the routing distribution of N tokens as log-probabilities ``logp (N, E)`` (the masked, tempered
softmax of the router logits; masked experts have ``-inf``) and returns ``experts (N, K)`` int64 in *draw order*.
It never computes expert weights or log-probabilities: ``expertrl.moe.hooks`` does that identically for every
policy, so the only thing a policy decides is the discrete choice.

Order convention: for ``Multinomial`` the k-th column is the k-th draw of sequential sampling without replacement
(``torch.multinomial(p, K, replacement=False)``), which is what the Plackett-Luce set probability
Π_k p_{e_k} / (1 - Σ_{j<k} p_{e_j}) of ``expertrl.moe.setprob`` assumes. ``TopK`` returns experts by decreasing
probability, which is the most likely draw order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from expertrl.types import UNROUTED, RoutingTrace


@dataclass(frozen=True)
class TopK:
    """Deterministic top-K: the router's native inference behaviour (and Det-FT)."""

    stochastic = False

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        return logp.topk(k, dim=-1).indices  # (N, K)


@dataclass(frozen=True)
class Multinomial:
    """K distinct experts sampled sequentially from the routing softmax (MoE-GRPO rollouts, Stoch-FT-Multi)."""

    stochastic = True

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        probs = logp.float().exp()  # (N, E); masked experts have probability 0
        return torch.multinomial(probs, k, replacement=False, generator=generator)  # (N, K) in draw order


@dataclass(frozen=True)
class NoisyTopK:
    """Top-K of Gaussian-noised logits (Stoch-FT-Noise after MoTE / V-MoE). ``noise_std`` None means 1/E.

    Noise on log-probs equals noise on logits (they differ by a per-token constant). The probability of the
    chosen set under this policy has no closed form, so use it for SFT baselines and exploration ablations; the
    trace still records the router-softmax log-probs of the chosen experts.
    """

    noise_std: float | None = None
    stochastic = True

    def select(self, logp: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        std = self.noise_std if self.noise_std is not None else 1.0 / logp.shape[-1]
        noise = torch.randn(logp.shape, generator=generator, device=logp.device, dtype=torch.float32)
        return (logp.float() + std * noise).topk(k, dim=-1).indices  # (N, K); -inf stays masked


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

    def select_layer(self, logp: Tensor, k: int, layer_pos: int, fallback=None) -> Tensor:
        """Recorded experts of layer ``layer_pos``; unrouted rows take ``fallback()`` (default: top-K of ``logp``)."""
        recorded = self.experts[layer_pos]  # (N, K)
        assert recorded.shape == (logp.shape[0], k), (
            f"replayed routes {tuple(recorded.shape)} do not match this forward's {logp.shape[0]} tokens x K={k}; "
            "replay the trace of exactly this batch (same sequences, same padding)"
        )
        recorded = recorded.to(device=logp.device, dtype=torch.long)
        missing = recorded[:, :1] == UNROUTED  # (N, 1) a position is recorded whole or not at all
        if missing.any():
            native = logp.topk(k, dim=-1).indices if fallback is None else fallback()
            recorded = torch.where(missing, native, recorded)
        return recorded  # (N, K)


def replay_policy_for(trace: RoutingTrace) -> Replay:
    """A ``Replay`` of ``trace`` for a forward over exactly the trace's (B, S) tokens."""
    L, B, S, K = trace.experts.shape
    return Replay(trace.experts.reshape(L, B * S, K))


POLICIES = {"topk": TopK, "multinomial": Multinomial, "noisy_topk": NoisyTopK}
"""Policies selectable by name in config (``Replay`` is built from a trace, not chosen by name)."""


def make_policy(name: str, *, noise_std: float | None = None) -> TopK | Multinomial | NoisyTopK:
    """The policy called ``name``; ``noise_std`` applies to ``noisy_topk`` only."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}")
    return NoisyTopK(noise_std) if name == "noisy_topk" else POLICIES[name]()
