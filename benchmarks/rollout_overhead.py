"""Cost of routing capture in rollouts, and where one MoE-GRPO training step spends its time (CPU).

Part 1, generation throughput on one model and one batch of random prompts (token ids 3..100 of the char
tokenizer), greedy tokens, ``min_new_tokens = max_new_tokens`` so every run generates the same number of tokens:
  (a) plain ``model.generate`` (no hooks);
  (b) ``generate`` inside ``route(model, TopK())``: the hook overhead alone (no expert sampling);
  (c) ``generate`` inside ``route(model, Multinomial(), generator=g)`` plus ``rec.trace(B)``: the MoE-GRPO
      rollout path with trace capture.
The three are run interleaved (a, b, c, a, b, c, ...) after one warm-up each; the best of ``--repeats`` counts.

Part 2, the two phases of a real ``expertrl train`` step (MoE-GRPO defaults, the addition task), read from the
run's own ``time/rollout`` and ``time/step`` metrics: the rollout (sampled experts, trace, rewards, advantages) and
the update (μ inner updates of forward + backward + optimiser; the first one's forward is the old policy). Measured
for the default-job shapes (preset ``small``) and for ``--preset``. ``benchmarks/vs_trl.py`` compares whole steps
with TRL's.

    .venv/bin/python benchmarks/rollout_overhead.py [--preset 5M] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.io import read_jsonl
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial, TopK
from expertrl.tokenizer import CHAR_VOCAB_SIZE, EOS_ID, PAD_ID
from expertrl.train import train
from expertrl.types import RoutingTrace

FAMILY = "qwen3_moe"


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One warm-up call of each, then ``repeats`` rounds calling each once per round, in order.

    Returns wall-clock seconds and this process's CPU seconds (all threads) per call. CPU time is less disturbed
    than wall time when other processes share the cores (it does not count time spent descheduled).
    """
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def logits_bytes(L: int, B: int, S: int, E: int) -> int:
    """What full (L, B, S, E) float32 router logits would take."""
    return L * B * S * E * 4


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


# ----------------------------------------------------------------------------------------------- part 1: overhead


