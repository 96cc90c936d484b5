"""Tasks: train and eval prompts plus a scorer of completions.

An item is a dict with at least ``prompt``, ``answer`` and ``id`` (all ``str``), and optionally ``category`` (a
``str`` used to break eval accuracy down). ``Task.score(completion, item)`` returns a float in [0, 1].

Task names:
    ``addition``        built-in generator of ``"12+7="`` -> ``"19"``; kwargs ``max_value``, ``num_terms``.
    ``rg:<dataset>``    a reasoning-gym dataset; kwargs go to its config (``rg:chain_sum``, ``rg:countdown``, ...).
    ``jsonl:<path>``    one JSON object per line with ``prompt``, ``answer`` and optionally ``category``, ``id``.
    ``mm:<name>``       a multimodal multiple-choice task of ``expertrl.tasks_mm`` (``mm:digits_mc``,
                        ``mm:shapes_count``, ``mm:colour``, ``mm:motion_video``, ``mm:jsonl_mm:<path>``); items also
                        hold ``images`` or ``video``; kwargs ``image_size`` (default 32) and the task's options. Needs
                        a vision-language model.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from expertrl.io import read_jsonl
from expertrl.rewards.verifiers import exact_match, extract_answer, math_verify_match
from expertrl.tasks_mm import load_mm_task

TASK_FORMS = ("addition", "rg:<dataset>", "jsonl:<path>", "mm:<multimodal task>")
VERIFIERS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "math_verify": math_verify_match}


@dataclass
class Task:
    name: str
    train: list[dict]
    eval: list[dict]
    score: Callable[[str, dict], float]
    """``score(completion, item)`` in [0, 1]."""
    multimodal: bool = False
    """items carry ``images`` or ``video`` (``mm:`` tasks): the model must be a vision-language model"""


def sample_items(items: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` items drawn uniformly with replacement by ``rng`` (the one sampler of prompts: RL steps, guidance
    calibration and SFT batches)."""
    return [items[rng.randrange(len(items))] for _ in range(n)]


def load_task(name: str, *, train_size: int, eval_size: int, seed: int, verifier: str = "task", **kwargs) -> Task:
    """Build the task ``name`` (one of ``TASK_FORMS``) with deterministic train and eval splits.

    Args:
        train_size: number of train items.
        eval_size: number of eval items.
        seed: the splits are a function of the seed.
        verifier: ``"task"`` for the task's own scorer (exact match for addition and jsonl, the dataset's
            ``score_answer`` for reasoning-gym), or a key of ``VERIFIERS`` applied to the extracted answer.
        **kwargs: task options (see the module docstring).
    """
    assert train_size >= 0 and eval_size >= 0, (train_size, eval_size)
    if verifier != "task" and verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose from {['task', *sorted(VERIFIERS)]}")
    if name == "addition":
        train, eval_, score = _addition(train_size, eval_size, seed, **kwargs)
    elif name.startswith("rg:"):
        train, eval_, score = _reasoning_gym(name.removeprefix("rg:"), train_size, eval_size, seed, **kwargs)
    elif name.startswith("jsonl:"):
        train, eval_, score = _jsonl(Path(name.removeprefix("jsonl:")), train_size, eval_size, **kwargs)
    elif name.startswith("mm:"):
        if verifier != "task":
            raise ValueError(
                f"verifier={verifier!r}: multimodal tasks are scored by their option letter; use verifier=task"
            )
        mm = load_mm_task(name.removeprefix("mm:"), train_size=train_size, eval_size=eval_size, seed=seed, **kwargs)
        return Task(name=name, train=mm.train, eval=mm.eval, score=mm.score, multimodal=True)
    else:
        raise ValueError(f"unknown task {name!r}; use one of {TASK_FORMS}")
    if verifier != "task":
        check = VERIFIERS[verifier]

        def score(completion: str, item: dict) -> float:
            return check(extract_answer(completion), item["answer"])

    return Task(name=name, train=train, eval=eval_, score=score)


