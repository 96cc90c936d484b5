"""Prompts as real models need them: the tokenizer's chat template (on by default when it has one), a system prompt,
and template variables, tested with a byte-level BPE tokenizer trained in-process that carries ChatML special tokens,
reasoning tags and a chat template, saved and loaded back like a hub tokenizer (``standins.bpe_chat_tokenizer``);
then a tiny MoE checkpoint with that vocabulary trained and evaluated through ``--model.path``."""

import json

import pytest
from standins import bpe_chat_tokenizer, gsm8k_rows, moe_checkpoint, write_dataset

from expertrl.cli import main
from expertrl.config import ConfigError, TaskConfig
from expertrl.prompts import render_items, render_prompt, use_chat_template
from expertrl.runtime import task_from_config


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    return bpe_chat_tokenizer(tmp_path_factory.mktemp("tok"))


def test_the_tokenizer_loads_like_a_hub_tokenizer(chat_tok):
    assert type(chat_tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert chat_tok.chat_template and chat_tok.eos_token == "<|im_end|>" and chat_tok.pad_token == "<|endoftext|>"
    ids = chat_tok("<|im_start|>user\n<think>", add_special_tokens=False)["input_ids"]
    assert chat_tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"] and ids[-1] == chat_tok.convert_tokens_to_ids(
        "<think>"
    )  # special tokens and reasoning tags are single tokens
    text = "<think>3 * 1200</think><answer>3600</answer>"
    assert chat_tok.decode(chat_tok(text + "<|im_end|>")["input_ids"], skip_special_tokens=True) == text


def test_render_with_the_chat_template(chat_tok):
    text = render_prompt(chat_tok, "2+2?", chat_template=True, system_prompt="Answer in <answer></answer>.")
    assert text == (
        "<|im_start|>system\nAnswer in <answer></answer>.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_think = render_prompt(chat_tok, "2+2?", chat_template=True, template_kwargs={"enable_thinking": False})
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(chat_tok, "2+2?", chat_template=False, system_prompt="Be brief.") == "Be brief.\n2+2?"


def test_on_by_default_only_when_the_tokenizer_has_a_template(chat_tok, tokenizer):
    assert use_chat_template(chat_tok, None) and not use_chat_template(tokenizer, None)  # tokenizer: the char one
    assert not use_chat_template(chat_tok, False)
    items = [{"prompt": "12+7=", "answer": "19", "id": "a"}]
    assert render_items(items, tokenizer) is items  # the character tokenizer: plain prompts, as before
    assert render_items(items, tokenizer, system_prompt="Add.")[0]["prompt"] == "Add.\n12+7="
    rendered = render_items(items, chat_tok)
    assert rendered[0]["prompt"].startswith("<|im_start|>user\n12+7=") and rendered[0]["question"] == "12+7="
    assert items[0]["prompt"] == "12+7="  # the input items are not modified
    with pytest.raises(ValueError, match="task.chat_template: the tokenizer has no chat template"):
        use_chat_template(tokenizer, True)


def test_task_from_config_renders_every_split_and_keeps_the_question(chat_tok, tokenizer):
    cfg = TaskConfig(name="addition", train_size=5, eval_size=3, system_prompt="Add the numbers.")
    task = task_from_config(cfg, chat_tok)
    for item in task.train + task.eval:
        assert item["prompt"].startswith("<|im_start|>system\nAdd the numbers.<|im_end|>")
        assert item["prompt"].endswith(f"user\n{item['question']}<|im_end|>\n<|im_start|>assistant\n")
        assert task.score(item["answer"], item) == 1.0  # the verifier reads the answer, not the prompt
    assert task_from_config(cfg, None).train[0]["prompt"] == task.train[0]["question"]
    with pytest.raises(ConfigError, match="task.chat_template"):
        task_from_config(TaskConfig(name="addition", train_size=5, eval_size=3, chat_template=True), tokenizer)


@pytest.mark.parametrize("family", ["olmoe"])
def test_train_and_eval_a_local_checkpoint_with_a_chat_tokenizer(tmp_path, chat_tok, family, capsys):
    ckpt = moe_checkpoint(tmp_path / "ckpt", chat_tok, family=family)
    data = write_dataset(gsm8k_rows(30), tmp_path / "gsm8k", "jsonl")
    task = [
        "--task.name",
        f"hf:{data}",
        "--task.prompt_field",
        "question",
        "--task.answer_extractor",
        "gsm8k",
        "--task.train_size",
        "20",
        "--task.eval_size",
        "4",
        "--task.system_prompt",
        "Answer in <answer></answer>.",
    ]
    args = ["train", "--model.path", str(ckpt), *task, "--reward_funcs", "[task, format, tag_count]",
            "--reward_weights", "[1.0, 0.5, 0.25]", "--reward_kwargs", "{format: {style: answer}}",
            "--sft.steps", "2", "--sft.batch_size", "4", "--steps", "2", "--rollout.prompts_per_step", "2",
            "--rollout.group_size", "2", "--rollout.max_new_tokens", "4", "--micro_batch_size", "4",
            "--eval_every", "0", "--progress", "false", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == 2
    for r in steps:  # the reward is the weighted sum of its logged (unweighted) parts
        total = r["reward/task"] + 0.5 * r["reward/format"] + 0.25 * r["reward/tag_count"]
        assert r["reward/mean"] == pytest.approx(total, abs=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["examples_end"][0][0].startswith("Tom has")  # examples show the question, not the template
    assert "held-out accuracy" in capsys.readouterr().out
    final = tmp_path / "run" / "final"
    assert (final / "chat_template.jinja").is_file() or "chat_template" in (final / "tokenizer_config.json").read_text()
    assert main(["eval", "--model.path", str(final), *task, "--max_new_tokens", "4", "--routing_stats", "false"]) == 0
    assert json.loads((final / "eval.json").read_text())["n"] == 4
