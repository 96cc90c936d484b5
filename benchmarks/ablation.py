"""Ablation: GRPO vs GSPO vs GMPO vs RSPO vs routing replay (R3, R2) vs router freezing, on one tiny MoE (CPU).

(1) One shared supervised warm-up (``run_sft``) on the default task, the built-in addition task (operands 0-99),
    saved once under ``OUT/sft/final``. The task is "countdown-style" only in being a verifiable arithmetic task:
    reasoning-gym's countdown is far too hard for the ~0.4M-parameter default model (it stays at zero reward).
(2) For each method, ``train()`` from that checkpoint (``--sft.steps 0``) with the method's preset
    (``a+b`` means ``--preset a,b``, e.g. ``grpo+r3``), ``--inner_updates 4`` so the ratios are off-policy,
    ``--optim.lr 3e-4`` (higher than the default, to provoke router shift), the same seed, ``--eval_every 0``,
    output in ``OUT/<method>``. The loss presets use deterministic top-K routing, sampled tokens and live routing in
    every forward unless a stabiliser (r3, r2, freeze_router) says otherwise.
(3) A Markdown table over methods from ``summary.json`` and ``metrics.jsonl``: held-out accuracy at the start and
    end of RL, mean reward over the first and last 10 steps, clip fraction (mean, max, step-to-step std =
    burstiness), mean router-shift weight gamma, mean fraction of tokens with gamma below
    the floor, min top-K overlap, mean max ratio, mean grad norm, wall time.
    Printed and written to ``OUT/ablation.md``.

Runs with one torch thread by default: with 2 threads on 2 cores shared with another job, steps stalled at
20-46 s instead of 0.3 s (thread oversubscription; see "Loaded machine" above in README.md).

A single seed on a tiny model: the table shows mechanisms (does the router shift, does clipping burst), not which
method is better at scale.

    .venv/bin/python benchmarks/ablation.py [--out runs/ablation] [--steps 60] [--methods grpo,gspo,rspo]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from expertrl.config import SFTJobConfig, TrainConfig
from expertrl.configio import load_config
from expertrl.presets import preset_overrides
from expertrl.sft import run_sft
from expertrl.train import train

DEFAULT_METHODS = "grpo,gspo,gmpo,rspo,grpo+r3,grpo+r2,grpo+freeze_router"


def read_metrics(path: Path) -> list[dict]:
    """The RL-step records of ``metrics.jsonl`` (the evaluation-only records at step -1 and steps are dropped)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "reward/mean" in r]


def values(rows: list[dict], key: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append(float(v))
    return out


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def stat(xs: list[float], fn) -> float | None:
    return fn(xs) if xs else None


def row_for(method: str, summary: dict, rows: list[dict], wall_s: float) -> dict:
    reward = values(rows, "reward/mean")
    clip = values(rows, "loss/clip_frac")
    return {
        "method": method,
        "acc_start": summary.get("accuracy_start"),
        "acc_end": summary.get("accuracy_end"),
        "reward_first10": stat(reward[:10], statistics.fmean),
        "reward_last10": stat(reward[-10:], statistics.fmean),
        "clip_mean": stat(clip, statistics.fmean),
        "clip_max": stat(clip, max),
        "clip_burst": statistics.stdev([b - a for a, b in zip(clip, clip[1:])]) if len(clip) > 2 else None,
        "gamma_mean": stat(values(rows, "router/shift/gamma_mean"), statistics.fmean),
        "below_floor_mean": stat(values(rows, "router/shift/frac_below_floor"), statistics.fmean),
        "overlap_min": stat(values(rows, "router/shift/topk_overlap"), min),
        "ratio_max_mean": stat(values(rows, "loss/ratio_max"), statistics.fmean),
        "grad_norm_mean": stat(values(rows, "optim/grad_norm"), statistics.fmean),
        "wall_s": wall_s,
    }


def table(results: list[dict]) -> str:
    head = (
        "| method | held-out acc start → end | reward first 10 → last 10 | clip_frac mean | clip_frac max "
        "| clip_frac step-std | γ mean | frac γ < floor | top-K overlap min | ratio_max mean | grad_norm mean "
        "| wall s |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['method']} | {fmt(r['acc_start'])} → {fmt(r['acc_end'])} "
            f"| {fmt(r['reward_first10'])} → {fmt(r['reward_last10'])} | {fmt(r['clip_mean'])} "
            f"| {fmt(r['clip_max'])} | {fmt(r['clip_burst'])} | {fmt(r['gamma_mean'])} "
            f"| {fmt(r['below_floor_mean'])} | {fmt(r['overlap_min'])} "
            f"| {fmt(r['ratio_max_mean'])} | {fmt(r['grad_norm_mean'])} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output folder (sft/, one folder per method, ablation.md)")
    p.add_argument("--steps", type=int, default=60, help="RL steps per method")
    p.add_argument("--inner-updates", type=int, default=4, help="optimiser passes per rollout batch")
    p.add_argument("--sft-steps", type=int, default=800, help="steps of the shared supervised warm-up")
    p.add_argument("--lr", type=float, default=3e-4, help="RL learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the warm-up and of every RL run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared, see above)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated presets; 'a+b' = --preset a,b")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    sft_dir = out / "sft"
    if not (sft_dir / "final").exists():
        t0 = time.perf_counter()
        sft_cfg = load_config(
            SFTJobConfig,
            None,
            ["--sft.steps", str(args.sft_steps), "--seed", str(args.seed), "--output_dir", str(sft_dir)]
            + ["--progress", "false"],
        )
        run_sft(sft_cfg)
        print(f"warm-up: {time.perf_counter() - t0:.0f} s")
    else:
        print(f"warm-up: reusing {sft_dir / 'final'}")

    results = []
    for method in args.methods.split(","):
        overrides = preset_overrides(method.replace("+", ","))
        overrides += ["--model.path", str(sft_dir / "final"), "--sft.steps", "0"]
        overrides += ["--inner_updates", str(args.inner_updates), "--seed", str(args.seed)]
        overrides += ["--steps", str(args.steps), "--eval_every", "0", "--optim.lr", str(args.lr)]
        overrides += ["--output_dir", str(out / method), "--progress", "false"]
        cfg = load_config(TrainConfig, None, overrides)
        print(f"\n=== {method} ===")
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0
        results.append(row_for(method, summary, read_metrics(out / method / "metrics.jsonl"), wall))

    text = table(results)
    print("\n" + text)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
