"""Local stand-ins for what users bring (no model hub here): an instruct tokenizer trained in-process (byte-level BPE
with ChatML special tokens, reasoning tags and a chat template, saved with ``save_pretrained`` and loaded back with
``AutoTokenizer.from_pretrained`` as a hub tokenizer is), a tiny MoE checkpoint with that vocabulary, and small
GSM8K- and MATH-style datasets written in every format ``hf:`` tasks read."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from expertrl.checkpoint import save_model
from expertrl.models import build_tiny_moe

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
"""ChatML, as Qwen's instruct tokenizers render it (with Qwen3's enable_thinking switch)"""


def gsm8k_rows(n: int) -> list[dict]:
    """GSM8K-style rows: ``question`` and a worked ``answer`` ending in ``#### <number>`` (with thousands separators
    where the number is large), and a ``level`` column."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 1200 + 7 * i
        rows.append(
            {
                "question": f"Tom has {a} boxes with {b} pens each. How many pens does he have?",
                "answer": f"He has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} pens.\n#### {a * b:,}",
                "level": "hard" if i % 3 == 0 else "easy",
            }
        )
    return rows


def math_rows(n: int) -> list[dict]:
    """MATH-style rows: ``problem`` and a ``solution`` whose answer is in ``\\boxed{...}`` (nested braces too)."""
    rows = []
    for i in range(n):
        problem = f"What is $\\frac{{{i + 1}}}{{2}}$ plus one half?"
        rows.append({"problem": problem, "solution": f"It is $\\boxed{{\\frac{{{i + 2}}}{{2}}}}$."})
    return rows


def write_dataset(rows: list[dict], path: Path, fmt: str) -> Path:
    """``rows`` written as ``fmt``: json, jsonl, parquet, csv (files at ``path`` + suffix) or disk (save_to_disk)."""
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        out = path.with_suffix(".json")
        out.write_text(json.dumps(rows))
        return out
    if fmt == "jsonl":
        out = path.with_suffix(".jsonl")
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        ds.to_parquet(str(path.with_suffix(".parquet")))
        return path.with_suffix(".parquet")
    if fmt == "csv":
        ds.to_csv(str(path.with_suffix(".csv")), index=False)
        return path.with_suffix(".csv")
    assert fmt == "disk", fmt
    ds.save_to_disk(str(path))
    return path


def bpe_chat_tokenizer(path: Path, *, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small corpus, give it ChatML special tokens, the reasoning tags (added, not special,
    so decoding keeps them, as in Qwen3) and a chat template, save it to ``path`` and load it back like a hub
    tokenizer. EOS is ``<|im_end|>`` and padding ``<|endoftext|>``, as in Qwen's instruct tokenizers."""
    corpus = [r["question"] + " " + r["answer"] for r in gsm8k_rows(60)] + [
        "Answer with <think> reasoning </think> then <answer> 42 </answer>. The answer is \\boxed{7}.",
        "You are a helpful assistant. 0 1 2 3 4 5 6 7 8 9 + - * / = ,",
    ] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def moe_checkpoint(path: Path, tokenizer, *, family: str = "qwen3_moe", seed: int = 0) -> Path:
    """A tiny ``family`` MoE model with the tokenizer's vocabulary and special ids, saved (with the tokenizer) as a
    local checkpoint directory for ``--model.path``."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = build_tiny_moe(family, "tiny", vocab_size=len(tokenizer), seed=seed, **ids)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return save_model(model, tokenizer, path)
