"""Reward registry: named functions from a batch of completions to a ``(B,)`` float32 reward, combined by weight.

Contract: ``fn(completions: list[str], items: list[dict], task: Scorer, **options) -> Tensor (B,) float32``, where
``items[b]`` is the task item (``prompt``, ``answer``, ...) that ``completions[b]`` answers and ``options`` are the
reward's keyword-only parameters (``reward_kwargs`` in the config, bound and checked at start-up by ``get_reward``
and one call on an empty batch, which every reward must accept).
An exception inside a reward is re-raised by ``compute_rewards`` as a ``RuntimeError`` naming the reward, the prompt
and the completion that triggered it.

Registered: ``task`` (the task's verifier), ``format`` and ``tag_count`` (``rewards/format.py``). A run chooses them
with ``reward_funcs`` and weighs them with ``reward_weights`` (TRL's names); each is logged as ``reward/<name>``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor


class Scorer(Protocol):
    """What a reward may ask of the task: its verifier (``expertrl.tasks.Task`` is one)."""

    def score(self, completion: str, item: dict) -> float: ...


RewardFn = Callable[..., Tensor]
"""(completions, items, task, **options) -> (B,) float32"""
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        assert name not in REWARDS, f"reward {name!r} registered twice"
        REWARDS[name] = fn
        return fn

    return add


@register_reward("task")
def task_reward(completions: list[str], items: list[dict], task: Scorer) -> Tensor:
    """(B,) the task's own verifier score of each completion."""
    return torch.tensor([task.score(c, item) for c, item in zip(completions, items, strict=True)], dtype=torch.float32)


def get_reward(name: str, **options) -> functools.partial:
    """The reward ``name`` with its keyword-only options bound, checked now (a misspelled option fails at start-up).

    Raises:
        ValueError: unknown ``name`` (lists the registered ones), or an option the reward does not take (lists the
            ones it does).
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
    params = inspect.signature(REWARDS[name]).parameters
    allowed = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"reward {name!r} got unknown option(s) {unknown}; its options are {allowed}")
    return functools.partial(REWARDS[name], **options)


def combine(parts: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """(B,) sum over rewards of weight * reward. ``parts`` and ``weights`` must name the same rewards."""
    assert parts, "no reward parts to combine"
    if parts.keys() != weights.keys():
        raise ValueError(f"reward parts {sorted(parts)} and weights {sorted(weights)} name different rewards")
    return sum(weights[name] * part for name, part in parts.items())


def _clip(text: str, limit: int = 200) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def compute_rewards(
    names_weights: dict[str, float],
    completions: list[str],
    items: list[dict],
    task: Scorer,
    *,
    options: dict[str, dict] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run each named reward and combine them.

    Args:
        names_weights: reward name -> weight (the order of the parts).
        options: reward name -> its keyword-only options (``get_reward``); absent names take their defaults.
    Returns:
        total: (B,) weighted sum.
        parts: reward name -> (B,) unweighted reward.
    """
    unknown = sorted(set(names_weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; choose from {sorted(REWARDS)}")
    assert len(names_weights) > 0, "no rewards configured"
    assert len(completions) == len(items), (len(completions), len(items))
    parts = {}
    for name in names_weights:
        fn = get_reward(name, **(options or {}).get(name, {}))
        try:
            reward = fn(completions, items, task)
        except Exception as err:
            b = _first_failing(fn, completions, items, task)
            where = "" if b is not None else " (no single completion reproduces it; showing the first)"
            b = 0 if b is None else b
            raise RuntimeError(
                f"reward {name!r} raised {type(err).__name__}: {err}{where}\n"
                f"  prompt: {_clip(items[b]['prompt'])}\n  completion: {_clip(completions[b])}"
            ) from err
        if reward.shape != (len(completions),) or reward.dtype != torch.float32:
            raise ValueError(
                f"reward {name!r} returned {reward.dtype} {tuple(reward.shape)}; expected float32 ({len(completions)},)"
            )
        parts[name] = reward
    return combine(parts, names_weights), parts


def _first_failing(fn: RewardFn, completions: list[str], items: list[dict], task: Scorer) -> int | None:
    """Index of the first completion on which ``fn`` raises when called alone, for the error message."""
    for b in range(len(completions)):
        try:
            fn(completions[b : b + 1], items[b : b + 1], task)
        except Exception:
            return b
    return None


# Import the reward modules so that their @register_reward decorators run.
from expertrl.rewards import format as _format_rewards  # noqa: E402, F401
