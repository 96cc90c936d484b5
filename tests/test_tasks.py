import json

import pytest
from transformers import AutoTokenizer

from expertrl.tasks import load_task
from expertrl.tokenizer import BOS_ID, CHAR_VOCAB_SIZE, EOS_ID, PAD_ID, build_char_tokenizer

TEXT = "  State the answer:\n\t12 + 7 = 19 .  <answer> 19 </answer>  "


def test_addition_is_deterministic_and_splits_are_disjoint():
    a = load_task("addition", train_size=200, eval_size=50, seed=1)
    b = load_task("addition", train_size=200, eval_size=50, seed=1)
    c = load_task("addition", train_size=200, eval_size=50, seed=2)
    assert a.train == b.train and a.eval == b.eval
    assert a.eval != c.eval
    eval_prompts = {item["prompt"] for item in a.eval}
    assert len(eval_prompts) == 50
    assert not eval_prompts & {item["prompt"] for item in a.train}
    assert len({item["id"] for item in a.train + a.eval}) == 250


def test_addition_items_and_scoring():
    task = load_task("addition", train_size=50, eval_size=10, seed=0, max_value=9, num_terms=3)
    for item in task.train + task.eval:
        terms = [int(t) for t in item["prompt"].removesuffix("=").split("+")]
        assert len(terms) == 3 and all(0 <= t <= 9 for t in terms)
        assert item["answer"] == str(sum(terms)) and item["category"] == str(len(item["answer"]))
    item = task.eval[0]
    assert task.score(item["answer"], item) == 1.0
    assert task.score(f" {item['answer']}\n", item) == 1.0
    assert task.score(f"<answer>{item['answer']}</answer>", item) == 1.0
    assert task.score(item["answer"] + "0", item) == 0.0


def test_addition_space_too_small_for_eval():
    load_task("addition", train_size=10, eval_size=120, seed=0, max_value=10)  # 121 prompts: 1 left for train
    with pytest.raises(ValueError, match="only 121 distinct prompts"):
        load_task("addition", train_size=10, eval_size=121, seed=0, max_value=10)
    with pytest.raises(ValueError, match="only 121 distinct prompts"):
        load_task("addition", train_size=0, eval_size=122, seed=0, max_value=10)


def test_reasoning_gym_chain_sum():
    task = load_task("rg:chain_sum", train_size=15, eval_size=5, seed=0)
    assert len(task.train) == 15 and len(task.eval) == 5
    item = task.eval[0]
    assert item["category"] == "chain_sum" and item["entry"]["answer"] == item["answer"]
    assert task.score(item["answer"], item) == 1.0
    assert task.score(f"Thinking... <answer>{item['answer']}</answer>", item) == 1.0
    assert task.score(str(int(item["answer"]) + 1), item) < 1.0
    again = load_task("rg:chain_sum", train_size=15, eval_size=5, seed=0)
    assert [i["prompt"] for i in again.train] == [i["prompt"] for i in task.train]


def test_verifier_choice():
    task = load_task("addition", train_size=1, eval_size=1, seed=0, verifier="math_verify")
    item = dict(task.eval[0], answer="0.5")
    assert task.score("<answer>1/2</answer>", item) == 1.0
    with pytest.raises(ValueError, match="exact_match"):
        load_task("addition", train_size=1, eval_size=1, seed=0, verifier="fuzzy")


def test_jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"q{i}", "answer": f"a{i}", "category": "easy" if i % 2 else "hard"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(f"jsonl:{path}", train_size=3, eval_size=2, seed=0)
    assert [i["prompt"] for i in task.train] == ["q0", "q1", "q2"]
    assert [i["prompt"] for i in task.eval] == ["q4", "q5"]
    assert task.eval[1]["category"] == "easy" and task.eval[1]["id"] == "qa-6"
    assert task.score(" a4 ", task.eval[0]) == 1.0 and task.score("a5", task.eval[0]) == 0.0
    with pytest.raises(ValueError, match="has 6 rows"):
        load_task(f"jsonl:{path}", train_size=5, eval_size=2, seed=0)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "answer": "a"}\n{"prompt": "q"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_task(f"jsonl:{path}", train_size=1, eval_size=0, seed=0)
    path.write_text('{"prompt": "q", "answer": "a"}\n{"prompt": "q", "answer": "a"}\n{"prompt": "q"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: missing field 'answer'"):
        load_task(f"jsonl:{path}", train_size=1, eval_size=0, seed=0)


def test_unknown_task_lists_the_forms():
    with pytest.raises(ValueError, match=r"rg:<dataset>.*jsonl:<path>"):
        load_task("gsm8k", train_size=1, eval_size=1, seed=0)


def test_char_tokenizer_round_trip_keeps_every_space():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok) == CHAR_VOCAB_SIZE and tok.padding_side == "left"
    ids = tok(TEXT)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character, no BOS/EOS added
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [EOS_ID, PAD_ID], skip_special_tokens=True) == TEXT
    assert tok.convert_ids_to_tokens(tok(" ")["input_ids"]) == [" "]


def test_char_tokenizer_pads_left_and_reloads_offline(tmp_path):
    tok = build_char_tokenizer()
    batch = tok(["1+2=", "10+2="], padding=True)
    assert batch["input_ids"][0][0] == PAD_ID and batch["attention_mask"][0] == [0, 1, 1, 1, 1]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert loaded.decode(loaded(TEXT)["input_ids"]) == TEXT
    assert loaded.padding_side == "left" and loaded.pad_token_id == PAD_ID and loaded.eos_token_id == EOS_ID


def _round_trips(tok, text: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < CHAR_VOCAB_SIZE for i in ids)


def test_char_tokenizer_encodes_any_text_through_byte_fallback():
    """Issue 13: `rg:gsm_symbolic` (€, £) and any JSONL with × crashed a tiny model's tokenizer. Every character
    outside printable ASCII now becomes its UTF-8 bytes, and decodes back exactly."""
    tok = build_char_tokenizer()
    for text in ["€5 × £3", "naïve café", "👽🤔", "∫ x dx → ∞", "日本語", "a\u200db", "tab\there"]:
        _round_trips(tok, text)
    ids = tok("€", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<0xE2>", "<0x82>", "<0xAC>"]  # the UTF-8 bytes of €
    assert tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"]) == ["a"]  # ASCII: one token
    assert tok.decode([tok.convert_tokens_to_ids("<0xE2>")]) == "\ufffd"  # a cut byte sequence a model wrote


def test_every_built_in_task_text_goes_through_the_char_tokenizer():
    """The full train/eval text of the addition task and of rg:gsm_symbolic at the default sizes, and items of every
    reasoning-gym dataset, round-trip through the character tokenizer."""
    pytest.importorskip("reasoning_gym")
    from reasoning_gym.factory import DATASETS

    from expertrl.config import TaskConfig

    tok = build_char_tokenizer()
    defaults = TaskConfig()
    for name, size in [("addition", defaults.train_size), ("rg:gsm_symbolic", defaults.train_size)]:
        task = load_task(name, train_size=size, eval_size=defaults.eval_size, seed=0)
        _round_trips(tok, "\n".join(it["prompt"] + it["answer"] for it in task.train + task.eval))
    for dataset in sorted(set(DATASETS) - {"composite"}):  # composite needs a list of datasets
        task = load_task(f"rg:{dataset}", train_size=3, eval_size=2, seed=0)
        _round_trips(tok, "\n".join(it["prompt"] + it["answer"] for it in task.train + task.eval))
