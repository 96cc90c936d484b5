"""`expertrl report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page and a Markdown summary comparing runs.

Reads what ``expertrl train`` wrote (``metrics.jsonl``, ``config.yaml``, ``summary.json``, ``final/``); plots never
touch a live model, except to produce missing routing statistics: when ``final/eval.json`` holds none (written by
``expertrl eval``), one evaluation pass (``evaluate.routing_statistics_pass``, greedy, top-K routing) runs on
``final/`` over the held-out split of the run's task. Figures (``expertrl.plots``) are matplotlib PNGs (Agg) embedded
as base64 data URIs, so the page opens in a browser without a server. Every figure has a stable id:

    fig-reward, fig-accuracy, fig-loss-diagnostics, fig-utilisation-steps, fig-utilisation-positions,
    fig-entropies, fig-jsd, fig-routing-example

The two entropies are named apart everywhere (METHODS §6.6, ambiguity 18): *per-token router entropy* (mean over
tokens of the router softmax's entropy, ``moe/router_entropy``) and *expert-usage entropy* (entropy of the aggregate
share of routed slots per expert, ``moe/usage_entropy``; MoE-GRPO's 1.05 → 1.82). JSD is in log2 (ambiguity 19).
A missing or corrupted run file raises ``RunError`` naming the file (and line) and the fix.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertrl.config import ConfigError, ModelConfig, RolloutConfig, TaskConfig
from expertrl.configio import from_dict, load_yaml
from expertrl.evaluate import routing_statistics_pass
from expertrl.io import read_jsonl
from expertrl.logging import quiet_hf_progress
from expertrl.metrics import new_name
from expertrl.plots import FIGURE_IDS, metric_series, render_figures  # FIGURE_IDS: part of this module's API
from expertrl.runtime import model_and_tokenizer, place_model, seed_everything, task_from_config


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


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl``, keys in today's vocabulary (older runs' names mapped through
    ``metrics.new_name``); a bad line raises ``RunError`` naming ``path:line``. Blank lines are skipped."""
    records = []
    for where, rec in read_jsonl(path, error=RunError):
        if "step" not in rec:
            raise RunError(f"{where}: expected a 'step' key in every record; repair or delete that line")
        records.append({new_name(k): v for k, v in rec.items()})
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
    metrics = read_metrics(metrics_file)
    sft_file = path / "sft_metrics.jsonl"
    sft_metrics = read_metrics(sft_file) if sft_file.is_file() else []
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
    quiet_hf_progress(progress)  # Hugging Face's loading bar follows the switch too
    model, tokenizer = model_and_tokenizer(model_cfg, seed, allow_dense=True)
    place_model(model)
    task = task_from_config(task_cfg, tokenizer)
    rollout = config.get("rollout", {})
    if "max_new_tokens" in rollout:
        max_new = int(rollout["max_new_tokens"])
    elif "rollout" in config:
        max_new = RolloutConfig().max_new_tokens
    else:  # an `expertrl sft` run: the answer budget sft.py evaluates with
        max_new = max(len(tokenizer(it["answer"], add_special_tokens=False)["input_ids"]) for it in task.eval) + 2
    return routing_statistics_pass(model, tokenizer, task.eval, max_new_tokens=max_new, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# tables

Table = tuple[list[str], list[list[str]]]
"""(column names, rows of cell strings)"""


def _last_mean(records: list[dict], key: str, n: int = 10) -> float | None:
    _, y = metric_series(records, key)
    return sum(y[-n:]) / len(y[-n:]) if y else None


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_rows(run: Run) -> dict:
    """The numbers of one run's row in the summary tables."""
    steps, _ = metric_series(run.metrics, "reward/mean")
    _, acc = metric_series(run.metrics, "eval/accuracy")
    r = run.routing
    mean = lambda v: float(np.mean(v))  # noqa: E731
    ev = run.evaluation or {}
    return {
        "run": run.label,
        "RL steps": len(steps),
        "reward (last 10)": _fmt(_last_mean(run.metrics, "reward/mean")),
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


def _table_rows(runs: list[Run]) -> Table:
    rows = [summary_rows(r) for r in runs]
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return cols, [[str(row.get(c, "–")) for c in cols] for row in rows]


def _per_cat_acc(run: Run) -> dict:
    """Held-out accuracy per category: from final/eval.json if there, else the run's summary.json."""
    if run.evaluation and "per_category" in run.evaluation:
        return run.evaluation["per_category"]
    return run.summary.get("per_category_end", {})


def _category_table(runs: list[Run]) -> Table:
    accs = [_per_cat_acc(r) for r in runs]
    cats = sorted({c for r in runs for c in r.routing["categories"]} | {c for acc in accs for c in acc})
    cols = ["category"] + [f"{r.label}: {what}" for r in runs for what in ("accuracy", "router H", "usage H")]
    rows = []
    for c in cats:
        row = [c]
        for r, acc in zip(runs, accs):
            g = r.routing["categories"].get(c)
            row += [_fmt(acc.get(c)), _fmt(g and g["router_entropy_mean"]), _fmt(g and g["usage_entropy_mean"])]
        rows.append(row)
    return cols, rows


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


def _sources(runs: list[Run]) -> list[str]:
    """One line per run: its directory and where its routing statistics came from."""
    return [
        f"{r.label}: {r.path} — routing statistics from "
        + ("final/eval.json" if r.evaluation and "routing" in r.evaluation else "an evaluation pass run by the report")
        + f" ({r.routing['all']['n_items']} held-out prompts, {r.routing.get('tokens', 'all')} tokens)"
        for r in runs
    ]


def _html_page(labels: list[str], sources: list[str], summary: Table, per_category: Table, figures: dict) -> str:
    """The self-contained page: sources, the two tables, then every figure of FIGURE_IDS with its caption."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>expertrl report: {html.escape(', '.join(labels))}"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>expertrl report: {html.escape(' vs '.join(labels))}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sources) + "</ul>",
        "<h2>Summary</h2>",
        _html_table(*summary),
        "<p>Router entropy = mean per-token entropy of the router softmax; usage entropy = entropy of the aggregate "
        "expert-usage distribution; both in nats, mean over MoE layers, from the evaluation pass. Task JSD: mean "
        "pairwise Jensen–Shannon divergence of per-task expert usage, log base 2. Load balance (max violation, dead "
        "expert fraction below 1e-3, coefficient of variation) of the evaluation pass's usage, mean over layers.</p>",
        "<h2>Per category</h2>",
        _html_table(*per_category),
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
    return "\n".join(parts)


def _markdown(labels: list[str], sources: list[str], summary: Table, per_category: Table) -> str:
    """The Markdown summary: sources and the two tables; the figures stay in report.html."""
    md = [
        f"# expertrl report: {' vs '.join(labels)}",
        "",
        *[f"- {s}" for s in sources],
        "",
        "## Summary",
        "",
        _md_table(*summary),
        "",
        "Router entropy: mean per-token entropy of the router softmax (nats). Usage entropy: entropy of the aggregate "
        "expert-usage distribution (nats). Both are means over MoE layers of the evaluation pass. Task JSD: mean "
        "pairwise Jensen–Shannon divergence between per-task expert usage, log base 2, mean over layers.",
        "",
        "## Per category",
        "",
        _md_table(*per_category),
        "",
        f"Figures ({', '.join(FIGURE_IDS)}) are in [report.html](report.html).",
        "",
    ]
    return "\n".join(md)


def _default_output(run_dirs: list[Path], labels: list[str]) -> Path:
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    name = "report-" + "-vs-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", x) for x in labels)
    return run_dirs[0].resolve().parent / name[:120]


def write_report(
    run_dirs: list[str | Path],
    output: str | Path | None = None,
    *,
    labels: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` comparing ``run_dirs`` side by side.

    Args:
        run_dirs: one or more directories written by ``expertrl train``.
        output: directory for the two files (default: ``RUN_DIR/report`` for one run, ``report-A-vs-B`` next to
            the first run for several).
        labels: names of the runs in legends and tables (default: the directories' names).
        progress: show the progress of a run whose routing statistics need an evaluation pass: Hugging Face's
            loading bar (on a terminal only) and the evaluation's (off a terminal, a plain line every 30 s).
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
    runs = [load_run(p, lab, progress=progress) for p, lab in zip(paths, labels)]
    out = Path(output) if output is not None else _default_output(paths, labels)
    out.mkdir(parents=True, exist_ok=True)
    figures = render_figures(labels, [r.metrics for r in runs], [r.routing for r in runs])
    sources, summary, per_category = _sources(runs), _table_rows(runs), _category_table(runs)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(_html_page(labels, sources, summary, per_category, figures))
    md_path.write_text(_markdown(labels, sources, summary, per_category))
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
    parser.add_argument(
        "--progress", default="true", choices=["true", "false"],
        help="progress of a run that needs an evaluation pass: Hugging Face's loading bar (on a terminal only) and the "
        "evaluation's bar (off a terminal, a plain line every 30 s); default true",
    )  # fmt: skip
    args = parser.parse_args(argv)
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    try:
        paths = write_report(args.run_dirs, args.output, labels=labels, progress=args.progress == "true")
    except (RunError, ValueError) as e:
        print(f"expertrl report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {paths['html']}\nsummary: {paths['markdown']}")
    return 0
