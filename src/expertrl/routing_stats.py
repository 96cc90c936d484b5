"""Routing statistics of an evaluation pass, per category and per layer (MoE-GRPO §4.3, Figs. 4-6; METHODS §3.9, §6.6):
expert usage, per-token router entropy and the entropy of aggregate usage, usage by token position, load balance,
task-wise Jensen-Shannon divergence, and one example's per-layer probabilities. ``RoutingStats`` accumulates them from
greedy top-K rollouts (``evaluate.routing_statistics_pass``); ``to_json`` makes the result JSON-ready.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from expertrl.decoding import text_tokenizer
from expertrl.diagnostics import (
    coefficient_of_variation,
    dead_fraction,
    expert_counts,
    expert_counts_by_position,
    max_violation,
    pairwise_jsd,
    token_entropy,
    usage_entropy,
)
from expertrl.policy import position_ids_from_mask
from expertrl.types import Rollout

JSD_BASE = 2.0
"""log base of every Jensen–Shannon divergence reported here (METHODS ambiguity 19): log2, so JSD is in [0, 1]"""


def _route_mask(attention_mask: Tensor, prompt_width: int, mask: Tensor, tokens: str) -> Tensor:
    """(B, S) float: 1 at the routed positions that count (alignment: the route at s predicts token s+1).

    ``all``: every attended position that predicts an attended token (prompt and completion; the last token is
    never fed back in generation). ``completion``: the positions P-1 .. S-2 that predict completion tokens.
    """
    if tokens == "all":
        out = torch.zeros_like(attention_mask, dtype=torch.float)  # (B, S)
        out[:, :-1] = (attention_mask[:, :-1] * attention_mask[:, 1:]).float()
        return out
    if tokens == "completion":
        out = torch.zeros_like(attention_mask, dtype=torch.float)  # (B, S)
        out[:, prompt_width - 1 : -1] = mask
        return out
    raise ValueError(f"tokens must be 'all' or 'completion', got {tokens!r}")


class _Acc:
    """Running sums of one group of sequences (a category, or all): counts and entropy sums per layer."""

    def __init__(self, L: int, E: int, K: int, max_positions: int, device) -> None:
        self.K = K
        self.counts = torch.zeros(L, E, device=device)  # (L, E) routed slots per expert
        self.h_sum = torch.zeros(L, device=device)  # (L,) sum of per-token router entropies
        self.pos_counts = torch.zeros(L, max_positions, E, device=device)  # (L, P, E)
        self.tokens = 0.0
        self.items = 0

    def add(self, experts: Tensor, h: Tensor, route_mask: Tensor, positions: Tensor, max_positions: int) -> None:
        """experts (L, b, S, K), h (L, b, S), route_mask (b, S), positions (b, S)."""
        E = self.counts.shape[1]
        for li in range(experts.shape[0]):
            self.counts[li] += expert_counts(experts[li], route_mask, E)
            self.pos_counts[li] += expert_counts_by_position(experts[li], positions, route_mask, E, max_positions)
        self.h_sum += (h * route_mask).sum((1, 2))
        self.tokens += float(route_mask.sum())
        self.items += route_mask.shape[0]

    def summary(self) -> dict:
        if self.tokens <= 0:
            raise ValueError("routing statistics: a category has no routed token; check the items' prompts")
        usage = self.counts / self.counts.sum(-1, keepdim=True)  # (L, E)
        E = self.counts.shape[1]
        h = self.h_sum / self.tokens  # (L,) mean per-token router entropy, nats
        u_h = usage_entropy(usage)  # (L,) entropy of aggregate usage, nats
        per_pos = self.pos_counts.sum(-1)  # (L, P) slots per position
        last = int((per_pos[0] > 0).nonzero().max()) + 1 if bool((per_pos[0] > 0).any()) else 0
        pos_usage = self.pos_counts[:, :last] / per_pos[:, :last, None].clamp(min=1)  # (L, P', E)
        return {
            "n_items": self.items,
            "n_tokens": int(self.tokens),
            "usage": usage,
            "router_entropy": h,
            "router_entropy_norm": h / math.log(E),
            "usage_entropy": u_h,
            "router_entropy_mean": h.mean(),
            "usage_entropy_mean": u_h.mean(),
            "position_usage": pos_usage,
            "position_tokens": (per_pos[0, :last] / self.K).round().long(),  # (P',) tokens at each position
            "max_violation": max_violation(usage),  # (L,)
            "dead_fraction": dead_fraction(usage),  # (L,)
            "cv": coefficient_of_variation(usage),  # (L,)
        }


class RoutingStats:
    """Accumulates the routing statistics of greedy top-K rollouts (``_rollout(routing=True)``) per category and in
    all; ``result`` is ``routing_statistics_pass``'s JSON-ready dict."""

    def __init__(self, tokenizer, *, tokens: str = "all", max_positions: int = 64) -> None:
        self.tok = text_tokenizer(tokenizer)
        self.tokens, self.max_positions = tokens, max_positions
        self.accs: dict[str, _Acc] = {}
        self.total: _Acc | None = None
        self.example: dict | None = None
        self.layers, self.E, self.K = None, None, None

    def add(self, chunk: list[dict], rollout: Rollout) -> None:
        """One chunk of items and its rollout (routes and probabilities of its top-K forward)."""
        P, mask, attention_mask = rollout.prompt_width, rollout.mask, rollout.attention_mask
        experts = rollout.routing.experts  # (L, B, S, K) the top-K routes of the forward
        probs = rollout.route_probs.float()  # (L, B, S, E)
        L, B, S, E = probs.shape
        self.layers, self.E, self.K = list(rollout.routing.layers), E, experts.shape[-1]
        h = token_entropy(probs)  # (L, B, S) per-token router entropy, nats
        route_mask = _route_mask(attention_mask, P, mask, self.tokens)  # (B, S)
        positions = position_ids_from_mask(attention_mask)  # (B, S)
        if self.total is None:
            self.total = _Acc(L, E, self.K, self.max_positions, probs.device)
        self.total.add(experts, h, route_mask, positions, self.max_positions)
        cats = [str(it.get("category", "all")) for it in chunk]
        for cat in sorted(set(cats)):
            rows = torch.tensor([c == cat for c in cats], device=probs.device)
            acc = self.accs.setdefault(cat, _Acc(L, E, self.K, self.max_positions, probs.device))
            acc.add(experts[:, rows], h[:, rows], route_mask[rows], positions[rows], self.max_positions)
        if self.example is None:
            keep = route_mask[0].bool()  # (S,)
            ids = rollout.input_ids[0][keep]
            self.example = {
                "prompt": chunk[0]["prompt"],
                "completion": rollout.completions[0],
                "tokens": [self.tok.decode([int(t)]) for t in ids],
                "probs": probs[:, 0][:, keep],  # (L, n, E)
                "experts": experts[:, 0][:, keep].long(),  # (L, n, K)
                "answer_index": int(keep[: P - 1].sum()) if bool(keep[P - 1]) else None,
            }

    def result(self) -> dict:
        out = {
            "layers": self.layers,
            "num_experts": self.E,
            "top_k": self.K,
            "tokens": self.tokens,
            "jsd_base": JSD_BASE,
            "categories": {cat: acc.summary() for cat, acc in sorted(self.accs.items())},
            "all": self.total.summary(),
            "jsd": None,
            "example": self.example,
        }
        names = sorted(self.accs)
        if len(names) >= 2:
            usage = torch.stack([out["categories"][c]["usage"] for c in names], dim=1)  # (L, A, E)
            mats, means = zip(*(pairwise_jsd(u, base=JSD_BASE) for u in usage))
            out["jsd"] = {
                "categories": names,
                "base": JSD_BASE,
                "matrix": torch.stack(mats),  # (L, A, A)
                "mean_per_layer": torch.stack(means),  # (L,)
                "mean": torch.stack(means).mean(),  # mean over layers of the mean over category pairs
            }
        return to_json(out)


def to_json(x):
    """Tensors -> (nested) lists of floats rounded to 6 decimals (ints stay ints); dicts/lists recursively."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return x.tolist() if not x.is_floating_point() else torch.round(x.double(), decimals=6).tolist()
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    return x
