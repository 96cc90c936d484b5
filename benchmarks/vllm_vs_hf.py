"""Rollout engines side by side: transformers' ``generate`` (``rollout.engine=hf``) vs vLLM in process
(``rollout.engine=vllm``), MoE-GRPO's default settings (K of E experts sampled per token, greedy tokens, Token- and
Gate-GRPO), one model shape at a time, the two engines on the same model, prompts and seeds.

Per shape and engine the real loop runs (``run.build_run``, then ``collect.collect`` + ``update.update`` per step, as
``train.train`` does): one warm-up step that is not counted (vLLM's first generate sets itself up), then ``--steps``
timed steps. Reported, median over the timed steps:

  rollout tok/s   completion tokens of the step / seconds of ``collect`` (the rollout, the weight push into the
                  engine, rewards and advantages)
  rollout s       seconds of ``collect``; for vllm, ``push s`` of it is the weight push
  step s          seconds of ``collect`` + ``update`` (whole RL step)

Shapes: ``tiny`` is the tiny preset with head_dim 32 (vLLM's CPU attention has no head size 8), saved once and loaded
with ``model.path``; ``5M`` and ``50M`` are the presets; ``5M-E64K8`` is the 5M preset with a wide router (64
experts, top-8: the K of Qwen3-30B-A3B, half its E). One engine runs at a time. The crossover is the first shape
where vllm's whole step beats hf's.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vllm_vs_hf.py [--shapes tiny,5M,50M,5M-E64K8] [--steps 3]
        [--prompts 8] [--group 8] [--max-new 32] [--json out.json]

``--accuracy-seeds 0,1,2`` instead compares what the two engines learn (the issue's acceptance: held-out accuracy
after RL within noise of each other): per seed one supervised warm-up of the ``--accuracy-preset`` model
(``expertrl sft``, ``--accuracy-sft`` steps), then the default MoE-GRPO job from it for ``--accuracy-steps`` steps
with each engine; held-out accuracy (greedy, top-K, the hf engine) at the start and the end, mean and std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from expertrl.collect import collect
from expertrl.config import SFTJobConfig, TrainConfig
from expertrl.configio import load_config
from expertrl.models import build_tiny_moe
from expertrl.run import build_run
from expertrl.sft import run_sft
from expertrl.start import start
from expertrl.tokenizer import build_char_tokenizer
from expertrl.train import train
from expertrl.update import update

SHAPES = {
    "tiny": [],  # --model.path is added (head_dim 32)
    "5M": ["--model.preset", "5M"],
    "50M": ["--model.preset", "50M"],
    "5M-E64K8": ["--model.preset", "5M", "--model.num_experts", "64", "--model.top_k", "8"],
}


def tiny_checkpoint(root: Path) -> Path:
    """The tiny preset with head_dim 32, saved for ``model.path``."""
    path = root / "tiny-hd32"
    if not (path / "config.json").is_file():
        build_tiny_moe("qwen3_moe", "tiny", head_dim=32).save_pretrained(path)
        build_char_tokenizer().save_pretrained(path)
    return path


def measure(shape_flags: list[str], engine: str, args, out: Path) -> dict:
    overrides = [
        *shape_flags, "--rollout.engine", engine, "--sft.steps", "0", "--steps", str(args.steps + 1),
        "--rollout.prompts_per_step", str(args.prompts), "--rollout.group_size", str(args.group),
        "--rollout.max_new_tokens", str(args.max_new), "--micro_batch_size", str(args.prompts * args.group),
        "--inner_updates", "1", "--task.eval_size", "4", "--eval_every", "0", "--progress", "false",
        "--output_dir", str(out),
    ]  # fmt: skip
    cfg = load_config(TrainConfig, None, overrides)
    run = build_run(cfg)
    try:
        with run.claimed():
            started = start(run, {"signal": None})  # the optimiser and the engine, as `expertrl train` before step 0
            assert started
            rows = timed_steps(run, args.steps)
            params = sum(p.numel() for p in run.policy_model.parameters())
    finally:
        run.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return med | {"rollout_tok_s": med["tokens"] / med["rollout_s"], "params": params}


def timed_steps(run, steps: int) -> list[dict]:
    """One untimed and ``steps`` timed RL steps (collect + update) of a started run."""
    rows = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch, metrics, spare = collect(run, step)
        t_rollout = time.perf_counter() - t0
        update(run, batch, spare, step)
        t_step = time.perf_counter() - t0
        if step == 0:
            continue  # warm-up: vLLM's first generate (and both engines' first kernels) set themselves up
        push = float(metrics.get("time/engine_sync", 0.0))
        rows.append(dict(tokens=float(batch.mask.sum()), rollout_s=t_rollout, step_s=t_step, push_s=push))
    return rows


def accuracy(args, root: Path) -> None:
    """Held-out accuracy after RL with each engine, from one warm-up per seed (module docstring)."""
    seeds = [int(x) for x in args.accuracy_seeds.split(",")]
    end: dict[str, list[float]] = {"hf": [], "vllm": []}
    start = []
    for seed in seeds:
        sft = root / f"sft-{seed}"
        run_sft(load_config(SFTJobConfig, None, [
            "--model.preset", args.accuracy_preset, "--sft.steps", str(args.accuracy_sft), "--seed", str(seed),
            "--output_dir", str(sft), "--progress", "false",
        ]))  # fmt: skip
        for engine in end:
            summary = train(load_config(TrainConfig, None, [
                "--model.path", str(sft / "final"), "--sft.steps", "0", "--rollout.engine", engine, "--seed", str(seed),
                "--steps", str(args.accuracy_steps), "--eval_every", "0", "--progress", "false",
                "--output_dir", str(root / f"rl-{engine}-{seed}"),
            ]))  # fmt: skip
            end[engine].append(summary["accuracy_end"])
        start.append(summary["accuracy_start"])
    a = args
    print(f"\n{a.accuracy_preset}, {a.accuracy_sft} SFT steps, {a.accuracy_steps} MoE-GRPO steps, seeds {seeds}")
    print("| engine | held-out accuracy, start of RL | end of RL, per seed | end, mean ± std |")
    print("|---|---|---|---|")
    for engine, values in end.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {engine} | {statistics.mean(start):.3f} | {', '.join(f'{v:.3f}' for v in values)} | "
              f"{statistics.mean(values):.3f} ± {spread:.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,5M,50M,5M-E64K8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--accuracy-seeds", default=None, help="e.g. 0,1,2: compare learning instead of speed")
    parser.add_argument("--accuracy-preset", default="5M")
    parser.add_argument("--accuracy-sft", type=int, default=480)
    parser.add_argument("--accuracy-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.accuracy_seeds:
        with tempfile.TemporaryDirectory() as tmp:
            accuracy(args, Path(tmp))
        return
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for shape in args.shapes.split(","):
            flags = SHAPES[shape] or ["--model.path", str(tiny_checkpoint(root))]
            row = {"shape": shape}
            for engine in ("hf", "vllm"):
                row[engine] = measure(flags, engine, args, root / f"{shape}-{engine}")
                print(f"{shape:9s} {engine:4s} {row[engine]}", flush=True)
            results.append(row)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    cpu = platform.processor() or platform.machine()
    print(f"\n{args.prompts} prompts x G={args.group}, <= {args.max_new} new tokens, {args.steps} timed steps "
          f"(median), torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, load average "
          f"{' '.join(load_before)} -> {' '.join(load_after)}\n")  # fmt: skip
    print("| shape | params | hf rollout tok/s | vllm rollout tok/s | hf step s | vllm step s (push s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    crossover = None
    for row in results:
        hf, vl = row["hf"], row["vllm"]
        speedup = hf["step_s"] / vl["step_s"]
        if crossover is None and speedup > 1:
            crossover = row["shape"]
        print(f"| {row['shape']} | {hf['params'] / 1e6:.2f}M | {hf['rollout_tok_s']:.0f} | {vl['rollout_tok_s']:.0f} | "
              f"{hf['step_s']:.2f} | {vl['step_s']:.2f} ({vl['push_s']:.2f}) | {speedup:.2f}x |")  # fmt: skip
    print(f"\ncrossover (first shape where vllm's whole step is faster): {crossover or 'none of these'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
