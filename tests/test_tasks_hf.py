"""``hf:<local path>`` tasks through Hugging Face ``datasets``: every format users keep data in (json, jsonl, parquet,
csv, save_to_disk, a directory of data files), field mapping, split choice, and the GSM8K / MATH answer conventions;
and the same field mapping for ``jsonl:`` tasks."""

import json

import datasets
import pytest
from standins import gsm8k_rows, math_rows, write_dataset

from expertrl.tasks import load_task

GSM8K = dict(prompt_field="question", answer_field="answer", answer_extractor="gsm8k")


def _load(path, train_size=6, eval_size=3, seed=0, **files):
    return load_task(f"hf:{path}", train_size=train_size, eval_size=eval_size, seed=seed, files=files)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "disk"])
def test_every_format_reads_the_same_items(tmp_path, fmt):
    rows = gsm8k_rows(12)
    path = write_dataset(rows, tmp_path / "gsm8k", fmt)
    task = _load(path, **GSM8K)
    assert len(task.train) == 6 and len(task.eval) == 3
    by_question = {r["question"]: r for r in rows}
    for item in task.train + task.eval:
        row = by_question[item["prompt"]]  # the prompt is the question field
        assert (
            item["answer"] == f"{int(row['answer'].rsplit('#### ', 1)[1].replace(',', ''))}"
        )  # "#### 3,600" -> "3600"
        assert item["id"].startswith(f"{path.stem}-train-")
    ids = [i["id"] for i in task.train + task.eval]
    assert len(set(ids)) == len(ids), "a held-out row was also drawn for training"
    assert [i["id"] for i in _load(path, **GSM8K).train] == [i["id"] for i in task.train]  # seeded
    assert [i["id"] for i in _load(path, seed=1, **GSM8K).train] != [i["id"] for i in task.train]


def test_gsm8k_answers_are_checked_after_extraction(tmp_path):
    path = write_dataset(gsm8k_rows(4), tmp_path / "g", "parquet")
    task = _load(path, train_size=2, eval_size=2, **GSM8K)
    item = task.eval[0]
    assert task.score(f"<think>...</think><answer>{item['answer']}</answer>", item) == 1.0
    assert task.score(f"so #### {item['answer']}", item) == 1.0
    assert task.score("<answer>0</answer>", item) == 0.0


def test_math_boxed_answers(tmp_path):
    path = write_dataset(math_rows(5), tmp_path / "math", "jsonl")
    files = dict(prompt_field="problem", answer_field="solution", answer_extractor="boxed")
    task = _load(path, train_size=3, eval_size=2, **files)
    assert all(i["answer"].startswith("\\frac{") for i in task.train + task.eval)  # nested braces kept
    item = task.eval[0]
    assert task.score(f"thus \\boxed{{{item['answer']}}}", item) == 1.0
    strict = load_task(
        f"hf:{path}",
        train_size=3,
        eval_size=2,
        seed=0,
        files=files,
        completion_extractor="boxed",
        verifier="math_verify",
    )
    assert strict.score(f"<answer>{item['answer']}</answer>", item) == 0.0  # the boxed extractor finds no box
    assert strict.score(f"\\boxed{{{item['answer']}}}", item) == 1.0


def test_held_out_split_and_categories(tmp_path):
    rows = gsm8k_rows(9)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:6]), "test": datasets.Dataset.from_list(rows[6:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    task = _load(tmp_path / "dd", train_size=6, eval_size=3, split="train", eval_split="test", category_field="level",
                 **GSM8K)  # fmt: skip
    assert {i["prompt"] for i in task.eval} == {r["question"] for r in rows[6:]}
    assert {i["prompt"] for i in task.train} == {r["question"] for r in rows[:6]}
    assert {i["category"] for i in task.train} == {"easy", "hard"}
    assert all(i["id"].startswith("dd-test-") for i in task.eval)


def test_directory_of_data_files_like_a_hub_copy(tmp_path):
    rows = gsm8k_rows(8)
    write_dataset(rows[:5], tmp_path / "gsm8k" / "main" / "train-00000-of-00001", "parquet")
    write_dataset(rows[5:], tmp_path / "gsm8k" / "main" / "test-00000-of-00001", "parquet")
    files = dict(eval_split="test", **GSM8K)
    task = load_task(f"hf:{tmp_path / 'gsm8k'}", train_size=5, eval_size=3, seed=0, files=files, data_dir="main")
    assert {i["prompt"] for i in task.eval} == {r["question"] for r in rows[5:]}


def test_numeric_answer_columns_and_plain_answers(tmp_path):
    rows = [{"q": f"{i}+1=", "a": i + 1, "category": "x"} for i in range(5)]
    path = write_dataset(rows, tmp_path / "num", "csv")
    task = _load(path, train_size=3, eval_size=2, prompt_field="q", answer_field="a")  # auto: the field as it is
    assert {i["answer"] for i in task.train + task.eval} <= {"1", "2", "3", "4", "5"}
    assert all(i["category"] == "x" for i in task.train)  # a 'category' column is used without being named


def test_jsonl_tasks_take_the_same_field_mapping(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(5)))
    task = load_task(f"jsonl:{path}", train_size=3, eval_size=2, seed=0, files=dict(category_field="level", **GSM8K))
    assert [i["prompt"] for i in task.train] == [r["question"] for r in gsm8k_rows(3)]  # file order, as before
    assert task.train[0]["answer"] == "3600" and task.train[0]["category"] == "hard"


def test_too_few_rows_names_the_sizes(tmp_path):
    path = write_dataset(gsm8k_rows(5), tmp_path / "g", "parquet")
    with pytest.raises(ValueError, match=r"task.train_size: split 'train' of .* has 5 rows; task.train_size \+ task"):
        _load(path, train_size=4, eval_size=2, **GSM8K)
