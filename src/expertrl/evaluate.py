"""Held-out accuracy with the papers' inference setting: deterministic top-K routing, greedy decoding."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from expertrl.moe.hooks import route
from expertrl.moe.policies import TopK
from expertrl.rollout import decoding_kwargs


@torch.no_grad()
def generate_greedy(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy completions of ``prompts`` with deterministic top-K routing, decoded up to EOS."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with route(model, TopK()):
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            **decoding_kwargs(tokenizer, max_new_tokens=max_new_tokens),
        )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    score,
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Accuracy (mean score) of greedy top-K completions on ``items``, overall and per ``category``.

    Args:
        score: ``score(completion, item) -> float`` (the task's verifier).
    Returns:
        ``{"accuracy": float, "per_category": {cat: float}, "n": int, "examples": [first 3 (prompt, completion)]}``
    """
    was_training = model.training
    model.eval()
    scores, cats, examples = [], [], []
    for start in tqdm(range(0, len(items), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = items[start : start + batch_size]
        completions = generate_greedy(model, tokenizer, [it["prompt"] for it in chunk], max_new_tokens=max_new_tokens)
        for it, text in zip(chunk, completions):
            scores.append(float(score(text, it)))
            cats.append(str(it.get("category", "all")))
            if len(examples) < 3:
                examples.append((it["prompt"], text))
    model.train(was_training)
    by_cat = defaultdict(list)
    for c, s in zip(cats, scores):
        by_cat[c].append(s)
    return {
        "accuracy": sum(scores) / max(len(scores), 1),
        "per_category": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
        "n": len(scores),
        "examples": examples,
    }


def run_eval(cfg) -> dict:
    """`expertrl eval`: held-out accuracy of ``cfg.model`` on ``cfg.task`` (top-K routing, greedy); JSON + table."""
    import json
    from pathlib import Path

    from expertrl.runtime import model_and_tokenizer, seed_everything, task_from_config

    seed_everything(cfg.seed)
    model, tokenizer = model_and_tokenizer(cfg.model, cfg.seed)
    task = task_from_config(cfg.task)
    result = evaluate(
        model,
        tokenizer,
        task.eval,
        task.score,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        progress=True,
    )
    print(f"expertrl eval: {task.name}, {result['n']} held-out prompts, top-K routing, greedy decoding")
    print(f"{'category':<16} accuracy")
    for cat, acc in result["per_category"].items():
        print(f"{cat:<16} {acc:.3f}")
    print(f"{'all':<16} {result['accuracy']:.3f}")
    if cfg.model.path is not None:
        out = Path(cfg.model.path) / "eval.json"
        out.write_text(json.dumps({"task": task.name, **result}, indent=2))
        print(f"results: {out}")
    return result