def _score_exact(completion: str, item: dict) -> float:
    return exact_match(extract_answer(completion), item["answer"])


def _addition(train_size: int, eval_size: int, seed: int, *, max_value: int = 99, num_terms: int = 2):
    """Sums of ``num_terms`` operands uniform in [0, max_value]. Eval prompts are distinct; train prompts are
    i.i.d. draws from the remaining space (a small space repeats them), so no train prompt is an eval prompt."""
    assert max_value >= 0 and num_terms >= 1, (max_value, num_terms)
    space = (max_value + 1) ** num_terms
    if eval_size > space or (train_size > 0 and eval_size == space):
        raise ValueError(
            f"addition with max_value={max_value}, num_terms={num_terms} has only {space} distinct prompts: too few "
            f"for {eval_size} held-out eval prompts plus train prompts; raise max_value or num_terms"
        )
    rng = random.Random(seed)

    def draw() -> tuple[int, ...]:
        return tuple(rng.randint(0, max_value) for _ in range(num_terms))

    if eval_size * 4 >= space:  # dense: sample without replacement from the enumerated space
        held_out = rng.sample(list(itertools.product(range(max_value + 1), repeat=num_terms)), eval_size)
    else:  # sparse: rejection sampling needs few retries
        seen: dict[tuple[int, ...], None] = {}
        while len(seen) < eval_size:
            seen[draw()] = None
        held_out = list(seen)
    held = set(held_out)
    if (space - eval_size) * 4 <= space:
        rest = [t for t in itertools.product(range(max_value + 1), repeat=num_terms) if t not in held]
        train_terms = rng.choices(rest, k=train_size)
    else:
        train_terms = []
        while len(train_terms) < train_size:
            if (t := draw()) not in held:
                train_terms.append(t)

    def item(terms: tuple[int, ...], split: str, i: int) -> dict:
        answer = str(sum(terms))
        prompt = "+".join(map(str, terms)) + "="
        return dict(
            prompt=prompt, answer=answer, id=f"addition-{split}-{i}", category=str(len(answer))
        )  # digits in the sum

    train = [item(t, "train", i) for i, t in enumerate(train_terms)]
    eval_ = [item(t, "eval", i) for i, t in enumerate(held_out)]
    return train, eval_, _score_exact


def _reasoning_gym(dataset: str, train_size: int, eval_size: int, seed: int, **config):
    """The first ``train_size`` entries of the seeded dataset are train, the next ``eval_size`` eval."""
    import reasoning_gym  # imported here: the import takes ~1.3 s

    ds = reasoning_gym.create_dataset(dataset, size=train_size + eval_size, seed=seed, **config)
    items = [
        dict(
            prompt=entry["question"],
            answer=str(entry["answer"]),
            id=f"{dataset}-{i}",
            category=str(entry["metadata"]["source_dataset"]),
            entry=entry,
        )
        for i, entry in enumerate(ds[i] for i in range(len(ds)))
    ]

    def score(completion: str, item: dict) -> float:
        return float(ds.score_answer(extract_answer(completion), item["entry"]))

    return items[:train_size], items[train_size:], score


def _jsonl(path: Path, train_size: int, eval_size: int):
    """Rows in file order; the last ``eval_size`` rows are eval, the first ``train_size`` of the others train."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    rows = []
    for where, row in read_jsonl(path):
        for key in ("prompt", "answer"):
            if key not in row:
                raise ValueError(f"{where}: missing field {key!r}")
            if not isinstance(row[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
        lineno = where.rsplit(":", 1)[1]
        item = dict(prompt=row["prompt"], answer=row["answer"], id=str(row.get("id", f"{path.stem}-{lineno}")))
        if "category" in row:
            item["category"] = str(row["category"])
        rows.append(item)
    if len(rows) < train_size + eval_size:
        raise ValueError(f"{path} has {len(rows)} rows; need train_size + eval_size = {train_size + eval_size}")
    split = len(rows) - eval_size
    return rows[:train_size], rows[split:], _score_exact
