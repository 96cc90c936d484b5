"""Multimodal multiple-choice tasks with verifiable rewards, all offline and seeded.

An item is a dict with ``prompt`` (str, the question followed by its options ``(A) .. (B) ..``), either ``images``
(list of RGB ``PIL.Image``) or ``video`` (list of RGB ``PIL.Image`` frames), ``options`` (list of str), ``answer``
(the correct option letter, ``"A"``, ``"B"``, ...), ``category`` (str, for per-category accuracy) and ``id``.
``score_option(completion, item)`` is 1.0 iff the first option letter in the completion is the answer.

Task names (``load_mm_task``):
    ``digits_mc``       scikit-learn's bundled 8x8 handwritten digits, upscaled: "Which digit is shown?" with 4
                        options; category = the true digit. Train and eval use disjoint digit images.
    ``shapes_count``    1-4 coloured squares on black: "How many squares are there?"; category = the count.
    ``colour``          one square or disc in one of 4 colours: "What colour is the shape?"; category = the colour.
    ``motion_video``    a digit moving left or right over ``num_frames`` (default 4) frames: "Which direction does
                        the digit move?"; category = the direction. Train and eval use disjoint digit images.
    ``jsonl_mm:<path>`` user data, one JSON object per line (see ``jsonl_mm``).
Generated images are ``image_size`` x ``image_size`` RGB; eval items never repeat a train item.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from expertrl.io import read_jsonl

LETTERS = "ABCDEFGHIJ"
MM_TASK_FORMS = ("digits_mc", "shapes_count", "colour", "motion_video", "jsonl_mm:<path>")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
DIRECTIONS = ("left", "right")


@dataclass
class MMTask:
    name: str
    train: list[dict]
    eval: list[dict]
    score: Callable[[str, dict], float]
    """``score(completion, item)`` in [0, 1]."""


def format_options(question: str, options: list[str]) -> str:
    """``"Which digit is shown? (A) 3 (B) 7"``."""
    return question + "".join(f" ({LETTERS[i]}) {opt}" for i, opt in enumerate(options))


# A lone letter: no letter, digit or underscore on either side ("Because" and "B2" hold no option letter).
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z])(?![A-Za-z0-9_])")
_ANSWER_CUE = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[(\[]?$", re.IGNORECASE)


def chosen_option(completion: str, num_options: int) -> str | None:
    """The first option letter in ``completion`` (uppercase), or None.

    A candidate is a lone letter among the first ``num_options`` letters. Capitals always count ("B", "Answer: B",
    "B. 7", "<answer>B</answer>"). Lower case counts only when formatted as an option, so the article "a" in
    "a seven" is not option A: bracketed or followed by ``)``/``]``/``.``/``:`` ("(b)", "b)", "b."), after a cue
    ("answer: b", "option b"), or as the whole completion.
    """
    valid = LETTERS[:num_options]
    whole = completion.strip()
    for match in _LONE_LETTER.finditer(completion):
        letter = match.group(1)
        if letter.upper() not in valid:
            continue
        if letter.isupper():
            return letter
        before, after = completion[: match.start()], completion[match.end() :]
        formatted = before.endswith(("(", "[")) or after.startswith((")", "]", ".", ":"))
        if formatted or whole == letter or _ANSWER_CUE.search(before):
            return letter.upper()
    return None


def score_option(completion: str, item: dict) -> float:
    """1.0 iff the first option letter in ``completion`` is ``item["answer"]`` (see ``chosen_option``), else 0.0."""
    return float(chosen_option(completion, len(item["options"])) == item["answer"])


def load_mm_task(name: str, *, train_size: int, eval_size: int, seed: int, image_size: int = 32, **kwargs) -> MMTask:
    """Build the multimodal task ``name`` (one of ``MM_TASK_FORMS``) with deterministic, disjoint train/eval splits.

    Args:
        train_size, eval_size: numbers of items.
        seed: every image, option order and split is a function of the seed.
        image_size: side of generated images in pixels (jsonl: resize user images to it; 0 keeps their size).
        **kwargs: task options: ``motion_video`` takes ``num_frames`` (default 4).
    """
    assert train_size >= 0 and eval_size >= 0, (train_size, eval_size)
    if image_size != 0 and image_size < 8:
        raise ValueError(f"image_size={image_size} is too small; use at least 8 pixels (32 for the tiny VLM)")
    builders = {"digits_mc": _digits_mc, "shapes_count": _shapes_count, "colour": _colour, "motion_video": _motion}
    if name in builders:
        train, eval_ = builders[name](train_size, eval_size, seed, image_size, **kwargs)
    elif name.startswith("jsonl_mm:"):
        rows = jsonl_mm(name.removeprefix("jsonl_mm:"), image_size=image_size or None, **kwargs)
        if len(rows) < train_size + eval_size:
            raise ValueError(f"{name} has {len(rows)} rows; need train_size + eval_size = {train_size + eval_size}")
        train, eval_ = rows[:train_size], rows[len(rows) - eval_size :]
    else:
        raise ValueError(f"unknown multimodal task {name!r}; use one of {MM_TASK_FORMS}")
    return MMTask(name=name, train=train, eval=eval_, score=score_option)


# ----- scikit-learn digits -------------------------------------------------------------------------------------


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 grey levels 0-255 and (1797,) labels of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits  # imported here: importing scikit-learn takes ~2 s

    data = load_digits()
    return (data.images * (255.0 / 16.0)).round().astype(np.uint8), data.target.astype(np.int64)


def _digit_pools(seed: int, train_size: int, eval_size: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index pools of digit images: the first ``eval_size`` of a seeded permutation, then the rest."""
    images, _ = _digits()
    if eval_size + train_size > len(images):
        raise ValueError(
            f"task.train_size: mm:{task} has {len(images)} distinct digit images; train_size + eval_size = "
            f"{train_size + eval_size} would repeat held-out images in training; set --task.train_size "
            f"{len(images) - eval_size} or lower (or lower task.eval_size)"
        )
    order = np.random.default_rng([seed, 0]).permutation(len(images))
    return order[eval_size : eval_size + train_size], order[:eval_size]


