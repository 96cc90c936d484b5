"""expertrl against TRL's GRPOTrainer on the same work (issue 16): completion tokens per second of a training step.

Workloads (a Qwen3-MoE built in-process from a config, random init, the character vocabulary of
``expertrl.tokenizer``, saved once with ``save_pretrained`` and loaded from that directory by both libraries):
- ``W1``: hidden 128, 4 layers, E 8, K 2, moe_intermediate 64, 4 heads / 2 KV heads, head_dim 32, tied embeddings;
- ``W2``: hidden 512, 8 layers, E 16, K 2, moe_intermediate 256, 8 heads / 4 KV heads, head_dim 64 (untied);
- ``50M``: expertrl's 50M preset (hidden 384, 6 layers, E 8, K 2, moe_intermediate 768, 6 heads / 2 KV heads).

The same task (reasoning-gym ``chain_sum``, 2 one-digit terms: the same prompt strings, plain text, no chat template),
batch (8 prompts x 8 completions <= 32 tokens, sampled tokens at T = 1, one optimizer step per batch, one micro-batch
of 64, lr 1e-4, AdamW), precision (float32 except in the ``_bf16`` variants) and threads for every variant:
- ``trl``: TRL 1.16.0 GRPOTrainer, defaults (gradient checkpointing on, ``loss_type="grpo"``, beta 0, the model's
  router aux loss), in its own virtual environment (``--trl-python``; ``--setup-trl`` creates it);
- ``trl_nockpt``: the same with ``gradient_checkpointing=False`` (TRL's fastest setting here);
- ``grpo``: ``expertrl --preset grpo`` (top-K routing, sampled tokens, live routing, Switch LB 0.01);
- ``moe_grpo``: expertrl's MoE-GRPO (sampled experts, greedy tokens, Token- + Gate-GRPO, LB 0.01), one inner update;
  every completion draws its own prompt routes (``routing.prompt_routes=row``, the default);
- ``moe_grpo_group``: the same with ``routing.prompt_routes=group`` (a group shares one draw of its prompt's routes,
  so the prompt is computed once per group in generation and in the loss forward, as under top-K routing);
- ``grpo_bf16``, ``moe_grpo_group_bf16`` (on request, ``--variants``): the same in bfloat16.

Method: every (workload, variant) run is a fresh child process that loads the saved model, runs ``--warmup`` untimed
steps and then ``--steps`` timed ones. The runs are interleaved (round r runs every variant of a workload once, the
order rotating by round) so slow phases of a shared machine hit every variant alike. A step is what each library's
loop does per optimizer step: rollout (generate), rewards, advantages, loss forward + backward, clipping, AdamW; TRL
from ``on_step_begin`` to ``on_step_end`` (generation happens inside its ``training_step``), expertrl
``collect`` + ``update`` (what ``time/step`` of ``expertrl train`` measures), neither with logging or evaluation.
Completion tokens per step: tokens up to and including EOS (TRL's ``completions/mean_length`` x 64; expertrl's
completion attention mask). Reported: median and spread (min-max) of the per-run median s/step, tok/s from the
medians, and the speed-up over TRL's best variant. Achieved FLOP/s: matmul FLOPs of one step's useful work
(generation with a KV cache, then forward + 2x backward over the batch; gradient checkpointing's recompute is not
counted), from the model config and the median step, as a fraction of this machine's matmul peak measured in the
same run (best of ``torch.mm`` 2048^3 float32 at the same threads). A prompt counts once per group wherever the
method routes a group's copies alike (top-K routing: TRL, ``grpo``; ``moe_grpo_group``), since computing it G times
is redundant work; under ``moe_grpo``'s per-row prompt routes each copy is a different computation and counts.

    .venv/bin/python benchmarks/vs_trl.py --setup-trl                       # once: benchmarks/.venv-trl (TRL 1.16.0)
    .venv/bin/python benchmarks/vs_trl.py                                   # full: W1, W2, 50M; ~1 h on 2 cores
    .venv/bin/python benchmarks/vs_trl.py --quick                           # smoke: tiny sizes, one round, ~3 min

Top-level imports are the standard library only: the same file runs the TRL child in TRL's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_VENV = HERE / ".venv-trl"
TRL_PACKAGES = ["trl==1.16.0", "transformers==5.19.0", "accelerate==1.15.0", "datasets==5.2.0", "reasoning-gym"]
"""TRL's environment: TRL 1.16.0 on the transformers expertrl pins (the same modelling code on both sides)."""

