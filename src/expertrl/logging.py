"""Metric sinks and progress: one JSON line per step in ``metrics.jsonl``, forwarded to the run's experiment trackers
(``report_to``: ``expertrl.trackers``), and a progress display. Rank 0 writes.

Metrics arrive as a flat dict of detached tensors (0-d or 1-d) and floats; they are turned into Python numbers
once per step here, never inside the losses (STYLE.md §6).

Progress (``progress_bar``): a tqdm bar on a terminal; off a terminal (a log file, a scheduler's output) one plain
line every ``PLAIN_EVERY_S`` seconds and at the end, never ``\r``-rewritten lines; nothing when progress is off.
Hugging Face's own bars (loading and writing weights) follow the same switch (``quiet_hf_progress``).
"""

from __future__ import annotations

import errno
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from expertrl.io import DiskFullError
from expertrl.trackers import Tracker, scalars

PLAIN_EVERY_S = 30.0
"""Seconds between two plain progress lines off a terminal."""


class PlainProgress:
    """``tqdm``'s interface, printing a plain line now and then: for logs that are not a terminal."""

    def __init__(self, iterable: Iterable, *, desc: str, total: int, initial: int = 0, every_s: float = PLAIN_EVERY_S):
        self.iterable, self.desc, self.total, self.n = iterable, desc, total, initial
        self.every_s, self.postfix = every_s, ""
        self._start = self._last = time.monotonic()
        self._start_n = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if now - self._last >= self.every_s or self.n >= self.total:
                self._last = now
                self._print(now)

    def _print(self, now: float) -> None:
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} ({rate:.2f} it/s){extra}", file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def progress_bar(
    iterable: Iterable, *, desc: str, total: int, initial: int = 0, enabled: bool = True, leave: bool = True
):
    """A tqdm bar on a terminal (``leave=False``: erased when done), ``PlainProgress`` lines otherwise, a silent tqdm
    when ``enabled`` is false."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(iterable, desc=desc, total=total, initial=initial)
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=not enabled, leave=leave)


def quiet_hf_progress(enabled: bool) -> None:
    """Hugging Face's bars (loading and writing weights) only on a terminal and when progress is on."""
    if enabled and sys.stderr.isatty():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def to_number(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return v.item() if v.dim() == 0 else [round(x, 6) for x in v.tolist()]
    return v


def mean_metrics(records: list[dict]) -> dict:
    """Average a list of metric dicts key by key (tensors stacked, so one sync at the end)."""
    out = {}
    for key in records[0]:
        vals = [r[key] for r in records if key in r]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack([v.detach().float() for v in vals]).mean(0)
        else:
            out[key] = sum(vals) / len(vals)
    return _usage_entropy_of_loads(out)


class MetricsLogger:
    """Appends ``{"step": s, **metrics}`` lines to ``path`` (flushed every line, so a killed run keeps its log) and
    hands the record's scalars to each tracker (step -1, the evaluation before RL, as step 0)."""

    def __init__(self, path: str | Path, enabled: bool = True, trackers: Sequence[Tracker] = ()):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict, step: int) -> dict:
        record = {"step": step, **{k: to_number(v) for k, v in metrics.items()}}
        if self.enabled:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a cut line is skipped on reading (io.read_jsonl(skip_bad=True))
                if e.errno != errno.ENOSPC:
                    raise
                raise DiskFullError(f"no space left on the device of {self.path} to log step {step}") from None
            for tracker in self.trackers:
                tracker.log(scalars(record), max(step, 0))
        return record

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Figures, as (H, W, 3) uint8 images, to every tracker (metrics.jsonl holds only numbers)."""
        for tracker in self.trackers:
            tracker.log_images(images, max(step, 0))

    def close(self) -> None:
        """Finish every tracker (metrics.jsonl needs no closing); safe to call twice."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


SUMMED_ACROSS_RANKS = ("rollout/num_tokens", "time/tokens_per_s", "rollout/trace_bytes")
WEIGHTED_ACROSS_RANKS = {"router/load/": "rollout/completion_length"}
"""key prefix -> the key whose per-rank value weighs the mean: a rank's expert loads are fractions of its completion
tokens, and every rank has the same number of rows, so weighing by mean completion length gives the global loads."""


def reduce_across_ranks(records: list[dict]) -> dict:
    """One step's record from the per-rank records (plain numbers or lists, as ``to_number`` gives them).

    Counts and throughputs (``SUMMED_ACROSS_RANKS``) are summed, ``time/*`` is the slowest rank's, expert loads are
    weighted by each rank's completion tokens (``WEIGHTED_ACROSS_RANKS``), everything else is the mean over the ranks
    that logged the key (lists element-wise): with equal per-rank batches the mean of per-rank means is the global
    mean. A rank whose batch dynamic sampling emptied logs no loss metrics. ``router/usage_entropy`` is recomputed
    from the global loads.
    """
    out = {}
    for key in dict.fromkeys(k for r in records for k in r):
        vals = [r[key] for r in records if key in r and r[key] is not None]
        if not vals or not isinstance(vals[0], (int, float, list)) or isinstance(vals[0], bool):
            out[key] = records[0].get(key, vals[0] if vals else None)
        elif all(v == vals[0] for v in vals):  # lr, step counters, a synced grad norm: keep the value as is
            out[key] = vals[0] if key not in SUMMED_ACROSS_RANKS else vals[0] * len(vals)
        elif isinstance(vals[0], list):
            by = next((w for prefix, w in WEIGHTED_ACROSS_RANKS.items() if key.startswith(prefix)), None)
            weights = [r.get(by, 1.0) for r in records if key in r and r[key] is not None] if by else [1.0] * len(vals)
            total = sum(weights) or 1.0
            out[key] = [round(sum(w * c for w, c in zip(weights, col)) / total, 6) for col in zip(*vals, strict=True)]
        elif key in SUMMED_ACROSS_RANKS:
            out[key] = sum(vals)
        elif key.startswith("time/"):
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return _usage_entropy_of_loads(out)


def _usage_entropy_of_loads(out: dict) -> dict:
    """``router/usage_entropy`` recomputed from the reduced ``router/load/*`` (the entropy of the global loads, not
    the mean of the parts' entropies)."""
    loads = [v for k, v in out.items() if k.startswith("router/load/") and isinstance(v, list)]
    if loads and "router/usage_entropy" in out:
        out["router/usage_entropy"] = sum(-sum(p * math.log(p) for p in load if p > 0) for load in loads) / len(loads)
    return out
