"""`expertrl report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page and a Markdown summary comparing runs.

Reads what ``expertrl train`` wrote (``metrics.jsonl``, ``config.yaml``, ``summary.json``, ``final/``); plots never
touch a live model, except to produce missing routing statistics: when ``final/eval.json`` holds none (written by
``expertrl eval``), one evaluation pass (``evaluate.routing_statistics_pass``, greedy, top-K routing) runs on
``final/`` over the held-out split of the run's task. Figures are matplotlib PNGs (Agg) embedded as base64 data URIs,
so the page opens in a browser without a server. Every figure has a stable id:

    fig-reward, fig-accuracy, fig-loss-diagnostics, fig-utilisation-steps, fig-utilisation-positions,
    fig-entropies, fig-jsd, fig-routing-example

The two entropies are named apart everywhere (METHODS §6.6, ambiguity 18): *per-token router entropy* (mean over
tokens of the router softmax's entropy, ``moe/router_entropy``) and *expert-usage entropy* (entropy of the aggregate
share of routed slots per expert, ``moe/usage_entropy``; MoE-GRPO's 1.05 → 1.82). JSD is in log2 (ambiguity 19).
A missing or corrupted run file raises ``RunError`` naming the file (and line) and the fix.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

FIGURE_IDS = (
    "fig-reward",
    "fig-accuracy",
    "fig-loss-diagnostics",
    "fig-utilisation-steps",
    "fig-utilisation-positions",
    "fig-entropies",
    "fig-jsd",
    "fig-routing-example",
)
LOSS_KEYS = (
    "loss/clip_frac",
    "loss/gate_clip_frac",
    "router_shift/gamma_mean",
    "router_shift/topk_overlap",
    "loss/approx_kl",
    "grad_norm",
)
"""loss-side diagnostics plotted when present in metrics.jsonl"""
MAX_LAYERS = 8
"""at most this many MoE layers (evenly spaced) per heatmap row"""
MAX_EXAMPLE_TOKENS = 40
"""token window of the routing-example heatmaps"""


class RunError(ValueError):
    """A run directory lacks a file or holds a corrupted one; the message names the file and how to fix it."""


@dataclass
class Run:
    """What the report reads of one run directory."""

    path: Path
    label: str
    metrics: list[dict]
    """metrics.jsonl records (RL steps and eval/accuracy lines)"""
    sft_metrics: list[dict]
    summary: dict
    """summary.json ({} if absent)"""
    evaluation: dict | None
    """final/eval.json (written by `expertrl eval`), if present"""
    routing: dict
    """routing statistics of an evaluation pass (see evaluate.routing_statistics_pass)"""


# ---------------------------------------------------------------------------------------------------------------
# reading runs


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a bad line raises ``RunError`` naming ``path:line``. Blank lines are skipped."""
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); repair or delete that line (a run killed while writing "
                "can leave a partial last line)"
            ) from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise RunError(
                f"{path}:{lineno}: expected a JSON object with a 'step' key, got {line[:60]!r}; repair or delete "
                "that line"
            )
        records.append(rec)
    return records