def generation_overhead(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    model = build_tiny_moe(FAMILY, preset, CHAR_VOCAB_SIZE, seed=0).eval()
    prompts = torch.randint(3, 101, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    gen_kwargs = dict(
        input_ids=prompts,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    shapes: dict = {}

    @torch.no_grad()
    def plain():
        out = model.generate(**gen_kwargs)
        assert out.shape == (batch, prompt_len + new_tokens), out.shape

    @torch.no_grad()
    def topk_hooks():
        with route(model, TopK()):
            model.generate(**gen_kwargs)

    @torch.no_grad()
    def sampled_capture():
        g = torch.Generator().manual_seed(1)
        with route(model, Multinomial(), generator=g) as rec:
            out = model.generate(**gen_kwargs)
        trace = rec.trace(batch)  # (L, B, S-1, K)
        shapes["trace"] = trace
        shapes["S"] = out.shape[1]

    wall, cpu = interleaved({"a": plain, "b": topk_hooks, "c": sampled_capture}, repeats)
    n_tok = batch * new_tokens
    res: dict = {
        name: {
            "best_s": min(t),
            "median_s": statistics.median(t),
            "all_s": t,
            "best_cpu_s": min(cpu[name]),
            "all_cpu_s": cpu[name],
            "tok_per_s": n_tok / min(t),
        }
        for name, t in wall.items()
    }
    for name in ("b", "c"):
        for key, base in (
            ("overhead_pct", "best_s"),
            ("overhead_pct_median", "median_s"),
            ("overhead_pct_cpu", "best_cpu_s"),
        ):
            res[name][key] = 100 * (res[name][base] / res["a"][base] - 1)
    trace: RoutingTrace = shapes["trace"]
    L, B, S_rec, K = trace.experts.shape
    res["trace"] = dict(
        shape=[L, B, S_rec, K],
        num_experts=trace.num_experts,
        trace_bytes=trace.nbytes(),
        full_logits_bytes=logits_bytes(L, B, S_rec, trace.num_experts),
    )
    return res


def router_call_cost(preset: str, batch: int, calls: int = 500, repeats: int = 5) -> dict:
    """Microseconds per call of one router on a decode-step input (batch tokens): native vs patched by ``route``.

    A tight loop of one small op is far less disturbed by other processes than a whole ``generate``, so this
    gives the intrinsic per-step hook cost; times the number of MoE layers it is the added time per decode step.
    """
    model = build_tiny_moe(FAMILY, preset, CHAR_VOCAB_SIZE, seed=0).eval()
    sites = find_routers(model)
    site = sites[0]
    h = torch.randn(batch, site.module.weight.shape[1], generator=torch.Generator().manual_seed(0))

    def best_us(fn: Callable[[], object]) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls)
        return best * 1e6

    out = {"layers": len(sites)}
    with torch.no_grad():
        out["native_us"] = best_us(lambda: site.module(h))
        for name, policy, gen in (("topk_us", TopK(), None), ("multinomial_us", Multinomial(), torch.Generator())):
            with route(model, policy, generator=gen, sites=[site]) as rec:
                out[name] = best_us(lambda: (site.module(h), rec.clear()))
    return out


# ----------------------------------------------------------------------------------------------- part 2: phases


def step_phases(preset: str, prompts_per_step: int, group_size: int, max_new_tokens: int, repeats: int) -> dict:
    """``repeats`` + 1 real ``expertrl train`` steps (MoE-GRPO defaults, no warm-up, no evaluation, no checkpoint);
    the first is a warm-up. Each step's own ``time/rollout`` (rollout, rewards, advantages) and ``time/step`` give
    the rollout and the update (μ inner updates: forward, backward, optimiser) shares."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            TrainConfig, None,
            [f"--model.preset={preset}", f"--rollout.prompts_per_step={prompts_per_step}",
             f"--rollout.group_size={group_size}", f"--rollout.max_new_tokens={max_new_tokens}",
             f"--steps={repeats + 1}", "--sft.steps=0", "--eval_every=0", "--save_every=0", "--progress=false",
             f"--output_dir={out}/run"],
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
        records = [rec for _, rec in read_jsonl(Path(out) / "run" / "metrics.jsonl") if "time/step" in rec][1:]
    rollout = [r["time/rollout"] for r in records]
    update = [r["time/step"] - r["time/rollout"] for r in records]
    per_step = {"rollout (generate, rewards, advantages)": statistics.median(rollout),
                "update (μ x forward + backward, optimiser)": statistics.median(update)}  # fmt: skip
    total = sum(per_step.values())
    return dict(
        preset=preset, batch=prompts_per_step * group_size, new_tokens=max_new_tokens,
        micro_batch_size=cfg.micro_batch_size, inner_updates=cfg.inner_updates, steps=len(records),
        step_s=per_step, step_total_s=total, share_pct={k: 100 * v / total for k, v in per_step.items()},
        tokens_per_s=statistics.median(r["time/tokens_per_s"] for r in records),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- report


def print_report(args, gen: dict, steps: list[dict]) -> None:
    print(f"## Generation overhead: preset {args.preset}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, best of {args.repeats} (interleaved)\n")  # fmt: skip
    print("| run | best s | median s | tok/s (best) | overhead best | overhead median | best CPU s | overhead CPU |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {
        "a": "(a) plain generate",
        "b": "(b) route(TopK) hooks",
        "c": "(c) route(Multinomial) + trace",
    }
    for name, label in labels.items():
        r = gen[name]
        ov, ovm, ovc = (
            f"{r[k]:+.1f}%" if k in r else "–" for k in ("overhead_pct", "overhead_pct_median", "overhead_pct_cpu")
        )
        print(f"| {label} | {r['best_s']:.3f} | {r['median_s']:.3f} | {r['tok_per_s']:.0f} | {ov} | {ovm} | "
              f"{r['best_cpu_s']:.3f} | {ovc} |")  # fmt: skip
    rc = gen["router_call"]
    step_ms = 1e3 * gen["a"]["best_s"] / args.new_tokens  # plain generate, per decode step (prefill included)
    print(f"\nOne router call on {args.batch} tokens: native {rc['native_us']:.0f} us, route(TopK) "
          f"{rc['topk_us']:.0f} us, route(Multinomial) {rc['multinomial_us']:.0f} us. Added per decode step "
          f"(x{rc['layers']} layers) vs (a)'s {step_ms:.2f} ms/step: TopK "
          f"{100 * rc['layers'] * (rc['topk_us'] - rc['native_us']) / (1e3 * step_ms):+.1f}%, Multinomial "
          f"{100 * rc['layers'] * (rc['multinomial_us'] - rc['native_us']) / (1e3 * step_ms):+.1f}% "
          f"(trace assembly not included).")  # fmt: skip
    t = gen["trace"]
    print(f"\nTrace {tuple(t['shape'])} (L,B,S-1,K): {fmt_bytes(t['trace_bytes'])} vs full float32 logits "
          f"(L,B,S-1,E={t['num_experts']}): {fmt_bytes(t['full_logits_bytes'])} "
          f"({t['full_logits_bytes'] / t['trace_bytes']:.1f}x)\n")  # fmt: skip
    for s in steps:
        print(f"## One training step (`expertrl train`, MoE-GRPO defaults): preset {s['preset']}, B={s['batch']} "
              f"({s['new_tokens']} new tokens), micro-batch {s['micro_batch_size']} x {s['inner_updates']} inner "
              f"updates, median of {s['steps']} steps\n")  # fmt: skip
        print("| phase | s per step | share of step |")
        print("|---|---|---|")
        for phase, sec in s["step_s"].items():
            print(f"| {phase} | {sec:.3f} | {s['share_pct'][phase]:.1f}% |")
        print(f"| **total** | {s['step_total_s']:.3f} | 100% ({s['tokens_per_s']:.0f} completion tok/s) |\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="5M", help="model preset for the overhead runs and the second step table")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-prompts", type=int, default=16, help="prompts per training step in the phase tables")
    p.add_argument("--step-group", type=int, default=8, help="group size G in the phase tables")
    p.add_argument("--step-new-tokens", type=int, default=8, help="max_new_tokens in the phase tables")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2 = the machine's cores)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    gen = generation_overhead(args.preset, args.batch, args.prompt_len, args.new_tokens, args.repeats)
    gen["router_call"] = router_call_cost(args.preset, args.batch)
    steps = [
        step_phases(preset, args.step_prompts, args.step_group, args.step_new_tokens, args.repeats)
        for preset in dict.fromkeys(["small", args.preset])
    ]
    print_report(args, gen, steps)
    wall = time.perf_counter() - t0
    load = (load_before, os.getloadavg()[0])
    print(f"(wall time {wall:.0f} s; 1-min load average {load[0]:.2f} before, {load[1]:.2f} after; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), generation=gen, steps=steps, wall_s=wall, loadavg_1min=load,
                           torch=torch.__version__, transformers=transformers.__version__), f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
