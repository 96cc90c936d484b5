"""Per-token costs of routing that grow with E and K, each as a ratio to E = 8, K = 2 (Mixtral's router).

Router shapes: 8x2 (Mixtral), 60x4 (Qwen1.5/Qwen2-MoE), 64x8 (OLMoE), 128x8 (Qwen3-30B-A3B) by default (``--shapes``).
Measured on ``--tokens`` routed tokens (one router call: a prefill chunk or a training forward's B*S rows), best of
``--repeats`` after a warm-up, one thread:

1. ``sample``: drawing K of E experts without replacement for every token from the routing softmax, as a MoE-GRPO
   rollout does: ``policies.Multinomial.select`` (``torch.multinomial``), and Gumbel-top-K with counter-based noise
   (``moe.gumbel``, the vLLM engine's draw; noise generation included);
2. ``set_logp``: the ordered Plackett-Luce log-probability of each token's K-set from all E scores
   (``setprob.set_logprob``), forward and forward + backward (Gate-GRPO's g_θ is differentiable);
3. ``router``: one whole router call under ``route`` (logits, routing softmax, the draw, expert weights, set and
   router log-probs, the trace record), forward + backward, with the native router's plain top-K as reference;
4. ``bytes/token/layer``: what the trace keeps per token and MoE layer: K expert ids (``types.expert_id_dtype``) and
   one float32 set log-prob;
5. ``step``: one whole MoE-GRPO step (sampled rollout with trace, two inner updates of GRPO + Gate-GRPO + Switch LB
   with the first update's forward as the old policy, AdamW) of a Qwen3-MoE at hidden 64 and 2 layers whose expert
   width shrinks as K grows (K * width = 256, fine-grained experts: the active FLOPs stay fixed, so the ratio is
   the cost of routing more, smaller experts, not of a larger model).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/router_scaling.py                      # the numbers in README.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/router_scaling.py --smoke              # seconds: small sizes
    .venv/bin/python benchmarks/router_scaling.py --json out.json --layers 48 --batch-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch

from expertrl.advantages import group_advantages
from expertrl.config import TrainConfig
from expertrl.models import build_tiny_moe
from expertrl.moe.gumbel import gumbel_noise, sample_without_replacement
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial
from expertrl.moe.setprob import set_logprob
from expertrl.objective import Denominators
from expertrl.policy import with_old_policy
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for
from expertrl.tasks import load_task
from expertrl.tokenizer import build_char_tokenizer
from expertrl.types import Sampling, expert_id_dtype

HIDDEN, ACTIVE_WIDTH = 64, 256  # the step's model: K * expert width = ACTIVE_WIDTH


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def router_costs(E: int, K: int, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds per token of each routing piece for one router call of ``tokens`` rows."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, E, generator=gen) * 2.0  # (N, E) a trained router's logit scale
    route_scores = logits / 0.7  # (N, E) the routing distribution at temperature 0.7
    logp = torch.log_softmax(route_scores, dim=-1)
    experts = Multinomial().select(logp, K, gen)  # (N, K)
    seeds, positions = torch.full((tokens,), 7, dtype=torch.long), torch.arange(tokens)
    scores_grad = route_scores.clone().requires_grad_(True)

    def pl_backward():
        set_logprob("plackett_luce", scores_grad, experts).sum().backward()

    costs = {
        "sample_multinomial": best_of(lambda: Multinomial().select(logp, K, gen), repeats),
        "sample_gumbel": best_of(
            lambda: sample_without_replacement(route_scores, K, gumbel_noise(seeds, positions, 1, E)[:, 0]), repeats
        ),
        "set_logp": best_of(lambda: set_logprob("plackett_luce", route_scores, experts), repeats),
        "set_logp_fwd_bwd": best_of(pl_backward, repeats),
    }
    costs |= _router_call(E, K, tokens, repeats)
    return {k: v / tokens for k, v in costs.items()}


def _router_call(E: int, K: int, tokens: int, repeats: int) -> dict[str, float]:
    """One router call of a real model (forward + backward), natively and under ``route`` with sampling."""
    model = build_tiny_moe("qwen3_moe", "small", num_experts=E, top_k=K, num_hidden_layers=1).eval()
    gate = model.model.layers[0].mlp.gate
    h = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def native():
        logits, weights, _ = gate(h)
        (weights.sum() + logits.sum()).backward()

    def routed():
        with route(model, Multinomial(), generator=torch.Generator().manual_seed(2), temperature=0.7) as rec:
            logits, weights, _ = gate(h)
        (weights.sum() + logits.sum() + rec.set_logp(1).sum()).backward()
        rec.trace(1)

    return {"router_native": best_of(native, repeats), "router_routed": best_of(routed, repeats)}


def trace_bytes_per_token_layer(E: int, K: int) -> int:
    return K * expert_id_dtype(E).itemsize + 4  # K ids + one float32 set log-prob


def step_seconds(E: int, K: int, *, prompts: int, group: int, new_tokens: int, repeats: int) -> float:
    """One MoE-GRPO step (rollout + 2 inner updates + AdamW), fine-grained experts of width ACTIVE_WIDTH / K."""
    model = build_tiny_moe("qwen3_moe", "small", num_experts=E, top_k=K, moe_intermediate_size=ACTIVE_WIDTH // K)
    model.eval()
    tok = build_char_tokenizer()
    items = load_task("addition", train_size=prompts, eval_size=1, seed=0).train
    cfg = TrainConfig()
    cfg.loss.lb_coef = 0.01
    objective = objective_for(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sampling = Sampling(routing_temperature=cfg.routing.temperature)

    def step():
        gen = torch.Generator().manual_seed(0)
        r = generate_rollout(model, tok, items, group_size=group, max_new_tokens=new_tokens, policy=Multinomial(),
                             sampling=sampling, generator=gen, old_routing=None)  # fmt: skip
        rewards = torch.rand(r.batch_size, generator=torch.Generator().manual_seed(1)).round()
        r.advantages, _ = group_advantages(rewards, group)
        dens = Denominators(float(r.batch_size), r.mask.sum())
        for first in (True, False):
            optimizer.zero_grad(set_to_none=True)
            out = objective(model, r, dens, first_update=first)
            out.loss.backward()
            optimizer.step()
            if first:
                r = with_old_policy(r, out.behaviour)

    return best_of(step, repeats)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8x2,60x4,64x8,128x8", help="ExK router shapes; the first is the baseline")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of one router call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="step: prompts per step")
    ap.add_argument("--group", type=int, default=4, help="step: completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=16, help="step: tokens generated per completion")
    ap.add_argument("--layers", type=int, default=48, help="projection: MoE layers of the real model")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="projection: tokens of a rollout batch")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the script runs")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.repeats, args.prompts, args.group, args.new_tokens = 256, 1, 2, 2, 4
    torch.set_num_threads(1)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for E, K in shapes:
        row = {"E": E, "K": K, **router_costs(E, K, args.tokens, args.repeats)}
        row["trace_bytes_per_token_layer"] = trace_bytes_per_token_layer(E, K)
        row["step_s"] = step_seconds(E, K, prompts=args.prompts, group=args.group, new_tokens=args.new_tokens,
                                     repeats=args.repeats)  # fmt: skip
        rows.append(row)
        print(f"E={E:4d} K={K}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("E", "K")))
    base = rows[0]
    keys = [k for k in base if k not in ("E", "K")]
    print(f"\nratios to E={base['E']}, K={base['K']} ({args.tokens} tokens per router call, best of {args.repeats})")
    print("| E x K | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['E']} x {row['K']} | " + " | ".join(f"{row[k] / base[k]:.2f}" for k in keys) + " |")
    print(f"\nprojection: {args.layers} MoE layers, {args.batch_tokens}-token rollout batch")
    for row in rows:
        per_token = args.layers * row["trace_bytes_per_token_layer"]
        sample_s = args.layers * args.batch_tokens * row["sample_multinomial"]
        pl_s = args.layers * args.batch_tokens * row["set_logp_fwd_bwd"]
        mib = per_token * args.batch_tokens / 2**20
        print(
            f"  E={row['E']} K={row['K']}: trace {per_token} B/token = {mib:.1f} MiB per batch; sampling "
            f"{sample_s:.3f} s, Plackett-Luce fwd+bwd {pl_s:.3f} s per batch on one core"
        )
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average": os.getloadavg(),
        "args": vars(args),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
