"""Everything one ``expertrl train`` run is made of, built in one place: ``build_run(cfg) -> Run``.

``build_run`` makes every object from the config (model, tokenizer, task with its prompts rendered, routing policy,
sampling distributions, objective, routing rewarder, experiment trackers), runs every start-up check that needs the
model and reads a resumed run's state; ``start.start`` then runs what comes before the first RL step (warm-up,
guidance, reference, engine, optimiser, DDP/FSDP2). What is left is the loop of ``train.py``:
``collect -> update -> record``.

Several processes (``torchrun`` / ``accelerate launch``): each rank draws the same global prompts as a 1-process run
and rolls out its own contiguous slice of them (whole groups); losses are normalised by global counts; rank 0 alone
evaluates, logs and writes files. ``parallel=fsdp2`` shards the model instead (``parallel.shard_model``), so every
rank runs every forward: generation decodes a fixed number of steps, evaluation runs on all ranks (rank 0 keeps the
result) and saving gathers the full state on all ranks (rank 0 writes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from expertrl.checkpoint import (
    checkpoint_path,
    find_resume_checkpoint,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    set_aside_newer,
)
from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import save_yaml, to_dict
from expertrl.decoding import is_processor
from expertrl.engines.vllm import VllmEngine, import_vllm
from expertrl.engines.vllm import check_model as check_engine_model
from expertrl.evaluate import evaluate
from expertrl.logging import MetricsLogger, quiet_hf_progress
from expertrl.losses import get_loss
from expertrl.moe.adapters import RouterSite, find_routers, site_labels
from expertrl.moe.guidance import num_deactivated
from expertrl.moe.guide import Guide
from expertrl.moe.lora_moe import adapter_settings, describe_trainable
from expertrl.moe.policies import make_policy
from expertrl.moe.setprob import MAX_UNORDERED_K
from expertrl.objective import Objective
from expertrl.parallel import (
    check_shardable,
    gather_full_state,
    is_sharded,
    refuse_accelerate_fsdp,
)
from expertrl.policy import output_head
from expertrl.rewards import get_reward
from expertrl.rewards.routing import RoutingRewarder
from expertrl.rundir import RunDir, claim_run_dir
from expertrl.runtime import (
    check_answer_lengths,
    model_and_tokenizer,
    place_model,
    seed_everything,
    task_from_config,
)
from expertrl.tasks import Task
from expertrl.trackers import check_installed, make_trackers
from expertrl.types import Sampling


@dataclass
class Run:
    """The objects and the mutable state of one training run (see the module docstring)."""

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    model: nn.Module  # the model the optimiser steps (a DDP wrapper, or FSDP2-sharded)
    policy_model: nn.Module  # the same model unwrapped: rollouts, evaluation, saving
    tokenizer: object
    task: Task
    sites: list[RouterSite]
    policy: object
    sampling: Sampling
    objective: Objective
    logger: MetricsLogger
    rewarder: RoutingRewarder | None = None
    guide: Guide | None = None
    ref_model: nn.Module | None = None
    engine: VllmEngine | None = None  # rollout.engine=vllm; None = transformers' generate (rollout.generate_rollout)
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    summary: dict = field(default_factory=dict)
    rundir: RunDir | None = None  # the claimed output directory (rank 0): its lock lasts as long as the run
    resume_from: Path | None = None  # the checkpoint a resumed run continues from (validated whole)
    resume_state: dict | None = None  # its trainer_state.json
    start_step: int = 0
    skipped: int = 0
    bad_in_row: int = 0  # NaN/Inf steps in a row
    collapsed_in_row: int = 0  # steps in a row whose policy showed collapse (train.collapse)
    healthy_checkpoint: Path | None = None  # the last checkpoint saved outside a collapse streak
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return next(self.policy_model.parameters()).device

    @property
    def sharded(self) -> bool:
        return self.cfg.parallel == "fsdp2" and self.world > 1  # one process has nothing to shard

    @property
    def labels(self) -> list[str]:
        return site_labels(self.sites)

    @contextlib.contextmanager
    def claimed(self):
        """Hold the output directory's lock for the block (the run); released at the end, also on error."""
        try:
            yield self
        finally:
            if self.rundir is not None:
                self.rundir.release()

    def any_rank(self, flag: bool) -> bool:
        """``flag`` on this rank, or, sharded (where every rank must run the same rollouts), on any rank."""
        if not self.sharded:
            return flag
        total = self.accelerator.reduce(torch.tensor(float(flag), device=self.accelerator.device), reduction="sum")
        return total.item() > 0

    def evaluate(self) -> dict | None:
        """Held-out evaluation (greedy, top-K routing) on rank 0; the other ranks wait. A sharded model all-gathers in
        every forward, so there every rank evaluates in step, and rank 0 keeps the result."""
        result = None
        if self.is_main or is_sharded(self.policy_model):
            with torch.no_grad():
                result = evaluate(
                    self.policy_model, self.tokenizer, self.task.eval, self.task.score,
                    max_new_tokens=self.cfg.rollout.max_new_tokens,
                )  # fmt: skip
        self.accelerator.wait_for_everyone()
        return result if self.is_main else None

    def close(self) -> None:
        """Shut the rollout engine down (a new one can start in this process afterwards)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def save(self, step_done: int) -> Path | None:
        """Write the checkpoint after ``step_done`` steps (rank 0). Sharded: every rank calls it to gather the full
        state, and the others return None."""
        model_state = optimizer_state = None
        if self.sharded:
            model_state, optimizer_state = gather_full_state(self.model, self.optimizer)
            if not self.is_main:
                return None
        path = checkpoint_path(self.out, step_done)
        healthy = path if self.collapsed_in_row == 0 else self.healthy_checkpoint  # what a collapse stop points to
        trainer_state = {
            "phase": "rl",
            "step": step_done,
            "scheduler": self.schedule.state_dict(),
            "summary": self.summary,
            "skipped_steps": self.skipped,
            "bad_in_row": self.bad_in_row,  # a run resumed inside a NaN or collapse streak goes on counting it
            "collapsed_in_row": self.collapsed_in_row,
            "healthy_checkpoint": healthy.name if healthy is not None else None,
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.t_start,
            "routing_reward": self.rewarder.state_dict() if self.rewarder is not None else None,
            "guidance": self.guide.state.state_dict() if self.guide is not None else None,
        }
        save_checkpoint(
            path,
            model=self.policy_model, tokenizer=self.tokenizer, optimizer=self.optimizer, trainer_state=trainer_state,
            config=dataclasses.replace(self.cfg, resume=None, overwrite=False), reference=self.ref_model,
            model_state=model_state, optimizer_state=optimizer_state,
        )  # fmt: skip
        prune_checkpoints(self.out, self.cfg.keep_checkpoints, protect=healthy)
        return path


def sampling_of(cfg: TrainConfig) -> Sampling:
    """The distributions rollouts sample from (and every forward that scores them uses)."""
    return Sampling(
        do_sample=cfg.rollout.do_sample,
        token_temperature=cfg.rollout.temperature if cfg.rollout.do_sample else 1.0,
        routing_temperature=cfg.routing.temperature,
        set_logprob=cfg.routing.set_logprob,
    )


def objective_for(cfg: TrainConfig, sites: list[RouterSite] = (), processes: int = 1) -> Objective:
    """The RL objective ``cfg`` describes, bound once (misspelled loss kwargs fail here, not at step 500). Prompts are
    shared in one process only (a DDP wrapper expects one forward per backward)."""
    lc, rs = cfg.loss, cfg.rspo
    return Objective(
        token_loss=get_loss(lc.name, **lc.kwargs), agg=lc.agg, replay=cfg.routing.replay,
        norm_const=float(cfg.rollout.max_new_tokens), gate_coef=lc.gate_coef, gate_tokens=lc.gate_tokens,
        rspo=rs.enabled, gamma_min=rs.gamma_min, layer_agg=rs.layer_agg, placement=rs.placement,
        kl_coef=lc.kl_coef, kl_estimator=lc.kl_estimator, lb_coef=lc.lb_coef, z_coef=lc.z_coef,
        soft_dispatch=bool(sites) and all(s.top_k == s.num_experts for s in sites), mismatch=lc.mismatch,
        mismatch_cap=lc.mismatch_cap, icepop_low=lc.icepop_bounds[0], icepop_high=lc.icepop_bounds[1],
        share_prompts=cfg.share_prompts and processes == 1,
    )  # fmt: skip


def check_model(cfg: TrainConfig, sites: list[RouterSite], task: Task, tokenizer) -> None:
    """Start-up checks that need the model and the task (``TrainConfig.check_combination`` has the rest)."""
    sigmoid = sorted({s.family.router_class for s in sites if s.family.scoring != "softmax"})
    if sigmoid and cfg.sigmoid_router_fixes():
        raise ConfigError(
            f"model.path: {sigmoid} score experts with a sigmoid, so only deterministic top-K routing is defined (no "
            "expert sampling, Gate-GRPO or RSPO); add: " + " ".join(cfg.sigmoid_router_fixes())
        )
    k_max = max((s.top_k for s in sites), default=0)
    if cfg.routing.set_logprob == "unordered" and k_max > MAX_UNORDERED_K:
        raise ConfigError(
            f"routing.set_logprob: unordered sums the K! orders of each expert set; K={k_max} is too many (at most "
            f"{MAX_UNORDERED_K}), use plackett_luce"
        )
    if cfg.guidance.enabled and sites:
        E, K = min(s.num_experts for s in sites), max(s.top_k for s in sites)
        off = num_deactivated(cfg.guidance.percent, E)
        if E - off < K:
            raise ConfigError(
                f"guidance.percent: {cfg.guidance.percent:g}% deactivates {off} of E={E} experts, leaving {E - off} < "
                f"K={K} to choose from; use guidance.percent <= {100.0 * (E - K) / E:g}"
            )
    if task.multimodal and not is_processor(tokenizer):
        raise ConfigError(
            f"task.name: {task.name!r} shows images or video, but the model is a text model; use a vision-language "
            "MoE model (model.family=qwen3_vl_moe, or model.path to a Qwen3-VL-MoE checkpoint)"
        )
    if cfg.guidance.enabled and cfg.guidance.groups == "modality" and not task.multimodal:
        raise ConfigError(
            f"guidance.groups: modality groups are vision vs text tokens, but task {task.name!r} has no images or "
            "video; use guidance.groups=prompt_completion, or a multimodal task (task.name=mm:<name>) on a VLM"
        )


def build_run(cfg: TrainConfig) -> Run:
    """Every object of the run, every start-up check and the resume state (module docstring); ``start`` runs the
    warm-up and builds what comes after it."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    refuse_accelerate_fsdp(accelerator)
    seed_everything(cfg.seed)
    if cfg.rollout.prompts_per_step % accelerator.num_processes:
        raise ConfigError(
            f"rollout.prompts_per_step: the global number of prompts per step ({cfg.rollout.prompts_per_step}) must "
            f"be divisible by the number of processes ({accelerator.num_processes}); each process rolls out whole "
            "groups"
        )
    if accelerator.is_main_process:
        check_installed(cfg.report_to)  # a missing tracker stops the run now, before any model is loaded
    check_reward_options(cfg)
    quiet_hf_progress(cfg.progress and accelerator.is_main_process)  # before the weights load: HF's own bars
    out = Path(cfg.output_dir)
    resume_from = find_resume_checkpoint(cfg) if cfg.resume is not None else None
    rundir = None
    if accelerator.is_main_process:  # the directory is this run's: locked, and never an earlier run's
        rundir = claim_run_dir(out, resume=resume_from is not None, overwrite=cfg.overwrite)
    accelerator.wait_for_everyone()
    try:
        return _build(cfg, accelerator, out, resume_from, rundir)
    except BaseException:
        if rundir is not None:
            rundir.release()
        raise


