import pytest
import torch

from expertrl.metrics import VOCABULARY, documented
from expertrl.rewards import REWARDS, combine, compute_rewards, get_reward, register_reward
from expertrl.rewards.answers import EXTRACTORS, get_extractor
from expertrl.rewards.format import STYLES, has_format
from expertrl.rewards.verifiers import exact_match, extract_answer, math_verify_match
from expertrl.tasks import load_task


@pytest.fixture(scope="module")
def task():
    return load_task("addition", train_size=4, eval_size=4, seed=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("19", "19"),
        ("  19 \n", "19"),
        ("think <answer> 19 </answer>", "19"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>a\nb</answer>", "a\nb"),
        ("<answer>unclosed", "<answer>unclosed"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [("19", "19", 1.0), (" 19\n", "19", 1.0), ("19", " 19 ", 1.0), ("190", "19", 0.0), ("1 9", "19", 0.0)],
)
def test_exact_match(completion, answer, expected):
    assert exact_match(completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [("0.5", "1/2", 1.0), ("1/2", "$\\frac{1}{2}$", 1.0), ("The answer is 19", "19", 1.0), ("18", "19", 0.0)],
)
def test_math_verify_match(completion, answer, expected):
    assert math_verify_match(completion, answer) == expected


def test_task_reward_and_weights(task):
    items = task.eval[:3]
    completions = [items[0]["answer"], "nope", f"<answer>{items[2]['answer']}</answer>"]
    total, parts = compute_rewards({"task": 2.0}, completions, items, task)
    torch.testing.assert_close(parts["task"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(total, torch.tensor([2.0, 0.0, 2.0]))


def test_combine_is_a_weighted_sum():
    parts = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.5, 2.0])}
    torch.testing.assert_close(combine(parts, {"a": 1.0, "b": -0.5}), torch.tensor([0.75, -1.0]))
    with pytest.raises(ValueError, match="different rewards"):
        combine(parts, {"a": 1.0})


def test_unknown_reward_lists_choices(task):
    with pytest.raises(ValueError, match="choose from"):
        compute_rewards({"nope": 1.0}, ["1"], task.eval[:1], task)


def test_raising_reward_names_the_reward_prompt_and_completion(task):
    @register_reward("_test_raises_on_boom")
    def raises(completions, items, task):
        return torch.tensor([1 / 0 if c == "BOOM" else 0.0 for c in completions])

    try:
        items = task.eval[:3]
        with pytest.raises(RuntimeError) as info:
            compute_rewards({"task": 1.0, "_test_raises_on_boom": 1.0}, ["1", "BOOM", "x" * 500], items, task)
        message = str(info.value)
        assert "_test_raises_on_boom" in message and "ZeroDivisionError" in message
        assert "'BOOM'" in message and repr(items[1]["prompt"]) in message
        assert isinstance(info.value.__cause__, ZeroDivisionError)
    finally:
        del REWARDS["_test_raises_on_boom"]


def test_wrong_reward_shape_fails(task):
    @register_reward("_test_scalar")
    def scalar(completions, items, task):
        return torch.tensor(1.0)

    try:
        with pytest.raises(ValueError, match="_test_scalar"):
            compute_rewards({"_test_scalar": 1.0}, ["1", "2"], task.eval[:2], task)
    finally:
        del REWARDS["_test_scalar"]


# --- answer extractors (rewards/answers.py) and format rewards (rewards/format.py) --------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("text", "  19 \n", "19"),
        ("answer_tag", "<think>so 18</think><answer> 19 </answer>", "19"),
        ("answer_tag", "19", None),
        ("boxed", "so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("boxed", "\\boxed{1} then \\boxed{2}", "2"),
        ("boxed", "\\boxed{1} then \\boxed{unclosed", "1"),  # the last *closed* one
        ("boxed", "\\fbox{7}", "7"),
        ("boxed", "no box", None),
        ("gsm8k", "He has 3 * 400 = <<3*400=1200>>1200 pens.\n#### 1,200", "1200"),
        ("gsm8k", "#### 42\nextra line", "42"),
        ("gsm8k", "####", None),
        ("gsm8k", "42", None),
        ("last_number", "3 apples and 1,234.5 pears.", "1234.5"),
        ("last_number", "it is -3/4", "-3/4"),
        ("last_number", "none", None),
        ("auto", "<answer>5</answer> \\boxed{6}", "5"),
        ("auto", "so \\boxed{6}\n#### 7", "6"),
        ("auto", "work\n#### 7", "7"),
        ("auto", " 19 ", "19"),
    ],
)
def test_answer_extractors(name, text, expected):
    assert EXTRACTORS[name](text) == expected


def test_unknown_extractor_lists_the_names():
    with pytest.raises(ValueError, match="gsm8k"):
        get_extractor("gsm8")


@pytest.mark.parametrize(
    ("text", "think_answer", "answer", "boxed", "think_boxed"),
    [
        ("<think>a</think><answer>4</answer>", True, True, False, False),
        ("<think>\na\n</think>\n<answer>\n4\n</answer>\n", True, True, False, False),
        ("<think>a</think> so <answer>4</answer>", False, True, False, False),  # text between the blocks
        ("<answer>4</answer>", False, True, False, False),
        ("<think>a</think><answer>4</answer> more", False, False, False, False),  # text after the answer
        ("<think>a</think><think>b</think><answer>4</answer>", False, True, False, False),
        ("<think>a<answer>4</answer>", False, True, False, False),  # unclosed think
        ("so \\boxed{4}", False, False, True, False),
        ("<think>a</think> so \\boxed{4}.", False, False, True, True),
        ("<think>\\boxed{4}</think> no", False, False, True, False),  # the box must follow the thinking
    ],
)
def test_format_styles(text, think_answer, answer, boxed, think_boxed):
    expected = dict(think_answer=think_answer, answer=answer, boxed=boxed, think_boxed=think_boxed)
    assert {style: has_format(text, style) for style in STYLES} == expected


def test_format_and_tag_count_rewards(task):
    completions = ["<think>a</think><answer>4</answer>", "<answer>4</answer>", "4", "<think><think></think>"]
    items = task.eval[:1] * 4
    total, parts = compute_rewards(
        {"task": 1.0, "format": 0.5, "tag_count": 0.25},
        completions,
        items,
        task,
        options={"format": {"style": "answer"}},
    )
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(parts["tag_count"], torch.tensor([1.0, 0.5, 0.0, 0.25]))
    torch.testing.assert_close(total, parts["task"] + 0.5 * parts["format"] + 0.25 * parts["tag_count"])
    _, parts = compute_rewards({"format": 1.0}, completions, items, task)  # default style: think_answer
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_reward_options_are_checked_when_bound():
    assert get_reward("format", style="boxed")(["\\boxed{1}"], [{}], None).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stile'\]; its options are \['style'\]"):
        get_reward("format", stile="boxed")
    with pytest.raises(ValueError, match="choose from"):
        get_reward("nope")


def test_every_registered_reward_has_a_documented_metric():
    for name in REWARDS:
        assert documented(f"reward/{name}") and f"reward/{name}" in VOCABULARY, name
