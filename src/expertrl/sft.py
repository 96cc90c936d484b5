"""Supervised fine-tuning on (prompt, answer) pairs, reusing the routing layer.

The MoE-GRPO paper's baselines are SFT configs: Det-FT (``routing=topk``), Stoch-FT-Multi (``multinomial``) and
Stoch-FT-Noise (``noisy_topk``), each with the Switch load-balancing loss on the experts actually used. The same
function is the warm-up stage of ``expertrl train``, so a model that starts from random weights can earn reward.
With a vision-language model (a processor in place of the tokenizer) the items' images or video go in front of the
prompt as the rollout renders them, and the answer tokens follow the prompt (``supervised_mm_batch``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expertrl.checkpoint import (
    find_resume_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    load_weights,
    save_sft_checkpoint,
    set_aside_newer,
    set_rng_state,
    truncate_metrics,
)
from expertrl.config import ConfigError, RunFailed, SFTConfig, SFTJobConfig
from expertrl.configio import save_yaml
from expertrl.decoding import is_processor, text_tokenizer
from expertrl.evaluate import evaluate
from expertrl.logging import MetricsLogger, progress_bar, quiet_hf_progress
from expertrl.losses.routing import routing_aux_loss
from expertrl.mm import VISION_KWARGS
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import route
from expertrl.moe.policies import make_policy
from expertrl.policy import position_ids_from_mask
from expertrl.rundir import RunDir, claim_run_dir
from expertrl.runtime import (
    clip_grad,
    derive_seed,
    model_and_tokenizer,
    optimizer_and_schedule,
    place_model,
    seed_everything,
    task_from_config,
)
from expertrl.stops import failures_stop_the_run, resume_command, save_final_model, saving_stops, stop_requests
from expertrl.tasks import sample_items
from expertrl.vlm import encode_mm_batch


def supervised_batch(tokenizer, items: list[dict], device) -> tuple[Tensor, Tensor, Tensor]:
    """Tokenise ``prompt + answer + EOS`` (left-padded); loss mask on the answer and EOS tokens.

    Returns:
        input_ids (B, S), attention_mask (B, S), loss_mask (B, S-1) aligned with ``logits[:, :-1]``.
    """
    rows, masks = [], []
    for it in items:
        p = tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(it["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
        target[i, width - len(r) :] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), attn.to(device), target[:, 1:].to(device)


def supervised_mm_batch(processor, items: list[dict], device) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """``supervised_batch`` for multimodal items: the rendered prompt (vision placeholders, then the text) followed by
    ``answer + EOS``, left-padded; loss mask on the answer and EOS tokens.

    Returns:
        input_ids (B, S), attention_mask (B, S), loss_mask (B, S-1) aligned with ``logits[:, :-1]``, and the vision
        kwargs of the forward (``mm_token_type_ids`` (B, S), answer tokens and pads are text; pixel values and
        grids as ``vlm.encode_mm_batch`` gives them, rows in the same order).
    """
    enc = encode_mm_batch(processor, items)  # (B, P) left-padded prompts
    tok = processor.tokenizer
    rows, types, masks = [], [], []
    for i, it in enumerate(items):
        real = enc["attention_mask"][i].bool()  # (P,)
        p = enc["input_ids"][i][real].tolist()
        a = tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p + a)
        types.append(enc["mm_token_type_ids"][i][real].tolist() + [0] * len(a))
        masks.append([0] * len(p) + [1] * len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    type_ids = torch.zeros((len(rows), width), dtype=enc["mm_token_type_ids"].dtype)
    target = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, t, m) in enumerate(zip(rows, types, masks)):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
        type_ids[i, width - len(r) :] = torch.tensor(t, dtype=type_ids.dtype)
        target[i, width - len(r) :] = torch.tensor(m, dtype=torch.float)
    mm = {k: enc[k].to(device) for k in VISION_KWARGS[1:] if k in enc} | {"mm_token_type_ids": type_ids.to(device)}
    return ids.to(device), attn.to(device), target[:, 1:].to(device), mm


class SFTOutcome(NamedTuple):
    """``supervised_train``'s result: the last step's metrics, and the stop request's signal when the loop stopped
    early (a checkpoint was written first)."""

    metrics: dict[str, float]
    interrupted: str | None = None


def supervised_train(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    cfg: SFTConfig,
    *,
    seed: int,
    progress: bool = True,
    log=None,
    start_step: int = 0,
    resume: dict | None = None,
    checkpoint: Callable[[int, torch.optim.Optimizer, object], object] | None = None,
    stop: dict | None = None,
) -> SFTOutcome:
    """Train ``model`` in place for ``cfg.steps`` steps of cross-entropy on the answers.

    Every step's batch and routing draws derive from ``(seed, step)``, so a run resumed at ``start_step`` with the
    checkpoint's optimizer and scheduler states (``resume``) continues exactly as an uninterrupted one. A step whose
    loss or gradient norm is NaN/Inf is skipped before it reaches the weights; ``cfg.max_bad_steps`` in a row stop
    the run (``RunFailed``).

    Args:
        tokenizer: a tokenizer, or a VLM's processor (the items then carry ``images`` or ``video``).
        start_step: the first step to run (a resumed run).
        resume: ``{"optimizer": state_dict, "scheduler": state_dict}`` of the checkpoint to continue from.
        checkpoint: ``checkpoint(steps_done, optimizer, scheduler)`` writes a resumable checkpoint; called every
            ``cfg.save_every`` steps and when ``stop`` asks.
        stop: a ``stops.stop_requests`` dict: after Ctrl-C/SIGTERM the step finishes, a checkpoint is written and
            the loop returns with ``interrupted`` set.
    """
    device = next(model.parameters()).device
    sites = find_routers(model, allow_dense=True)
    routed = bool(sites)
    dense = routed and all(s.top_k == s.num_experts for s in sites)  # LoRA-MoE dense mixture: soft Switch LB
    if not routed and (cfg.routing != "topk" or cfg.lb_coef > 0 or cfg.z_coef > 0):
        raise ConfigError(
            f"sft.routing: {type(model).__name__} has no router (a dense model or a plain LoRA), so routing "
            f"{cfg.routing!r}, sft.lb_coef and sft.z_coef mean nothing; set sft.routing=topk sft.lb_coef=0 sft.z_coef=0"
        )
    if not is_processor(tokenizer) and any("images" in it or "video" in it for it in items):
        raise ConfigError(
            "task.name: the items have images or a video but the model has a text tokenizer; a multimodal task needs "
            "a vision-language model (model.family=qwen3_vl_moe, or model.path to a Qwen3-VL-MoE checkpoint)"
        )
    policy = make_policy(cfg.routing, **cfg.routing_kwargs)
    optimizer, schedule = optimizer_and_schedule(model.parameters(), cfg.optim, cfg.steps)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["scheduler"])
    model.train()
    last: dict = {}
    bad_in_row = 0
    bar = progress_bar(range(start_step, cfg.steps), desc="sft", total=cfg.steps, initial=start_step, enabled=progress)
    for step in bar:
        t0 = time.perf_counter()
        batch = sample_items(items, cfg.batch_size, random.Random(derive_seed(seed, step, 7)))
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, step, 8))
        if is_processor(tokenizer):  # M-RoPE: no position ids, the model computes its 3-D positions
            ids, attn, target, mm = supervised_mm_batch(tokenizer, batch, device)
            inputs = {"position_ids": None, "use_cache": False, **mm}
        else:
            ids, attn, target = supervised_batch(tokenizer, batch, device)
            inputs = {"position_ids": position_ids_from_mask(attn)}
        with route(model, policy, generator=generator, keep_probs=cfg.lb_coef > 0, keep_logits=cfg.z_coef > 0) as rec:
            logits = model(input_ids=ids, attention_mask=attn, **inputs).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        ce = (ce * target.flatten()).sum() / target.sum()
        loss, metrics = ce, {"loss/ce": ce.detach()}
        if routed and (cfg.lb_coef > 0 or cfg.z_coef > 0):  # the router losses of RL, on every attended position
            B = ids.shape[0]
            aux, aux_metrics = routing_aux_loss(
                attn, probs=rec.probs(B) if cfg.lb_coef > 0 else None, experts=rec.trace(B).experts,
                lb_coef=cfg.lb_coef, logits=rec.logits(B) if cfg.z_coef > 0 else None, z_coef=cfg.z_coef,
                soft_dispatch=dense,
            )  # fmt: skip
            loss = loss + aux
            metrics |= aux_metrics
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad(model, cfg.optim.grad_clip)
        if bool(torch.isfinite(loss.detach() + grad_norm)):
            bad_in_row = 0
            optimizer.step()
            schedule.step()
            last = metrics | {"optim/grad_norm": grad_norm.detach(), "optim/lr": schedule.get_last_lr()[0]}
            last["time/step"] = time.perf_counter() - t0
            if log is not None:
                log(last, step)
            bar.set_postfix(loss=f"{ce.item():.3f}")
        else:  # never let a NaN/Inf step reach the weights
            optimizer.zero_grad(set_to_none=True)
            bad_in_row += 1
            bar.write(f"sft step {step}: NaN/Inf loss or gradient norm, step skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.max_bad_steps:
                raise RunFailed(
                    f"sft step {step}: {bad_in_row} steps in a row had a NaN/Inf loss or gradient norm "
                    f"(sft.max_bad_steps={cfg.max_bad_steps}); fix the cause (e.g. lower sft.optim.lr) and start again"
                )
        signal = stop["signal"] if stop is not None else None
        if checkpoint is not None and (signal or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            checkpoint(step + 1, optimizer, schedule)  # a skipped step left the weights as they were: safe to save
        if signal and step + 1 < cfg.steps:
            model.eval()
            return SFTOutcome({k: float(v) for k, v in last.items()}, signal)
    model.eval()
    return SFTOutcome({k: float(v) for k, v in last.items()})


def run_sft(cfg: SFTJobConfig) -> dict:
    """`expertrl sft`: supervised fine-tuning, held-out accuracy before and after, final model saved.

    Like ``expertrl train``: the output directory is claimed (locked, never an earlier run's unless ``overwrite``),
    a checkpoint is written every ``sft.save_every`` steps and on Ctrl-C/SIGTERM (the summary then has
    ``interrupted``), and ``resume`` continues from the latest complete one exactly as an uninterrupted run."""
    seed_everything(cfg.seed)
    quiet_hf_progress(cfg.progress)  # Hugging Face's loading and saving bars follow the switch too
    out = Path(cfg.output_dir)
    resume_from = find_resume_checkpoint(cfg) if cfg.resume is not None else None
    rundir = claim_run_dir(out, resume=resume_from is not None, overwrite=cfg.overwrite)
    try:
        with stop_requests() as stop:
            return _run_sft(cfg, out, resume_from, stop, rundir)
    finally:
        rundir.release()


def _run_sft(cfg: SFTJobConfig, out: Path, resume_from: Path | None, stop: dict, rundir: RunDir) -> dict:
    model, tokenizer = model_and_tokenizer(cfg.model, cfg.seed, allow_dense=True)
    place_model(model)  # the GPU where there is one
    task = task_from_config(cfg.task, tokenizer, model=model, answers=True)  # prompt + answer fit the context
    tok = text_tokenizer(tokenizer)
    max_new = max(len(tok(it["answer"], add_special_tokens=False)["input_ids"]) for it in task.eval) + 2
    start_step, resume = 0, None
    if resume_from is None:  # the model and task loaded: an earlier run replaced with --overwrite goes only now
        rundir.clear_previous()
        save_yaml(dataclasses.replace(cfg, resume=None, overwrite=False), out / "config.yaml")
        before = evaluate(model, tokenizer, task.eval, task.score, max_new_tokens=max_new)
        summary = {"accuracy_before": before["accuracy"]}
    else:
        state = load_trainer_state(resume_from)
        load_weights(model, resume_from / "model", cfg.model)
        start_step, summary = state["step"], state["summary"]
        resume = {"optimizer": load_optimizer_state(resume_from), "scheduler": state["scheduler"]}
        set_rng_state(state["rng"])
        truncate_metrics(out / "metrics.jsonl", start_step)
        set_aside_newer(out, resume_from)  # partial writes removed; newer, damaged checkpoints out of the way
        print(f"resuming supervised fine-tuning from {resume_from} ({start_step} of {cfg.sft.steps} steps)")
    logger = MetricsLogger(out / "metrics.jsonl")

    command = resume_command("sft", out)

    def checkpoint(steps_done: int, optimizer, schedule) -> None:
        config = dataclasses.replace(cfg, resume=None, overwrite=False)
        with saving_stops(out, f"the checkpoint after step {steps_done}", command):
            save_sft_checkpoint(out, steps_done, model, tokenizer, optimizer, schedule, config, summary,
                                keep=cfg.keep_checkpoints)  # fmt: skip

    with failures_stop_the_run(out, lambda: "supervised fine-tuning", command):
        outcome = supervised_train(
            model, tokenizer, task.train, cfg.sft, seed=cfg.seed, progress=cfg.progress,
            log=lambda m, s: logger.log(m, s), start_step=start_step, resume=resume, checkpoint=checkpoint, stop=stop,
        )  # fmt: skip
    if outcome.interrupted:
        print(f"{outcome.interrupted}: stopped supervised fine-tuning (checkpoint written). Resume with:\n  {command}")
        return summary | {"interrupted": outcome.interrupted}
    after = evaluate(model, tokenizer, task.eval, task.score, max_new_tokens=max_new)
    with saving_stops(out, "the final model (all steps are done)", command):
        save_final_model(model, tokenizer, out / "final", wait_s=cfg.final_save_wait_s)
    summary |= {"accuracy_after": after["accuracy"], "model": str(out / "final")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"sft: held-out accuracy {summary['accuracy_before']:.3f} -> {after['accuracy']:.3f}; "
        f"model saved to {out / 'final'}"
    )
    return summary
