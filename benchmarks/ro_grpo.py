"""RO-GRPO on CPU: GRPO on a LoRA-MoE tiny model with and without routing rewards, several seeds.

(1) One dense base, shared by every arm: a tiny Qwen3 (``--model.preset small``, 0.09M params) fully fine-tuned on
    the built-in addition task (operands 0-99) with ``expertrl sft`` (Det-FT; a dense model has no router), saved
    once under ``OUT/base/final``. It plays the part of the pretrained dense LLM that RO-GRPO adapts.
(2) Arms, each ``train()`` from that base with ``--sft.steps 0`` (the base stays frozen; only adapters train):
      lora            the single-LoRA baseline (PEFT), rank matched to the LoRA-MoE's trainable budget
      lora_moe        vanilla LoRA-MoE (E=4, r=8 per expert, dense soft mixture on gate/up/down), GRPO
      +aux            the same with a load-balancing aux loss (0.01; soft dispatch on a dense mixture)
      +smooth         RO-GRPO Smooth routing reward (w_route 0.2, lambda_H 0.5 -> lambda_B 2.0, k 10, c 0.5)
      +relative       RO-GRPO Relative routing reward (bonus 0.2, 1000-sample window)
      +shuffled       the paper's control: Smooth rewards permuted inside each batch
    All arms use sampled tokens (T=1), 16 prompts x G=8, mu=2, lr 3e-4, the same seeds.
(3) Per arm and seed: held-out accuracy (greedy, 128 prompts) at the end, and routing statistics of the *held-out*
    greedy completions computed exactly like the reward: H_norm (mean per-token router entropy / ln E over
    (token, module) pairs) and M_norm (load imbalance, 1 = collapse), plus the loop rate of the completions.
    Mean +- std over seeds in a Markdown table: printed and written to ``OUT/ro_grpo.md`` (raw rows in results.json).

    .venv/bin/python benchmarks/ro_grpo.py [--out runs/ro_grpo] [--steps 100] [--seeds 0,1,2] [--arms lora,lora_moe]

A tiny model and a simple task: the table shows whether the routing rewards move the routing statistics and what
they cost in accuracy here, not what they do for a 7B model.
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
from expertrl.decoding import decoding_kwargs
from expertrl.models import load_model
from expertrl.moe.hooks import route
from expertrl.moe.lora_moe import matched_lora_rank
from expertrl.moe.policies import TopK
from expertrl.policy import forward_sequences
from expertrl.presets import preset_overrides
from expertrl.rewards.routing import routing_statistics
from expertrl.rewards.shaping import repetition_rate
from expertrl.rollout import completion_mask
from expertrl.runtime import model_and_tokenizer, task_from_config
from expertrl.sft import run_sft
from expertrl.train import train
from expertrl.types import Sampling

ARMS = {
    "lora": "lora",
    "lora_moe": "lora_moe",
    "+aux": "lora_moe,aux_loss",
    "+smooth": "lora_moe,ro_grpo_smooth",
    "+relative": "lora_moe,ro_grpo_relative",
    "+shuffled": "lora_moe,ro_grpo_shuffled",
}


def base_model(out: Path, sft_steps: int) -> Path:
    final = out / "base" / "final"
    if not (final / "config.json").is_file():
        overrides = ["--model.family", "qwen3", "--model.preset", "small", "--sft.routing", "topk",
                     "--sft.lb_coef", "0", "--sft.steps", str(sft_steps), "--output_dir", str(out / "base"),
                     "--progress", "false"]  # fmt: skip
        run_sft(load_config(SFTJobConfig, None, overrides))
    return final


@torch.no_grad()
def heldout_routing(cfg: TrainConfig, run_dir: Path) -> dict:
    """H_norm, M_norm and loop rate of greedy held-out completions of the trained adapter (top-K routing)."""
    model_cfg = cfg.model
    model_cfg.adapter.path = str(run_dir / "final")
    model, tok = model_and_tokenizer(model_cfg, cfg.seed)
    model.eval()
    task = task_from_config(cfg.task)
    prompts = [it["prompt"] for it in task.eval]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with route(model, TopK()):
        seqs = model.generate(**enc, **decoding_kwargs(tok, max_new_tokens=cfg.rollout.max_new_tokens))
    P = enc["input_ids"].shape[1]
    mask = completion_mask(seqs[:, P:], tok.eos_token_id)  # (B, C)
    attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
    _, loop_rate = repetition_rate(seqs[:, P:], mask)
    out = {"loop_rate": float(loop_rate)}
    fwd = forward_sequences(model, seqs, attn, P, None, sampling=Sampling(), keep_probs=True)
    if fwd.probs.shape[0] > 0:  # the plain-LoRA baseline has no router
        stats = routing_statistics(fwd.probs[:, :, P - 1 : -1], mask)
        out |= {"h_norm": float(stats["h_norm"].mean()), "m_norm": float(stats["m_norm"].mean())}
    return out


def run_arm(arm: str, seed: int, base: Path, out: Path, steps: int, lora_rank: int) -> dict:
    run_dir = out / f"{arm.strip('+')}-s{seed}"
    overrides = preset_overrides(ARMS[arm]) + [
        "--model.path", str(base), "--sft.steps", "0", "--steps", str(steps), "--seed", str(seed),
        "--optim.lr", "3e-4", "--eval_every", "0", "--output_dir", str(run_dir), "--progress", "false",
    ]  # fmt: skip
    if arm == "lora":
        overrides += ["--model.adapter.rank", str(lora_rank), "--model.adapter.alpha", str(2.0 * lora_rank)]
    cfg = load_config(TrainConfig, None, overrides)
    if not (run_dir / "summary.json").is_file():
        t0 = time.perf_counter()
        train(cfg)
        print(f"{arm} seed {seed}: {time.perf_counter() - t0:.0f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"arm": arm, "seed": seed, "acc_start": summary["accuracy_start"], "acc_end": summary["accuracy_end"]} | (
        heldout_routing(cfg, run_dir)
    )


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def table(rows: list[dict], arms: list[str]) -> str:
    lines = [
        "| arm | held-out acc. (start → end) | H_norm (held-out) | M_norm (held-out) | loop rate |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        start = statistics.mean(r["acc_start"] for r in rs)
        lines.append(
            f"| {arm} | {start:.3f} → {mean_std([r['acc_end'] for r in rs])} | "
            f"{mean_std([r['h_norm'] for r in rs if 'h_norm' in r])} | "
            f"{mean_std([r['m_norm'] for r in rs if 'm_norm' in r])} | {mean_std([r['loop_rate'] for r in rs])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ro_grpo")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sft-steps", type=int, default=900)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    base = base_model(out, args.sft_steps)
    # RO-GRPO matches the single LoRA's rank to the LoRA-MoE's trainable budget (experts + routers).
    dense = load_model(base)
    lora_rank = matched_lora_rank(dense, num_experts=4, rank=8)
    print(f"single-LoRA rank matched to LoRA-MoE E=4 r=8: {lora_rank}")
    rows = [run_arm(arm, int(seed), base, out, args.steps, lora_rank) for arm in arms for seed in args.seeds.split(",")]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    md = table(rows, arms)
    (out / "ro_grpo.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
