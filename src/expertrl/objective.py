"""The RL objective of one micro-batch: every method switch bound once, no config in the loss path.

    objective = Objective(token_loss=get_loss("grpo"), agg="seq_mean_token_mean", replay="rollout", gate_coef=1.0)
    out = objective(model, micro, Denominators(num_seqs=B), first_update=True)
    out.loss.backward()

What it computes, per micro-batch (MoE-GRPO Eq. 4-6, RSPO, KL, router losses):

1. one forward under the distributions the micro-batch was sampled from (``rollout.policy_forward``), routing as
   ``replay`` says: ``rollout`` replays the rollout's routes (MoE-GRPO, R3); ``first_forward`` (R2) and ``none``
   route live top-K in the first update and then replay (R2) or score (none) the routes that update chose;
2. at the first inner update the weights are still the rollout's, so this forward *is* the old policy: its token,
   set and router log-probs, detached, are the old ones (``Behaviour``; no separate old-log-prob forward, and the
   first ratio is exactly 1 by construction, whatever the micro-batch). Later updates read them from the batch;
3. RSPO's router-shift weight γ̃ from the untempered router log-probs of the old-activated experts (its diagnostics
   are logged for every method), the registry's token loss on ``log ρ (+ log γ̃)``, the k-estimator KL, Gate-GRPO on
   the set log-probs (``moe.setprob``), each aggregated by ``agg``;
4. the Switch load balancing (+ z-loss) on the experts this forward used (``losses.routing.routing_aux_loss``);
5. with ``mismatch`` (TIS, MIS, IcePop), the token loss weighted per token from k = π_train,old / π_engine, the old
   log-prob over the rollout engine's (``Rollout.sample_logp``); the engine-vs-trainer metrics at the first update.

Micro-batch losses are scaled so that they sum to the full-batch loss (``Denominators``; under DDP the global
counts divided by the world size). Metrics are detached tensors under ``loss/`` and ``router/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from expertrl.losses.aggregate import aggregate
from expertrl.losses.gate import gate_grpo
from expertrl.losses.kl import kl_penalty
from expertrl.losses.mismatch import MISMATCH_CORRECTIONS, mismatch_metrics, mismatch_weight
from expertrl.losses.routing import routing_aux_loss
from expertrl.losses.rspo import after_clip_weight, apply_router_shift, router_shift
from expertrl.ops import entropy, masked_mean
from expertrl.policy import ForwardOut, policy_forward, with_old_policy
from expertrl.types import UNROUTED, Rollout, RoutingTrace

REPLAYS = ("rollout", "first_forward", "none")


@dataclass(frozen=True)
class Denominators:
    """Loss denominators of one step (global counts / world size under DDP); None = the micro-batch's own.

    Attributes:
        num_seqs: sequences in the step's batch (``seq_mean_*`` aggregations, the router losses).
        num_tokens: completion tokens in the step's batch (``token_mean``).
        num_gate_tokens: tokens Gate-GRPO covers (``gate_tokens=all`` with ``token_mean``); default ``num_tokens``.
    """

    num_seqs: float
    num_tokens: float | Tensor | None = None
    num_gate_tokens: float | Tensor | None = None
    lb_dispatch: Tensor | None = None
    """(L, E) the step's global dispatch fraction of the routes it replays (``losses.routing.routing_aux_loss``)"""
    num_lb_tokens: float | Tensor | None = None
    """tokens the router losses count in the step's batch (with ``lb_dispatch``)"""


def routed_positions(attention_mask: Tensor) -> Tensor:
    """(B, S) float: the positions whose routes count in the router losses: every attended position but each row's
    last (it predicts nothing that is scored, and a sequence's final token was never routed by the rollout), so the
    losses do not depend on how wide the batch happens to be padded."""
    mask = attention_mask.clone().float()
    last = attention_mask.long().cumsum(-1).argmax(-1)  # (B,)
    mask[torch.arange(mask.shape[0], device=mask.device), last] = 0
    return mask


class ObjectiveOut(NamedTuple):
    """``Objective``'s result: the loss, its metrics and, at the first update, the forward that defines the old
    policy (``rollout.with_old_policy`` reads its token, set and router log-probs and its routes)."""

    loss: Tensor
    metrics: dict[str, Tensor]
    behaviour: ForwardOut | None


