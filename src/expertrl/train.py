"""`expertrl train`: optional supervised warm-up, then MoE-GRPO. The whole RL loop is ``train`` below.

One step: rollout (G completions per prompt, sampled experts, greedy tokens; routing trace recorded) -> rewards ->
group advantages -> ``inner_updates`` optimiser steps over the rollout batch, each a pass of replayed forwards
(token log-probs + live router log-probs of the recorded expert sets) -> Token-GRPO + Gate-GRPO + Switch LB loss ->
metrics. See docs/architecture.md for which module owns each step.

Vision-language MoE models (``model.family=qwen3_vl_moe`` or a Qwen3-VL-MoE ``model.path``) train on multimodal tasks
(``task.name=mm:<name>``) through the same loop: the "tokenizer" is then the model's processor, a rollout carries
its prompts' vision kwargs (``Rollout.mm_inputs``) into every replayed forward, and ``guidance.groups=modality``
masks experts per vision/text token group (MoE-GRPO §3.3, ``moe.guidance.ModalityGuide``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from expertrl.advantages import group_advantages
from expertrl.checkpoint import (
    checkpoint_path,
    complete_checkpoints,
    find_resume_checkpoint,
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    remove_partial_checkpoints,
    save_checkpoint,
    save_model,
    set_rng_state,
    stop_requests,
    truncate_metrics,
)
from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import save_yaml
from expertrl.evaluate import evaluate
from expertrl.logging import MetricsLogger, mean_metrics, reduce_across_ranks, to_number
from expertrl.losses import get_loss
from expertrl.moe.adapters import find_routers, site_labels
from expertrl.moe.guidance import (
    GuidanceState,
    ModalityGuide,
    PromptCompletionGuide,
    calibrate_modality,
    calibrate_prompt_completion,
)
from expertrl.moe.lora_moe import adapter_settings, describe_trainable
from expertrl.moe.policies import TopK, make_policy
from expertrl.moe.setprob import MAX_UNORDERED_K
from expertrl.parallel import (
    broadcast_weights,
    check_shardable,
    gather_full_state,
    is_sharded,
    load_full_optimizer_state,
    refuse_accelerate_fsdp,
    shard_model,
)
from expertrl.rewards import compute_rewards
from expertrl.rewards.routing import RoutingRewarder, repetition_rate
from expertrl.rewards.shaping import soft_overlong_punishment, truncated
from expertrl.rollout import (
    concat_rollouts,
    encode_prompts,
    generate_rollout,
    informative_groups,
    is_processor,
    policy_forward,
    text_tokenizer,
)
from expertrl.runtime import (
    clip_grad,
    derive_seed,
    model_and_tokenizer,
    optimizer_and_schedule,
    seed_everything,
    task_from_config,
)
from expertrl.sft import supervised_train
from expertrl.step import loss_on_microbatch, routing_usage
from expertrl.types import Sampling


def scored_rollout(
    model, tokenizer, task, cfg: TrainConfig, policy, ref_model, *, step, round_, rank, world, rewarder=None, guide=None
):
    """One scored rollout of this rank's share of a step's prompts: completions, routes, rewards, advantages.

    Every random choice derives from (seed, step, rank, round): a resumed or multi-process run draws the same.
    Round 0 is the step's batch; DAPO's dynamic sampling draws later rounds to refill it.

    Args:
        rewarder: RO-GRPO's ``RoutingRewarder``: routing statistics of each completion become a reward added to the
            task reward before the group advantage (its history advances after this batch is scored).
        guide: router guidance (``Guide``) of the rollout and, if it applies in the loss, of the old forward.

    Returns:
        the Rollout and the advantage (and routing-reward) metrics.
    """
    salt = (round_,) if round_ else ()  # round 0 keeps the seeds of a run without dynamic sampling
    by_rank = (rank,) if rank else ()  # rank 0 keeps the seeds of a 1-process run
    rng = random.Random(derive_seed(cfg.seed, step, 0, *salt))
    items = [task.train[rng.randrange(len(task.train))] for _ in range(cfg.rollout.prompts_per_step)]
    per_rank = len(items) // world
    items = items[rank * per_rank : (rank + 1) * per_rank]  # this rank's slice; a group never spans ranks
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, step, 1, *by_rank, *salt))
    torch.manual_seed(derive_seed(cfg.seed, step, 2, *by_rank, *salt))  # token sampling, when on
    rollout = generate_rollout(
        model,
        tokenizer,
        items,
        group_size=cfg.rollout.group_size,
        max_new_tokens=cfg.rollout.max_new_tokens,
        policy=policy,
        sampling=sampling_of(cfg),
        generator=generator,
        guide=guide,
        old_routing="rollout" if cfg.routing.replay == "rollout" else "live",
        keep_probs=rewarder is not None,
    )
    if ref_model is not None:
        with torch.no_grad():
            routes = None if cfg.routing.replay == "none" else rollout.routing
            # the same distributions and expert mask as the policy's forwards, so the KL starts at 0
            rollout.ref_logp = policy_forward(ref_model, rollout, routes).logp
    rewards, parts = compute_rewards({"task": 1.0}, rollout.completions, rollout.items, task)
    rewards = rewards.to(device)
    route_metrics = {}
    if rewarder is not None:  # RO-GRPO: no gradient, statistics of the completion tokens' routing distributions
        P = rollout.prompt_width
        probs = rollout.route_probs[:, :, P - 1 : -1]  # (L, B, C, E) completion token c <-> position P-1+c
        shuffle_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, 4, *by_rank, *salt))
        progress = step / max(cfg.steps - 1, 1)
        parts["routing"], route_metrics = rewarder.score(probs, rollout.mask, progress, generator=shuffle_gen)
        rewards = rewards + parts["routing"].to(device)
        route_metrics["reward/task"] = parts["task"].mean()
    rollout.route_probs = None  # only the rewards read them
    if cfg.rollout.overlong_cache > 0:  # DAPO soft overlong punishment, part of the reward before advantages
        parts["overlong"] = soft_overlong_punishment(
            rollout.mask.sum(-1), max_len=cfg.rollout.max_new_tokens, cache=cfg.rollout.overlong_cache
        )
        rewards = rewards + parts["overlong"].to(device)
    route_metrics["completions/loop_rate"] = repetition_rate(  # before overlong filtering hides the cut ones
        rollout.input_ids[:, rollout.prompt_width :], rollout.mask
    )[1]
    if cfg.rollout.mask_truncated:  # DAPO overlong filtering: a cut completion gets no loss
        eos = text_tokenizer(tokenizer).eos_token_id
        cut = truncated(rollout.mask, rollout.input_ids[:, rollout.prompt_width :], eos)
        rollout.mask = rollout.mask * (~cut)[:, None].to(rollout.mask.dtype)
    rollout.rewards = rewards
    rollout.reward_parts = parts
    rollout.advantages, adv_metrics = group_advantages(
        rollout.rewards, cfg.rollout.group_size, scale=cfg.loss.advantage_scale
    )
    return rollout, adv_metrics | route_metrics


def sampling_of(cfg: TrainConfig) -> Sampling:
    """The distributions rollouts sample from (and every forward that scores them uses): token decoding, the routing
    temperature and the set log-probability of ``cfg``."""
    return Sampling(
        do_sample=cfg.rollout.do_sample,
        token_temperature=cfg.rollout.temperature if cfg.rollout.do_sample else 1.0,
        routing_temperature=cfg.routing.temperature,
        set_logprob=cfg.routing.set_logprob,
    )


def calibrate_guidance(model, tokenizer, task, cfg: TrainConfig, step: int) -> GuidanceState:
    """Modality-aware router guidance: count which experts deterministic top-K routing gives each token group over
    ``guidance.calibration_batches`` batches of training prompts, then mask each group's bottom ``guidance.percent`` %
    (MoE-GRPO Eq. 7). Prompts derive from (seed, step), so every rank and a resumed run count the same.

    ``guidance.groups=prompt_completion``: prompt vs completion tokens of greedy top-K rollouts. ``modality``: vision
    placeholders vs text tokens of one top-K forward over the prompts (the images and the question, as the paper
    counts its modalities; generated tokens are text and are not needed to tell the groups apart)."""
    rng = random.Random(derive_seed(cfg.seed, step + 1, 5))  # step -1 = before RL
    if cfg.guidance.groups == "modality":
        from expertrl.vlm import vision_token_ids

        batches = []
        for _ in range(cfg.guidance.calibration_batches):
            items = [task.train[rng.randrange(len(task.train))] for _ in range(cfg.rollout.prompts_per_step)]
            input_ids, attention_mask, mm = encode_prompts(tokenizer, items)
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask, **mm})
        return calibrate_modality(model, batches, vision_ids=vision_token_ids(model), percent=cfg.guidance.percent)
    rollouts = []
    for _ in range(cfg.guidance.calibration_batches):
        items = [task.train[rng.randrange(len(task.train))] for _ in range(cfg.rollout.prompts_per_step)]
        rollouts.append(
            generate_rollout(
                model, tokenizer, items, group_size=1, max_new_tokens=cfg.rollout.max_new_tokens, policy=TopK()
            )
        )
    return calibrate_prompt_completion(model, rollouts, percent=cfg.guidance.percent)


def make_guide(state: GuidanceState, cfg: TrainConfig, model) -> PromptCompletionGuide | ModalityGuide:
    """The rollout's ``Guide`` for ``guidance.groups``: prompt/completion groups, or vision/text groups of a VLM."""
    if cfg.guidance.groups == "modality":
        from expertrl.vlm import vision_token_ids

        return ModalityGuide(state, frozenset(vision_token_ids(model)), in_loss=cfg.guidance.in_loss)
    return PromptCompletionGuide(state, in_loss=cfg.guidance.in_loss)


