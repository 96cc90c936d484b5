"""Answer checkers: pure functions from strings to a score in [0, 1]. The answer extractors are in ``answers.py``."""

from __future__ import annotations

from expertrl.rewards.answers import auto


def extract_answer(text: str) -> str:
    """The answer a completion states: the last ``<answer>...</answer>``, else the last ``\\boxed{...}``, else what
    follows ``####``, else the stripped text (the ``auto`` extractor of ``expertrl.rewards.answers``)."""
    return auto(text)


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the two strings are equal after stripping surrounding whitespace, else 0.0."""
    return float(completion.strip() == answer.strip())


def math_verify_match(completion: str, answer: str) -> float:
    """1.0 if math-verify finds ``completion`` mathematically equal to the gold ``answer`` ("0.5" == "1/2")."""
    from math_verify import parse, verify  # imported here: the import costs ~0.5 s and pulls in sympy

    return float(verify(parse(answer), parse(completion)))