@dataclass(frozen=True)
class Objective:
    """Token loss (+ RSPO, KL) + gate_coef · Gate-GRPO + routing losses for one micro-batch.

    Attributes:
        token_loss: a registered policy loss with its keyword arguments bound (``losses.get_loss``).
        agg: aggregation of per-token terms (``losses.aggregate.AGGREGATIONS``).
        replay: ``rollout`` | ``first_forward`` | ``none`` (module docstring).
        norm_const: Dr.GRPO's per-sequence constant (``seq_mean_token_sum_norm``; the completion budget).
        gate_coef: weight of Gate-GRPO (0 = off); ``gate_tokens``: ``completion`` (Eq. 5) or ``all``.
        rspo: rescale the token ratios by γ̃; ``gamma_min``, ``layer_agg``, ``placement`` as ``losses.rspo``.
        kl_coef, kl_estimator: per-token KL to the reference model (``Rollout.ref_logp``).
        lb_coef, z_coef: Switch load balancing and router z-loss; ``soft_dispatch``: the routers are dense mixtures.
        mismatch: engine/trainer correction of the token loss (``losses.mismatch``: ``tis``, ``mis``, ``icepop``,
            ``none``) from the old log-probs over the rollout engine's (``Rollout.sample_logp``); ``mismatch_cap`` is
            C of TIS/MIS, ``icepop_low`` and ``icepop_high`` IcePop's α and β.
        share_prompts: rows sharing a prompt and its routes compute it once (``policy.shared_prompt_forward``).
    """

    token_loss: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    agg: str = "seq_mean_token_mean"
    replay: str = "rollout"
    norm_const: float = 1.0
    gate_coef: float = 0.0
    gate_tokens: str = "completion"
    rspo: bool = False
    gamma_min: float = 0.8
    layer_agg: str = "mean"
    placement: str = "before_clip"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    lb_coef: float = 0.0
    z_coef: float = 0.0
    soft_dispatch: bool = False
    mismatch: str = "none"
    mismatch_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    share_prompts: bool = False

    def __post_init__(self) -> None:
        if self.replay not in REPLAYS:
            raise ValueError(f"unknown replay {self.replay!r}; choose from {list(REPLAYS)}")
        if self.mismatch not in MISMATCH_CORRECTIONS:
            raise ValueError(f"unknown mismatch correction {self.mismatch!r}; choose from {list(MISMATCH_CORRECTIONS)}")

    def forward(self, model: nn.Module, micro: Rollout, *, first_update: bool) -> ForwardOut:
        """The micro-batch's forward, routed as ``replay`` says (see the module docstring)."""
        if self.replay == "rollout":
            routes, score = micro.routing, None  # replay the rollout's routes (MoE-GRPO, R3)
        elif first_update:
            routes, score = None, None  # live top-K; these routes become the old policy's (R2 / RSPO)
        elif self.replay == "first_forward":
            routes, score = micro.routing, None  # R2: replay the first update's routes
        else:
            routes, score = None, micro.routing  # live top-K, the old-activated experts scored (RSPO's shift)
        return policy_forward(
            model, micro, routes, keep_probs=True, score=score, keep_logits=self.z_coef > 0,
            share_prompts=self.share_prompts,
        )  # fmt: skip

    def __call__(self, model: nn.Module, micro: Rollout, dens: Denominators, *, first_update: bool) -> ObjectiveOut:
        """Loss, metrics and (at the first update) the old policy of one micro-batch.

        Args:
            micro: the micro-batch; after the first update it must carry the old policy (``with_behaviour``).
            dens: the step's denominators.
            first_update: this forward runs at the rollout's weights: it defines the old policy, and logs how the
                rollout's routes agree with the trainer's top-K (``router/shift/rollout_train_*``).
        """
        P = micro.prompt_width
        generated_routes = micro.routing  # the routes generation used, before a live first update replaces them
        fwd = self.forward(model, micro, first_update=first_update)
        behaviour = None
        if first_update:
            behaviour = fwd
            micro = with_old_policy(micro, fwd)
        assert micro.old_logp is not None, "after the first update a micro-batch carries the old policy"
        comp = slice(P - 1, -1)  # completion token c <-> route at position P - 1 + c (types.py)
        routed = fwd.probs.shape[0] > 0  # False for a model with no router (plain-LoRA baseline)
        metrics: dict[str, Tensor] = {}
        log_gamma = torch.zeros_like(micro.old_logp)
        if routed:
            log_gamma, metrics = router_shift(
                fwd.router_logp[:, :, comp], micro.old_router_logp[:, :, comp], micro.mask,
                gamma_min=self.gamma_min, layer_agg=self.layer_agg,
            )  # fmt: skip  # (B, C) log of RSPO's floored, detached weight; its metrics are logged for every method
        old_logp = micro.old_logp
        if self.rspo and self.placement == "before_clip":
            old_logp = apply_router_shift(old_logp, log_gamma)  # the host loss sees log ρ + log γ̃ (RSPO v2)
        per_token, token_metrics = self.token_loss(fwd.logp, old_logp, micro.advantages, micro.mask)
        if self.rspo and self.placement == "after_clip":
            per_token = after_clip_weight(per_token, log_gamma)
        metrics |= {f"loss/{k}": v for k, v in token_metrics.items()}
        per_token, engine_metrics = self._engine_mismatch(per_token, micro, first_update)
        metrics |= engine_metrics
        if self.kl_coef > 0:
            kl = kl_penalty(fwd.logp, micro.ref_logp, estimator=self.kl_estimator)  # (B, C)
            per_token = per_token + self.kl_coef * kl
            metrics["loss/kl"] = masked_mean(kl.detach(), micro.mask)
        agg = dict(num_tokens=dens.num_tokens, num_seqs=dens.num_seqs, norm_const=self.norm_const)
        loss = aggregate(per_token, micro.mask, self.agg, **agg)
        own = agg | {"num_seqs": None, "num_tokens": None}  # this micro-batch's own mean, for the metric
        metrics["loss/token"] = aggregate(per_token, micro.mask, self.agg, **own).detach()
        if self.gate_coef > 0:
            gate_loss, gate_metrics = self._gate(fwd, micro, dens, agg)
            loss = loss + self.gate_coef * gate_loss
            metrics |= gate_metrics
        if routed:
            aux, aux_metrics = self._routing(fwd, micro, generated_routes, dens, comp, first_update)
            loss = loss + aux
            metrics |= aux_metrics
        return ObjectiveOut(loss, metrics, behaviour)

    def _engine_mismatch(self, per_token: Tensor, micro: Rollout, first: bool) -> tuple[Tensor, dict]:
        """The token loss weighted by the engine/trainer correction (``mismatch``), and the mismatch metrics: at the
        first update, how far the engine's token log-probs are from the trainer's at the same weights
        (``rollout/engine_*``); with a correction, its mean weight and the share of tokens it truncated or dropped."""
        if micro.sample_logp is None:
            if self.mismatch != "none":
                raise ValueError(f"loss.mismatch={self.mismatch} needs the rollout engine's token log-probs")
            return per_token, {}
        metrics = {}
        if first:
            stats = mismatch_metrics(micro.old_logp, micro.sample_logp, micro.mask)
            metrics |= {f"rollout/engine_{k}": v for k, v in stats.items()}
        if self.mismatch != "none":
            weight, stats = mismatch_weight(
                self.mismatch, micro.old_logp, micro.sample_logp, micro.mask, cap=self.mismatch_cap,
                low=self.icepop_low, high=self.icepop_high,
            )  # fmt: skip  # (B, C) detached
            per_token = per_token * weight
            metrics |= {f"loss/{k}": v for k, v in stats.items()}
        return per_token, metrics

    def _gate(self, fwd: ForwardOut, micro: Rollout, dens: Denominators, agg: dict) -> tuple[Tensor, dict]:
        """Gate-GRPO (MoE-GRPO Eq. 5): ratio of the live router's probability of each recorded expert set, under the
        distribution the rollout sampled from, to the old one."""
        P = micro.prompt_width
        start = P - 1 if self.gate_tokens == "completion" else 0
        gate_mask = micro.mask
        if self.gate_tokens == "all":
            gate_mask = torch.cat([micro.attention_mask[:, : P - 1].float(), micro.mask], dim=1)  # (B, S-1)
        per_token, m = gate_grpo(
            fwd.set_logp[:, :, start:-1], micro.old_set_logp[:, :, start:-1], micro.advantages, gate_mask
        )  # (B, T) averaged over layers
        den = dens.num_tokens
        if self.gate_tokens == "all" and dens.num_gate_tokens is not None:
            den = dens.num_gate_tokens
        gate_loss = aggregate(per_token, gate_mask, self.agg, **(agg | {"num_tokens": den}))
        return gate_loss, {f"loss/{k}": v for k, v in m.items()} | {"loss/gate": gate_loss.detach()}

    def _routing(
        self, fwd: ForwardOut, micro: Rollout, generated: RoutingTrace, dens: Denominators, comp: slice, first: bool
    ) -> tuple[Tensor, dict]:
        """Router losses on the experts this forward used, scaled like the token loss; routing metrics.

        Overlap metrics (METHODS §1.5, §6.6), over completion tokens: ``router/shift/topk_overlap`` (and
        ``_per_layer``, (L,)) is |S_old ∩ S_live| / K, the share of the old policy's experts the live router would still
        pick with top-K. At the first update the same quantity over the routes *generation* used is the rollout-vs-train
        agreement, ``router/shift/rollout_train_overlap`` (+ ``_per_layer``), with ``rollout_train_mismatch``, the
        fraction of tokens whose expert set differs in at least one layer (the R3 paper's statistic): how far sampled
        routes stray from top-K under MoE-GRPO, or how much an engine's routes disagree with the trainer's."""
        B = micro.batch_size
        aux, metrics = routing_aux_loss(
            routed_positions(micro.attention_mask), probs=fwd.probs, experts=fwd.routing.experts,
            lb_coef=self.lb_coef, logits=fwd.logits, z_coef=self.z_coef, soft_dispatch=self.soft_dispatch,
            dispatch=dens.lb_dispatch, num_tokens=dens.num_lb_tokens,
        )  # fmt: skip
        if dens.lb_dispatch is None or self.soft_dispatch:  # this forward's own losses, weighted by its share
            aux = aux * (B / dens.num_seqs)
        with torch.no_grad():
            probs_c = fwd.probs[:, :, comp]  # (L, B, C, E)
            k = micro.routing.experts.shape[-1]
            live_top = probs_c.topk(k, dim=-1).indices  # (L, B, C, K) what top-K routing would pick now
            tok_mask = micro.mask[None].expand(probs_c.shape[0], -1, -1)  # (L, B, C)

            def overlap(trace: RoutingTrace) -> Tensor:  # (L, B, C) share of trace's experts in the live top-K
                old = trace.experts[:, :, comp].long()
                return (live_top[..., :, None] == old[..., None, :]).any(-1).float().mean(-1)

            shift = overlap(micro.routing)
            metrics["router/shift/topk_overlap"] = masked_mean(shift, tok_mask)
            metrics["router/shift/topk_overlap_per_layer"] = masked_mean(shift, tok_mask, dim=(1, 2))  # (L,)
            if first:
                agree = overlap(generated)
                metrics["router/shift/rollout_train_overlap"] = masked_mean(agree, tok_mask)
                metrics["router/shift/rollout_train_overlap_per_layer"] = masked_mean(agree, tok_mask, dim=(1, 2))
                differs = (agree < 1).any(0).float()  # (B, C) the set differs in at least one layer
                metrics["router/shift/rollout_train_mismatch"] = masked_mean(differs, micro.mask)
            router_h = entropy(probs_c)  # (L, B, C) per-token router entropy
            metrics["router/entropy"] = masked_mean(router_h, tok_mask)
        return aux, metrics


