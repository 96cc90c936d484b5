"""Datasets as users keep them: ``hf:<local path>`` tasks read through Hugging Face ``datasets``, and the field mapping
and answer extraction that ``jsonl:`` tasks share.

``hf:<path>`` takes
    a file          ``.parquet``, ``.jsonl``, ``.json`` or ``.csv`` (``load_dataset(<builder>, data_files=...)``); its
                    one split is called ``train``;
    a directory     written by ``save_to_disk`` (a ``Dataset``, whose one split is ``train``, or a ``DatasetDict``),
                    read with ``load_from_disk``;
    a directory     of data files, e.g. a local copy of a hub dataset (``main/train-00000-of-00001.parquet``,
                    ``main/test-...``): ``load_dataset(<dir>)``, splits named after the files; ``task.kwargs`` go to
                    ``load_dataset`` (e.g. ``{data_dir: main}``).

Rows become items through ``task.prompt_field``, ``task.answer_field`` and ``task.category_field``; the gold answer is
read out of the answer field by ``task.answer_extractor`` (``rewards.answers``: ``gsm8k`` for GSM8K's ``#### 72``,
``boxed`` for MATH's ``\\boxed{...}``). Splits: ``task.split`` trains; ``task.eval_split`` is the held-out split, or,
when it is None, ``task.eval_size`` rows are carved out of ``task.split``. Which rows are taken is a seeded draw
(``task.seed``) without replacement, so a dataset sorted by difficulty or topic still gives a representative sample.
Every failure is a ``ValueError`` or ``FileNotFoundError`` naming the setting, the file and the fix.
"""

from __future__ import annotations

import random
from pathlib import Path

from expertrl.io import read_jsonl
from expertrl.rewards.answers import EXTRACTORS, get_extractor

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
"""file suffix -> the ``datasets`` builder that reads it"""


def row_to_item(
    row: dict,
    *,
    where: str,
    item_id: str,
    prompt_field: str,
    answer_field: str,
    category_field: str | None,
    answer_extractor: str,
) -> dict:
    """One task item (``prompt``, ``answer``, ``id`` and, if any, ``category``) from a row; ``where`` names the row in
    error messages (``file:line`` or ``file, split 'train', row 3``)."""
    prompt, answer = row[prompt_field], row[answer_field]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # numeric answer columns (parquet/csv) are read as numbers
    for key, name, value in (("task.prompt_field", prompt_field, prompt), ("task.answer_field", answer_field, answer)):
        if not isinstance(value, str):
            raise ValueError(f"{key}: {where}: field {name!r} must be text, got {type(value).__name__}")
    gold = get_extractor(answer_extractor)(answer)
    if gold is None:
        shown = answer if len(answer) <= 80 else "..." + answer[-77:]
        raise ValueError(
            f"task.answer_extractor: {answer_extractor!r} finds no answer in {where}, field {answer_field!r}: "
            f"{shown!r}; choose the extractor of the data's convention ({sorted(EXTRACTORS)}: gsm8k reads '#### 42', "
            "boxed reads \\boxed{42}, text takes the field as it is) or fix that row"
        )
    item = dict(prompt=prompt, answer=gold, id=item_id, where=where)
    if category_field is not None and row.get(category_field) is not None:
        item["category"] = str(row[category_field])
    return item


def load_hf_rows(
    path: str | Path,
    *,
    train_size: int,
    eval_size: int,
    seed: int,
    split: str = "train",
    eval_split: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    category_field: str | None = None,
    answer_extractor: str = "auto",
    **load_kwargs,
) -> tuple[list[dict], list[dict]]:
    """(train items, eval items) of the local dataset at ``path`` (module docstring)."""
    path = Path(path)
    splits = _open(path, **load_kwargs)
    for key, name in (("task.split", split), ("task.eval_split", eval_split)):
        if name is not None and name not in splits:
            raise ValueError(
                f"{key}: {path} has no split {name!r}; its splits are {sorted(splits)} (a single data file's one split "
                "is 'train'; leave task.eval_split unset to carve the held-out rows out of task.split)"
            )
    train_ds = splits[split]
    columns = list(train_ds.column_names)
    if category_field is None and "category" in columns:
        category_field = "category"
    for key, name in (("task.prompt_field", prompt_field), ("task.answer_field", answer_field),
                      ("task.category_field", category_field)):  # fmt: skip
        if name is not None and name not in columns:
            raise ValueError(
                f"{key}: {path} (split {split!r}) has no column {name!r}; its columns are {columns}. "
                f"Set {key} to one of them"
            )
    rng = random.Random(seed)
    if eval_split is None:  # carve the held-out rows out of the training split
        picked = _draw(rng, len(train_ds), train_size + eval_size, path, split, "task.train_size + task.eval_size")
        parts = [(train_ds, split, picked[eval_size:]), (train_ds, split, picked[:eval_size])]
    else:
        eval_ds = splits[eval_split]
        missing = [c for c in (prompt_field, answer_field) if c not in eval_ds.column_names]
        if missing:
            raise ValueError(
                f"task.eval_split: split {eval_split!r} of {path} has no column {missing[0]!r}; its columns are "
                f"{list(eval_ds.column_names)}"
            )
        parts = [
            (train_ds, split, _draw(rng, len(train_ds), train_size, path, split, "task.train_size")),
            (eval_ds, eval_split, _draw(rng, len(eval_ds), eval_size, path, eval_split, "task.eval_size")),
        ]
    fields = dict(prompt_field=prompt_field, answer_field=answer_field, answer_extractor=answer_extractor)
    out = []
    for ds, name, rows in parts:
        cat = category_field if category_field in ds.column_names else None
        out.append([
            row_to_item(ds[i], where=f"{path}, split {name!r}, row {i}", item_id=f"{path.stem}-{name}-{i}",
                        category_field=cat, **fields)
            for i in rows
        ])  # fmt: skip
    return out[0], out[1]


def _draw(rng: random.Random, n: int, k: int, path: Path, split: str, what: str) -> list[int]:
    if k > n:
        raise ValueError(
            f"{what.split(' ')[0]}: split {split!r} of {path} has {n} rows; {what} = {k} is more. Lower it"
            + (" (or set task.eval_split to a held-out split)" if "+" in what else "")
        )
    return rng.sample(range(n), k)


def _open(path: Path, **load_kwargs) -> dict:
    """{split name: datasets.Dataset} of a local file or directory."""
    import datasets  # imported here: ~1 s, and only hf: tasks need it

    if not path.exists():
        raise FileNotFoundError(
            f"task.name: dataset {str(path)!r} does not exist; hf:<path> takes a local file "
            f"({', '.join(BUILDERS)}), a directory written by save_to_disk, or a directory of data files"
        )
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return dict(_load(datasets, path, str(path), {}, load_kwargs))
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"task.name: cannot tell the format of {str(path)!r} from its suffix; hf:<path> reads "
            f"{', '.join(BUILDERS)} files, save_to_disk directories and directories of data files"
        )
    return dict(_load(datasets, path, builder, {"data_files": {"train": str(path)}}, load_kwargs))


def _load(datasets, path: Path, what: str, files: dict, load_kwargs: dict):
    try:
        return datasets.load_dataset(what, **files, **load_kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        if path.suffix.lower() == ".jsonl":
            for _ in read_jsonl(path):  # raises naming file:line of the first bad line
                pass
        raise ValueError(f"task.name: {path} could not be read as a dataset: {err.__cause__ or err}") from None
