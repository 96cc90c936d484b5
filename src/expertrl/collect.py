"""One step's training batch: rollout -> rewards -> advantages (-> DAPO refill). The batch is read-only afterwards.

Every random choice derives from (seed, step, rank, round), so a resumed or multi-process run draws the same
prompts, routes and tokens. Round 0 is the step's batch; DAPO's dynamic sampling draws later rounds to refill it.
Only this rank's share of the step's prompts is rolled out (a group never spans ranks).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from expertrl.advantages import group_advantages
from expertrl.batching import concat_rollouts, informative_groups
from expertrl.decoding import text_tokenizer
from expertrl.engines.vllm import rollout_to
from expertrl.moe.gumbel import row_seeds
from expertrl.ops import entropy
from expertrl.policy import policy_forward
from expertrl.rewards import compute_rewards
from expertrl.rewards.shaping import repetition_rate, soft_overlong_punishment, truncated
from expertrl.rollout import generate_rollout
from expertrl.runtime import derive_seed
from expertrl.tasks import sample_items
from expertrl.types import Rollout


def scored_rollout(run, step: int, round_: int = 0) -> tuple[Rollout, dict[str, Tensor]]:
    """One scored rollout of this rank's share of a step's prompts: completions, routes, rewards, advantages.

    The registered rewards of ``reward_funcs``, weighted by ``reward_weights``, make each completion's reward (each
    logged unweighted as ``reward/<name>``). RO-GRPO's routing statistics of each completion (from the routing
    probabilities generation sampled with) become a reward added to it before the group advantage; DAPO's soft
    overlong punishment too. With a KL
    penalty, the reference model's token log-probs under the same distributions and routes.
    """
    cfg = run.cfg
    salt = (round_,) if round_ else ()  # round 0 keeps the seeds of a run without dynamic sampling
    by_rank = (run.rank,) if run.rank else ()  # rank 0 keeps the seeds of a 1-process run
    items = sample_items(
        run.task.train, cfg.rollout.prompts_per_step, random.Random(derive_seed(cfg.seed, step, 0, *salt))
    )
    per_rank = len(items) // run.world
    items = items[run.rank * per_rank : (run.rank + 1) * per_rank]  # this rank's slice
    device = run.device
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, step, 1, *by_rank, *salt))
    torch.manual_seed(derive_seed(cfg.seed, step, 2, *by_rank, *salt))  # token sampling, when on
    # sampled routes: each row's noise keyed by its *global* index, so they do not depend on the number of processes
    G = cfg.rollout.group_size
    rows = torch.arange(len(items) * G) + run.rank * len(items) * G
    seeds = row_seeds(derive_seed(cfg.seed, step, 5, *salt), rows)  # (B,)
    prompt_seeds = None  # routing.prompt_routes=row: the prompt positions draw with the row's seed
    if cfg.routing.prompt_routes == "group":  # one draw per group (groups never span ranks)
        prompt_seeds = row_seeds(derive_seed(cfg.seed, step, 6, *salt), rows // G)  # (B,)
    if run.engine is not None:  # vLLM: the same Rollout, routes sampled or captured inside the engine
        rollout = run.engine.generate_rollout(
            items, group_size=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens, policy=run.policy,
            sampling=run.sampling, generator=generator, guide=run.guide, route_seeds=seeds,
            prompt_route_seeds=prompt_seeds,
        )  # fmt: skip
        rollout = rollout_to(rollout, device)
    else:
        rollout = generate_rollout(
            run.policy_model, run.tokenizer, items,
            group_size=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens, policy=run.policy,
            sampling=run.sampling, generator=generator, guide=run.guide, old_routing=None,
            keep_probs=run.rewarder is not None, routes="experts", route_seeds=seeds, prompt_route_seeds=prompt_seeds,
            share_prompts=cfg.share_prompts and not run.sharded,
        )  # fmt: skip  # no old-log-prob forward: the first update's forward is the old policy (objective.py)
    ref_logp = None
    if run.ref_model is not None:
        with torch.no_grad():
            routes = None if cfg.routing.replay == "none" else rollout.routing
            ref_logp = policy_forward(run.ref_model, rollout, routes, share_prompts=cfg.share_prompts).logp  # KL at 0
    rewards, parts = compute_rewards(  # reward_funcs weighted by reward_weights (TRL's names)
        cfg.reward_set, rollout.completions, rollout.items, run.task, options=cfg.reward_kwargs
    )
    rewards = rewards.to(device)
    metrics: dict[str, Tensor] = {f"reward/{name}": part.mean() for name, part in parts.items()}  # unweighted
    if run.rewarder is not None:  # RO-GRPO: no gradient, statistics of the completion tokens' routing distributions
        P = rollout.prompt_width
        probs = rollout.route_probs[:, :, P - 1 : -1]  # (L, B, C, E) completion token c <-> position P-1+c
        shuffle_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, 4, *by_rank, *salt))
        progress = step / max(cfg.steps - 1, 1)
        parts["routing"], route_metrics = run.rewarder.score(probs, rollout.mask, progress, generator=shuffle_gen)
        rewards = rewards + parts["routing"].to(device)
        metrics |= route_metrics
    if cfg.rollout.overlong_cache > 0:  # DAPO soft overlong punishment, part of the reward before advantages
        parts["overlong"] = soft_overlong_punishment(
            rollout.mask.sum(-1), max_len=cfg.rollout.max_new_tokens, cache=cfg.rollout.overlong_cache
        )
        rewards = rewards + parts["overlong"].to(device)
        metrics["reward/overlong"] = parts["overlong"].mean()
    completion = rollout.input_ids[:, rollout.prompt_width :]
    eos = text_tokenizer(run.tokenizer).eos_token_id
    lengths = rollout.mask.sum(-1)
    metrics |= {  # of the completions as generated, before overlong filtering
        "rollout/loop_rate": repetition_rate(completion, rollout.mask)[1],
        "rollout/completion_length": lengths.mean(),
        "rollout/empty_frac": ((lengths == 1) & (completion[:, 0] == eos)).float().mean(),
    }
    cut = truncated(rollout.mask, completion, eos)  # (B,) no EOS within max_new_tokens
    metrics["rollout/truncated_frac"] = cut.float().mean()
    mask = rollout.mask
    if cfg.rollout.mask_truncated:  # DAPO overlong filtering: a cut completion gets no loss
        mask = mask * (~cut)[:, None].to(mask.dtype)
    advantages, adv_metrics = group_advantages(rewards, cfg.rollout.group_size, scale=cfg.loss.advantage_scale)
    rollout = replace(
        rollout, mask=mask, rewards=rewards, advantages=advantages, reward_parts=parts, ref_logp=ref_logp,
        route_probs=None,  # only the rewards read them
    )  # fmt: skip
    return rollout, adv_metrics | metrics


class Collected(NamedTuple):
    """``collect``'s result.

    Attributes:
        batch: the step's training batch (scored, advantages set).
        metrics: rollout/reward/router metrics (detached tensors and floats).
        spare: the unfiltered first rollout: real rows for the zero-weight passes a DDP rank whose batch dynamic
            sampling shrank must still run (``update``).
    """

    batch: Rollout
    metrics: dict
    spare: Rollout


def collect(run, step: int) -> Collected:
    """The step's batch (scored, advantages set) and its rollout/reward/router metrics.

    DAPO's dynamic sampling drops groups whose rewards are all equal and refills the batch with up to
    ``rollout.max_refill_rounds`` more rounds (under FSDP2 every rank runs every round, in step, and a full rank drops
    what it drew); the batch then keeps what it has (``rollout/batch_fill``).
    """
    cfg = run.cfg
    metrics = {}
    if run.engine is not None:  # the engine generates with the weights the last optimiser step left
        run.engine.push_weights(run.policy_model)
        metrics["time/engine_sync"] = run.engine.push_seconds
    rollout, adv = scored_rollout(run, step)
    metrics |= {
        "reward/mean": rollout.rewards.mean(),
        "reward/std": rollout.rewards.std(unbiased=False),
        "rollout/trace_bytes": float(rollout.routing.nbytes()),
    } | routing_usage(rollout, run.labels)
    metrics |= {k: v for k, v in adv.items() if "/" in k and v.dim() == 0}
    for key, name in (
        ("router/utilisation", "router/utilisation"),
        ("router/load_mse_norm_per_module", "router/load_mse_norm"),
    ):
        if key in adv:  # per-router rows: one key per router
            metrics |= {f"{name}/{label}": row for label, row in zip(run.labels, adv[key])}
    batch = rollout
    if cfg.rollout.dynamic_sampling:
        target = rollout.batch_size
        batch = informative_groups(rollout)
        rounds = 0
        while rounds < cfg.rollout.max_refill_rounds and run.any_rank(batch.batch_size < target):
            rounds += 1
            more, _ = scored_rollout(run, step, round_=rounds)
            if batch.batch_size < target:
                batch = concat_rollouts([batch, informative_groups(more)], text_tokenizer(run.tokenizer).pad_token_id)
        batch = batch.index_batch(torch.arange(min(batch.batch_size, target)))
        metrics["rollout/refill_rounds"] = float(rounds)
        metrics["rollout/batch_fill"] = batch.batch_size / target
    if cfg.rollout.mask_truncated:  # groups with an advantage on a row that still has loss tokens (train.collapse)
        in_loss = (batch.advantages != 0) & (batch.mask.sum(-1) > 0)  # (B,)
        groups = in_loss.view(-1, batch.group_size).any(-1) if in_loss.numel() else in_loss.new_zeros(1)
        metrics["reward/frac_informative_in_loss"] = groups.float().mean()
    return Collected(batch, metrics, rollout)


def routing_usage(rollout: Rollout, labels: list[str] | None = None) -> dict[str, Tensor]:
    """Expert load per router (``router/load/<label>``, (E,)) and the entropy of aggregate expert usage
    (``router/usage_entropy``, METHODS §6.6) over the completion positions of a rollout."""
    P = rollout.prompt_width
    experts = rollout.routing.experts[:, :, P - 1 : -1].long()  # (L, B, C, K)
    if experts.shape[0] == 0:  # no router
        return {}
    E = rollout.routing.num_experts
    valid = rollout.mask.bool()[None, :, :, None].expand_as(experts)  # (L, B, C, K)
    labels = labels or [f"layer{layer}" for layer in rollout.routing.layers]
    out, usage_h = {}, []
    for li, label in enumerate(labels):
        counts = torch.bincount(experts[li][valid[li]], minlength=E).float()  # (E,)
        load = counts / counts.sum().clamp(min=1)
        out[f"router/load/{label}"] = load
        usage_h.append(entropy(load))
    out["router/usage_entropy"] = torch.stack(usage_h).mean()
    return out