class BehaviourStore:
    """The old policy of a whole batch, assembled from the first update's micro-batches (rows in any order).

    A micro-batch may be narrower than the batch (``Rollout.trimmed``: no columns past its longest row); its values
    are right-padded to the batch's widths as ``batching.concat_rollouts`` pads: log-probs 0, experts ``UNROUTED``
    (positions no row of that micro-batch attends, out of every mask).
    """

    def __init__(self, batch_size: int, seq_width: int, completion_width: int) -> None:
        self.batch_size = batch_size
        self.widths = {"seq": seq_width, "completion": completion_width}
        self._parts: dict[str, Tensor] = {}
        self._trace: RoutingTrace | None = None
        self._filled = 0

    def _put(self, name: str, rows: Tensor, value: Tensor, dim: int, width: str, pad: float = 0.0) -> None:
        missing = self.widths[width] - value.shape[dim + 1]  # the sequence dim follows the batch dim
        if missing:
            shape = list(value.shape)
            shape[dim + 1] = missing
            value = torch.cat([value, value.new_full(shape, pad)], dim=dim + 1)
        if name not in self._parts:
            shape = list(value.shape)
            shape[dim] = self.batch_size
            self._parts[name] = value.new_zeros(shape)
        self._parts[name].index_copy_(dim, rows.to(value.device), value)

    def store(self, rows: Tensor, behaviour: ForwardOut) -> None:
        """Keep the micro-batch ``rows``' old policy (its first-update forward)."""
        self._put("logp", rows, behaviour.logp.detach(), 0, "completion")
        self._put("set_logp", rows, behaviour.set_logp.detach(), 1, "seq")
        self._put("router_logp", rows, behaviour.router_logp.detach(), 1, "seq")
        self._put("experts", rows, behaviour.routing.experts, 1, "seq", pad=UNROUTED)
        self._put("routing_set_logp", rows, behaviour.routing.set_logp, 1, "seq")
        self._trace = behaviour.routing
        self._filled += len(rows)

    def behaviour(self) -> ForwardOut:
        """The whole batch's old policy; every row must have been stored."""
        assert self._filled == self.batch_size, (self._filled, self.batch_size)
        p, t = self._parts, self._trace
        routing = RoutingTrace(p["experts"], p["routing_set_logp"], t.layers, t.num_experts)
        return ForwardOut(p["logp"], p["set_logp"], p["router_logp"], None, routing)
