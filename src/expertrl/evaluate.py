"""Held-out evaluation with the papers' inference setting (deterministic top-K routing): greedy accuracy, pass@k of
sampled completions, and routing statistics of an evaluation pass (MoE-GRPO §4.3, Figs. 4-6; METHODS §3.9, §6.6).

``evaluate`` scores greedy completions (and, with ``num_samples > 0``, n sampled completions per prompt for pass@k).
``routing_statistics_pass`` generates greedily, then runs one top-K forward over prompt + completion that keeps the
full router probabilities, and reduces them per category and layer with ``expertrl.diagnostics``. ``run_eval`` is
`expertrl eval`: both, written to ``<model>/eval.json`` and printed as a table. Multimodal items (``images`` /
``video``) work with a VLM and its processor in place of the tokenizer (``rollout.encode_prompts``); the vision
special tokens are never generated.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from expertrl.config import ConfigError
from expertrl.io import atomic_write_text
from expertrl.logging import progress_bar, quiet_hf_progress
from expertrl.moe.adapters import find_routers
from expertrl.moe.policies import TopK
from expertrl.rollout import generate_rollout
from expertrl.routing_stats import RoutingStats, to_json
from expertrl.runtime import model_and_tokenizer, place_model, seed_everything, task_from_config
from expertrl.types import GREEDY, Rollout, Sampling


@torch.no_grad()
def _rollout(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    group_size: int = 1,
    routing: bool = False,
) -> Rollout:
    """Completions of ``items`` with deterministic top-K routing (the papers' inference setting), through the rollout
    engine's own generate path (``rollout.generate_rollout``). ``routing``: also one top-K forward over prompt +
    completion that keeps the full router probabilities (``route_probs``) and its routes (``routing``)."""
    return generate_rollout(
        model, tokenizer, items, group_size=group_size, max_new_tokens=max_new_tokens, policy=TopK(),
        sampling=sampling, old_routing="live" if routing else None, keep_probs=routing, routes="none",
    )  # fmt: skip  # generation's own routes are never read: plain generate


def generate_greedy(model: nn.Module, tokenizer, prompts: list[str] | list[dict], *, max_new_tokens: int) -> list[str]:
    """Greedy completions with deterministic top-K routing, decoded up to EOS.

    Args:
        tokenizer: a tokenizer, or a VLM's processor.
        prompts: prompt strings, or task items (``prompt`` and, for a VLM, ``images`` or ``video``).
    """
    items = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    return _rollout(model, tokenizer, items, max_new_tokens=max_new_tokens).completions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 − C(n−c, k) / C(n, k)`` (Chen et al. 2021).

    The probability that a random k-subset of the n samples holds at least one correct one. Exact (integer
    binomials), so n in the hundreds is fine.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean_by_category(cats: list[str], values: list[float]) -> dict[str, float]:
    by_cat = defaultdict(list)
    for c, v in zip(cats, values, strict=True):
        by_cat[c].append(v)
    return {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}


def evaluate(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    score,
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = False,
    num_samples: int = 0,
    temperature: float = 1.0,
    pass_k: Sequence[int] = (1,),
    seed: int | None = None,
    routing: bool = False,
) -> dict:
    """Accuracy (mean score) of greedy top-K completions on ``items``, overall and per ``category``; optionally
    pass@k and the routing statistics of the same greedy completions (``routing``: see ``routing_statistics_pass``; one
    generation serves both).

    Args:
        score: ``score(completion, item) -> float`` (the task's verifier).
        batch_size: sequences per ``generate`` call (sampling: ``batch_size // num_samples`` prompts, at least 1).
        num_samples: n sampled completions per prompt for pass@k (token sampling at ``temperature``, top-K
            routing); 0 = greedy only. A sample is correct when its score is >= 1.
        pass_k: the k of pass@k, each in [1, num_samples].
        seed: seeds the global torch RNG before sampling (token sampling draws from it); None leaves it alone.
    Returns:
        ``{"accuracy", "per_category": {cat: float}, "n", "examples": [first 3 (prompt, completion)]}``, with
        ``routing`` also ``"routing"``, and with sampling also ``"num_samples", "temperature", "sample_mean_score",
        "pass_at_k": {"k": float}, "pass_at_k_per_category": {cat: {"k": float}}``.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0 (0 = greedy only), got {num_samples}")
    if num_samples > 0:
        bad = [k for k in pass_k if not 1 <= int(k) <= num_samples]
        if bad or not pass_k:
            raise ValueError(f"pass_k must be a non-empty list of k in [1, num_samples={num_samples}], got {pass_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampled pass@k, got {temperature}")
    was_training = model.training
    model.eval()
    scores, cats, examples = [], [], []
    stats = RoutingStats(tokenizer) if routing else None
    steps = range(0, len(items), batch_size)
    for start in progress_bar(steps, desc="eval greedy", total=len(steps), enabled=progress, leave=False):
        chunk = items[start : start + batch_size]
        rollout = _rollout(model, tokenizer, chunk, max_new_tokens=max_new_tokens, routing=routing)
        if stats is not None:
            stats.add(chunk, rollout)
        for it, text in zip(chunk, rollout.completions):
            scores.append(float(score(text, it)))
            cats.append(str(it.get("category", "all")))
            if len(examples) < 3:
                examples.append((it.get("question", it["prompt"]), text))  # the question, not the template
    result = {
        "accuracy": sum(scores) / max(len(scores), 1),
        "per_category": _mean_by_category(cats, scores),
        "n": len(scores),
        "examples": examples,
    }
    if stats is not None:
        result["routing"] = stats.result()
    if num_samples > 0:
        result |= _sampled_pass_at_k(
            model, tokenizer, items, score, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
            num_samples=num_samples, temperature=temperature, pass_k=[int(k) for k in pass_k], seed=seed,
        )  # fmt: skip
    model.train(was_training)
    return result


def _sampled_pass_at_k(
    model, tokenizer, items, score, *, max_new_tokens, batch_size, progress, num_samples, temperature, pass_k, seed
) -> dict:
    """n sampled completions per prompt (contiguous groups), scored; pass@k averaged over prompts."""
    if seed is not None:
        torch.manual_seed(seed)
    n = num_samples
    per_call = max(1, batch_size // n)  # prompts per generate call
    correct, sample_scores, cats = [], [], []
    steps = range(0, len(items), per_call)
    for start in progress_bar(steps, desc=f"eval pass@k (n={n})", total=len(steps), enabled=progress, leave=False):
        chunk = items[start : start + per_call]
        sampling = Sampling(do_sample=True, token_temperature=temperature)
        texts = _rollout(
            model, tokenizer, chunk, max_new_tokens=max_new_tokens, sampling=sampling, group_size=n
        ).completions
        for i, it in enumerate(chunk):
            s = [float(score(t, it)) for t in texts[i * n : (i + 1) * n]]
            sample_scores.extend(s)
            correct.append(sum(v >= 1.0 for v in s))
            cats.append(str(it.get("category", "all")))
    per_k = {str(k): [pass_at_k(n, c, k) for c in correct] for k in pass_k}
    return {
        "num_samples": n,
        "temperature": temperature,
        "sample_mean_score": sum(sample_scores) / max(len(sample_scores), 1),
        "pass_at_k": {k: sum(v) / max(len(v), 1) for k, v in per_k.items()},
        "pass_at_k_per_category": _transpose({k: _mean_by_category(cats, v) for k, v in per_k.items()}),
    }


def _transpose(d: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for k, per_cat in d.items():
        for cat, v in per_cat.items():
            out[cat][k] = v
    return dict(out)


@torch.no_grad()
def routing_statistics_pass(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    tokens: str = "all",
    max_positions: int = 64,
    progress: bool = False,
) -> dict:
    """Routing statistics of greedy, top-K-routed generation on ``items``, per category and per layer (JSON-ready).

    Greedy top-K generation, then one top-K forward over prompt + completion with the full router probabilities
    kept (the same routes generation used). Counted positions: see ``tokens`` (default: prompt and completion, as
    MoE-GRPO's Fig. 4 counts the whole token sequence).

    Args:
        items: task items with ``prompt`` and optionally ``category`` ("all" if absent).
        tokens: ``all`` (prompt + completion positions) or ``completion`` (the positions that predict completion
            tokens, like the training metric ``moe/load``).
        max_positions: token positions kept in the experts × positions map (later positions still count elsewhere).
    Returns:
        ``{"layers", "num_experts", "top_k", "tokens", "jsd_base", "categories": {cat: group}, "all": group,
        "jsd": {"categories", "matrix" (L, A, A), "mean_per_layer" (L,), "mean"} or None (< 2 categories),
        "example": first item's per-layer routing}``. A group holds ``usage`` (L, E) (sums to 1 per layer),
        ``router_entropy`` (L,) per-token router entropy in nats (and ``_norm``: / ln E), ``usage_entropy`` (L,)
        entropy of aggregate usage in nats, their means over layers, ``position_usage`` (L, P, E) (rows sum to 1),
        ``position_tokens`` (P,), ``n_items``, ``n_tokens``, and load balance (``max_violation``, ``dead_fraction``,
        ``cv``, per layer). The example holds ``prompt``, ``completion``, ``tokens`` (one string per counted
        position: the token the router saw), ``probs`` (L, n, E), ``experts`` (L, n, K) and ``answer_index`` (the
        index in ``tokens`` of the route that predicted the first completion token).
    """
    if not items:
        raise ValueError("routing_statistics_pass: items is empty; pass at least one task item")
    was_training = model.training
    model.eval()
    stats = RoutingStats(tokenizer, tokens=tokens, max_positions=max_positions)
    steps = range(0, len(items), batch_size)
    for start in progress_bar(steps, desc="eval routing", total=len(steps), enabled=progress, leave=False):
        chunk = items[start : start + batch_size]
        stats.add(chunk, _rollout(model, tokenizer, chunk, max_new_tokens=max_new_tokens, routing=True))
    model.train(was_training)
    return stats.result()


# ---------------------------------------------------------------------------------------------------------------
# `expertrl eval`


def run_eval(cfg) -> dict:
    """`expertrl eval`: accuracy of ``cfg.model`` on ``cfg.task`` (top-K routing, greedy), optional pass@k of sampled
    completions, and routing statistics; written to ``eval.json`` next to what was evaluated (the adapter directory
    for an adapter, else the model directory) and printed as a table."""
    if cfg.model.path is None:
        raise ConfigError(
            "model.path: expertrl eval scores a saved model; pass --model.path DIR (a run's final/ directory, or the "
            "base model of an adapter given by --model.adapter.path)"
        )
    seed_everything(cfg.seed)
    quiet_hf_progress(cfg.progress)  # Hugging Face's loading bar follows the switch too
    model, tokenizer = model_and_tokenizer(cfg.model, cfg.seed, allow_dense=True)
    place_model(model)
    task = task_from_config(cfg.task, tokenizer, model=model, new_tokens=cfg.max_new_tokens,
                            new_tokens_field="max_new_tokens")  # fmt: skip
    result = evaluate(
        model, tokenizer, task.eval, task.score, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        progress=cfg.progress, num_samples=cfg.num_samples, temperature=cfg.temperature, pass_k=cfg.pass_k,
        seed=cfg.seed,
        routing=cfg.routing_stats and bool(find_routers(model, allow_dense=True)),  # a dense model routes nothing
    )  # fmt: skip
    print(format_table(task.name, result))
    out = Path(cfg.model.adapter.path or cfg.model.path) / "eval.json"  # each adapter keeps its own result
    kept = write_eval_json(out, json.dumps(to_json({"task": task.name, **result}), indent=1))
    print(f"results: {out}" + (f" (the previous eval.json, another result, kept as {kept.name})" if kept else ""))
    return result


def write_eval_json(path: Path, text: str) -> Path | None:
    """Write ``text`` to ``path`` atomically (a kill leaves the old file or the new one). A previous ``path`` holding
    another result is not lost: it is renamed to ``eval-<n>.json`` (the first free n), which is returned."""
    kept = None
    if path.is_file() and path.read_text() != text:
        n = 1
        while (kept := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
            n += 1
        os.replace(path, kept)
    atomic_write_text(path, text)
    return kept


def format_table(task_name: str, result: dict) -> str:
    """The console table of ``run_eval``: accuracy (and pass@k, routing entropies) per category."""
    ks = list(result.get("pass_at_k", {}))
    routing = result.get("routing")
    head = f"{'category':<16} {'n':>5} {'accuracy':>9}" + "".join(f" {'pass@' + k:>8}" for k in ks)
    if routing:
        head += f" {'router H':>9} {'usage H':>8}"
    lines = [
        f"expertrl eval: {task_name}, {result['n']} held-out prompts, top-K routing, greedy decoding"
        + (f"; pass@k from {result['num_samples']} samples at temperature {result['temperature']}" if ks else ""),
        head,
    ]
    cats = routing["categories"] if routing else {}
    per_cat_k = result.get("pass_at_k_per_category", {})

    def row(name: str, acc: float, pk: dict, group: dict | None) -> str:
        n = "" if group is None else group["n_items"]
        line = f"{name:<16} {n!s:>5} {acc:>9.3f}" + "".join(f" {pk.get(k, float('nan')):>8.3f}" for k in ks)
        if group is not None:
            line += f" {group['router_entropy_mean']:>9.3f} {group['usage_entropy_mean']:>8.3f}"
        return line

    for cat, acc in result["per_category"].items():
        lines.append(row(cat, acc, per_cat_k.get(cat, {}), cats.get(cat)))
    lines.append(row("all", result["accuracy"], result.get("pass_at_k", {}), routing["all"] if routing else None))
    if routing:
        lines.append(
            "router H = mean per-token router entropy (nats); usage H = entropy of aggregate expert usage (nats); "
            f"both averaged over {len(routing['layers'])} MoE layers, ln E = {math.log(routing['num_experts']):.3f}"
        )
        if routing["jsd"] is not None:
            lines.append(
                f"task-wise expert-usage JSD (log2, mean over category pairs and layers): {routing['jsd']['mean']:.4f}"
            )
    return "\n".join(lines)
