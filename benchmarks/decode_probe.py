"""Probes behind benchmarks/README.md's account of MoE-GRPO's decode cost (issue 16): each prints what it measured.

- ``experts``: one inference call of expertrl's experts kernel (``moe.experts``: one small GEMM per expert, float32)
  at a decode step's shape (64 tokens, K 2, the ``--workload``'s experts), its slots spread over all E experts (as
  sampled routes spread them) or on 6 (as W2's random-init top-K router puts them); and two alternatives that were
  tried and not kept: the padded bmm (every expert's rows zero-padded to the largest count, one batched matmul per
  projection: faster per call where the slots spread, no faster in a whole W2 rollout) and the column-grouped
  orientation (each expert's GEMM with the 2I weight rows as M). Medians of ``--repeats`` calls.
- ``gemm``: one expert's gate-up GEMM at 1 and 8 rows cycling over the E experts' weights, against one read of the
  same weights: the small GEMMs' GFLOP/s and GiB/s.
- ``matmul``: ``torch.mm`` of ``--matmul-n``³ in float32 and bfloat16, best of 3 after one warm-up call, and
  whether torch has oneDNN's bf16 kernels on this CPU (``runtime.cpu_has_onednn_bf16``).
- ``spread``: distinct experts per decode step and layer (of the 64 rows × K slots at each decode position) under
  ``--preset grpo`` (top-K, sampled tokens) and MoE-GRPO (sampled experts, greedy tokens), on vs_trl.py's batch
  (8 ``rg:chain_sum`` prompts × 8, ≤ 32 tokens) and a saved model (``--model``; default: vs_trl.py's workload
  ``--workload`` built from its config), optionally after ``--sft-steps`` of ``expertrl sft`` (Switch LB 0.01).
- ``compile``: one ``generate`` of 64 rows × 40-token prompts × 32 sampled tokens with transformers' dynamic cache,
  expertrl's in-place cache (``decoding.rollout_cache``), ``cache_implementation="static"`` and static +
  ``torch.compile`` (forced on CPU through ``CompileConfig``; its first call, the compile, is reported apart; a warm
  inductor cache in /tmp makes it seconds instead of ~45 s), in interleaved rounds.

    .venv/bin/python benchmarks/decode_probe.py experts gemm matmul            # ~1 min
    .venv/bin/python benchmarks/decode_probe.py spread --workload W2 --sft-steps 80   # ~6 min on 2 cores
    .venv/bin/python benchmarks/decode_probe.py compile --workload W1          # ~2 min (W2: ~5 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (the workloads and the task of the TRL comparison)

TOKENS, K = 64, 2


def _seconds(fn) -> float:
    """Wall time of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` calls after one warm-up, in milliseconds."""
    fn()
    return 1e3 * statistics.median(_seconds(fn) for _ in range(repeats))


def _experts_module(shape: dict):
    """The experts module of a one-layer Qwen3-MoE of ``shape``, on expertrl's kernel."""
    from transformers import AutoModelForCausalLM

    import expertrl.moe.experts as kernel

    config = vs_trl.model_config(
        shape, 16, num_hidden_layers=1, num_experts_per_tok=K, experts_implementation=kernel.NAME
    )
    model = AutoModelForCausalLM.from_config(config)
    return model.model.layers[0].mlp.experts


def column_grouped(experts, hidden, top_k_index, top_k_weights):
    """Another orientation that was tried: each expert's GEMM as W (2I, H) @ x_eᵀ (H, n_e), M = 2I rows instead of
    n_e (``F.grouped_mm`` grouping the columns of xᵀ), then back to rows."""
    E, N = experts.num_experts, hidden.shape[0]
    expert_sorted, perm = torch.sort(top_k_index.reshape(-1))
    offsets = torch.cumsum(torch.bincount(expert_sorted, minlength=E), 0, dtype=torch.int32)  # (E,)
    xt = hidden.index_select(0, perm // K).t()  # (H, N*K) slot columns grouped by expert
    gate, up = F.grouped_mm(experts.gate_up_proj, xt, offs=offsets).chunk(2, dim=0)  # (I, N*K) each
    y = F.grouped_mm(experts.down_proj, F.silu(gate) * up, offs=offsets).t()  # (N*K, H)
    y = y * top_k_weights.reshape(-1).index_select(0, perm)[:, None]
    return hidden.new_zeros(N, y.shape[1]).index_add(0, perm // K, y)


def padded_bmm(experts, hidden, top_k_index, top_k_weights):
    """The alternative that was tried: every expert's rows zero-padded to the largest count, one bmm per projection."""
    E, N = experts.num_experts, hidden.shape[0]
    expert_sorted, perm = torch.sort(top_k_index.reshape(-1))
    counts = torch.bincount(expert_sorted, minlength=E)
    rows = int(counts.max())
    slot = torch.arange(N * K) - (torch.cumsum(counts, 0) - counts)[expert_sorted]  # position within its expert
    flat = expert_sorted * rows + slot
    x = hidden.new_zeros(E * rows, hidden.shape[1]).index_copy_(0, flat, hidden.index_select(0, perm // K))
    gate, up = torch.bmm(x.view(E, rows, -1), experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, experts.down_proj.transpose(1, 2)).view(E * rows, -1).index_select(0, flat)
    y = y * top_k_weights.reshape(-1).index_select(0, perm)[:, None]
    return hidden.new_zeros(N, y.shape[1]).index_add(0, perm // K, y)


@torch.no_grad()  # generation's setting
def probe_experts(args) -> None:
    shape = vs_trl.WORKLOADS[args.workload]
    experts = _experts_module(shape).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, shape["hidden"], generator=gen)
    weights = torch.full((TOKENS, K), 0.5)
    for used in (shape["experts"], min(6, shape["experts"])):
        index = torch.stack([torch.randperm(used, generator=gen)[:K] for _ in range(TOKENS)])  # (N, K) distinct
        ref = experts(hidden, index, weights)
        same = max(float((f(experts, hidden, index, weights) - ref).abs().max()) for f in (padded_bmm, column_grouped))
        kernel = _median_ms(lambda index=index: experts(hidden, index, weights), args.repeats)
        padded = _median_ms(lambda index=index: padded_bmm(experts, hidden, index, weights), args.repeats)
        columns = _median_ms(lambda index=index: column_grouped(experts, hidden, index, weights), args.repeats)
        most = int(torch.bincount(index.reshape(-1)).max())
        print(
            f"experts {args.workload}: slots on {used} of {shape['experts']} experts (at most {most} rows each): "
            f"expertrl kernel {kernel:.2f} ms, padded bmm {padded:.2f} ms, column-grouped {columns:.2f} ms "
            f"(max difference {same:.1e})"
        )


@torch.no_grad()
def probe_gemm(args) -> None:
    """One expert's gate-up GEMM at a decode step's rows (1 and 8), cycling over the ``--workload``'s E experts as a
    spread decode step does, against reading the same weights once (``sum``): how far the small GEMMs are from the
    memory they read."""
    shape = vs_trl.WORKLOADS[args.workload]
    E, H, I2 = shape["experts"], shape["hidden"], 2 * shape["moe_intermediate"]
    weights = torch.randn(E, I2, H)  # (E, 2I, H) the experts' gate_up_proj layout
    mib = weights.numel() * 4 / 2**20
    read = _median_ms(lambda: weights.sum(), args.repeats)
    print(f"gemm {args.workload}: sum of the {E} experts' gate-up weights ({mib:.1f} MiB) {read:.2f} ms "
          f"({mib / 1024 / read * 1e3:.1f} GiB/s)")  # fmt: skip
    for rows in (1, 8):
        x = torch.randn(rows, H)
        ms = _median_ms(lambda x=x: [F.linear(x, weights[e]) for e in range(E)], args.repeats)
        gflops = 2 * rows * H * I2 * E / ms / 1e6
        print(f"gemm {args.workload}: {E} x F.linear({rows} x {H} @ {H} x {I2}) {ms:.2f} ms ({ms / E * 1e3:.0f} us "
              f"each, {gflops:.1f} GFLOP/s, {mib / 1024 / ms * 1e3:.1f} GiB/s of weights)")  # fmt: skip


def probe_matmul(args) -> None:
    from expertrl.runtime import cpu_has_onednn_bf16

    n = args.matmul_n
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best = min(_seconds(lambda a=a, b=b: torch.mm(a, b)) for _ in range(3))
        print(f"matmul {str(dtype).removeprefix('torch.')}: {2 * n**3 / best / 1e9:.1f} GFLOP/s ({n}^3, best of 3)")
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 kernels: {cpu_has_onednn_bf16()}")


def _saved_model(args, root: Path) -> Path:
    if args.model:
        return Path(args.model)
    path = root / "model"
    vs_trl.build_model(vs_trl.WORKLOADS[args.workload], path)
    return path


def probe_spread(args) -> None:
    from expertrl.collect import collect
    from expertrl.config import SFTJobConfig, TrainConfig
    from expertrl.configio import load_config
    from expertrl.presets import preset_overrides
    from expertrl.run import build_run
    from expertrl.sft import run_sft
    from expertrl.start import start

    with tempfile.TemporaryDirectory() as tmp:
        model = _saved_model(args, Path(tmp))
        task = ["--task.name", "rg:chain_sum", "--task.kwargs", json.dumps(vs_trl.TASK_KWARGS)]
        if args.sft_steps:
            run_sft(load_config(SFTJobConfig, None, [
                "--model.path", str(model), *task, "--task.train_size", "2048", "--task.eval_size", "16",
                "--sft.steps", str(args.sft_steps), "--sft.batch_size", "32", "--output_dir", f"{tmp}/sft",
                "--progress", "false",
            ]))  # fmt: skip
            model = Path(tmp) / "sft" / "final"
        for preset in ("grpo", "moe_grpo"):
            overrides = vs_trl.expertrl_args(preset_overrides(preset), str(model), f"{tmp}/{preset}", 2, train_size=64)
            cfg = load_config(TrainConfig, None, overrides)
            run = build_run(cfg)
            distinct, largest, lengths = [], [], []
            with run.claimed():
                start(run, {"signal": None})
                for step in range(2):
                    batch, _, _ = collect(run, step)
                    ids = batch.routing.experts  # (L, B, S, K)
                    lengths.append(float(batch.mask.sum(-1).mean()))
                    for s in range(batch.prompt_width, ids.shape[2] - 1):  # decode positions
                        live = batch.attention_mask[:, s].bool()
                        for layer in range(ids.shape[0]):
                            used = ids[layer, live, s].reshape(-1).long()
                            used = used[used >= 0]
                            if len(used):
                                counts = torch.bincount(used)
                                distinct.append(int((counts > 0).sum()))
                                largest.append(float(counts.max() / counts.sum()))
            E, label = batch.routing.num_experts, args.model or args.workload
            print(
                f"spread {label} (sft {args.sft_steps} steps) {preset}: {statistics.mean(distinct):.1f} of {E} "
                f"experts per decode step and layer, largest share {statistics.mean(largest):.2f}, "
                f"completion length {statistics.mean(lengths):.1f}"
            )


def probe_compile(args) -> None:
    from transformers import AutoModelForCausalLM, CompileConfig

    from expertrl.decoding import rollout_cache

    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(_saved_model(args, Path(tmp)), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (TOKENS, 40), generator=gen)
    new = vs_trl.MAX_NEW

    def generate(**kw) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=True, pad_token_id=0, **kw,
            )  # fmt: skip
        return time.perf_counter() - t0

    compiled = CompileConfig(fullgraph=False, dynamic=False)
    compiled._compile_all_devices = True  # transformers compiles only on accelerators unless told
    variants = {
        "dynamic cache": {},
        "expertrl in-place cache": {"past_key_values": lambda: rollout_cache(model, ids.shape[1] + new)},
        "static cache": {"cache_implementation": "static"},
        "static cache + torch.compile": {"cache_implementation": "static", "compile_config": compiled},
    }
    make = {  # fresh keyword arguments (a fresh cache) per call
        name: (lambda kw=kw: {k: v() if callable(v) else v for k, v in kw.items()}) for name, kw in variants.items()
    }
    first = {name: generate(**make[name]()) for name in variants}  # the compile happens in its variant's first call
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):  # interleaved rounds, the order rotating, so slow phases hit every variant
        names = list(variants)[r % len(variants) :] + list(variants)[: r % len(variants)]
        for name in names:
            times[name].append(generate(**make[name]()))
    for name, ts in times.items():
        print(
            f"compile {args.model or args.workload} {name}: first call {first[name]:.1f} s, then median "
            f"{statistics.median(ts):.3f} s ({min(ts):.3f}-{max(ts):.3f}, {len(ts)} interleaved calls)"
        )


PROBES = {
    "experts": probe_experts,
    "gemm": probe_gemm,
    "matmul": probe_matmul,
    "spread": probe_spread,
    "compile": probe_compile,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probes", nargs="+", choices=sorted(PROBES))
    ap.add_argument("--workload", default="W2", choices=sorted(vs_trl.WORKLOADS))
    ap.add_argument("--model", default=None, help="a saved model directory instead of the workload's random one")
    ap.add_argument("--sft-steps", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="calls per measurement (experts: 60 used in the README)")
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for name in args.probes:
            PROBES[name](args)
    finally:
        torch.set_num_threads(threads)  # a caller's setting (the test suite's) survives


if __name__ == "__main__":
    main()
