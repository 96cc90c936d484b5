"""MoE-GRPO's exploration ablation on CPU (the paper's Fig. 3 / Table 5): modality-aware router guidance vs plain
multinomial expert sampling vs Gaussian-noise exploration, several seeds.

(1) One shared supervised warm-up per task (``run_sft``, Stoch-FT-Multi), saved once under ``OUT/<task>/sft/final``.
(2) Arms, each ``train()`` from that checkpoint (``--sft.steps 0``), MoE-GRPO otherwise (greedy tokens, Token- +
    Gate-GRPO, routing temperature 1.0 so exploration is wide and guidance has something to cut):
      guided        multinomial sampling of K from the router with each token group's bottom 25% experts masked
                    (vision/text groups on an image task, prompt/completion groups on a text task)
      multinomial   plain multinomial sampling of K (no mask)
      noise         top-K of Gaussian-noised logits (sigma = 1/E); no closed-form set probability, so Token-GRPO only
(3) Per arm: reward mean and within-group reward std (the spread GRPO learns from) averaged over the first and the
    last quarter of training, and held-out accuracy at the end; mean +- std over seeds. Markdown table printed and
    written to ``OUT/guidance-<task>.md``; per-step curves in ``OUT/guidance-<task>.json``.

    .venv/bin/python benchmarks/guidance.py [--task addition|mm:digits_mc] [--steps 60] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from expertrl.config import SFTJobConfig, TrainConfig
from expertrl.configio import load_config
from expertrl.sft import run_sft
from expertrl.train import train

ARMS = {
    "guided": ["--guidance.enabled", "true", "--guidance.percent", "25"],
    "multinomial": [],
    "noise": ["--routing.policy", "noisy_topk", "--loss.gate_coef", "0"],
}


def flags_for(task: str) -> tuple[list[str], list[str]]:
    """(model + task flags of the warm-up, the guidance groups of the RL arms) for ``task``."""
    if task.startswith("mm:"):  # the tiny Qwen3-VL-MoE (E=4, K=2): 25% = one expert per group and layer
        return ["--task.name", task, "--model.family", "qwen3_vl_moe"], ["--guidance.groups", "modality"]
    return ["--task.name", task, "--model.preset", "small"], ["--guidance.groups", "prompt_completion"]


def warm_start(out: Path, task: str, sft_steps: int) -> Path:
    final = out / "sft" / "final"
    if not (final / "config.json").is_file():
        model_task, _ = flags_for(task)
        overrides = [
            *model_task,
            "--sft.steps",
            str(sft_steps),
            "--output_dir",
            str(out / "sft"),
            "--progress",
            "false",
        ]
        run_sft(load_config(SFTJobConfig, None, overrides))
    return final


def run_arm(arm: str, seed: int, task: str, start: Path, out: Path, steps: int) -> dict:
    run_dir = out / f"{arm}-s{seed}"
    _, groups = flags_for(task)
    overrides = [
        "--task.name", task, *groups, *ARMS[arm], "--model.path", str(start), "--sft.steps", "0",
        "--steps", str(steps), "--seed", str(seed), "--routing.temperature", "1.0", "--eval_every", "0",
        "--output_dir", str(run_dir), "--progress", "false",
    ]  # fmt: skip
    if not (run_dir / "summary.json").is_file():
        t0 = time.perf_counter()
        train(load_config(TrainConfig, None, overrides))
        print(f"{arm} seed {seed}: {time.perf_counter() - t0:.0f} s")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/mean" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    q = max(1, len(rows) // 4)
    return {
        "arm": arm,
        "seed": seed,
        "reward": [r["reward/mean"] for r in rows],
        "group_std": [r["reward/group_std"] for r in rows],
        "acc_start": summary["accuracy_start"],
        "acc_end": summary["accuracy_end"],
        "reward_first": statistics.mean(r["reward/mean"] for r in rows[:q]),
        "reward_last": statistics.mean(r["reward/mean"] for r in rows[-q:]),
        "std_first": statistics.mean(r["reward/group_std"] for r in rows[:q]),
        "std_last": statistics.mean(r["reward/group_std"] for r in rows[-q:]),
    }


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| arm | reward, first → last quarter | within-group reward std, first → last quarter "
        "| held-out acc. (start → end) |",
        "|---|---|---|---|",
    ]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        lines.append(
            f"| {arm} | {ms([r['reward_first'] for r in rs])} → {ms([r['reward_last'] for r in rs])} | "
            f"{ms([r['std_first'] for r in rs])} → {ms([r['std_last'] for r in rs])} | "
            f"{rs[0]['acc_start']:.3f} → {ms([r['acc_end'] for r in rs])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/guidance")
    ap.add_argument("--task", default="addition")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sft-steps", type=int, default=800)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out) / args.task.replace(":", "_")
    start = warm_start(out, args.task, args.sft_steps)
    rows = [
        run_arm(arm, int(seed), args.task, start, out, args.steps)
        for arm in args.arms.split(",")
        for seed in args.seeds.split(",")
    ]
    name = args.task.replace(":", "_")
    (out.parent / f"guidance-{name}.json").write_text(json.dumps(rows, indent=1))
    md = table(rows)
    (out.parent / f"guidance-{name}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
