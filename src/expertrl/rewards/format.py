"""Format rewards: does a completion have the shape of the answer format the prompt asks for?

Registered as ``format`` (1.0 when the whole completion has the shape, else 0.0: the usual format reward of R1-style
training, open-r1's ``format`` and TRL's ``think_format_reward``) and ``tag_count`` (0.25 for each of ``<think>``,
``</think>``, ``<answer>`` and ``</answer>`` that appears exactly once: open-r1's partial credit, which a small model
can climb before it gets the whole format right). Choose and weigh them with ``reward_funcs`` / ``reward_weights``;
``reward_kwargs: {format: {style: boxed}}`` picks the shape (``STYLES``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from expertrl.rewards import Scorer, register_reward
from expertrl.rewards.answers import boxed

_THINK = r"<think>(?:(?!<think>|</think>).)*</think>"
_ANSWER = r"<answer>(?:(?!<answer>|</answer>).)*</answer>"
STYLES: dict[str, str] = {
    "think_answer": "<think>...</think> then <answer>...</answer>, nothing else around them",
    "answer": "any text, then one <answer>...</answer> that ends the completion",
    "boxed": "a closed \\boxed{...} anywhere in the completion",
    "think_boxed": "<think>...</think> first, then text with a closed \\boxed{...}",
}
"""format styles: name -> the shape that earns 1.0"""
_PATTERNS = {
    "think_answer": re.compile(rf"\s*{_THINK}\s*{_ANSWER}\s*", re.DOTALL),
    "answer": re.compile(rf"(?:(?!<answer>).)*{_ANSWER}\s*", re.DOTALL),
    "think_boxed": re.compile(rf"\s*{_THINK}(?:(?!<think>|</think>).)*", re.DOTALL),
}


def has_format(text: str, style: str) -> bool:
    """Whether ``text`` has the shape ``STYLES[style]`` describes."""
    if style not in STYLES:
        raise ValueError(f"unknown format style {style!r}; choose from {sorted(STYLES)}")
    if style == "boxed":
        return boxed(text) is not None
    ok = _PATTERNS[style].fullmatch(text) is not None
    return ok and (style != "think_boxed" or boxed(text.split("</think>", 1)[1]) is not None)


@register_reward("format")
def format_reward(completions: list[str], items: list[dict], task: Scorer, *, style: str = "think_answer") -> Tensor:
    """(B,) 1.0 where the completion has the shape of ``style`` (``STYLES``), else 0.0."""
    if style not in STYLES:
        raise ValueError(f"unknown format style {style!r}; choose from {sorted(STYLES)}")
    return torch.tensor([float(has_format(c, style)) for c in completions], dtype=torch.float32)


@register_reward("tag_count")
def tag_count(completions: list[str], items: list[dict], task: Scorer) -> Tensor:
    """(B,) 0.25 for each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` that appears exactly once."""
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return torch.tensor([sum(0.25 for t in tags if c.count(t) == 1) for c in completions], dtype=torch.float32)
