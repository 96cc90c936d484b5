"""One step's optimisation: ``inner_updates`` (μ) optimiser steps over the batch, micro-batched.

The first inner update runs at the rollout's weights, so its forwards are the old policy: ``Objective`` returns
their log-probs (detached) and they are kept for the later updates (``BehaviourStore``). No separate old-log-prob
forward is run, and the first update's ratios are exactly 1. Each micro-batch is trimmed to its longest row
(``Rollout.trimmed``): no forward or backward over padding columns that no row of it attends.

Guards: under DDP every rank runs the same number of backward passes (a rank that dynamic sampling left with fewer
micro-batches pads with zero-weight passes over real rows); an update whose loss or gradient norm is NaN/Inf is
skipped before it reaches the weights (every rank skips, or none does), and the rest of the step with it.
"""

from __future__ import annotations

import math
import time

import torch

from expertrl.logging import mean_metrics
from expertrl.losses.routing import dispatch_counts
from expertrl.objective import BehaviourStore, Denominators, routed_positions
from expertrl.policy import with_old_policy
from expertrl.runtime import clip_grad, derive_seed
from expertrl.types import Rollout


def denominators(run, batch: Rollout) -> tuple[Denominators, int]:
    """The step's loss denominators (global counts / world size, because DDP averages per-rank gradients), the global
    dispatch fraction of the routes the step replays (the router losses' ``f``), and the largest per-rank batch (each
    rank runs as many micro-batches as the fullest one). Under DDP: one small gather and one reduce."""
    P = batch.prompt_width
    n_gate = batch.mask.sum() + batch.attention_mask[:, : P - 1].sum()  # gate_tokens=all covers prompts
    counts = torch.stack(
        [torch.tensor(float(batch.batch_size), device=n_gate.device), batch.mask.sum(), n_gate.float()]
    )
    dispatch = num_lb = None
    routes = batch.routing
    if routes.experts.shape[0] > 0 and not run.objective.soft_dispatch:  # routed, hard dispatch
        slots, num_lb = dispatch_counts(routes.experts, routed_positions(batch.attention_mask), routes.num_experts)
        if run.world > 1:
            both = run.accelerator.reduce(torch.cat([slots.flatten(), num_lb[None]]).to(n_gate.device), "sum")
            slots, num_lb = both[:-1].reshape(slots.shape), both[-1]
        dispatch = (slots / slots.sum(-1, keepdim=True).clamp(min=1)).float()  # (L, E)
        num_lb = (num_lb / run.world).float()
    if run.world > 1:
        per_rank = run.accelerator.gather(counts.double()[None])  # (world, 3)
        b_max = int(per_rank[:, 0].max())
        b_all, n_tok, n_gate_all = (per_rank.sum(0) / run.world).tolist()
        return Denominators(b_all, n_tok, n_gate_all, dispatch, num_lb), b_max
    return Denominators(float(batch.batch_size), counts[1], counts[2], dispatch, num_lb), batch.batch_size


def update(run, batch: Rollout, spare: Rollout, step: int) -> dict:
    """μ optimiser steps over ``batch``; returns the step's loss/optim/time metrics.

    An inner update whose loss or gradient norm is NaN/Inf is not applied, nor are the step's later ones (the earlier
    ones were: ``optim/applied_updates`` counts them); such a step counts in ``run.skipped`` and ``run.bad_in_row``
    (reset by a good step), and ``record`` stops the run when ``max_bad_steps`` come in a row.

    Args:
        batch: the step's batch from ``collect`` (read-only).
        spare: real rows for DDP's zero-weight padding passes (``collect``'s unfiltered rollout).
    """
    cfg, model, objective = run.cfg, run.model, run.objective
    t0 = time.perf_counter()
    by_rank = (run.rank,) if run.rank else ()
    B = batch.batch_size
    dens, b_max = denominators(run, batch)
    n_pad = math.ceil(b_max / cfg.micro_batch_size) - math.ceil(B / cfg.micro_batch_size)
    pad_idx = torch.arange(min(cfg.micro_batch_size, spare.batch_size))
    metrics, grad_norms, losses_all = [], [], []
    skipped, applied = False, 0
    for inner in range(cfg.inner_updates if b_max > 0 else 0):
        first = inner == 0
        store = BehaviourStore(B, batch.input_ids.shape[1], batch.completion_width) if first else None
        order = torch.randperm(
            B, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, step, 3, inner, *by_rank))
        )
        run.optimizer.zero_grad(set_to_none=True)
        losses, pass_metrics = [], []
        passes = [(batch, idx, 1.0) for idx in order.split(cfg.micro_batch_size)] + [(spare, pad_idx, 0.0)] * n_pad
        for src, idx, weight in passes:
            micro = src.index_batch(idx.to(src.input_ids.device)).trimmed()  # no forward over columns past its rows
            out = objective(model, micro, dens, first_update=first)
            run.accelerator.backward(out.loss * weight if weight != 1.0 else out.loss)
            if weight:
                losses.append(out.loss.detach())
                pass_metrics.append(out.metrics)
                if first:
                    store.store(idx, out.behaviour)
        grad_norm = clip_grad(model, cfg.optim.grad_clip).detach()  # of the rank-averaged gradient
        if run.sharded:
            grad_norm = grad_norm.full_tensor()  # a DTensor over the shards' norms
        # One sync per update, the price of skipping a NaN/Inf update before it reaches the weights.
        nonfinite = (~torch.isfinite(sum(losses, torch.zeros((), device=grad_norm.device)) + grad_norm)).float()
        if run.world > 1:  # every rank skips, or none does
            nonfinite = run.accelerator.reduce(nonfinite, reduction="sum")
        if nonfinite.item() > 0:
            run.optimizer.zero_grad(set_to_none=True)
            skipped = True
            break
        metrics += pass_metrics
        grad_norms.append(grad_norm)
        losses_all.append(torch.stack(losses).sum() if losses else torch.zeros(()))
        run.optimizer.step()
        run.schedule.step()
        applied += 1
        if first and B > 0:
            batch = with_old_policy(batch, store.behaviour())  # later updates read the old policy from the batch
    run.bad_in_row = run.bad_in_row + 1 if skipped else 0
    run.skipped += int(skipped)
    out = {
        "time/update": time.perf_counter() - t0,
        "optim/lr": run.schedule.get_last_lr()[0],
        "optim/skipped_steps": run.skipped,
        "optim/applied_updates": applied,
    }
    if metrics:  # empty when dynamic sampling dropped every group, or the first update was skipped
        out |= mean_metrics(metrics) | {
            "optim/grad_norm": torch.stack(grad_norms).mean(),
            "loss/total": torch.stack(losses_all).mean(),
        }
    return out
