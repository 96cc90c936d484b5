"""`expertrl train`: optional supervised warm-up, then MoE-GRPO (or any preset). The whole loop is ``train`` below.

    run = build_run(cfg)                     # every object, every start-up check, resume, warm-up  (run.py)
    for step in range(run.start_step, cfg.steps):
        batch, metrics, spare = collect(run, step)     # rollout -> rewards -> advantages (-> DAPO refill)  (collect.py)
        metrics |= update(run, batch, spare, step)     # μ inner updates, NaN guard, DDP padding  (update.py)
        record(run, step, metrics, stop)               # reduce, evaluate, log, save, stop requests
    finish(run)                              # final evaluation, final model, summary

Every per-step random choice derives from (seed, step), so on CPU a resumed run logs the same metrics, step for step,
as one that was never interrupted. docs/architecture.md says which module owns each step.
"""

from __future__ import annotations

import json
import time

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from expertrl.checkpoint import latest_checkpoint, save_model, stop_requests
from expertrl.collect import collect
from expertrl.config import TrainConfig
from expertrl.logging import reduce_across_ranks, to_number
from expertrl.parallel import gather_full_state
from expertrl.run import Run, build_run, calibrate, make_guide
from expertrl.update import update


def train(cfg: TrainConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary that is also written to ``summary.json``.

    With ``cfg.resume`` it continues from the run's latest checkpoint (no warm-up, no start evaluation). Ctrl-C or
    SIGTERM finishes the step, writes a checkpoint and returns the summary with ``interrupted`` set.
    """
    run = build_run(cfg)
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps, desc="rl",
               disable=not (cfg.progress and run.is_main))  # fmt: skip
    try:
        with stop_requests() as stop:
            for step in bar:
                t0 = time.perf_counter()
                refresh_guidance(run, step)
                batch, metrics, spare = collect(run, step)
                metrics["time/rollout"] = time.perf_counter() - t0
                metrics |= update(run, batch, spare, step)
                metrics["time/step"] = time.perf_counter() - t0
                metrics["rollout/num_tokens"] = batch.mask.sum()
                metrics["time/tokens_per_s"] = metrics["rollout/num_tokens"] / metrics["time/step"]
                signal = record(run, step, metrics, stop["signal"], bar)
                if signal is not None:
                    return run.summary | {"interrupted": signal, "steps_done": step + 1}
        return finish(run)
    finally:
        run.close()  # the rollout engine, if any


def refresh_guidance(run: Run, step: int) -> None:
    """Recount router guidance on the current policy every ``guidance.refresh_every`` steps (0 = never)."""
    every = run.cfg.guidance.refresh_every
    if run.guide is not None and every and step > 0 and step % every == 0:
        run.guide = make_guide(run, calibrate(run, step=step))


def record(run: Run, step: int, metrics: dict, signal: str | None, bar) -> str | None:
    """Reduce the step's metrics over ranks, evaluate (every ``eval_every`` steps), log, save (every ``save_every``
    steps, and on a stop request), and stop the run after ``max_bad_steps`` NaN/Inf steps in a row.

    Returns:
        the stop request's signal name when the run stops here (a checkpoint was written), else None.
    """
    cfg = run.cfg
    if run.bad_in_row and run.is_main:
        bar.write(
            f"step {step}: NaN/Inf loss or gradient norm, update skipped ({run.bad_in_row} in a row; the run stops "
            f"at max_bad_steps={cfg.max_bad_steps})"
        )
    metrics = {k: to_number(v) for k, v in metrics.items()}
    if run.world > 1:  # one gather per step: the metrics, and whether any rank was asked to stop
        gathered = gather_object([(metrics, signal)])
        metrics = reduce_across_ranks([m for m, _ in gathered])
        signal = next((s for _, s in gathered if s), None)
    last_step = step + 1 == cfg.steps
    do_eval = cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0 and not last_step
    if do_eval:
        result = run.evaluate()
        metrics["eval/accuracy"] = result["accuracy"] if result is not None else float("nan")
    logged = run.logger.log(metrics, step)
    bar.set_postfix(
        reward=f"{logged['reward/mean']:.2f}", gate_clip=f"{logged.get('loss/gate_clip_frac', 0.0):.2f}",
        **({"eval": f"{logged['eval/accuracy']:.2f}"} if do_eval else {}),
    )  # fmt: skip
    if run.bad_in_row >= cfg.max_bad_steps:
        last = latest_checkpoint(run.out)
        where = (
            f"The last good checkpoint {last} is intact; fix the cause (e.g. lower optim.lr), then continue with "
            f"--config {run.out}/config.yaml --resume {run.out}"
            if last is not None
            else "No checkpoint had been written yet (save_every=0 or before the first save)"
        )
        raise RuntimeError(
            f"step {step}: {run.bad_in_row} steps in a row had a NaN/Inf loss or gradient norm "
            f"(max_bad_steps={cfg.max_bad_steps}); stopping without writing a checkpoint. {where}."
        )
    periodic = cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or last_step)
    saved = None
    if (periodic or signal) and run.bad_in_row == 0 and (run.is_main or run.sharded):  # never save a failed state
        saved = run.save(step + 1)
    if signal and not last_step:
        bar.close()
        note = f"checkpoint {saved}" if saved is not None else f"no new checkpoint; latest {latest_checkpoint(run.out)}"
        run.accelerator.print(
            f"{signal}: stopped after {step + 1} of {cfg.steps} RL steps ({note}). Resume with:\n"
            f"  expertrl train --config {run.out}/config.yaml --resume {run.out}"
        )
        run.accelerator.wait_for_everyone()
        return signal
    return None


def finish(run: Run) -> dict:
    """Final held-out evaluation, the final model (Hugging Face format) and ``summary.json``."""
    final_eval = run.evaluate()
    final_weights = gather_full_state(run.model)[0] if run.sharded else None  # collective
    s = run.summary
    s["skipped_steps"] = run.skipped
    s["wall_time_s"] = round(run.elapsed_before + time.perf_counter() - run.t_start, 1)
    if run.is_main:
        run.logger.log({"eval/accuracy": final_eval["accuracy"]}, step=run.cfg.steps)
        s["accuracy_end"] = final_eval["accuracy"]
        s["per_category_end"] = final_eval["per_category"]
        s["examples_end"] = final_eval["examples"]
        s["model"] = str(save_model(run.policy_model, run.tokenizer, run.out / "final", state_dict=final_weights))
        (run.out / "summary.json").write_text(json.dumps(s, indent=2))
        print_summary(s)
    run.accelerator.wait_for_everyone()  # rank 0 has written the final model
    return s


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


__all__ = ["finish", "record", "train"]
