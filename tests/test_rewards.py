import pytest
import torch

from expertrl.rewards import REWARDS, combine, compute_rewards, register_reward
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
