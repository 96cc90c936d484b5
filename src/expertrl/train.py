"""`expertrl train`: optional supervised warm-up, then MoE-GRPO (or any preset). The whole loop is ``train`` below.

    run = build_run(cfg)                     # every object, every start-up check, resume state  (run.py)
    start(run, stop)                         # the warm-up (resumable), reference model, guidance, optimiser  (start.py)
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

from expertrl.checkpoint import latest_checkpoint
from expertrl.collect import collect
from expertrl.config import RunFailed, TrainConfig
from expertrl.io import read_jsonl
from expertrl.logging import progress_bar, reduce_across_ranks, to_number
from expertrl.parallel import gather_full_state
from expertrl.plots import figure_images
from expertrl.run import Run, build_run
from expertrl.start import calibrate, make_guide, start
from expertrl.stops import failures_stop_the_run, resume_command, save_final_model, saving_stops, stop_requests
from expertrl.update import update


def train(cfg: TrainConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary that is also written to ``summary.json``.

    With ``cfg.resume`` it continues from the run's latest checkpoint (no warm-up, no start evaluation). Ctrl-C or
    SIGTERM finishes the step (or warm-up step), writes a checkpoint and returns the summary with ``interrupted``
    set; the CLI then exits with status 75 (EX_TEMPFAIL: try again with ``--resume``).
    """
    run = build_run(cfg)
    try:
        with run.claimed(), stop_requests() as stop:  # the output directory's lock lasts as long as the run
            with failures_stop_the_run(run.out, lambda: "before the first RL step", resume_command("train", run.out)):
                started = start(run, stop)
            if not started:  # a stop request ended the warm-up: a checkpoint was written
                return run.summary
            bar = progress_bar(range(run.start_step, cfg.steps), desc="rl", total=cfg.steps, initial=run.start_step,
                               enabled=cfg.progress and run.is_main)  # fmt: skip
            at = [f"step {run.start_step}"]  # where an error stops the run
            with failures_stop_the_run(run.out, lambda: at[0], resume_command("train", run.out)):
                for step in bar:
                    at[0] = f"step {step}"
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
                at[0] = "the final evaluation"
                return finish(run)
    finally:
        run.close()  # the rollout engine, if any
        run.logger.close()  # the experiment trackers (report_to) finish, also when a step raised


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
    metrics = {k: to_number(v) for k, v in metrics.items()}
    if run.world > 1:  # one gather per step: the metrics, and whether any rank was asked to stop
        gathered = gather_object([(metrics, signal)])
        metrics = reduce_across_ranks([m for m, _ in gathered])
        signal = next((s for _, s in gathered if s), None)
    if run.bad_in_row and run.is_main:
        applied = int(metrics.get("optim/applied_updates", 0))
        bar.write(
            f"step {step}: NaN/Inf loss or gradient norm in inner update {applied + 1} of {cfg.inner_updates}, not "
            f"applied ({applied} earlier applied; {run.bad_in_row} such steps in a row; the run stops at "
            f"max_bad_steps={cfg.max_bad_steps})"
        )
    why = collapse(metrics, cfg)
    run.collapsed_in_row = run.collapsed_in_row + 1 if why else 0
    if why and run.is_main:
        bar.write(f"step {step}: {why} ({run.collapsed_in_row} in a row; the run stops at max_bad_steps)")
    last_step = step + 1 == cfg.steps
    do_eval = cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0 and not last_step
    if do_eval:
        result = run.evaluate()
        metrics["eval/accuracy"] = result["accuracy"] if result is not None else float("nan")
    with saving_stops(run.out, f"the metrics of step {step}", resume_command("train", run.out)):
        logged = run.logger.log(metrics, step)
    bar.set_postfix(
        reward=f"{logged['reward/mean']:.2f}", gate_clip=f"{logged.get('loss/gate_clip_frac', 0.0):.2f}",
        **({"eval": f"{logged['eval/accuracy']:.2f}"} if do_eval else {}),
    )  # fmt: skip
    if run.bad_in_row >= cfg.max_bad_steps or run.collapsed_in_row >= cfg.max_bad_steps:
        nan = run.bad_in_row >= cfg.max_bad_steps
        latest = latest_checkpoint(run.out)
        last = latest if nan else run.healthy_checkpoint
        if last is not None:
            where = (
                f"The last good checkpoint {last} is intact; fix the cause (e.g. lower optim.lr), then continue with "
                f"{resume_command('train', run.out)}"
            )
            if not nan and last != latest:
                where += " after deleting the checkpoints saved after it"
        else:
            where = "No healthy checkpoint had been written (save_every=0, or no step before the streak reached a save)"
            if latest is not None:
                where += f"; {latest} holds the policy of the streak, not a healthy one"
        what = "had a NaN/Inf loss or gradient norm" if nan else f"showed a collapsed policy ({why})"
        raise RunFailed(
            f"step {step}: {cfg.max_bad_steps} steps in a row {what} (max_bad_steps={cfg.max_bad_steps}); "
            f"stopping without writing a checkpoint. {where}."
        )
    periodic = cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or last_step)
    saved = None
    # A NaN/Inf step was not applied, so the weights are the last good step's: a stop request still saves them
    # (save_checkpoint refuses non-finite weights); periodic saves wait for a good step.
    if ((periodic and run.bad_in_row == 0) or signal) and (run.is_main or run.sharded):
        with saving_stops(run.out, f"the checkpoint after step {step + 1}", resume_command("train", run.out)):
            saved = run.save(step + 1)
        if run.collapsed_in_row == 0:  # what a collapse stop points back to
            run.healthy_checkpoint = saved
    if signal and not last_step:
        bar.close()
        note = f"checkpoint {saved}" if saved is not None else f"no new checkpoint; latest {latest_checkpoint(run.out)}"
        run.accelerator.print(
            f"{signal}: stopped after {step + 1} of {cfg.steps} RL steps ({note}). Resume with:\n"
            f"  {resume_command('train', run.out)}"
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
        if run.logger.trackers:  # the report's figures that metrics.jsonl alone can draw
            records = [rec for _, rec in read_jsonl(run.logger.path, skip_bad=True)]
            run.logger.log_images(figure_images([run.out.name], [records]), step=run.cfg.steps)
        s["accuracy_end"] = final_eval["accuracy"]
        s["per_category_end"] = final_eval["per_category"]
        s["examples_end"] = final_eval["examples"]
        with saving_stops(run.out, "the final model (all RL steps are done)", resume_command("train", run.out)):
            s["model"] = str(save_final_model(run.policy_model, run.tokenizer, run.out / "final",
                                              wait_s=run.cfg.final_save_wait_s, state_dict=final_weights))  # fmt: skip
        (run.out / "summary.json").write_text(json.dumps(s, indent=2))
        print_summary(s)
    run.accelerator.wait_for_everyone()  # rank 0 has written the final model
    return s


def collapse(metrics: dict, cfg: TrainConfig) -> str | None:
    """Why the step's (rank-reduced) metrics show a policy that can no longer learn, or None.

    * every completion was only EOS (nothing to reward, nothing to learn from);
    * the gradient norm was exactly 0 although the loss had something to learn from: some group's rewards differed,
      or the Switch load-balancing loss acts on a trainable router. Exactly 0 means saturated softmaxes (weights
      blown up by a too-high learning rate); a healthy model has a small, non-zero gradient. A zero advantage
      everywhere without the balancing loss (e.g. every answer right) is a legitimate zero gradient, not collapse,
      and so is one where DAPO's ``mask_truncated`` took the loss off every row with an advantage (then
      ``reward/frac_informative_in_loss`` is what counts).
    """
    if metrics.get("rollout/empty_frac", 0.0) == 1.0:
        return "every completion was only EOS"
    if metrics.get("optim/grad_norm") != 0.0:
        return None
    informative = 1.0 - metrics.get("reward/frac_zero_std", 1.0)
    if cfg.rollout.mask_truncated:  # cut completions have no loss: count only the groups whose advantage reaches it
        informative = metrics.get("reward/frac_informative_in_loss", 0.0)
    if informative > 0:
        return f"the gradient norm was exactly 0 although {informative:.0%} of groups had a non-zero advantage"
    if cfg.loss.lb_coef > 0 and not cfg.routing.freeze_router:
        return "the gradient norm was exactly 0 although the load-balancing loss acts on the router (saturated routers)"
    return None


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
