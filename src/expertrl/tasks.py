"""Tasks: train and eval prompts plus a scorer of completions.

An item is a dict with at least ``prompt``, ``answer`` and ``id`` (all ``str``), and optionally ``category`` (a
``str`` used to break eval accuracy down). ``Task.score(completion, item)`` returns a float in [0, 1].

Task names:
    ``addition``        built-in generator of ``"12+7="`` -> ``"19"``; kwargs ``max_value``, ``num_terms``.
    ``rg:<dataset>``    a reasoning-gym dataset; kwargs go to its config (``rg:chain_sum``, ``rg:countdown``, ...).
    ``jsonl:<path>``    one JSON object per line with ``prompt``, ``answer`` and optionally ``category``, ``id`` (other
                        key names through ``prompt_field`` / ``answer_field`` / ``category_field``); rows in file
                        order, the last ``eval_size`` are held out.
    ``hf:<path>``       a local dataset read through Hugging Face ``datasets`` (parquet/jsonl/json/csv file,
                        ``save_to_disk`` directory, directory of data files), with field mapping and a split choice
                        (``expertrl.tasks_hf``); kwargs go to ``datasets.load_dataset``.
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
from expertrl.rewards.answers import get_extractor
from expertrl.rewards.verifiers import exact_match, math_verify_match
from expertrl.tasks_hf import load_hf_rows, row_to_item
from expertrl.tasks_mm import load_mm_task

TASK_FORMS = ("addition", "rg:<dataset>", "jsonl:<path>", "hf:<path>", "mm:<multimodal task>")
FILE_FIELDS = ("prompt_field", "answer_field", "category_field", "answer_extractor")
"""options of the file-based tasks (jsonl:, hf:): which fields hold what, and how the gold answer is read"""
HF_SPLITS = ("split", "eval_split")
"""options of hf: tasks only"""
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
    truncated: int = 0
    """prompts cut to ``task.max_prompt_tokens`` (``prompts.fit_prompts``)"""


def sample_items(items: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` items drawn uniformly with replacement by ``rng`` (the one sampler of prompts: RL steps, guidance
    calibration and SFT batches)."""
    return [items[rng.randrange(len(items))] for _ in range(n)]


def load_task(
    name: str,
    *,
    train_size: int,
    eval_size: int,
    seed: int,
    verifier: str = "task",
    completion_extractor: str = "auto",
    files: dict | None = None,
    **kwargs,
) -> Task:
    """Build the task ``name`` (one of ``TASK_FORMS``) with deterministic train and eval splits.

    Args:
        train_size: number of train items.
        eval_size: number of eval items.
        seed: the splits are a function of the seed.
        verifier: ``"task"`` for the task's own check (exact match for addition, jsonl and hf, the dataset's
            ``score_answer`` for reasoning-gym), or a key of ``VERIFIERS`` applied to the extracted answer.
        completion_extractor: how the answer is read out of a completion (a key of ``rewards.answers.EXTRACTORS``).
        files: options of file-based tasks, ``FILE_FIELDS`` (jsonl: and hf:) and ``HF_SPLITS`` (hf: only).
        **kwargs: task options (see the module docstring).
    """
    assert train_size >= 0 and eval_size >= 0, (train_size, eval_size)
    if verifier != "task" and verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose from {['task', *sorted(VERIFIERS)]}")
    extract = get_extractor(completion_extractor)
    files = dict(files or {})
    allowed = FILE_FIELDS + HF_SPLITS if name.startswith("hf:") else FILE_FIELDS if name.startswith("jsonl:") else ()
    if set(files) - set(allowed):
        raise ValueError(
            f"task.{sorted(set(files) - set(allowed))[0]}: applies to file-based tasks (jsonl:<path>, hf:<path>; "
            f"task.split and task.eval_split to hf: only), not to {name!r}; leave it unset"
        )
    rg_score = None
    if name == "addition":
        train, eval_ = _addition(train_size, eval_size, seed, **kwargs)
    elif name.startswith("rg:"):
        train, eval_, rg_score = _reasoning_gym(name.removeprefix("rg:"), train_size, eval_size, seed, **kwargs)
    elif name.startswith("jsonl:"):
        train, eval_ = _jsonl(Path(name.removeprefix("jsonl:")), train_size, eval_size, **files, **kwargs)
    elif name.startswith("hf:"):
        rows = dict(train_size=train_size, eval_size=eval_size, seed=seed)
        train, eval_ = load_hf_rows(name.removeprefix("hf:"), **rows, **files, **kwargs)
    elif name.startswith("mm:"):
        if verifier != "task":
            raise ValueError(
                f"verifier={verifier!r}: multimodal tasks are scored by their option letter; use verifier=task"
            )
        mm = load_mm_task(name.removeprefix("mm:"), train_size=train_size, eval_size=eval_size, seed=seed, **kwargs)
        return Task(name=name, train=mm.train, eval=mm.eval, score=mm.score, multimodal=True)
    else:
        raise ValueError(f"unknown task {name!r}; use one of {TASK_FORMS}")
    check = exact_match if verifier == "task" else VERIFIERS[verifier]
    own = rg_score if verifier == "task" else None  # reasoning-gym's own scorer (it scores None, no answer, too)

    def score(completion: str, item: dict) -> float:
        found = extract(completion)
        if own is not None:
            return own(found, item)
        return 0.0 if found is None else float(check(found, item["answer"]))

    return Task(name=name, train=train, eval=eval_, score=score)


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
    return train, eval_


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

    def score(answer: str | None, item: dict) -> float:
        return float(ds.score_answer(answer, item["entry"]))

    return items[:train_size], items[train_size:], score


def _jsonl(
    path: Path,
    train_size: int,
    eval_size: int,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    category_field: str | None = None,
    answer_extractor: str = "auto",
):
    """Rows in file order; the last ``eval_size`` rows are eval, the first ``train_size`` of the others train."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    rows = []
    for where, row in read_jsonl(path):
        for key, field in (("task.prompt_field", prompt_field), ("task.answer_field", answer_field)):
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r} ({key}); the row has {sorted(row)}")
        lineno = where.rsplit(":", 1)[1]
        cat = category_field or "category"
        rows.append(
            row_to_item(
                row, where=where, item_id=str(row.get("id", f"{path.stem}-{lineno}")), prompt_field=prompt_field,
                answer_field=answer_field, category_field=cat if cat in row else None,
                answer_extractor=answer_extractor,
            )
        )  # fmt: skip
    if len(rows) < train_size + eval_size:
        raise ValueError(f"{path} has {len(rows)} rows; need train_size + eval_size = {train_size + eval_size}")
    split = len(rows) - eval_size
    return rows[:train_size], rows[split:]
