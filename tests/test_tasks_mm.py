"""Multimodal tasks: option-letter scoring (golden table), determinism, disjoint splits, images, videos, JSONL."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from expertrl.tasks_mm import COLOURS, LETTERS, MM_TASK_FORMS, chosen_option, jsonl_mm, load_mm_task, score_option

BUILT_IN = ["digits_mc", "shapes_count", "colour", "motion_video"]
ITEM = {"options": ["3", "7", "1", "0"], "answer": "B"}  # four options: A-D are valid letters


@pytest.mark.parametrize(
    "completion, chosen",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b)", "B"),
        ("b.", "B"),
        ("Answer: B", "B"),
        ("answer: b", "B"),
        ("The answer is (b).", "B"),
        ("B. 7", "B"),
        ("<answer>B</answer>", "B"),
        ("  b \n", "B"),  # a lone lower-case letter as the whole completion
        ("[C] because", "C"),
        ("Because 7", None),  # the B of "Because" is inside a word
        ("Bravo", None),
        ("B2", None),  # a letter glued to a digit is not an option
        ("a seven, so B", "B"),  # the article "a" is not option A
        ("I think D", "D"),  # "I" is not among the four options
        ("E", None),  # out of range for four options
        ("7", None),  # the option's text is not its letter
        ("", None),
        ("A or B", "A"),  # the first letter wins
        ("c: 1", "C"),
    ],
)
def test_chosen_option_golden(completion, chosen):
    assert chosen_option(completion, 4) == chosen
    assert score_option(completion, ITEM) == float(chosen == "B")


def test_chosen_option_respects_the_number_of_options():
    assert chosen_option("C", 2) is None and chosen_option("C", 3) == "C"


@pytest.mark.parametrize("name", BUILT_IN)
def test_tasks_are_deterministic_and_splits_disjoint(name):
    a = load_mm_task(name, train_size=40, eval_size=20, seed=3)
    b = load_mm_task(name, train_size=40, eval_size=20, seed=3)
    c = load_mm_task(name, train_size=40, eval_size=20, seed=4)
    assert (len(a.train), len(a.eval)) == (40, 20) and a.name == name and a.score is score_option

    def key(item):
        pictures = item.get("images") or item["video"]
        return item["prompt"], tuple(np.asarray(p).tobytes() for p in pictures)

    assert [key(it) for it in a.train + a.eval] == [key(it) for it in b.train + b.eval]
    assert [key(it) for it in a.train] != [key(it) for it in c.train]
    assert not {key(it) for it in a.train} & {key(it) for it in a.eval}
    assert len({key(it) for it in a.eval}) == 20  # eval items are distinct


@pytest.mark.parametrize("name", BUILT_IN)
def test_items_are_well_formed_and_answers_balanced(name):
    task = load_mm_task(name, train_size=200, eval_size=0, seed=0)
    for item in task.train:
        n = len(item["options"])
        assert item["answer"] in LETTERS[:n] and isinstance(item["category"], str) and item["id"]
        assert item["prompt"].endswith(f"({LETTERS[n - 1]}) {item['options'][-1]}")
        assert score_option(item["answer"], item) == 1.0
    counts = Counter(item["answer"] for item in task.train)
    n = len(task.train[0]["options"])
    assert set(counts) == set(LETTERS[:n])
    assert all(0.5 * 200 / n <= c <= 1.5 * 200 / n for c in counts.values()), counts


@pytest.mark.parametrize("name", ["digits_mc", "shapes_count", "colour"])
@pytest.mark.parametrize("size", [28, 32])
def test_images_have_the_requested_size_and_mode(name, size):
    for item in load_mm_task(name, train_size=5, eval_size=5, seed=0, image_size=size).train:
        assert "video" not in item and len(item["images"]) == 1
        assert item["images"][0].size == (size, size) and item["images"][0].mode == "RGB"


def test_digits_answer_is_the_shown_digit():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for item in load_mm_task("digits_mc", train_size=20, eval_size=0, seed=1, image_size=8).train:
        assert item["options"][LETTERS.index(item["answer"])] == item["category"]
        assert len(set(item["options"])) == 4
        # At 8x8 the image is the dataset's own array, so its label can be looked up.
        grey = np.asarray(item["images"][0])[:, :, 0]
        match = np.abs(digits.images * (255 / 16) - grey).max(axis=(1, 2)) <= 0.5
        assert {str(d) for d in digits.target[match]} == {item["category"]}


def test_shapes_count_answer_counts_the_squares():
    for item in load_mm_task("shapes_count", train_size=30, eval_size=0, seed=0).train:
        lit = np.asarray(item["images"][0]).sum(-1) > 0  # (32, 32)
        cells = lit.reshape(4, 8, 4, 8).any(axis=(1, 3))  # (4, 4) grid cells holding a square
        assert str(int(cells.sum())) == item["category"] == item["options"][LETTERS.index(item["answer"])]


def test_colour_answer_is_the_shape_colour():
    for item in load_mm_task("colour", train_size=30, eval_size=0, seed=0).train:
        pixels = np.asarray(item["images"][0]).reshape(-1, 3)
        colours = {tuple(p) for p in pixels if p.any()}
        assert colours == {COLOURS[item["category"]]}
        assert item["options"][LETTERS.index(item["answer"])] == item["category"]


@pytest.mark.parametrize("num_frames", [3, 4])
def test_motion_video_moves_the_way_the_answer_says(num_frames):
    task = load_mm_task("motion_video", train_size=30, eval_size=10, seed=0, num_frames=num_frames)
    for item in task.train + task.eval:
        assert "images" not in item and len(item["video"]) == num_frames
        assert all(f.size == (32, 32) and f.mode == "RGB" for f in item["video"])
        xs = []
        for frame in item["video"]:
            grey = np.asarray(frame).astype(float).sum(-1)  # (H, W)
            xs.append((grey.sum(0) * np.arange(grey.shape[1])).sum() / grey.sum())  # horizontal centre of mass
        steps = np.diff(xs)
        direction = item["options"][LETTERS.index(item["answer"])]
        assert direction == item["category"]
        assert (steps > 1.5).all() if direction == "right" else (steps < -1.5).all(), (direction, xs)


def _png(path, colour, size=(16, 12)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def test_jsonl_mm_round_trip(tmp_path):
    names = [_png(tmp_path / f"f{i}.png", (10 * i, 0, 0)) for i in range(3)]
    rows = [
        {"prompt": "Colour?", "images": [names[0]], "options": ["red", "blue"], "answer": "A", "category": "c"},
        {"prompt": "Move?", "video": names, "options": ["left", "right", "none"], "answer": "C", "fps": 4},
        {"prompt": "Two?", "images": [names[1], str(tmp_path / names[2])], "options": ["x", "y"], "answer": "B",
         "id": "mine"},
    ]  # fmt: skip
    path = tmp_path / "mm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is skipped
    items = jsonl_mm(path)
    assert len(items) == 3
    assert items[0]["prompt"] == "Colour? (A) red (B) blue" and items[0]["answer"] == "A"
    assert items[0]["category"] == "c" and items[0]["id"] == "mm-1" and items[2]["id"] == "mine"
    assert items[1]["fps"] == 4.0 and len(items[1]["video"]) == 3 and "images" not in items[1]
    assert [np.asarray(f)[0, 0].tolist() for f in items[1]["video"]] == [[0, 0, 0], [10, 0, 0], [20, 0, 0]]
    assert items[0]["images"][0].size == (16, 12) and items[0]["images"][0].mode == "RGB"
    assert jsonl_mm(path, image_size=8)[2]["images"][1].size == (8, 8)

    task = load_mm_task(f"jsonl_mm:{path}", train_size=2, eval_size=1, seed=0, image_size=0)
    assert [it["id"] for it in task.train] == ["mm-1", "mm-2"] and [it["id"] for it in task.eval] == ["mine"]
    assert task.score("(C)", task.train[1]) == 1.0
    with pytest.raises(ValueError, match="has 3 rows"):
        load_mm_task(f"jsonl_mm:{path}", train_size=3, eval_size=1, seed=0)


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"images": ["ok.png"], "options": ["a", "b"], "answer": "A"}, "field 'prompt'"),
        ({"prompt": "q", "images": ["ok.png"], "options": ["a"], "answer": "A"}, "field 'options'"),
        ({"prompt": "q", "images": ["ok.png"], "options": ["a", "b"], "answer": "C"}, "field 'answer'"),
        ({"prompt": "q", "images": ["ok.png"], "options": ["a", "b"], "answer": "b"}, "field 'answer'"),
        ({"prompt": "q", "options": ["a", "b"], "answer": "A"}, "exactly one of the fields 'images'"),
        ({"prompt": "q", "images": [], "options": ["a", "b"], "answer": "A"}, "field 'images' must be a non-empty"),
        ({"prompt": "q", "images": ["missing.png"], "options": ["a", "b"], "answer": "A"}, "does not exist"),
        ({"prompt": "q", "video": ["ok.png", "bad.png"], "options": ["a", "b"], "answer": "A"}, "cannot read image"),
        ({"prompt": "q", "video": ["ok.png"], "options": ["a", "b"], "answer": "A", "fps": 0}, "field 'fps'"),
    ],
)
def test_jsonl_mm_bad_rows_name_line_and_field(tmp_path, row, message):
    _png(tmp_path / "ok.png", (0, 0, 0))
    (tmp_path / "bad.png").write_text("not an image")
    good = {"prompt": "q", "images": ["ok.png"], "options": ["a", "b"], "answer": "A"}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(ValueError, match=message) as err:
        jsonl_mm(path)
    assert f"{path}:2" in str(err.value)
    if "video" in str(row) and "bad.png" in str(row):
        assert "field 'video'[1]" in str(err.value)


def test_unknown_task_and_oversized_splits_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown multimodal task 'nope'") as err:
        load_mm_task("nope", train_size=1, eval_size=1, seed=0)
    assert all(form in str(err.value) for form in MM_TASK_FORMS)
    with pytest.raises(ValueError, match="distinct digit images"):
        load_mm_task("digits_mc", train_size=1800, eval_size=10, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        load_mm_task("colour", train_size=1, eval_size=1, seed=0, image_size=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mm_task(f"jsonl_mm:{tmp_path / 'none.jsonl'}", train_size=1, eval_size=1, seed=0)
