"""What a run does before its first RL step, after ``run.build_run``: ``start(run, stop)``.

A new run (or one resumed inside its warm-up): the supervised warm-up (resumable: it checkpoints every
``sft.save_every`` steps and on Ctrl-C/SIGTERM) and the held-out evaluation before and after it. A resumed run: its
restored state. Then, for every run: the frozen KL reference, router guidance (``calibrate``, ``make_guide``; also
recounted by ``train.refresh_guidance``), the vLLM engine, FSDP2 sharding, the optimiser and schedule (restored on
resume) and DDP wrapping.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

from expertrl.checkpoint import (
    load_optimizer_state,
    load_weights,
    save_sft_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from expertrl.config import ConfigError
from expertrl.decoding import is_processor
from expertrl.engines.vllm import VllmEngine
from expertrl.logging import MetricsLogger
from expertrl.moe.guidance import GuidanceState
from expertrl.moe.guide import Guide, calibrate_guide
from expertrl.moe.policies import TopK
from expertrl.parallel import broadcast_weights, load_full_optimizer_state, shard_model
from expertrl.rollout import generate_rollout
from expertrl.run import Run
from expertrl.runtime import derive_seed, optimizer_and_schedule
from expertrl.sft import supervised_train
from expertrl.stops import failures_stop_the_run, resume_command, saving_stops
from expertrl.tasks import sample_items
from expertrl.vlm import vision_token_ids


def start(run: Run, stop: dict) -> bool:
    """What a run does before its first RL step, after ``build_run``: the supervised warm-up of a new run (resumable:
    it checkpoints every ``sft.save_every`` steps and on Ctrl-C/SIGTERM) and the start evaluation, or the restored
    state of a resumed run; then the frozen KL reference, router guidance and the optimiser, and DDP/FSDP2 wrapping.

    Returns:
        False when a stop request ended the warm-up (a checkpoint was written), True when RL can start.
    """
    cfg, out, model, state, resume_from = run.cfg, run.out, run.policy_model, run.resume_state, run.resume_from
    if state is None or state.get("phase") == "sft":
        if not _warm_up(run, stop):
            return False
        state = resume_from = None  # RL starts from step 0 on the warmed-up weights
    else:
        run.summary |= state["summary"] | {"output_dir": str(out)}  # a moved run names its new place
        if run.is_main:
            truncate_metrics(out / "metrics.jsonl", state["step"])  # the checkpoints were tidied by build_run
        run.accelerator.print(f"resuming from {resume_from} ({state['step']} of {cfg.steps} RL steps done)")
    if run.sharded:  # every rank shards its own copy: start from rank 0's, as DDP does
        broadcast_weights(model)
    if cfg.routing.freeze_router:
        for site in run.sites:
            site.weight.requires_grad_(False)
    if cfg.loss.kl_coef > 0:  # frozen copy of the RL start model (after the warm-up); a full copy per rank
        run.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if resume_from is not None:
            load_weights(run.ref_model, resume_from / "reference", cfg.model)
    if cfg.guidance.enabled:
        saved = None if state is None else state.get("guidance")
        run.guide = make_guide(run, GuidanceState.from_state_dict(saved) if saved else calibrate(run, step=-1))
    if cfg.rollout.engine == "vllm":
        run.engine = start_engine(run)
    if run.sharded:
        shard_model(model)  # before the optimizer, which then holds the sharded parameters
    _optimizer(run, state, resume_from)
    return True


def start_engine(run: Run) -> VllmEngine:
    """The vLLM rollout engine on the policy's current weights (after the warm-up or the resumed checkpoint)."""
    cfg = run.cfg
    try:
        return VllmEngine.start(
            run.policy_model, run.tokenizer, workdir=run.out / "engine", seed=cfg.seed,
            max_model_len=cfg.rollout.engine_max_len, kv_cache_mb=cfg.rollout.engine_kv_cache_mb,
        )  # fmt: skip
    except ValueError as err:  # what the engine cannot run, found once it is built: one line
        raise ConfigError(str(err)) from None