def check_reward_options(cfg: TrainConfig) -> None:
    """Bind every reward to its ``reward_kwargs`` and call it on an empty batch: a misspelled option or a bad value
    stops the run here, naming ``reward_kwargs.<name>``, before any model loads."""
    for name in cfg.reward_funcs:
        try:
            get_reward(name, **cfg.reward_kwargs.get(name, {}))([], [], None)
        except ValueError as e:
            raise ConfigError(f"reward_kwargs.{name}: {e}") from None


def _build(cfg: TrainConfig, accelerator: Accelerator, out: Path, resume_from: Path | None, rundir) -> Run:
    model, tokenizer = model_and_tokenizer(cfg.model, cfg.seed)
    if resume_from is not None:
        load_weights(model, resume_from / "model", cfg.model)  # the warm-up is already in these weights
    place_model(model, accelerator.device)  # a bf16 model on a CPU without bf16 kernels: one warning, the run goes on
    sites = find_routers(model)  # fails early, naming the family, if the model has no MoE layers (or adapters)
    task = task_from_config(cfg.task, tokenizer, model=model, new_tokens=cfg.rollout.max_new_tokens)
    if cfg.sft.steps > 0:  # the warm-up trains on prompt + answer
        check_answer_lengths(task, tokenizer, model)
    check_model(cfg, sites, task, tokenizer)
    try:  # the loss reads token log-probs from the LM head's weight in chunks (ops.linear_token_logp)
        output_head(model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    check_engine(cfg, model, task, accelerator.num_processes)
    state = load_trainer_state(resume_from) if resume_from is not None else None
    if cfg.parallel == "fsdp2" and accelerator.num_processes > 1:
        check_shardable(model, tokenizer)
    trackers = []
    if accelerator.is_main_process:  # every start-up check passed: now the folder changes
        rundir.clear_previous()  # --overwrite: the earlier run goes only now (a run that cannot start keeps it)
        if resume_from is not None:  # partial writes removed; newer, damaged checkpoints set aside (not deleted)
            set_aside_newer(out, resume_from)
        save_yaml(dataclasses.replace(cfg, resume=None, overwrite=False), out / "config.yaml")  # a moved run: new place
        trackers = make_trackers(  # after clear_previous, which would remove their files (runs/, wandb/)
            cfg.report_to, out=out, run_name=cfg.run_name or out.resolve().name, project=cfg.project,
            config=to_dict(dataclasses.replace(cfg, resume=None, overwrite=False)),
            resume_step=state["step"] if state and state.get("phase", "rl") == "rl" else None,
        )  # fmt: skip
    run = Run(
        cfg=cfg, out=out, accelerator=accelerator, model=model, policy_model=model, tokenizer=tokenizer, task=task,
        sites=sites, policy=make_policy(cfg.routing.policy, noise_std=cfg.routing.noise_std),
        sampling=sampling_of(cfg), objective=objective_for(cfg, sites, accelerator.num_processes),
        logger=MetricsLogger(out / "metrics.jsonl", enabled=accelerator.is_main_process, trackers=trackers),
        rewarder=_rewarder(cfg),
        summary={"output_dir": str(out)} | ({"prompts_truncated": task.truncated} if task.truncated else {}),
        rundir=rundir,
    )  # fmt: skip
    _print_header(run)
    run.resume_from = run.healthy_checkpoint = resume_from
    run.resume_state = state
    return run


def check_engine(cfg: TrainConfig, model: nn.Module, task: Task, world: int) -> None:
    """Before any work: one process, a model the vLLM engine can run, vLLM installed, and the longest prompt plus
    ``rollout.max_new_tokens`` within the engine's sequence length (each a one-line error)."""
    if cfg.rollout.engine != "vllm":
        return
    if world > 1:
        raise ConfigError(
            f"rollout.engine: vllm runs one in-process engine; {world} processes would each start one on the same "
            "device (not supported yet); use rollout.engine=hf"
        )
    need = task.longest_prompt + cfg.rollout.max_new_tokens
    if need > cfg.rollout.engine_max_len:
        raise ConfigError(
            f"rollout.engine_max_len: the longest prompt ({task.longest_prompt} tokens) + rollout.max_new_tokens "
            f"({cfg.rollout.max_new_tokens}) = {need} tokens exceed the engine's {cfg.rollout.engine_max_len} per "
            f"sequence; set rollout.engine_max_len >= {need}, or lower rollout.max_new_tokens or task.max_prompt_tokens"
        )
    try:
        check_engine_model(model)
        import_vllm()
    except (ValueError, ImportError) as err:
        raise ConfigError(str(err)) from None


def _rewarder(cfg: TrainConfig) -> RoutingRewarder | None:
    """RO-GRPO's routing rewarder (its keyword arguments are the config section's fields), or None when off."""
    rr = cfg.routing_reward
    return None if rr.kind == "none" else RoutingRewarder(**dataclasses.asdict(rr))


def _print_header(run: Run) -> None:
    cfg, sites, model = run.cfg, run.sites, run.policy_model
    n_params = sum(p.numel() for p in model.parameters())
    routers = (
        f"{len(sites)} routers, E={sites[0].num_experts}, K={max(s.top_k for s in sites)}" if sites else "no router"
    )
    run.accelerator.print(
        f"expertrl train: {type(model).__name__} ({n_params / 1e6:.2f}M params, {routers}), task {run.task.name} "
        f"({len(run.task.train)} train / {len(run.task.eval)} held-out), routing {cfg.routing.policy}, loss "
        f"{cfg.loss.name} + {cfg.loss.gate_coef} x gate" + (f", {run.world} processes" if run.world > 1 else "")
    )
    if adapter_settings(model) is not None:
        run.accelerator.print(f"  {describe_trainable(model)}")


__all__ = ["Run", "build_run", "check_engine", "check_model", "objective_for", "sampling_of"]
