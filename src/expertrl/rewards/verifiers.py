"""Answer extraction and answer checkers: pure functions from strings to a score in [0, 1]."""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str:
    """The stripped contents of the last ``<answer>...</answer>`` in ``text``, else the stripped text."""
    found = _ANSWER_TAG.findall(text)
    return (found[-1] if found else text).strip()


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the two strings are equal after stripping surrounding whitespace, else 0.0."""
    return float(completion.strip() == answer.strip())


def math_verify_match(completion: str, answer: str) -> float:
    """1.0 if math-verify finds ``completion`` mathematically equal to the gold ``answer`` ("0.5" == "1/2")."""
    from math_verify import parse, verify  # imported here: the import costs ~0.5 s and pulls in sympy

    return float(verify(parse(answer), parse(completion)))
