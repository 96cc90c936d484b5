"""The figures of `expertrl report`: pure functions from plain data (metrics.jsonl records, routing statistics of an
evaluation pass) to matplotlib figures (Agg backend), and from figures to PNG data URIs. Nothing here reads a file.

Every figure has a stable id (``FIGURE_IDS``); ``render_figures`` draws them all in that order:

    fig-reward, fig-accuracy, fig-loss-diagnostics, fig-utilisation-steps, fig-utilisation-positions,
    fig-entropies, fig-jsd, fig-routing-example

Inputs are parallel lists, one entry per run: ``labels`` (legend names), ``metrics`` (the run's metrics.jsonl records,
dicts with a ``step`` key) and ``routings`` (``evaluate.routing_statistics_pass`` output: ``categories``, ``all``,
``layers``, ``num_experts``, optional ``jsd`` and ``example``). The two entropies are named apart (METHODS §6.6,
ambiguity 18): per-token router entropy ``moe/router_entropy`` vs expert-usage entropy ``moe/usage_entropy``; JSD is
in log2 (ambiguity 19).
"""

from __future__ import annotations

import base64
import io
import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
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
    "router/shift/gamma_mean",
    "router/shift/topk_overlap",
    "loss/approx_kl",
    "optim/grad_norm",
)
"""loss-side diagnostics plotted when present in metrics.jsonl"""
MAX_LAYERS = 8
"""at most this many MoE layers (evenly spaced) per heatmap row"""
MAX_EXAMPLE_TOKENS = 40
"""token window of the routing-example heatmaps"""

Records = list[dict]
"""metrics.jsonl records of one run"""


def metric_series(records: Records, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records whose ``key`` is a number, in file order."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def png_data_uri(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (90 dpi); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # constrained layout: no second "tight" draw
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _color(i: int):
    return plt.get_cmap("tab10")(i % 10)


def _pick_layers(n: int) -> list[int]:
    """Evenly spaced layer positions, at most MAX_LAYERS of them."""
    if n <= MAX_LAYERS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)})