WORKLOADS = {
    "W1": dict(hidden=128, layers=4, experts=8, top_k=2, moe_intermediate=64, heads=4, kv_heads=2, head_dim=32,
               tied=True),
    "W2": dict(hidden=512, layers=8, experts=16, top_k=2, moe_intermediate=256, heads=8, kv_heads=4, head_dim=64,
               tied=False),
    "50M": dict(hidden=384, layers=6, experts=8, top_k=2, moe_intermediate=768, heads=6, kv_heads=2, head_dim=64,
                tied=False),
    "tiny": dict(hidden=32, layers=2, experts=4, top_k=2, moe_intermediate=32, heads=4, kv_heads=2, head_dim=8,
                 tied=True),
}  # fmt: skip
"""Model shapes; ``tiny`` is for ``--quick`` only."""

VARIANTS = ("trl", "trl_nockpt", "grpo", "moe_grpo", "moe_grpo_group")
EXPERTRL_VARIANTS = {
    "grpo": ("grpo", []),
    "moe_grpo": ("moe_grpo", []),
    "moe_grpo_group": ("moe_grpo", ["--routing.prompt_routes", "group"]),
    "grpo_bf16": ("grpo", ["--model.dtype", "bfloat16"]),
    "moe_grpo_group_bf16": ("moe_grpo", ["--routing.prompt_routes", "group", "--model.dtype", "bfloat16"]),
}
"""expertrl variants: (preset, extra overrides). The ``_bf16`` ones (not in the default list: TRL runs float32 here)
load the model in bfloat16 (float32 router and log-prob math, ``model.dtype``)."""
PER_ROW_PROMPTS = {"moe_grpo"}
"""Variants whose G copies of a prompt are different computations (per-row sampled prompt routes)."""
TASK_KWARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
PROMPTS, GROUP, MAX_NEW, LR = 8, 8, 32, 1e-4