def _warm_up(run: Run, stop: dict) -> bool:
    """A new run (or one resumed inside its warm-up): the supervised warm-up (every rank warms up its own copy; DDP
    then broadcasts rank 0's weights), and the held-out accuracy before it and before RL. False when a stop request
    ended the warm-up after writing a checkpoint."""
    cfg, state = run.cfg, run.resume_state
    if cfg.sft.steps > 0:
        sft_log = MetricsLogger(run.out / "sft_metrics.jsonl", enabled=run.is_main)
        start_step, resume = 0, None
        if state is None:
            before = run.evaluate()
            if before is not None:
                run.summary["accuracy_init"] = before["accuracy"]
        else:  # resumed inside the warm-up: its weights are loaded, restore the optimiser and continue
            start_step, run.summary = state["step"], state["summary"] | {"output_dir": str(run.out)}
            resume = {"optimizer": load_optimizer_state(run.resume_from), "scheduler": state["scheduler"]}
            set_rng_state(state["rng"])
            if run.is_main:
                truncate_metrics(run.out / "sft_metrics.jsonl", start_step)
            run.accelerator.print(
                f"resuming the warm-up from {run.resume_from} ({start_step} of {cfg.sft.steps} steps)"
            )

        command = resume_command("train", run.out)

        def checkpoint(steps_done: int, optimizer, schedule) -> None:
            if run.is_main:
                with saving_stops(run.out, f"the warm-up checkpoint after step {steps_done}", command):
                    save_sft_checkpoint(run.out, steps_done, run.policy_model, run.tokenizer, optimizer, schedule,
                                        dataclasses.replace(cfg, resume=None, overwrite=False), run.summary,
                                        keep=cfg.keep_checkpoints)  # fmt: skip

        with failures_stop_the_run(run.out, lambda: "the warm-up", command):
            outcome = supervised_train(
                run.policy_model, run.tokenizer, run.task.train, cfg.sft, seed=cfg.seed,
                progress=cfg.progress and run.is_main, log=lambda m, s: sft_log.log(m, s), start_step=start_step,
                resume=resume, checkpoint=checkpoint, stop=stop,
            )  # fmt: skip
        if outcome.interrupted:
            run.accelerator.print(
                f"{outcome.interrupted}: stopped the warm-up (checkpoint written). Resume with:\n  {command}"
            )
            run.summary |= {"interrupted": outcome.interrupted}
            return False
    start = run.evaluate()
    if start is not None:
        run.logger.log({"eval/accuracy": start["accuracy"]}, step=-1)
        run.summary["accuracy_start"] = start["accuracy"]
        print(f"held-out accuracy before RL: {start['accuracy']:.3f} ({start['n']} prompts)")
    return True


def _optimizer(run: Run, state: dict | None, resume_from: Path | None) -> None:
    """AdamW + schedule over the trainable parameters (restored on resume), then DDP wrapping."""
    cfg, model = run.cfg, run.policy_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.optimizer, run.schedule = optimizer_and_schedule(
        trainable, cfg.optim, cfg.steps * cfg.inner_updates, fused=not run.sharded
    )
    if state is not None:
        saved = load_optimizer_state(resume_from)
        if run.sharded:
            load_full_optimizer_state(model, run.optimizer, saved)
        else:
            run.optimizer.load_state_dict(saved)
        run.schedule.load_state_dict(state["scheduler"])
        run.start_step, run.skipped, run.elapsed_before = state["step"], state["skipped_steps"], state["wall_time_s"]
        run.bad_in_row, run.collapsed_in_row = state.get("bad_in_row", 0), state.get("collapsed_in_row", 0)
        healthy = state.get("healthy_checkpoint", resume_from.name)  # the streak's start, if it was inside one
        run.healthy_checkpoint = resume_from.with_name(healthy) if healthy is not None else None
        set_rng_state(state["rng"])  # every per-step seed is derived, so this only covers what we missed
        if run.rewarder is not None and state.get("routing_reward") is not None:
            run.rewarder.load_state_dict(state["routing_reward"])  # RO-GRPO's Relative history
    if not run.sharded:
        run.model, run.optimizer = run.accelerator.prepare(model, run.optimizer)
    if not hasattr(run.model, "config"):  # a DDP wrapper: routing hooks find the routers through model.config
        run.model.config = model.config
    run.model.eval()  # no dropout/jitter: rollout and updates share one deterministic forward


def calibrate(run: Run, step: int) -> GuidanceState:
    """Router guidance counts on the current policy: deterministic top-K routes of ``guidance.calibration_batches``
    batches of training prompts, labelled by the guide's token groups (MoE-GRPO Eq. 7). Prompts derive from
    (seed, step), so every rank and a resumed run count the same (step -1 = before RL)."""
    cfg = run.cfg
    rng = random.Random(derive_seed(cfg.seed, step + 1, 5))
    rollouts = [
        generate_rollout(
            run.policy_model,
            run.tokenizer,
            sample_items(run.task.train, cfg.rollout.prompts_per_step, rng),
            group_size=1,
            max_new_tokens=cfg.rollout.max_new_tokens,
            policy=TopK(),
            old_routing=None,
            routes="experts",
        )  # fmt: skip
        for _ in range(cfg.guidance.calibration_batches)
    ]
    return calibrate_guide(
        run.policy_model, rollouts, groups=cfg.guidance.groups, percent=cfg.guidance.percent, vision_ids=_vision(run)
    )


def make_guide(run: Run, state: GuidanceState) -> Guide:
    """The rollouts' ``Guide`` for ``state`` (saved as ``guidance.json``)."""
    if run.is_main:
        state.save(run.out / "guidance.json")
    g = run.cfg.guidance
    return Guide.for_groups(state, groups=g.groups, vision_ids=_vision(run), in_loss=g.in_loss)


def _vision(run: Run) -> frozenset[int]:
    """The vision placeholder ids of a VLM (modality guidance labels them), none for a text model."""
    return frozenset(vision_token_ids(run.policy_model)) if is_processor(run.tokenizer) else frozenset()


__all__ = ["calibrate", "make_guide", "start", "start_engine"]