def train(cfg: TrainConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary that is also written to ``summary.json``.

    With ``cfg.resume`` it continues from the run's latest checkpoint (no warm-up, no start evaluation). Every
    per-step random choice derives from (seed, step), so on CPU a resumed run logs the same metrics, step for step,
    as one that was never interrupted.

    Several processes (``torchrun`` / ``accelerate launch``) train data-parallel: each step draws the same global
    prompts as a 1-process run and rank r takes the r-th contiguous slice of them (whole groups); the losses are
    normalised by the global counts, so the DDP-averaged gradient is the global-batch gradient. Metrics are reduced
    over ranks once per step; rank 0 alone evaluates, logs and writes files.

    ``parallel=fsdp2`` shards the model over the processes instead (``parallel.shard_model``); the batch split and the
    losses are the same. As every forward then all-gathers, every rank runs every forward: generation decodes a fixed
    number of steps, DAPO refill rounds continue while any rank needs them, evaluation runs on all ranks (rank 0
    keeps the result) and saving gathers the full weights and optimizer state on all ranks (rank 0 writes them).
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    refuse_accelerate_fsdp(accelerator)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(
            f"rollout.prompts_per_step: the global number of prompts per step ({cfg.rollout.prompts_per_step}) must "
            f"be divisible by the number of processes ({world}); each process rolls out whole groups"
        )
    by_rank = (rank,) if rank else ()  # rank 0 keeps the 1-process seed streams
    sharded = cfg.parallel == "fsdp2" and world > 1  # one process has nothing to shard
    resume_from = find_resume_checkpoint(cfg) if cfg.resume is not None else None
    if resume_from is None and complete_checkpoints(out):
        raise ConfigError(
            f"output_dir: {str(out)!r} holds checkpoints of an earlier run; continue it with "
            f"--config {out}/config.yaml --resume {out}, or choose another output_dir"
        )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(dataclasses.replace(cfg, resume=None), out / "config.yaml")  # describes the run, not this launch
    logger = MetricsLogger(out / "metrics.jsonl", enabled=is_main)
    t_start = time.perf_counter()

    model, tokenizer = model_and_tokenizer(cfg.model, cfg.seed)
    if resume_from is not None:
        load_weights(model, resume_from / "model", cfg.model)  # the warm-up is already in these weights
    model.to(accelerator.device)
    sites = find_routers(model)  # fails early, naming the family, if the model has no MoE layers (or adapters)
    k_max = max((s.top_k for s in sites), default=0)  # no sites: the plain-LoRA baseline, which declares no router
    sigmoid = sorted({s.family.router_class for s in sites if s.family.scoring != "softmax"})
    if sigmoid and (cfg.rspo.enabled or cfg.loss.gate_coef > 0):
        raise ValueError(
            f"RSPO's router shift and Gate-GRPO read router log-probabilities, but {sigmoid} score experts with a "
            "sigmoid (not a softmax); set rspo.enabled=false and loss.gate_coef=0 for this family until it is handled"
        )
    if cfg.loss.gate_coef > 0 and cfg.routing.policy == "noisy_topk":
        raise ValueError(
            "loss.gate_coef > 0 needs a routing policy with a closed-form set probability; noisy_topk has none. "
            "Use routing.policy=multinomial, or set loss.gate_coef=0 for a noise-exploration ablation."
        )
    if cfg.routing.set_logprob == "unordered" and k_max > MAX_UNORDERED_K:
        raise ConfigError(
            f"routing.set_logprob: unordered sums the K! orders of each expert set; K={k_max} is too many (at most "
            f"{MAX_UNORDERED_K}), use plackett_luce"
        )
    task = task_from_config(cfg.task)
    if sharded:
        check_shardable(model, tokenizer)
    if task.multimodal and not is_processor(tokenizer):
        raise ConfigError(
            f"task.name: {task.name!r} shows images or video, but {type(model).__name__} is a text model; use a "
            "vision-language MoE model (model.family=qwen3_vl_moe, or model.path to a Qwen3-VL-MoE checkpoint)"
        )
    if cfg.guidance.enabled and cfg.guidance.groups == "modality" and not task.multimodal:
        raise ConfigError(
            f"guidance.groups: modality groups are vision vs text tokens, but task {task.name!r} has no images or "
            "video; use guidance.groups=prompt_completion, or a multimodal task (task.name=mm:<name>) on a VLM"
        )
    token_loss = get_loss(cfg.loss.name, **cfg.loss.kwargs)  # misspelled kwargs fail here, not at step 500
    policy = make_policy(cfg.routing.policy, noise_std=cfg.routing.noise_std)
    labels = site_labels(sites)
    rr = cfg.routing_reward
    rewarder = None
    if rr.kind != "none":
        rewarder = RoutingRewarder(
            kind=rr.kind,
            shuffled=rr.shuffled,
            w_route=rr.w_route,
            lambda_h_start=rr.lambda_h_start,
            lambda_b_end=rr.lambda_b_end,
            steepness=rr.steepness,
            center=rr.center,
            bonus=rr.bonus,
            history=rr.history,
            window=rr.window,
            ema_decay=rr.ema_decay,
            pool=rr.pool,
        )
    guide = None
    n_params = sum(p.numel() for p in model.parameters())
    routers = f"{len(sites)} routers, E={sites[0].num_experts}, K={k_max}" if sites else "no router"
    accelerator.print(
        f"expertrl train: {type(model).__name__} ({n_params / 1e6:.2f}M params, {routers}), task {task.name} "
        f"({len(task.train)} train / {len(task.eval)} held-out), routing {cfg.routing.policy}, loss {cfg.loss.name} "
        f"+ {cfg.loss.gate_coef} x gate" + (f", {world} processes" if world > 1 else "")
    )
    if adapter_settings(model) is not None:
        accelerator.print(f"  {describe_trainable(model)}")

    def main_eval(m) -> dict | None:
        """Held-out evaluation (greedy) on rank 0; the other ranks wait for it. A sharded model all-gathers in every
        forward, so there every rank evaluates the same prompts in step, and rank 0 keeps the result."""
        result = None
        if is_main or is_sharded(m):
            with torch.no_grad():
                result = evaluate(m, tokenizer, task.eval, task.score, max_new_tokens=cfg.rollout.max_new_tokens)
        accelerator.wait_for_everyone()
        return result if is_main else None

    summary: dict = {"output_dir": str(out)}
    state = load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        summary |= state["summary"]
        if is_main:
            truncate_metrics(out / "metrics.jsonl", state["step"])
            remove_partial_checkpoints(out)
        accelerator.print(f"resuming from {resume_from} ({state['step']} of {cfg.steps} RL steps done)")
    else:
        if cfg.sft.steps > 0:  # every rank warms up its own copy; DDP then broadcasts rank 0's weights
            before = main_eval(model)
            if before is not None:
                summary["accuracy_init"] = before["accuracy"]
            sft_log = MetricsLogger(out / "sft_metrics.jsonl", enabled=is_main)
            supervised_train(
                model,
                tokenizer,
                task.train,
                cfg.sft,
                seed=cfg.seed,
                progress=cfg.progress and is_main,
                log=lambda m, s: sft_log.log(m, s),
            )
        start_eval = main_eval(model)
        if start_eval is not None:
            logger.log({"eval/accuracy": start_eval["accuracy"]}, step=-1)
            summary["accuracy_start"] = start_eval["accuracy"]
            print(f"held-out accuracy before RL: {start_eval['accuracy']:.3f} ({start_eval['n']} prompts)")

    if sharded:  # every rank shards its own copy: start from rank 0's, as DDP does
        broadcast_weights(model)
    if cfg.routing.freeze_router:
        for site in sites:
            site.weight.requires_grad_(False)
    ref_model = None
    if cfg.loss.kl_coef > 0:  # frozen copy of the RL start model (after the warm-up)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if resume_from is not None:
            load_weights(ref_model, resume_from / "reference", cfg.model)
    guidance_state = None
    if cfg.guidance.enabled:
        if state is not None and state.get("guidance") is not None:
            guidance_state = GuidanceState.from_state_dict(state["guidance"])
        else:
            guidance_state = calibrate_guidance(accelerator.unwrap_model(model), tokenizer, task, cfg, step=-1)
        guide = make_guide(guidance_state, cfg, accelerator.unwrap_model(model))
        if is_main:
            guidance_state.save(out / "guidance.json")
    if sharded:  # the reference model stays a full, unsharded copy on every rank (no collectives in its forwards)
        shard_model(model)  # before the optimizer, which then holds the sharded parameters
    total_opt_steps = cfg.steps * cfg.inner_updates
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(trainable, cfg.optim, total_opt_steps)
    start_step, skipped, elapsed_before = 0, 0, 0.0
    if state is not None:
        if sharded:
            load_full_optimizer_state(model, optimizer, load_optimizer_state(resume_from))
        else:
            optimizer.load_state_dict(load_optimizer_state(resume_from))
        schedule.load_state_dict(state["scheduler"])
        start_step, skipped, elapsed_before = state["step"], state["skipped_steps"], state["wall_time_s"]
        set_rng_state(state["rng"])  # every per-step seed is derived, so this only covers what we missed
        if rewarder is not None and state.get("routing_reward") is not None:
            rewarder.load_state_dict(state["routing_reward"])  # RO-GRPO's Relative history
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    if not hasattr(model, "config"):  # a DDP wrapper: routing hooks find the routers through model.config
        model.config = accelerator.unwrap_model(model).config
    model.eval()  # no dropout/jitter: rollout, old log-probs and updates share one deterministic forward

    def save(step_done: int) -> Path | None:
        """Write the checkpoint after ``step_done`` steps (rank 0). Sharded: every rank calls it to gather the full
        state, and the others return None."""
        model_state = optimizer_state = None
        if sharded:
            model_state, optimizer_state = gather_full_state(model, optimizer)
            if not is_main:
                return None
        trainer_state = {
            "step": step_done,
            "scheduler": schedule.state_dict(),
            "summary": summary,
            "skipped_steps": skipped,
            "wall_time_s": elapsed_before + time.perf_counter() - t_start,
            "routing_reward": rewarder.state_dict() if rewarder is not None else None,
            "guidance": guide.state.state_dict() if guide is not None else None,
        }
        path = save_checkpoint(
            checkpoint_path(out, step_done),
            model=accelerator.unwrap_model(model),
            tokenizer=tokenizer,
            optimizer=optimizer,
            trainer_state=trainer_state,
            config=dataclasses.replace(cfg, resume=None),
            reference=ref_model,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        prune_checkpoints(out, cfg.keep_checkpoints)
        return path

    def any_rank(flag: bool) -> bool:
        """``flag`` on this rank, or, sharded (where every rank must run the same rollouts), on any rank."""
        if not sharded:
            return flag
        return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0

    bad_in_row = 0
    bar = tqdm(
        range(start_step, cfg.steps),
        initial=start_step,
        total=cfg.steps,
        desc="rl",
        disable=not (cfg.progress and is_main),
    )
    with stop_requests() as stop:
        for step in bar:
            t0 = time.perf_counter()
            refresh = cfg.guidance.refresh_every
            if guide is not None and refresh and step > 0 and step % refresh == 0:  # recount on the current policy
                unwrapped = accelerator.unwrap_model(model)
                guide = make_guide(calibrate_guidance(unwrapped, tokenizer, task, cfg, step=step), cfg, unwrapped)
                if is_main:
                    guide.state.save(out / "guidance.json")
            collect = functools.partial(  # this step's prompts for this rank, scored; round > 0 refills
                scored_rollout, accelerator.unwrap_model(model), tokenizer, task, cfg, policy, ref_model,
                step=step, rank=rank, world=world, rewarder=rewarder, guide=guide,
            )  # fmt: skip
            rollout, adv_metrics = collect(round_=0)
            metrics = (
                {
                    "reward": rollout.rewards.mean(),
                    "reward_std": rollout.rewards.std(unbiased=False),
                    "reward_group_std": adv_metrics["reward_std"],
                    "frac_reward_zero_std": adv_metrics["frac_reward_zero_std"],
                    "completions/mean_length": rollout.mask.sum(-1).mean(),
                    "moe/trace_bytes": float(rollout.routing.nbytes()),
                }
                | routing_usage(rollout, labels)
                | {k: v for k, v in adv_metrics.items() if "/" in k and v.dim() == 0}
            )
            for key in ("moe/utilisation", "moe/load_mse_norm_per_module"):  # per-router rows: one key per router
                if key in adv_metrics:
                    metrics |= {f"{key}/{lab}": row for lab, row in zip(labels, adv_metrics[key])}
            full = rollout
            if cfg.rollout.dynamic_sampling:  # DAPO: drop groups whose rewards are all equal, refill with new ones
                target = full.batch_size
                rollout = informative_groups(rollout)
                rounds = 0
                while rounds < cfg.rollout.max_refill_rounds and any_rank(rollout.batch_size < target):
                    rounds += 1
                    more, _ = collect(round_=rounds)  # sharded: a full rank generates too, in step, and drops it
                    if rollout.batch_size < target:
                        pad = text_tokenizer(tokenizer).pad_token_id
                        rollout = concat_rollouts([rollout, informative_groups(more)], pad)
                rollout = rollout.index_batch(torch.arange(min(rollout.batch_size, target)))
                metrics["dynamic_sampling/refill_rounds"] = float(rounds)
                metrics["dynamic_sampling/batch_fill"] = rollout.batch_size / target
            t_rollout = time.perf_counter() - t0
            t_update = time.perf_counter()
            B = rollout.batch_size
            # Loss denominators: the whole step's counts (over all ranks), divided by the world size because DDP
            # averages the per-rank gradients. One small gather per step under DDP.
            P = rollout.prompt_width
            n_gate = rollout.mask.sum() + rollout.attention_mask[:, : P - 1].sum()  # gate_tokens=all covers prompts
            counts = torch.stack([torch.tensor(float(B), device=n_gate.device), rollout.mask.sum(), n_gate.float()])
            if world > 1:
                per_rank_counts = accelerator.gather(counts.double()[None])  # (world, 3)
                B_max = int(per_rank_counts[:, 0].max())
                B_all, n_tok_all, n_gate_all = (per_rank_counts.sum(0) / world).tolist()
            else:
                B_max, B_all, n_tok_all, n_gate_all = B, B, counts[1], counts[2]
            dens = dict(num_seqs=B_all, num_tokens=n_tok_all, num_gate_tokens=n_gate_all)
            # DDP needs the same number of backward passes on every rank: a rank that dynamic sampling left with
            # fewer micro-batches pads with zero-weight passes over its unfiltered rollout.
            n_pad = math.ceil(B_max / cfg.micro_batch_size) - math.ceil(B / cfg.micro_batch_size)
            pad_idx = torch.arange(min(cfg.micro_batch_size, full.batch_size))
            step_metrics = []
            grad_norms = []
            bad = False
            for inner in range(cfg.inner_updates if B_max > 0 else 0):
                seed = derive_seed(cfg.seed, step, 3, inner, *by_rank)
                order = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
                optimizer.zero_grad(set_to_none=True)
                losses, pass_metrics = [], []
                passes = [(rollout, idx, 1.0) for idx in order.split(cfg.micro_batch_size)]
                for src, micro_idx, weight in passes + [(full, pad_idx, 0.0)] * n_pad:
                    micro = src.index_batch(micro_idx.to(src.input_ids.device))
                    loss, micro_metrics = loss_on_microbatch(
                        model, micro, cfg, token_loss, **dens, first_update=inner == 0
                    )
                    accelerator.backward(loss * weight if weight != 1.0 else loss)
                    if weight:
                        losses.append(loss.detach())
                        pass_metrics.append(micro_metrics)
                grad_norm = clip_grad(model, cfg.optim.grad_clip).detach()  # of the rank-averaged gradient
                if sharded:
                    grad_norm = grad_norm.full_tensor()  # a DTensor over the shards' norms
                # One sync per update, the price of skipping a NaN/Inf update before it reaches the weights.
                nonfinite = (~torch.isfinite(sum(losses, torch.zeros((), device=grad_norm.device)) + grad_norm)).float()
                if world > 1:  # every rank skips, or none does
                    nonfinite = accelerator.reduce(nonfinite, reduction="sum")
                if nonfinite.item() > 0:
                    optimizer.zero_grad(set_to_none=True)
                    bad = True
                    break
                step_metrics += pass_metrics
                grad_norms.append(grad_norm)
                optimizer.step()
                schedule.step()
            t_end = time.perf_counter()
            bad_in_row = bad_in_row + 1 if bad else 0
            if bad:
                skipped += 1
                (tqdm.write if is_main else lambda _: None)(
                    f"step {step}: NaN/Inf loss or gradient norm, update skipped "
                    f"({bad_in_row} in a row; the run stops at max_bad_steps={cfg.max_bad_steps})"
                )
            n_tokens = rollout.mask.sum()
            if step_metrics:  # empty when dynamic sampling dropped every group, or the first update was skipped
                metrics |= mean_metrics(step_metrics) | {"grad_norm": torch.stack(grad_norms).mean()}
            metrics |= {
                "lr": schedule.get_last_lr()[0],
                "num_tokens": n_tokens,
                "faults/skipped_steps": skipped,
                "time/step": t_end - t0,
                "time/rollout": t_rollout,
                "time/update": t_end - t_update,
                "tokens_per_s": n_tokens / (t_end - t0),
            }
            metrics = {k: to_number(v) for k, v in metrics.items()}
            signal = stop["signal"]
            if world > 1:  # one gather per step: the metrics, and whether any rank was asked to stop
                gathered = gather_object([(metrics, signal)])
                metrics = reduce_across_ranks([m for m, _ in gathered])
                signal = next((s for _, s in gathered if s), None)
            do_eval = cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps
            if do_eval:
                result = main_eval(accelerator.unwrap_model(model))
                metrics["eval/accuracy"] = result["accuracy"] if result is not None else float("nan")
            record = logger.log(metrics, step)
            bar.set_postfix(
                reward=f"{record['reward']:.2f}",
                gate_clip=f"{record.get('loss/gate_clip_frac', 0.0):.2f}",
                **({"eval": f"{record['eval/accuracy']:.2f}"} if do_eval else {}),
            )
            if bad_in_row >= cfg.max_bad_steps:
                last = latest_checkpoint(out)
                where = (
                    f"The last good checkpoint {last} is intact; fix the cause (e.g. lower optim.lr), then continue "
                    f"with --config {out}/config.yaml --resume {out}"
                    if last is not None
                    else "No checkpoint had been written yet (save_every=0 or before the first save)"
                )
                raise RuntimeError(
                    f"step {step}: {bad_in_row} steps in a row had a NaN/Inf loss or gradient norm "
                    f"(max_bad_steps={cfg.max_bad_steps}); stopping without writing a checkpoint. {where}."
                )
            last_step = step + 1 == cfg.steps
            periodic = cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or last_step)
            saved = None
            if (periodic or signal) and bad_in_row == 0 and (is_main or sharded):  # never save a state that just failed
                saved = save(step + 1)
            if signal and not last_step:
                bar.close()
                note = (
                    f"checkpoint {saved}"
                    if saved is not None
                    else f"no new checkpoint; latest {latest_checkpoint(out)}"
                )
                accelerator.print(
                    f"{signal}: stopped after {step + 1} of {cfg.steps} RL steps ({note}). Resume with:\n"
                    f"  expertrl train --config {out}/config.yaml --resume {out}"
                )
                accelerator.wait_for_everyone()
                return summary | {"interrupted": signal, "steps_done": step + 1}

    unwrapped = accelerator.unwrap_model(model)
    final_eval = main_eval(unwrapped)
    final_weights = gather_full_state(model)[0] if sharded else None  # collective
    summary["skipped_steps"] = skipped
    summary["wall_time_s"] = round(elapsed_before + time.perf_counter() - t_start, 1)
    if is_main:
        logger.log({"eval/accuracy": final_eval["accuracy"]}, step=cfg.steps)
        summary["accuracy_end"] = final_eval["accuracy"]
        summary["per_category_end"] = final_eval["per_category"]
        summary["examples_end"] = final_eval["examples"]
        summary["model"] = str(save_model(unwrapped, tokenizer, out / "final", state_dict=final_weights))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    accelerator.wait_for_everyone()  # rank 0 has written the final model
    return summary


def print_summary(s: dict) -> None:
    print("\n=== expertrl train: summary ===")
    if "accuracy_init" in s:
        print(f"held-out accuracy, random init      : {s['accuracy_init']:.3f}")
    print(f"held-out accuracy, start of RL       : {s['accuracy_start']:.3f}")
    print(f"held-out accuracy, end of RL         : {s['accuracy_end']:.3f}")
    print(f"wall time                           : {s['wall_time_s']:.0f} s")
    for prompt, completion in s.get("examples_end", []):
        print(f"  {prompt!r} -> {completion!r}")
    print(f"final model (Hugging Face format)   : {s.get('model')}")
    print(f"metrics                             : {s['output_dir']}/metrics.jsonl")


__all__ = ["train", "to_number"]