def _digit_image(index: int, side: int) -> Image.Image:
    """A digit as a white-on-black RGB image, upscaled from 8x8 to ``side`` x ``side`` (bilinear)."""
    grey = Image.fromarray(_digits()[0][index], mode="L").resize((side, side), Image.BILINEAR)
    return grey.convert("RGB")


def _digits_mc(train_size: int, eval_size: int, seed: int, image_size: int) -> tuple[list[dict], list[dict]]:
    _, labels = _digits()
    train_pool, eval_pool = _digit_pools(seed, train_size, eval_size, "digits_mc")

    def items(pool: np.ndarray, split: str, stream: int) -> list[dict]:
        rng = np.random.default_rng([seed, stream])
        out = []
        for i, index in enumerate(pool):
            digit = int(labels[index])
            distractors = rng.choice([d for d in range(10) if d != digit], size=3, replace=False)
            slot = int(rng.integers(4))  # the answer's letter is uniform over A-D
            options = [str(d) for d in distractors]
            options.insert(slot, str(digit))
            out.append(
                dict(prompt=format_options("Which digit is shown?", options), images=[_digit_image(index, image_size)],
                     options=options, answer=LETTERS[slot], category=str(digit), id=f"digits_mc-{split}-{i}")
            )  # fmt: skip
        return out

    return items(train_pool, "train", 1), items(eval_pool, "eval", 2)


# ----- generated shapes ----------------------------------------------------------------------------------------