def _read_json(path: Path, fix: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object; {fix}")
    return data


def load_run(run_dir: str | Path, label: str | None = None, *, progress: bool = False) -> Run:
    """Read one run directory; computes routing statistics with an evaluation pass if ``final/eval.json`` has none."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(
            f"run directory {str(path)!r} not found; pass a directory written by `expertrl train` (it holds "
            "config.yaml, metrics.jsonl and final/)"
        )
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise RunError(
            f"{metrics_file} not found: is {str(path)!r} a run directory of `expertrl train`? It is written from the "
            "first step on; rerun or resume the training run"
        )
    metrics = read_jsonl(metrics_file)
    sft_file = path / "sft_metrics.jsonl"
    sft_metrics = read_jsonl(sft_file) if sft_file.is_file() else []
    summary_file = path / "summary.json"
    summary = _read_json(summary_file, "delete it or rerun the training run") if summary_file.is_file() else {}
    final = path / "final"
    eval_file = final / "eval.json"
    fix_eval = f"delete it, or rewrite it with `expertrl eval --config {path}/config.yaml --model.path {final}`"
    evaluation = _read_json(eval_file, fix_eval) if eval_file.is_file() else None
    if evaluation is not None and "routing" in evaluation:
        routing = evaluation["routing"]
        for key in ("categories", "all", "layers", "num_experts"):
            if key not in routing:
                raise RunError(f"{eval_file}: routing statistics lack {key!r}; {fix_eval}")
    else:
        routing = routing_statistics_for_run(path, progress=progress)
    return Run(path, label or path.name, metrics, sft_metrics, summary, evaluation, routing)


def routing_statistics_for_run(run_dir: str | Path, *, progress: bool = False) -> dict:
    """Evaluation pass of ``run_dir/final`` on the held-out split of the task in ``run_dir/config.yaml``."""
    from expertrl.config import ConfigError, ModelConfig, RolloutConfig, TaskConfig
    from expertrl.configio import from_dict, load_yaml
    from expertrl.evaluate import routing_statistics_pass
    from expertrl.runtime import model_and_tokenizer, seed_everything, task_from_config

    path = Path(run_dir)
    final = path / "final"
    config_file = path / "config.yaml"
    try:
        config = load_yaml(config_file)
        task_cfg = from_dict(TaskConfig, config.get("task", {}), prefix="task.")
        model_section = dict(config.get("model", {}))
        adapter = model_section.get("adapter") or {}
        if adapter.get("kind", "none") != "none":  # save_model wrote the adapter only: base settings + adapter.path
            model_cfg = from_dict(ModelConfig, {**model_section, "adapter": {**adapter, "path": str(final)}}, "model.")
        else:  # a plain Hugging Face model directory
            keep = ("dtype", "experts_implementation", "trust_remote_code")
            model_cfg = from_dict(ModelConfig, {k: model_section[k] for k in keep if k in model_section}, "model.")
            model_cfg.path = str(final)
    except ConfigError as e:
        raise RunError(f"{config_file}: {e}; the routing statistics need the run's task and model settings") from None
    if not final.is_dir() or not any(final.iterdir()):
        raise RunError(
            f"{final} not found (or empty): the run has no final model; it was interrupted or is still running. "
            f"Finish it with `expertrl train --config {path}/config.yaml --resume {path}`, or evaluate a checkpoint "
            "with `expertrl eval --model.path <dir>` and put its eval.json in final/"
        )
    seed = int(config.get("seed", 0))
    seed_everything(seed)
    model, tokenizer = model_and_tokenizer(model_cfg, seed, allow_dense=True)
    task = task_from_config(task_cfg)
    rollout = config.get("rollout", {})
    if "max_new_tokens" in rollout:
        max_new = int(rollout["max_new_tokens"])
    elif "rollout" in config:
        max_new = RolloutConfig().max_new_tokens
    else:  # an `expertrl sft` run: the answer budget sft.py evaluates with
        max_new = max(len(tokenizer(it["answer"], add_special_tokens=False)["input_ids"]) for it in task.eval) + 2
    return routing_statistics_pass(model, tokenizer, task.eval, max_new_tokens=max_new, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# figures


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # constrained layout: no second "tight" draw
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _color(i: int):
    return plt.get_cmap("tab10")(i % 10)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _pick_layers(n: int) -> list[int]:
    """Evenly spaced layer positions, at most MAX_LAYERS of them."""
    if n <= MAX_LAYERS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)})


def _grid(rows: int, cols: int, w: float = 3.2, h: float = 2.6):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained")
    return fig, axes


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_reward(runs: list[Run]):
    """Reward mean and within-group reward std over RL steps (MoE-GRPO Fig. 3)."""
    fig, axes = _grid(1, 2, 4.5, 3.0)
    for ax, key, title in zip(
        axes[0],
        ("reward", "reward_group_std"),
        ("reward (mean over the step's completions)", "within-group reward std"),
    ):
        for i, run in enumerate(runs):
            x, y = _series(run.metrics, key)
            ax.plot(x, y, color=_color(i), label=run.label, lw=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return fig


def fig_accuracy(runs: list[Run]):
    """Held-out accuracy (greedy, top-K routing) over RL steps; step -1 = before the RL start (after SFT)."""
    fig, axes = _grid(1, 1, 5.0, 3.0)
    ax = axes[0, 0]
    for i, run in enumerate(runs):
        x, y = _series(run.metrics, "eval/accuracy")
        ax.plot(x, y, "o-", color=_color(i), label=run.label, ms=3, lw=1.3)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def fig_loss_diagnostics(runs: list[Run]):
    """Clip fractions, router shift γ and friends, for the keys of LOSS_KEYS that any run logged; None if none."""
    keys = [k for k in LOSS_KEYS if any(_series(r.metrics, k)[0] for r in runs)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = _grid(rows, cols, 3.6, 2.6)
    for j, key in enumerate(keys):
        ax = axes[j // cols, j % cols]
        for i, run in enumerate(runs):
            x, y = _series(run.metrics, key)
            ax.plot(x, y, color=_color(i), label=run.label, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for j in range(len(keys), rows * cols):
        axes[j // cols, j % cols].axis("off")
    axes[0, 0].legend(fontsize=7)
    return fig


def _load_over_steps(run: Run) -> dict[int, tuple[list[int], np.ndarray]]:
    """moe/load/layer{i} records -> {layer: (steps, (E, steps) shares)}."""
    out = {}
    keys = sorted(
        {k for r in run.metrics for k in r if re.fullmatch(r"moe/load/layer\d+", k)},
        key=lambda k: int(k.removeprefix("moe/load/layer")),
    )
    for key in keys:
        pts = [(r["step"], r[key]) for r in run.metrics if isinstance(r.get(key), list)]
        out[int(key.removeprefix("moe/load/layer"))] = (
            [p[0] for p in pts],
            np.array([p[1] for p in pts], dtype=float).T,
        )
    return out


def fig_utilisation_steps(runs: list[Run]):
    """Experts × RL steps heatmap of each layer's expert load (share of completion-token slots), from metrics.jsonl."""
    loads = [_load_over_steps(r) for r in runs]
    cols = max(1, max(len(_pick_layers(len(ld))) for ld in loads))
    fig, axes = _grid(len(runs), cols, 3.0, 2.4)
    vmax = max([float(m.max()) for ld in loads for _, m in ld.values() if m.size] + [1e-9])
    im = None
    for i, (run, ld) in enumerate(zip(runs, loads)):
        layers = sorted(ld)
        if not layers:
            _note(axes[i, 0], f"{run.label}: no moe/load/layer* in metrics.jsonl")
        shown = [layers[p] for p in _pick_layers(len(layers))]
        for j in range(cols):
            ax = axes[i, j]
            if j >= len(shown):
                if layers or j > 0:  # keep the note of a run without loads
                    ax.axis("off")
                continue
            steps, m = ld[shown[j]]
            im = ax.imshow(
                m,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                vmin=0,
                vmax=vmax,
                extent=(min(steps) - 0.5, max(steps) + 0.5, -0.5, m.shape[0] - 0.5),
                interpolation="nearest",
            )
            ax.set_title(f"{run.label} · layer {shown[j]}", fontsize=8)
            ax.set_xlabel("RL step", fontsize=7)
            ax.set_ylabel("expert", fontsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of routed slots")
    return fig


def fig_utilisation_positions(runs: list[Run]):
    """Experts × token positions heatmap per layer, from the evaluation pass (MoE-GRPO Fig. 4)."""
    cols = max(len(_pick_layers(len(r.routing["layers"]))) for r in runs)
    fig, axes = _grid(len(runs), cols, 3.0, 2.4)
    im = None
    for i, run in enumerate(runs):
        pos = np.array(run.routing["all"]["position_usage"], dtype=float)  # (L, P, E)
        shown = _pick_layers(pos.shape[0])
        for j in range(cols):
            ax = axes[i, j]
            if j >= len(shown):
                ax.axis("off")
                continue
            im = ax.imshow(
                pos[shown[j]].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_title(f"{run.label} · layer {run.routing['layers'][shown[j]]}", fontsize=8)
            ax.set_xlabel("token position", fontsize=7)
            ax.set_ylabel("expert", fontsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of routed slots at the position")
    return fig


def fig_entropies(runs: list[Run]):
    """Per-token router entropy vs expert-usage entropy: over RL steps (metrics.jsonl) and per layer (eval pass)."""
    fig, axes = _grid(2, 2, 4.5, 2.9)
    panels = (
        ("moe/router_entropy", "per-token router entropy H_τ (nats)\nmean over completion tokens, training"),
        ("moe/usage_entropy", "expert-usage entropy H(u) (nats)\naggregate usage, training"),
    )
    ln_e = math.log(runs[0].routing["num_experts"])
    for ax, (key, title) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            x, y = _series(run.metrics, key)
            ax.plot(x, y, color=_color(i), label=run.label, lw=1.2)
        ax.axhline(ln_e, color="grey", ls="--", lw=0.8, label=f"ln E = {ln_e:.2f}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax, key, title in zip(
        axes[1],
        ("router_entropy", "usage_entropy"),
        ("per-token router entropy H_τ (nats), eval pass", "expert-usage entropy H(u) (nats), eval pass"),
    ):
        for i, run in enumerate(runs):
            y = run.routing["all"][key]
            ax.plot(run.routing["layers"], y, "o-", color=_color(i), label=run.label, ms=3, lw=1.2)
        ax.axhline(ln_e, color="grey", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return fig


def fig_jsd(runs: list[Run]):
    """Per-task expert usage (mean over layers; MoE-GRPO Fig. 5) and the task-pair JSD matrix (log2, mean over
    layers)."""
    fig, axes = _grid(len(runs), 2, 4.2, 3.0)
    for i, run in enumerate(runs):
        cats = run.routing["categories"]
        names = sorted(cats)
        usage = np.array([np.mean(np.array(cats[c]["usage"], dtype=float), axis=0) for c in names])  # (A, E)
        ax = axes[i, 0]
        im = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{run.label}: expert usage per task (mean over layers)", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax = axes[i, 1]
        jsd = run.routing.get("jsd")
        if not jsd:
            _note(ax, f"{run.label}: one task category only; JSD needs at least two")
            continue
        m = np.mean(np.array(jsd["matrix"], dtype=float), axis=0)  # (A, A)
        im = ax.imshow(m, cmap="magma", vmin=0, interpolation="nearest")
        ax.set_xticks(range(len(jsd["categories"])), jsd["categories"], fontsize=7, rotation=90)
        ax.set_yticks(range(len(jsd["categories"])), jsd["categories"], fontsize=7)
        base = jsd.get("base", 2.0)
        ax.set_title(f"{run.label}: task-pair JSD (log{base:g}); mean = {jsd['mean']:.4f}", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _box_chosen(ax, experts: np.ndarray) -> None:
    """Red boxes around the chosen experts: experts (rows, K) int, one heatmap row per row."""
    for r, row in enumerate(experts):
        for e in row:
            if e >= 0:
                ax.add_patch(Rectangle((e - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))


def _example_layers(n: int) -> list[int]:
    """First, middle and last layer (those that exist)."""
    return sorted({0, n // 2, n - 1})


def fig_routing_example(runs: list[Run]):
    """One example's routing probabilities with the chosen experts boxed in red (MoE-GRPO Fig. 6a): layers × experts
    at the route that predicted the first answer token, then tokens × experts for the first, middle and last layer."""
    cols = 1 + max(len(_example_layers(len(r.routing["layers"]))) for r in runs)
    fig, axes = _grid(len(runs), cols, 3.3, 3.6)
    im = None
    for i, run in enumerate(runs):
        ex = run.routing.get("example")
        if not ex:
            _note(axes[i, 0], f"{run.label}: no example in the routing statistics")
            continue
        probs = np.array(ex["probs"], dtype=float)  # (L, n, E)
        experts = np.array(ex["experts"], dtype=int)  # (L, n, K)
        t = ex.get("answer_index")
        t = probs.shape[1] - 1 if t is None else t
        ax = axes[i, 0]
        im = ax.imshow(probs[:, t], aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        _box_chosen(ax, experts[:, t])
        ax.set_yticks(range(probs.shape[0]), run.routing["layers"], fontsize=7)
        ax.set_ylabel("MoE layer", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(
            f"{run.label}: {ex['prompt'][-30:]!r} → {ex['completion'][:20]!r}\nlayers at token {t}", fontsize=8
        )
        lo = max(0, t - MAX_EXAMPLE_TOKENS // 2)
        hi = min(probs.shape[1], lo + MAX_EXAMPLE_TOKENS)
        shown = _example_layers(probs.shape[0])
        for j in range(1, cols):
            ax = axes[i, j]
            if j > len(shown):
                ax.axis("off")
                continue
            li = shown[j - 1]
            ax.imshow(probs[li, lo:hi], aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            _box_chosen(ax, experts[li, lo:hi])
            ax.set_yticks(range(hi - lo), [repr(s)[1:-1] for s in ex["tokens"][lo:hi]], fontsize=6)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_title(f"layer {run.routing['layers'][li]}: router input token × expert", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="router probability")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# tables


def _last_mean(records: list[dict], key: str, n: int = 10) -> float | None:
    _, y = _series(records, key)
    return sum(y[-n:]) / len(y[-n:]) if y else None


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_rows(run: Run) -> dict:
    """The numbers of one run's row in the summary tables."""
    steps, _ = _series(run.metrics, "reward")
    _, acc = _series(run.metrics, "eval/accuracy")
    r = run.routing
    mean = lambda v: float(np.mean(v))  # noqa: E731
    ev = run.evaluation or {}
    return {
        "run": run.label,
        "RL steps": len(steps),
        "reward (last 10)": _fmt(_last_mean(run.metrics, "reward")),
        "accuracy start": _fmt(acc[0] if acc else None),
        "accuracy end": _fmt(acc[-1] if acc else None),
        **{f"pass@{k}": _fmt(v) for k, v in ev.get("pass_at_k", {}).items()},
        "router entropy (per-token, nats)": _fmt(r["all"]["router_entropy_mean"]),
        "usage entropy (aggregate, nats)": _fmt(r["all"]["usage_entropy_mean"]),
        "task JSD (log2)": _fmt(r["jsd"]["mean"] if r.get("jsd") else None, 4),
        "max violation": _fmt(mean(r["all"]["max_violation"])),
        "dead experts": _fmt(mean(r["all"]["dead_fraction"])),
        "CV of load": _fmt(mean(r["all"]["cv"])),
    }


def _table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    rows = [summary_rows(r) for r in runs]
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return cols, [[str(row.get(c, "–")) for c in cols] for row in rows]


def _category_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    cats = sorted({c for r in runs for c in r.routing["categories"]} | {c for r in runs for c in _per_cat_acc(r)})
    cols = ["category"] + [f"{r.label}: {what}" for r in runs for what in ("accuracy", "router H", "usage H")]
    rows = []
    for c in cats:
        row = [c]
        for r in runs:
            g = r.routing["categories"].get(c)
            row += [
                _fmt(_per_cat_acc(r).get(c)),
                _fmt(g and g["router_entropy_mean"]),
                _fmt(g and g["usage_entropy_mean"]),
            ]
        rows.append(row)
    return cols, rows


def _per_cat_acc(run: Run) -> dict:
    if run.evaluation and "per_category" in run.evaluation:
        return run.evaluation["per_category"]
    return run.summary.get("per_category_end", {})


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(cols: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------------------------------
# the page

_CAPTIONS = {
    "fig-reward": "Reward mean and within-group reward std per RL step (MoE-GRPO Fig. 3).",
    "fig-accuracy": "Held-out accuracy, greedy decoding with deterministic top-K routing (step -1: before RL).",
    "fig-loss-diagnostics": "Loss-side diagnostics from metrics.jsonl: clip fractions (token and gate), router "
    "shift γ (RSPO), top-K overlap of old and live routes, approximate KL, gradient norm.",
    "fig-utilisation-steps": "Expert utilisation per layer over RL steps: share of the completion tokens' routed "
    "slots per expert (moe/load/layer*), experts × steps.",
    "fig-utilisation-positions": "Expert utilisation by token position from the evaluation pass (prompt and "
    "completion tokens, greedy, top-K routing): experts × token positions (MoE-GRPO Fig. 4).",
    "fig-entropies": "The two entropies, named apart: per-token router entropy H_τ = −Σ_e p ln p averaged over tokens "
    "(low = confident router) vs expert-usage entropy H(u) of the aggregate share of routed slots per expert (high = "
    "diverse use; MoE-GRPO's 1.05 → 1.82). Both in nats; dashed: ln E. Top: training; bottom: evaluation pass.",
    "fig-jsd": "Per-task expert usage (MoE-GRPO Fig. 5) and the Jensen–Shannon divergence between task-wise usage "
    "distributions, log base 2 (in [0, 1]), averaged over layers; the title gives the mean over task pairs.",
    "fig-routing-example": "Routing probabilities of one held-out example (MoE-GRPO Fig. 6a), chosen top-K experts "
    "boxed in red: layers × experts at the route that predicted the first answer token, then tokens × experts.",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
    "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
    "figure{margin:1.5em 0}figure img{max-width:100%}figcaption{font-size:13px;color:#444;max-width:1000px}"
)


def _figures(runs: list[Run]) -> dict[str, str | None]:
    makers = {
        "fig-reward": fig_reward,
        "fig-accuracy": fig_accuracy,
        "fig-loss-diagnostics": fig_loss_diagnostics,
        "fig-utilisation-steps": fig_utilisation_steps,
        "fig-utilisation-positions": fig_utilisation_positions,
        "fig-entropies": fig_entropies,
        "fig-jsd": fig_jsd,
        "fig-routing-example": fig_routing_example,
    }
    out = {}
    for fid, make in makers.items():
        fig = make(runs)
        out[fid] = None if fig is None else _png(fig)
    return out


def _default_output(run_dirs: list[Path], labels: list[str]) -> Path:
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    name = "report-" + "-vs-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", x) for x in labels)
    return run_dirs[0].resolve().parent / name[:120]


def write_report(
    run_dirs: list[str | Path], output: str | Path | None = None, *, labels: list[str] | None = None
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` comparing ``run_dirs`` side by side.

    Args:
        run_dirs: one or more directories written by ``expertrl train``.
        output: directory for the two files (default: ``RUN_DIR/report`` for one run, ``report-A-vs-B`` next to
            the first run for several).
        labels: names of the runs in legends and tables (default: the directories' names).
    Returns:
        ``{"html": Path, "markdown": Path}``.
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty; pass at least one run directory written by `expertrl train`")
    paths = [Path(p) for p in run_dirs]
    if labels is None:
        labels = [p.name for p in paths]
        if len(set(labels)) < len(labels):
            labels = [str(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"labels: got {len(labels)} labels for {len(paths)} run directories; give one per run")
    runs = [load_run(p, lab) for p, lab in zip(paths, labels)]
    out = Path(output) if output is not None else _default_output(paths, labels)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(runs)
    cols, rows = _table_rows(runs)
    cat_cols, cat_rows = _category_table(runs)
    sources = [
        f"{r.label}: {r.path} — routing statistics from "
        + ("final/eval.json" if r.evaluation and "routing" in r.evaluation else "an evaluation pass run by the report")
        + f" ({r.routing['all']['n_items']} held-out prompts, {r.routing.get('tokens', 'all')} tokens)"
        for r in runs
    ]

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>expertrl report: {html.escape(', '.join(labels))}"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>expertrl report: {html.escape(' vs '.join(labels))}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sources) + "</ul>",
        "<h2>Summary</h2>",
        _html_table(cols, rows),
        "<p>Router entropy = mean per-token entropy of the router softmax; usage entropy = entropy of the aggregate "
        "expert-usage distribution; both in nats, mean over MoE layers, from the evaluation pass. Task JSD: mean "
        "pairwise Jensen–Shannon divergence of per-task expert usage, log base 2. Load balance (max violation, dead "
        "expert fraction below 1e-3, coefficient of variation) of the evaluation pass's usage, mean over layers.</p>",
        "<h2>Per category</h2>",
        _html_table(cat_cols, cat_rows),
    ]
    for fid in FIGURE_IDS:
        caption = html.escape(_CAPTIONS[fid])
        uri = figures[fid]
        body = (
            f"<img alt='{fid}' src='{uri}'>"
            if uri is not None
            else "<p><em>None of the runs logged these metrics in metrics.jsonl.</em></p>"
        )
        parts.append(f"<figure id='{fid}'>{body}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts))

    md = [
        f"# expertrl report: {' vs '.join(labels)}",
        "",
        *[f"- {s}" for s in sources],
        "",
        "## Summary",
        "",
        _md_table(cols, rows),
        "",
        "Router entropy: mean per-token entropy of the router softmax (nats). Usage entropy: entropy of the aggregate "
        "expert-usage distribution (nats). Both are means over MoE layers of the evaluation pass. Task JSD: mean "
        "pairwise Jensen–Shannon divergence between per-task expert usage, log base 2, mean over layers.",
        "",
        "## Per category",
        "",
        _md_table(cat_cols, cat_rows),
        "",
        f"Figures ({', '.join(FIGURE_IDS)}) are in [report.html](report.html).",
        "",
    ]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    return {"html": html_path, "markdown": md_path}


def report_main(argv: list[str] | None = None) -> int:
    """`expertrl report RUN_DIR [RUN_DIR ...] [--output DIR] [--labels a,b]`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="expertrl report",
        description="One self-contained HTML page and a Markdown summary comparing training runs side by side.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by `expertrl train`")
    parser.add_argument("--output", default=None, help="output directory (default: RUN_DIR/report for one run)")
    parser.add_argument("--labels", default=None, help="comma-separated run names, one per RUN_DIR")
    args = parser.parse_args(argv)
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    try:
        paths = write_report(args.run_dirs, args.output, labels=labels)
    except (RunError, ValueError) as e:
        print(f"expertrl report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {paths['html']}\nsummary: {paths['markdown']}")
    return 0