def _example_layers(n: int) -> list[int]:
    """First, middle and last layer (those that exist)."""
    return sorted({0, n // 2, n - 1})


def _grid(rows: int, cols: int, w: float = 3.2, h: float = 2.6):
    return plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_metric(ax, labels: list[str], metrics: list[Records], key: str, *fmt: str, **style) -> None:
    """One line per run of ``key`` over RL steps, in the run's colour."""
    for i, (label, records) in enumerate(zip(labels, metrics)):
        x, y = metric_series(records, key)
        ax.plot(x, y, *fmt, color=_color(i), label=label, **style)


def _label_heatmap(ax, title: str, xlabel: str) -> None:
    """Small title and axis labels, integer ticks: the look of the utilisation heatmaps."""
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel("expert", fontsize=7)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=6)


def _box_chosen(ax, experts: np.ndarray) -> None:
    """Red boxes around the chosen experts: experts (rows, K) int, one heatmap row per row."""
    for r, row in enumerate(experts):
        for e in row:
            if e >= 0:
                ax.add_patch(Rectangle((e - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))


def load_over_steps(records: Records) -> dict[int, tuple[list[int], np.ndarray]]:
    """moe/load/layer{i} records -> {layer: (steps, (E, steps) shares)}."""
    out = {}
    keys = sorted(
        {k for r in records for k in r if re.fullmatch(r"moe/load/layer\d+", k)},
        key=lambda k: int(k.removeprefix("router/load/layer")),
    )
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list)]
        out[int(key.removeprefix("router/load/layer"))] = (
            [p[0] for p in pts],
            np.array([p[1] for p in pts], dtype=float).T,
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# figures from metrics.jsonl


def fig_reward(labels: list[str], metrics: list[Records]) -> Figure:
    """Reward mean and within-group reward std over RL steps (MoE-GRPO Fig. 3)."""
    fig, axes = _grid(1, 2, 4.5, 3.0)
    for ax, key, title in zip(
        axes[0],
        ("reward/mean", "reward/group_std"),
        ("reward (mean over the step's completions)", "within-group reward std"),
    ):
        _plot_metric(ax, labels, metrics, key, lw=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return fig


def fig_accuracy(labels: list[str], metrics: list[Records]) -> Figure:
    """Held-out accuracy (greedy, top-K routing) over RL steps; step -1 = before the RL start (after SFT)."""
    fig, axes = _grid(1, 1, 5.0, 3.0)
    ax = axes[0, 0]
    _plot_metric(ax, labels, metrics, "eval/accuracy", "o-", ms=3, lw=1.3)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def fig_loss_diagnostics(labels: list[str], metrics: list[Records]) -> Figure | None:
    """Clip fractions, router shift γ and friends, for the keys of LOSS_KEYS that any run logged; None if none."""
    keys = [k for k in LOSS_KEYS if any(metric_series(records, k)[0] for records in metrics)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = _grid(rows, cols, 3.6, 2.6)
    for j, key in enumerate(keys):
        ax = axes[j // cols, j % cols]
        _plot_metric(ax, labels, metrics, key, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for j in range(len(keys), rows * cols):
        axes[j // cols, j % cols].axis("off")
    axes[0, 0].legend(fontsize=7)
    return fig


def fig_utilisation_steps(labels: list[str], metrics: list[Records]) -> Figure:
    """Experts × RL steps heatmap of each layer's expert load (share of completion-token slots), from metrics.jsonl."""
    loads = [load_over_steps(records) for records in metrics]
    cols = max(1, max(len(_pick_layers(len(ld))) for ld in loads))
    fig, axes = _grid(len(labels), cols, 3.0, 2.4)
    vmax = max([float(m.max()) for ld in loads for _, m in ld.values() if m.size] + [1e-9])
    im = None
    for i, (label, ld) in enumerate(zip(labels, loads)):
        layers = sorted(ld)
        if not layers:
            _note(axes[i, 0], f"{label}: no moe/load/layer* in metrics.jsonl")
        shown = [layers[p] for p in _pick_layers(len(layers))]
        for j in range(cols):
            ax = axes[i, j]
            if j >= len(shown):
                if layers or j > 0:  # keep the note of a run without loads
                    ax.axis("off")
                continue
            steps, m = ld[shown[j]]  # m: (E, steps)
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
            _label_heatmap(ax, f"{label} · layer {shown[j]}", "RL step")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of routed slots")
    return fig


def fig_entropies(labels: list[str], metrics: list[Records], routings: list[dict]) -> Figure:
    """Per-token router entropy vs expert-usage entropy: over RL steps (metrics.jsonl) and per layer (eval pass)."""
    fig, axes = _grid(2, 2, 4.5, 2.9)
    panels = (
        ("router/entropy", "per-token router entropy H_τ (nats)\nmean over completion tokens, training"),
        ("router/usage_entropy", "expert-usage entropy H(u) (nats)\naggregate usage, training"),
    )
    ln_e = math.log(routings[0]["num_experts"])
    for ax, (key, title) in zip(axes[0], panels):
        _plot_metric(ax, labels, metrics, key, lw=1.2)
        ax.axhline(ln_e, color="grey", ls="--", lw=0.8, label=f"ln E = {ln_e:.2f}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax, key, title in zip(
        axes[1],
        ("router_entropy", "usage_entropy"),
        ("per-token router entropy H_τ (nats), eval pass", "expert-usage entropy H(u) (nats), eval pass"),
    ):
        for i, (label, routing) in enumerate(zip(labels, routings)):
            y = routing["all"][key]  # (L,)
            ax.plot(routing["layers"], y, "o-", color=_color(i), label=label, ms=3, lw=1.2)
        ax.axhline(ln_e, color="grey", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# figures from the routing statistics of an evaluation pass


def fig_utilisation_positions(labels: list[str], routings: list[dict]) -> Figure:
    """Experts × token positions heatmap per layer, from the evaluation pass (MoE-GRPO Fig. 4)."""
    cols = max(len(_pick_layers(len(routing["layers"]))) for routing in routings)
    fig, axes = _grid(len(labels), cols, 3.0, 2.4)
    im = None
    for i, (label, routing) in enumerate(zip(labels, routings)):
        pos = np.array(routing["all"]["position_usage"], dtype=float)  # (L, P, E)
        shown = _pick_layers(pos.shape[0])
        for j in range(cols):
            ax = axes[i, j]
            if j >= len(shown):
                ax.axis("off")
                continue
            im = ax.imshow(
                pos[shown[j]].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
            )
            _label_heatmap(ax, f"{label} · layer {routing['layers'][shown[j]]}", "token position")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of routed slots at the position")
    return fig


def fig_jsd(labels: list[str], routings: list[dict]) -> Figure:
    """Per-task expert usage (mean over layers; MoE-GRPO Fig. 5) and the task-pair JSD matrix (log2, mean over
    layers)."""
    fig, axes = _grid(len(labels), 2, 4.2, 3.0)
    for i, (label, routing) in enumerate(zip(labels, routings)):
        cats = routing["categories"]
        names = sorted(cats)
        usage = np.array([np.mean(np.array(cats[c]["usage"], dtype=float), axis=0) for c in names])  # (A, E)
        ax = axes[i, 0]
        im = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{label}: expert usage per task (mean over layers)", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax = axes[i, 1]
        jsd = routing.get("jsd")
        if not jsd:
            _note(ax, f"{label}: one task category only; JSD needs at least two")
            continue
        m = np.mean(np.array(jsd["matrix"], dtype=float), axis=0)  # (L, A, A) -> (A, A)
        im = ax.imshow(m, cmap="magma", vmin=0, interpolation="nearest")
        ax.set_xticks(range(len(jsd["categories"])), jsd["categories"], fontsize=7, rotation=90)
        ax.set_yticks(range(len(jsd["categories"])), jsd["categories"], fontsize=7)
        base = jsd.get("base", 2.0)
        ax.set_title(f"{label}: task-pair JSD (log{base:g}); mean = {jsd['mean']:.4f}", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def fig_routing_example(labels: list[str], routings: list[dict]) -> Figure:
    """One example's routing probabilities with the chosen experts boxed in red (MoE-GRPO Fig. 6a): layers × experts
    at the route that predicted the first answer token, then tokens × experts for the first, middle and last layer."""
    cols = 1 + max(len(_example_layers(len(routing["layers"]))) for routing in routings)
    fig, axes = _grid(len(labels), cols, 3.3, 3.6)
    im = None
    for i, (label, routing) in enumerate(zip(labels, routings)):
        ex = routing.get("example")
        if not ex:
            _note(axes[i, 0], f"{label}: no example in the routing statistics")
            continue
        probs = np.array(ex["probs"], dtype=float)  # (L, n, E)
        experts = np.array(ex["experts"], dtype=int)  # (L, n, K)
        t = ex.get("answer_index")
        t = probs.shape[1] - 1 if t is None else t
        ax = axes[i, 0]
        im = ax.imshow(probs[:, t], aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        _box_chosen(ax, experts[:, t])
        ax.set_yticks(range(probs.shape[0]), routing["layers"], fontsize=7)
        ax.set_ylabel("MoE layer", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{label}: {ex['prompt'][-30:]!r} → {ex['completion'][:20]!r}\nlayers at token {t}", fontsize=8)
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
            ax.set_title(f"layer {routing['layers'][li]}: router input token × expert", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="router probability")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# all of them


def render_figures(labels: list[str], metrics: list[Records], routings: list[dict]) -> dict[str, str | None]:
    """{figure id: PNG data URI, or None where no run logged the figure's metrics}, in FIGURE_IDS order.

    Each figure is drawn and closed before the next, so at most one is open at a time."""
    makers = {
        "fig-reward": lambda: fig_reward(labels, metrics),
        "fig-accuracy": lambda: fig_accuracy(labels, metrics),
        "fig-loss-diagnostics": lambda: fig_loss_diagnostics(labels, metrics),
        "fig-utilisation-steps": lambda: fig_utilisation_steps(labels, metrics),
        "fig-utilisation-positions": lambda: fig_utilisation_positions(labels, routings),
        "fig-entropies": lambda: fig_entropies(labels, metrics, routings),
        "fig-jsd": lambda: fig_jsd(labels, routings),
        "fig-routing-example": lambda: fig_routing_example(labels, routings),
    }
    assert tuple(makers) == FIGURE_IDS, "render_figures and FIGURE_IDS disagree"
    out = {}
    for fid, make in makers.items():
        fig = make()
        out[fid] = None if fig is None else png_data_uri(fig)
    return out


METRIC_FIGURES = ("fig-reward", "fig-accuracy", "fig-loss-diagnostics", "fig-utilisation-steps")
"""the figures drawn from metrics.jsonl alone (no evaluation pass): what a run's experiment tracker shows"""


def figure_images(labels: list[str], metrics: list[Records]) -> dict[str, np.ndarray]:
    """{figure id: (H, W, 3) uint8 RGB image} of the ``METRIC_FIGURES`` the runs have data for (for trackers)."""
    makers = {
        "fig-reward": fig_reward,
        "fig-accuracy": fig_accuracy,
        "fig-loss-diagnostics": fig_loss_diagnostics,
        "fig-utilisation-steps": fig_utilisation_steps,
    }
    assert tuple(makers) == METRIC_FIGURES
    out = {}
    for fid, make in makers.items():
        fig = make(labels, metrics)
        if fig is None:
            continue
        fig.canvas.draw()
        out[fid] = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)
        plt.close(fig)
    return out