def _disjoint_draws(draw: Callable[[np.random.Generator], tuple], train_size: int, eval_size: int, seed: int,
                    task: str) -> tuple[list[tuple], list[tuple]]:  # fmt: skip
    """Eval scenes are distinct; train scenes are draws that are not eval scenes (rejection sampling)."""
    rng = np.random.default_rng([seed, 0])
    held: dict[tuple, None] = {}
    tries = 0
    while len(held) < eval_size:
        held[draw(rng)] = None
        tries += 1
        if tries > 100 * (eval_size + 10):
            raise ValueError(f"{task}: cannot draw {eval_size} distinct eval scenes; lower eval_size")
    train = []
    while len(train) < train_size:
        scene = draw(rng)
        if scene not in held:
            train.append(scene)
    return train, list(held)


def _canvas(side: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (side, side), (0, 0, 0))
    return img, ImageDraw.Draw(img)


def _shapes_count(train_size: int, eval_size: int, seed: int, image_size: int) -> tuple[list[dict], list[dict]]:
    """Squares in distinct cells of a 4x4 grid, each a random colour; counts uniform over 1-4."""
    cells, cell = 4, image_size // 4
    names = sorted(COLOURS)
    options = ["1", "2", "3", "4"]

    def draw(rng: np.random.Generator) -> tuple:
        count = int(rng.integers(1, 5))
        where = tuple(sorted(int(c) for c in rng.choice(cells * cells, size=count, replace=False)))
        return where, tuple(names[int(c)] for c in rng.integers(len(names), size=count))

    def item(scene: tuple, split: str, i: int) -> dict:
        where, colours = scene
        img, pen = _canvas(image_size)
        margin = max(1, cell // 6)
        for c, colour in zip(where, colours):
            x, y = (c % cells) * cell, (c // cells) * cell
            pen.rectangle([x + margin, y + margin, x + cell - 1 - margin, y + cell - 1 - margin], fill=COLOURS[colour])
        n = len(where)
        return dict(prompt=format_options("How many squares are there?", options), images=[img], options=options,
                    answer=LETTERS[n - 1], category=str(n), id=f"shapes_count-{split}-{i}")  # fmt: skip

    train, eval_ = _disjoint_draws(draw, train_size, eval_size, seed, "shapes_count")
    return [item(s, "train", i) for i, s in enumerate(train)], [item(s, "eval", i) for i, s in enumerate(eval_)]


def _colour(train_size: int, eval_size: int, seed: int, image_size: int) -> tuple[list[dict], list[dict]]:
    """One square or disc of a uniform colour, random size and position."""
    names = list(COLOURS)

    def draw(rng: np.random.Generator) -> tuple:
        size = int(rng.integers(image_size // 4, image_size // 2 + 1))
        x, y = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
        return names[int(rng.integers(len(names)))], ("square", "disc")[int(rng.integers(2))], x, y, size

    def item(scene: tuple, split: str, i: int) -> dict:
        colour, shape, x, y, size = scene
        img, pen = _canvas(image_size)
        box = [x, y, x + size - 1, y + size - 1]
        (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
        return dict(prompt=format_options("What colour is the shape?", names), images=[img], options=list(names),
                    answer=LETTERS[names.index(colour)], category=colour, id=f"colour-{split}-{i}")  # fmt: skip

    train, eval_ = _disjoint_draws(draw, train_size, eval_size, seed, "colour")
    return [item(s, "train", i) for i, s in enumerate(train)], [item(s, "eval", i) for i, s in enumerate(eval_)]


# ----- video ---------------------------------------------------------------------------------------------------


def _motion(train_size: int, eval_size: int, seed: int, image_size: int, *, num_frames: int = 4):
    """A digit (half the frame wide) sliding horizontally by a constant 2+ pixels per frame, left or right."""
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames}: motion needs at least 2 frames")
    side = image_size // 2
    travel = image_size - side  # pixels the digit can move
    if travel // (num_frames - 1) < 2:
        raise ValueError(f"image_size={image_size} leaves too little room for {num_frames} frames; enlarge it")
    train_pool, eval_pool = _digit_pools(seed, train_size, eval_size, "motion_video")
    options = list(DIRECTIONS)

    def items(pool: np.ndarray, split: str, stream: int) -> list[dict]:
        rng = np.random.default_rng([seed, stream])
        out = []
        for i, index in enumerate(pool):
            direction = DIRECTIONS[int(rng.integers(2))]
            step = int(rng.integers(2, travel // (num_frames - 1) + 1))
            start = int(rng.integers(0, travel - step * (num_frames - 1) + 1))
            xs = [start + step * t for t in range(num_frames)]
            xs = xs if direction == "right" else xs[::-1]
            y = int(rng.integers(0, image_size - side + 1))
            digit = _digit_image(index, side)
            frames = []
            for x in xs:
                frame = Image.new("RGB", (image_size, image_size), (0, 0, 0))
                frame.paste(digit, (x, y))
                frames.append(frame)
            out.append(
                dict(prompt=format_options("Which direction does the digit move?", options), video=frames,
                     options=options, answer=LETTERS[DIRECTIONS.index(direction)], category=direction,
                     id=f"motion_video-{split}-{i}")
            )  # fmt: skip
        return out

    return items(train_pool, "train", 1), items(eval_pool, "eval", 2)


# ----- user data -----------------------------------------------------------------------------------------------


def _load_image(path: Path, image_size: int | None, where: str) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{where}: image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except OSError as err:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({err})") from err
    return img.resize((image_size, image_size), Image.BILINEAR) if image_size else img


def jsonl_mm(path: str | Path, *, image_size: int | None = None) -> list[dict]:
    """Multiple-choice items from a JSONL file, in file order.

    Each line is an object with ``prompt`` (str), ``options`` (list of 2-10 str, appended to the prompt as
    ``(A) .. (B) ..``), ``answer`` (the correct letter), and either ``images`` (list of image paths) or ``video``
    (list of frame paths); optional ``category``, ``id`` and ``fps`` (video frames per second). Relative paths are
    relative to the JSONL file. A bad row raises ``ValueError`` naming ``file:line`` and the field.

    Args:
        image_size: resize every image/frame to a square of this side; None keeps the files' sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multimodal task file {str(path)!r} does not exist")
    return [
        _jsonl_row(row, where, f"{path.stem}-{where.rsplit(':', 1)[1]}", path.parent, image_size)
        for where, row in read_jsonl(path)
    ]


def _jsonl_row(row: dict, where: str, default_id: str, root: Path, image_size: int | None) -> dict:
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: field 'prompt' must be a string")
    options = row.get("options")
    if not (
        isinstance(options, list) and 2 <= len(options) <= len(LETTERS) and all(isinstance(o, str) for o in options)
    ):
        raise ValueError(f"{where}: field 'options' must be a list of 2 to {len(LETTERS)} strings")
    answer = row.get("answer")
    if not (isinstance(answer, str) and answer in LETTERS[: len(options)]):
        raise ValueError(f"{where}: field 'answer' must be one of {list(LETTERS[: len(options)])}, got {answer!r}")
    if ("images" in row) == ("video" in row):
        raise ValueError(f"{where}: give exactly one of the fields 'images' (list of paths) or 'video' (frame paths)")
    key = "images" if "images" in row else "video"
    paths = row[key]
    if not (isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths)):
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of file paths")
    pictures = [_load_image(root / p, image_size, f"{where}: field {key!r}[{j}]") for j, p in enumerate(paths)]
    item = dict(prompt=format_options(row["prompt"], options), options=options, answer=answer,
                category=str(row.get("category", "jsonl_mm")), id=str(row.get("id", default_id)))  # fmt: skip
    item[key] = pictures
    if "fps" in row:
        if not (isinstance(row["fps"], int | float) and row["fps"] > 0):
            raise ValueError(f"{where}: field 'fps' must be a positive number")
        item["fps"] = float(row["fps"])
    return item
