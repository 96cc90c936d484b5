"""Answer extractors: pure functions from a text to the answer it states, or None when it states none.

One registry serves both sides of a verifier: ``task.answer_extractor`` reads the gold answer out of a dataset's answer
field (GSM8K keeps its worked solution and ends it with ``#### 72``; MATH ends its solution in ``\\boxed{...}``), and
``task.completion_extractor`` reads the model's answer out of a completion (reasoning models write
``<think>...</think><answer>...</answer>`` or ``\\boxed{...}``).

    text         the whole text, stripped (never None)
    answer_tag   the contents of the last ``<answer>...</answer>``
    boxed        the contents of the last closed ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced
    gsm8k        what follows the last ``####`` on its line, thousands separators removed
    last_number  the last number in the text (``-1,234.5`` -> ``-1234.5``; ``3/4`` stays a fraction)
    auto         answer_tag, else boxed, else gsm8k, else the whole text (never None): plain answers such as ``"19"``
                 read as themselves, and each of the formats above is found without being named
"""

from __future__ import annotations

import re
from collections.abc import Callable

Extractor = Callable[[str], "str | None"]
EXTRACTORS: dict[str, Extractor] = {}

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def register_extractor(name: str) -> Callable[[Extractor], Extractor]:
    def add(fn: Extractor) -> Extractor:
        assert name not in EXTRACTORS, f"extractor {name!r} registered twice"
        EXTRACTORS[name] = fn
        return fn

    return add


@register_extractor("text")
def whole_text(text: str) -> str:
    """The whole text, stripped."""
    return text.strip()


@register_extractor("answer_tag")
def answer_tag(text: str) -> str | None:
    """The stripped contents of the last ``<answer>...</answer>``, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


@register_extractor("boxed")
def boxed(text: str) -> str | None:
    """The stripped contents of the last closed ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced, or
    None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


@register_extractor("gsm8k")
def gsm8k(text: str) -> str | None:
    """What follows the last ``####`` up to the end of its line, stripped, with thousands separators removed
    (``#### 1,200`` -> ``1200``), or None when there is no ``####`` or nothing after it."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].split("\n", 1)[0].strip().replace(",", "")
    return answer or None


@register_extractor("last_number")
def last_number(text: str) -> str | None:
    """The last number in the text with thousands separators removed (a trailing full stop is not part of it), or
    None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


@register_extractor("auto")
def auto(text: str) -> str:
    """``answer_tag``, else ``boxed``, else ``gsm8k``, else the whole text."""
    for fn in (answer_tag, boxed, gsm8k):
        if (found := fn(text)) is not None:
            return found
    return text.strip()


def get_extractor(name: str) -> Extractor:
    """``EXTRACTORS[name]``; an unknown name lists the valid ones."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {name!r}; choose from {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]
