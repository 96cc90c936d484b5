"""The loss of one micro-batch of a rollout, and the routing statistics of a rollout.

``loss_on_microbatch`` is where the method switches meet: the replay mode decides how the forward routes, RSPO
rescales the token ratios, the registry's token loss and Gate-GRPO give per-token terms, the aggregation makes
them one scalar, and the Switch load-balancing loss is added on the experts actually used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.config import TrainConfig
from expertrl.losses.aggregate import aggregate
from expertrl.losses.gate import gate_grpo
from expertrl.losses.kl import kl_penalty
from expertrl.losses.routing import router_z_loss, switch_load_balancing
from expertrl.losses.rspo import after_clip_weight, apply_router_shift, router_shift
from expertrl.ops import entropy, masked_mean
from expertrl.rollout import policy_forward
from expertrl.types import Rollout


def loss_on_microbatch(
    model,
    micro: Rollout,
    cfg: TrainConfig,
    token_loss,
    num_seqs: float,
    num_tokens: float | None = None,
    num_gate_tokens: float | None = None,
    first_update: bool = False,
):
    """Token loss (+ RSPO, KL) + gate_coef * Gate-GRPO + lb_coef * Switch LB for one micro-batch.

    ``first_update``: this forward runs at the rollout's weights (the first inner update), so it also logs how the
    rollout's routes agree with the trainer's own top-K choice (``router_shift/rollout_train_*``).

    Micro-batch losses are scaled so that they sum to the full-batch loss: ``num_seqs`` is the rollout batch size,
    ``num_tokens`` its completion-token count (``token_mean`` only) and ``num_gate_tokens`` the count of tokens the
    gate loss covers (``token_mean`` with ``loss.gate_tokens=all``; defaults to ``num_tokens``). Under DDP, which
    averages gradients over ranks, pass the global counts divided by the world size: the average of the per-rank
    losses is then the global-batch loss. ``None`` normalises by the micro-batch's own count.

    Returns:
        loss: 0-d tensor to backpropagate.
        metrics: detached tensors.
    """
    P = micro.prompt_width
    lc, replay = cfg.loss, cfg.routing.replay
    fwd = policy_forward(  # under the distributions the micro-batch was sampled from (micro.sampling, expert_mask)
        model,
        micro,
        None if replay == "none" else micro.routing,  # live top-K, or the recorded routes (R3 / R2)
        keep_probs=True,
        score=micro.routing if replay == "none" else None,  # old-activated experts scored by the live router
        keep_logits=lc.z_coef > 0,
    )  # logp (B, C), set_logp (L, B, S), router_logp (L, B, S, K), probs (L, B, S, E)
    # Position s routes the token predicted there, so completion token c <-> position P-1+c (types.py).
    comp = slice(P - 1, -1)
    routed = fwd.probs.shape[0] > 0  # False for a model with no router (plain-LoRA baseline)
    if not routed:
        log_gamma, metrics = torch.zeros_like(micro.old_logp), {}
    else:
        log_gamma, metrics = router_shift(
            fwd.router_logp[:, :, comp],
            micro.old_router_logp[:, :, comp],
            micro.mask,
            gamma_min=cfg.rspo.gamma_min,
            layer_agg=cfg.rspo.layer_agg,
        )  # (B, C) log of RSPO's floored, detached router-shift weight; its metrics are logged for every method
    old_logp = micro.old_logp
    if cfg.rspo.enabled and cfg.rspo.placement == "before_clip":
        old_logp = apply_router_shift(old_logp, log_gamma)  # the host loss sees log ratio + log gamma (RSPO v2)
    per_token, token_metrics = token_loss(fwd.logp, old_logp, micro.advantages, micro.mask)
    if cfg.rspo.enabled and cfg.rspo.placement == "after_clip":
        per_token = after_clip_weight(per_token, log_gamma)
    metrics |= {f"loss/{k}": v for k, v in token_metrics.items()}
    if lc.kl_coef > 0:
        kl = kl_penalty(fwd.logp, micro.ref_logp, estimator=lc.kl_estimator)  # (B, C)
        per_token = per_token + lc.kl_coef * kl
        metrics["loss/kl"] = masked_mean(kl.detach(), micro.mask)
    agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_const=float(cfg.rollout.max_new_tokens))
    loss = aggregate(per_token, micro.mask, lc.agg, **agg)
    # Gate-GRPO (MoE-GRPO Eq. 5): ratio of the live router's probability of each recorded expert set to the old one.
    start = P - 1 if lc.gate_tokens == "completion" else 0
    if lc.gate_coef > 0:
        set_logp = fwd.set_logp[:, :, start:-1]  # (L, B, T) of the sampling distribution (tempered, masked)
        old_set_logp = micro.old_set_logp[:, :, start:-1]  # (L, B, T) the same, from the old forward
        gate_mask = micro.mask
        if lc.gate_tokens == "all":
            gate_mask = torch.cat([micro.attention_mask[:, : P - 1].float(), micro.mask], dim=1)  # (B, S-1)
        gate_per_token, gate_metrics = gate_grpo(set_logp, old_set_logp, micro.advantages, gate_mask)
        gate_den = num_tokens if lc.gate_tokens == "completion" or num_gate_tokens is None else num_gate_tokens
        gate_loss = aggregate(gate_per_token, gate_mask, lc.agg, **(agg | {"num_tokens": gate_den}))
        loss = loss + lc.gate_coef * gate_loss
        metrics |= {f"loss/{k}": v for k, v in gate_metrics.items()} | {"loss/gate": gate_loss.detach()}
    if routed:
        routing_loss, routing_metrics = _routing_terms(fwd, micro, cfg, comp, num_seqs, first_update)
        loss = loss + routing_loss
        metrics |= routing_metrics
    metrics["loss/token"] = aggregate(
        per_token, micro.mask, lc.agg, **(agg | {"num_seqs": None, "num_tokens": None})
    ).detach()
    return loss, metrics


def _routing_terms(
    fwd, micro: Rollout, cfg: TrainConfig, comp: slice, num_seqs: float, first_update: bool = False
) -> tuple[Tensor, dict]:
    """The weighted Switch load-balancing loss (+ router z-loss) on the experts this forward used, and the routing
    metrics. Scaled like the token loss so micro-batch terms sum to the full-batch term.

    Overlap metrics (METHODS §1.5, §6.6), over completion tokens: ``router_shift/topk_overlap`` (and
    ``_per_layer``, (L,)) is |S_old ∩ S_live| / K, the share of the old policy's experts the live router would still
    pick with top-K. At the first inner update the weights are the rollout's, so the same quantity is the
    rollout-vs-train agreement, logged as ``router_shift/rollout_train_overlap`` (+ ``_per_layer``) with
    ``rollout_train_mismatch``, the fraction of tokens whose expert set differs in at least one layer (the R3
    paper's statistic): how far sampled routes stray from top-K under MoE-GRPO, or how much an engine's routes
    disagree with the trainer's under R3."""
    lc = cfg.loss
    # Switch load balancing on the experts this forward actually used (every routed, attended position).
    L, B, S, E = fwd.probs.shape
    lb_mask = micro.attention_mask.clone().float()  # (B, S)
    # Each row's last attended token predicts nothing that is scored (and a sequence's final token was never routed
    # by the rollout): drop it per row, so the loss does not depend on how wide the batch happens to be padded.
    last = micro.attention_mask.long().cumsum(-1).argmax(-1)  # (B,) index of each row's last attended position
    lb_mask[torch.arange(B, device=lb_mask.device), last] = 0
    experts = fwd.routing.experts.long()  # (L, B, S, K)
    dense = experts.shape[-1] == E  # RL routes a fixed K per router: K = E is a dense mixture (LoRA-MoE default)
    lb = switch_load_balancing(
        fwd.probs.reshape(L, B * S, E), experts.reshape(L, B * S, -1), lb_mask.reshape(-1), soft_dispatch=dense
    )
    extra = torch.zeros((), device=lb.device)
    if lc.lb_coef > 0:
        extra = extra + lc.lb_coef * lb * (B / num_seqs)
    metrics = {"loss/lb": lb.detach()}
    if lc.z_coef > 0:  # ST-MoE router z-loss on the raw logits of the same positions
        z = router_z_loss(fwd.logits.reshape(L, B * S, E), lb_mask.reshape(-1))
        extra = extra + lc.z_coef * z * (B / num_seqs)
        metrics["loss/z"] = z.detach()
    with torch.no_grad():
        probs_c = fwd.probs[:, :, comp]  # (L, B, C, E)
        k = micro.routing.experts.shape[-1]
        live_top = probs_c.topk(k, dim=-1).indices  # (L, B, C, K) what top-K routing would pick now
        old = micro.routing.experts[:, :, comp].long()  # (L, B, C, K) what the old policy activated
        overlap = (live_top[..., :, None] == old[..., None, :]).any(-1).float().mean(-1)  # (L, B, C)
        tok_mask = micro.mask.expand_as(overlap)  # (L, B, C)
        metrics["router_shift/topk_overlap"] = masked_mean(overlap, tok_mask)
        metrics["router_shift/topk_overlap_per_layer"] = masked_mean(overlap, tok_mask, dim=(1, 2))  # (L,)
        if first_update:
            metrics["router_shift/rollout_train_overlap"] = metrics["router_shift/topk_overlap"]
            metrics["router_shift/rollout_train_overlap_per_layer"] = metrics["router_shift/topk_overlap_per_layer"]
            differs = (overlap < 1).any(0).float()  # (B, C) the set differs in at least one layer
            metrics["router_shift/rollout_train_mismatch"] = masked_mean(differs, micro.mask)
        router_h = entropy(probs_c)  # (L, B, C) per-token router entropy
        metrics["moe/router_entropy"] = masked_mean(router_h, micro.mask.expand_as(router_h))
    return extra, metrics


def routing_usage(rollout: Rollout, labels: list[str] | None = None) -> dict:
    """Expert load per router and the entropy of aggregate expert usage over the completion positions.

    ``labels`` name the routers in metric keys (``moe/load/<label>``); default ``layer<i>``."""
    P = rollout.prompt_width
    experts = rollout.routing.experts[:, :, P - 1 : -1].long()  # (L, B, C, K)
    E = rollout.routing.num_experts
    valid = rollout.mask.bool()[None, :, :, None].expand_as(experts)  # (L, B, C, K)
    out = {}
    if experts.shape[0] == 0:  # no router
        return out
    usage_h = []
    labels = labels or [f"layer{layer}" for layer in rollout.routing.layers]
    for li, label in enumerate(labels):
        counts = torch.bincount(experts[li][valid[li]], minlength=E).float()  # (E,)
        load = counts / counts.sum().clamp(min=1)
        out[f"moe/load/{label}"] = load
        usage_h.append(entropy(load))
    out["moe/usage_entropy"] = torch.stack(usage_h).mean()
    return out