# ---------------------------------------------------------------------------------------------------------- models
def model_config(shape: dict, vocab_size: int, **settings):
    """The Qwen3-MoE config of ``shape`` (``WORKLOADS``), with ``settings`` on top (expertrl's environment)."""
    from transformers import Qwen3MoeConfig

    fields = dict(
        vocab_size=vocab_size, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
        moe_intermediate_size=shape["moe_intermediate"], intermediate_size=shape["moe_intermediate"],
        norm_topk_prob=True, tie_word_embeddings=shape["tied"],
        max_position_embeddings=512, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    return Qwen3MoeConfig(**(fields | settings))


def build_model(shape: dict, out: Path, seed: int = 0) -> None:
    """A random Qwen3-MoE of ``shape`` with the character tokenizer, saved to ``out`` (expertrl's environment)."""
    from transformers import AutoModelForCausalLM

    from expertrl.models import seeded_from_config
    from expertrl.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_char_tokenizer

    tok = build_char_tokenizer()
    config = model_config(shape, len(tok), pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = seeded_from_config(lambda: AutoModelForCausalLM.from_config(config), seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def task_items(train_size: int, seed: int = 0) -> list[dict]:
    """The prompts and answers both libraries train on: expertrl's ``rg:chain_sum`` items (expertrl's environment)."""
    from expertrl.tasks import load_task

    task = load_task("rg:chain_sum", train_size=train_size, eval_size=8, seed=seed, **TASK_KWARGS)
    return [{"prompt": it["prompt"], "answer": it["answer"]} for it in task.train]


def step_flops(
    shape: dict, vocab: int, prompt_len: int, completion_len: float, batch: int, prompt_copies: int
) -> float:
    """Matmul FLOPs of one step's useful work: generation (prefill, then one token at a time with a KV cache) and the
    loss forward + backward (2x forward) over prompt + completion; the LM head only where logits are used. The prompt
    positions count ``prompt_copies`` times (the number of groups where their copies are one computation, else the
    batch), the completions ``batch`` times. (The sharing variants compute the last prompt position per row; counted
    once per group here, it is ~1/P of the prompt's work.)"""
    H, hd, nq, nkv = shape["hidden"], shape["head_dim"], shape["heads"], shape["kv_heads"]
    per_token = 2 * H * hd * (2 * nq + 2 * nkv)  # q, k, v, o projections
    per_token += 2 * H * shape["experts"] + 6 * shape["top_k"] * H * shape["moe_intermediate"]  # router, experts
    per_token *= shape["layers"]

    def attention(ctx: float) -> float:  # scores and values of one query over ctx keys, all layers
        return 4 * nq * hd * ctx * shape["layers"]

    head = 2 * H * vocab
    S = prompt_len + completion_len
    prompt = prompt_len * per_token + sum(attention(t + 1) for t in range(prompt_len))  # prefill = prompt forward
    decode = sum(per_token + attention(prompt_len + t + 1) + head for t in range(int(round(completion_len)) - 1))
    completion = completion_len * (per_token + head) + sum(attention(t + 1) for t in range(prompt_len, int(round(S))))
    return prompt_copies * 4 * prompt + batch * (head + decode + 3 * completion)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul rate (FLOP/s): the best of ``repeats`` n^3 products at ``threads``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------------------- children
def expertrl_args(method: list[str], model: str, out: str, steps: int, train_size: int, seed: int = 0) -> list[str]:
    """``expertrl train`` settings of this benchmark's work (module docstring) for the ``method`` overrides (a
    preset's and a variant's) on the saved ``model``: ``steps`` steps over a train split of ``train_size`` items."""
    return [
        *method, "--model.path", model, "--task.name", "rg:chain_sum",
        "--task.kwargs", json.dumps(TASK_KWARGS), "--task.train_size", str(train_size), "--task.eval_size", "8",
        "--rollout.prompts_per_step", str(PROMPTS), "--rollout.group_size", str(GROUP),
        "--rollout.max_new_tokens", str(MAX_NEW), "--rollout.temperature", "1.0", "--micro_batch_size",
        str(PROMPTS * GROUP), "--inner_updates", "1", "--optim.lr", str(LR), "--sft.steps", "0", "--eval_every", "0",
        "--steps", str(steps), "--output_dir", out, "--overwrite", "true", "--progress", "false", "--seed", str(seed),
    ]  # fmt: skip


def expertrl_child(a: argparse.Namespace) -> dict:
    """Warm-up + timed steps of expertrl's own loop (``collect`` + ``update``) on the saved model."""
    import torch

    torch.set_num_threads(a.threads)
    from expertrl.collect import collect
    from expertrl.config import TrainConfig
    from expertrl.configio import load_config
    from expertrl.presets import preset_overrides
    from expertrl.run import build_run
    from expertrl.start import start
    from expertrl.update import update

    preset, extra = EXPERTRL_VARIANTS[a.variant]
    steps = a.warmup + a.steps
    args = expertrl_args([*preset_overrides(preset), *extra], a.model, a.out, steps, PROMPTS * steps, a.seed)
    cfg = load_config(TrainConfig, None, [*args, *a.extra])
    run = build_run(cfg)
    with run.claimed():
        started = start(run, {"signal": None})
        assert started
        times, tokens, rollout_s = [], [], []
        for step in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            batch, metrics, spare = collect(run, step)
            t1 = time.perf_counter()
            update(run, batch, spare, step)
            t2 = time.perf_counter()
            if step >= a.warmup:
                times.append(t2 - t0)
                rollout_s.append(t1 - t0)
                tokens.append(int(batch.attention_mask[:, batch.prompt_width :].sum()))
        prompt_len = int(batch.prompt_width)
    return {"seconds": times, "tokens": tokens, "rollout_seconds": rollout_s, "prompt_len": prompt_len}


def trl_child(a: argparse.Namespace) -> dict:
    """Warm-up + timed steps of TRL's GRPOTrainer on the saved model (TRL's environment)."""
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    items = json.loads(Path(a.items).read_text())
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_list(items)

    def task_reward(completions, answer, **_):  # exact answer (the random model scores ~0 either way)
        return [float(c.strip() == x) for c, x in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.seconds, self.lengths = 0.0, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    timer = Timer()
    cfg = GRPOConfig(
        output_dir=a.out, use_cpu=True, bf16=False, per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP, max_completion_length=MAX_NEW, learning_rate=LR, max_steps=a.warmup + a.steps,
        logging_steps=1, report_to="none", save_strategy="no", temperature=1.0, loss_type="grpo", seed=a.seed,
        gradient_checkpointing=a.variant == "trl", disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[task_reward], args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer]
    )
    trainer.train()
    n = PROMPTS * GROUP
    lengths = timer.lengths[-a.steps :]
    prompt_len = max(len(tok(it["prompt"])["input_ids"]) for it in items)
    return {
        "seconds": timer.seconds[a.warmup :],
        "tokens": [round(x * n) for x in lengths],
        "prompt_len": prompt_len,
    }


# ---------------------------------------------------------------------------------------------------------- driver
def setup_trl() -> None:
    """Create ``benchmarks/.venv-trl`` with TRL 1.16.0 (torch 2.13.0: the CPU wheel on the dev machines' disk)."""
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(TRL_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *TRL_PACKAGES], check=True)


def run_child(python: str, variant: str, model: Path, items: Path, a: argparse.Namespace, out: Path) -> dict:
    cmd = [
        python, str(Path(__file__).resolve()), "--child", variant, "--model", str(model), "--items", str(items),
        "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads), "--seed", str(a.seed),
        "--out", str(out),
    ]  # fmt: skip
    if not variant.startswith("trl") and a.extra:
        cmd += ["--", *a.extra]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{variant} on {model.name} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(results: dict, shapes: dict, vocab: int, peak: float) -> str:
    lines = [
        "| workload | variant | runs | s/step median (min-max of run medians) | completion tok/s | vs TRL best "
        "| FLOP/s (% of peak) |",
        "|---|---|---|---|---|---|---|",
    ]
    for wl, by_variant in results.items():
        per = {}
        for variant, runs in by_variant.items():
            medians = [statistics.median(r["seconds"]) for r in runs]
            tokens = statistics.median([t for r in runs for t in r["tokens"]])
            s = statistics.median(medians)
            per[variant] = (s, min(medians), max(medians), tokens, runs[0]["prompt_len"], len(runs))
        trl_best = max((per[v][3] / per[v][0] for v in per if v.startswith("trl")), default=None)  # tok/s
        for variant, (s, lo, hi, tokens, prompt_len, n) in per.items():
            rate = tokens / s
            copies = PROMPTS * GROUP if variant in PER_ROW_PROMPTS else PROMPTS
            flops = step_flops(shapes[wl], vocab, prompt_len, tokens / (PROMPTS * GROUP), PROMPTS * GROUP, copies) / s
            speed = f"{rate / trl_best:.2f}x" if trl_best else "-"
            of_peak = " of the float32 peak" if "bf16" in variant else ""
            lines.append(
                f"| {wl} | {variant} | {n} | {s:.3f} ({lo:.3f}-{hi:.3f}) | {rate:,.0f} | {speed} "
                f"| {flops / 1e9:.2f} G ({100 * flops / peak:.1f}%{of_peak}) |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,50M", help="comma-separated keys of WORKLOADS")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs of every variant per workload")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run (first calls, allocator)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny shape, 1 round, 2 + 1 steps")
    ap.add_argument("--trl-python", default=str(TRL_VENV / "bin" / "python"), help="python of TRL's environment")
    ap.add_argument("--setup-trl", action="store_true", help="create benchmarks/.venv-trl and exit")
    ap.add_argument("--out", default="runs/vs_trl", help="models, per-run results and the summary go here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--items", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="extra expertrl overrides for the expertrl variants (after --)")
    a = ap.parse_args()
    if a.setup_trl:
        setup_trl()
        return
    if a.child:
        a.variant = a.child
        print(json.dumps(trl_child(a) if a.child.startswith("trl") else expertrl_child(a)))
        return
    if a.quick:
        a.workloads, a.rounds, a.steps, a.warmup = "tiny", 1, 2, 1
    if not Path(a.trl_python).is_file() and any(v.startswith("trl") for v in a.variants.split(",")):
        sys.exit(f"--trl-python {a.trl_python} does not exist; create TRL's environment with --setup-trl")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    items = out / "items.json"
    items.write_text(json.dumps(task_items(PROMPTS * (a.warmup + a.steps) + 8, seed=a.seed)))
    peak = matmul_peak(a.threads)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s float32 at {a.threads} threads", flush=True)
    shapes = {wl: WORKLOADS[wl] for wl in a.workloads.split(",")}
    variants = a.variants.split(",")
    results: dict = {wl: {v: [] for v in variants} for wl in shapes}
    t_start = time.time()
    for wl, shape in shapes.items():
        model = out / "models" / wl
        if not (model / "config.json").is_file():
            build_model(shape, model, seed=a.seed)
        for r in range(a.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]  # rotate: no variant always first
            for variant in order:
                python = a.trl_python if variant.startswith("trl") else sys.executable
                with tempfile.TemporaryDirectory(dir=out) as tmp:
                    res = run_child(python, variant, model, items, a, Path(tmp) / "run")
                results[wl][variant].append(res)
                s = statistics.median(res["seconds"])
                print(f"{wl} round {r} {variant}: {s:.3f} s/step, {statistics.median(res['tokens'])} tok", flush=True)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(out / "models" / next(iter(shapes))).vocab_size
    table = summarise(results, shapes, vocab, peak)
    load = os.getloadavg()
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {a.rounds} rounds x ({a.warmup} warm-up + {a.steps} "
        f"timed steps); {a.threads} threads; matmul peak {peak / 1e9:.1f} GFLOP/s; wall {time.time() - t_start:.0f} s; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print(header + "\n\n" + table)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "peak": peak, "results": results}, indent=1))
    (out / "summary.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
