"""Evaluation: greedy accuracy scored by hand, pass@k (golden values, subset enumeration, sampled consistency), and
routing statistics of an evaluation pass checked against a direct top-K forward."""

import itertools
import json
import math

import pytest
import torch

from expertrl.checkpoint import save_model
from expertrl.config import EvalConfig, ModelConfig, TaskConfig
from expertrl.diagnostics import router_entropy, usage_distribution, usage_entropy
from expertrl.evaluate import evaluate, format_table, generate_greedy, pass_at_k, routing_statistics_pass, run_eval
from expertrl.moe.hooks import route
from expertrl.moe.policies import TopK
from expertrl.rollout import completion_mask

ITEMS = [
    {"prompt": "12+7=", "answer": "19", "id": "a", "category": "two"},
    {"prompt": "3+4=", "answer": "7", "id": "b", "category": "one"},
    {"prompt": "40+41=", "answer": "81", "id": "c", "category": "two"},
    {"prompt": "1+1=", "answer": "2", "id": "d", "category": "one"},
]


def test_pass_at_k_golden_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_equals_subset_enumeration():
    for n, c, k in [(5, 2, 2), (6, 1, 3), (6, 3, 1), (7, 4, 5)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_greedy_accuracy_is_what_its_completions_imply(tiny_moe, tokenizer):
    prompts = [it["prompt"] for it in ITEMS]
    completions = generate_greedy(tiny_moe, tokenizer, prompts, max_new_tokens=4)
    # items a, b, d are "right" iff the model reproduces its own greedy completion; c expects something else
    expected = {it["id"]: c for it, c in zip(ITEMS, completions)} | {"c": "never"}
    seen = []

    def score(completion, item):
        seen.append(completion)
        return float(completion == expected[item["id"]])

    result = evaluate(tiny_moe, tokenizer, ITEMS, score, max_new_tokens=4, batch_size=4)
    assert seen == completions
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["per_category"] == {"one": 1.0, "two": 0.5}
    assert result["n"] == 4 and result["examples"][0] == (ITEMS[0]["prompt"], completions[0])
    assert "pass_at_k" not in result  # greedy only by default (train.py's call)


def test_sampled_pass_at_k_is_consistent_with_the_scored_samples(tiny_moe, tokenizer):
    log = []

    def score(completion, item):  # a coin-like verifier on the sampled first character
        ok = float(bool(completion) and ord(completion[0]) % 2 == 0)
        log.append((item["id"], ok))
        return ok

    n = 6
    result = evaluate(
        tiny_moe, tokenizer, ITEMS, score, max_new_tokens=3, batch_size=12, num_samples=n, pass_k=[1, 2, 6], seed=0
    )
    samples = log[len(ITEMS) :]  # after the greedy pass: n contiguous samples per item
    assert len(samples) == n * len(ITEMS)
    correct = [int(sum(ok for _, ok in samples[i * n : (i + 1) * n])) for i in range(len(ITEMS))]
    assert [samples[i * n][0] for i in range(len(ITEMS))] == [it["id"] for it in ITEMS]
    assert 0 < sum(correct) < n * len(ITEMS), "the verifier should accept some samples and reject others"
    for k in (1, 2, 6):
        ref = sum(pass_at_k(n, c, k) for c in correct) / len(ITEMS)
        assert result["pass_at_k"][str(k)] == pytest.approx(ref)
    # pass@1 is the mean correctness of the samples, and pass@k grows with k
    assert result["pass_at_k"]["1"] == pytest.approx(result["sample_mean_score"])
    assert result["pass_at_k"]["1"] <= result["pass_at_k"]["2"] <= result["pass_at_k"]["6"]
    assert set(result["pass_at_k_per_category"]) == {"one", "two"}
    again = evaluate(
        tiny_moe, tokenizer, ITEMS, score, max_new_tokens=3, batch_size=12, num_samples=n, pass_k=[1, 2, 6], seed=0
    )
    assert again["pass_at_k"] == result["pass_at_k"]  # the seed fixes the sampled tokens
    with pytest.raises(ValueError, match="pass_k"):
        evaluate(tiny_moe, tokenizer, ITEMS, score, max_new_tokens=3, num_samples=2, pass_k=[4])


def _reference_stats(model, tokenizer, items, max_new_tokens):
    """Slow reference: the routes and probabilities recorded during greedy top-K generation itself (not a second
    forward), reduced per layer with the diagnostics functions directly."""
    enc = tokenizer([it["prompt"] for it in items], return_tensors="pt", padding=True, add_special_tokens=False)
    B, P = enc["input_ids"].shape
    with torch.no_grad(), route(model, TopK(), keep_probs=True) as rec:
        seqs = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.eos_token_id
        )  # (B, S)
    probs, experts = rec.probs(B), rec.trace(B).experts  # (L, B, S-1, E), (L, B, S-1, K): the last token is not fed
    attn = torch.cat([enc["attention_mask"], completion_mask(seqs[:, P:], tokenizer.eos_token_id).long()], 1)
    route_mask = (attn[:, :-1] * attn[:, 1:]).float()  # (B, S-1) positions that predict an attended token
    L, E = probs.shape[0], probs.shape[-1]
    usage = torch.stack([usage_distribution(experts[li], route_mask, E) for li in range(L)])
    h = torch.stack([router_entropy(probs[li], route_mask) for li in range(L)])
    return usage, h, int(route_mask.sum())


def test_routing_statistics_match_a_direct_top_k_forward(tiny_moe, tokenizer):
    items = [it for it in ITEMS if it["category"] == "one"]  # equal prompt widths: no padding question
    stats = routing_statistics_pass(tiny_moe, tokenizer, items, max_new_tokens=4, batch_size=8)
    usage, h, n_tokens = _reference_stats(tiny_moe, tokenizer, items, 4)
    group = stats["all"]
    assert group["n_tokens"] == n_tokens
    torch.testing.assert_close(torch.tensor(group["usage"]), usage, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(group["router_entropy"]), h, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(group["usage_entropy"]), usage_entropy(usage), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(group["router_entropy_norm"]), h / math.log(stats["num_experts"]), atol=1e-5, rtol=0
    )


def test_routing_statistics_per_category_are_distributions(tiny_moe, tokenizer):
    stats = routing_statistics_pass(tiny_moe, tokenizer, ITEMS, max_new_tokens=4, batch_size=3, max_positions=8)
    json.dumps(stats)  # JSON-serialisable as returned
    L, E, K = len(stats["layers"]), stats["num_experts"], stats["top_k"]
    assert (L, E, K) == (2, 4, 2)
    assert set(stats["categories"]) == {"one", "two"}
    for group in [*stats["categories"].values(), stats["all"]]:
        usage = torch.tensor(group["usage"])  # (L, E)
        assert usage.shape == (L, E)
        torch.testing.assert_close(usage.sum(-1), torch.ones(L), atol=1e-5, rtol=0)
        pos = torch.tensor(group["position_usage"])  # (L, P, E), P <= max_positions
        assert pos.shape[0] == L and pos.shape[1] <= 8 and pos.shape[2] == E
        torch.testing.assert_close(pos.sum(-1), torch.ones(L, pos.shape[1]), atol=1e-5, rtol=0)
        assert all(0 <= v <= math.log(E) + 1e-6 for v in group["router_entropy"] + group["usage_entropy"])
    assert stats["categories"]["one"]["n_items"] == 2 and stats["all"]["n_items"] == 4
    assert sum(g["n_tokens"] for g in stats["categories"].values()) == stats["all"]["n_tokens"]
    jsd = stats["jsd"]
    assert jsd["base"] == 2.0 and jsd["categories"] == ["one", "two"]
    m = torch.tensor(jsd["matrix"])  # (L, A, A)
    torch.testing.assert_close(m, m.transpose(1, 2))
    assert m[:, 0, 1].mean().item() == pytest.approx(jsd["mean"], abs=1e-5)
    ex = stats["example"]
    probs, experts = torch.tensor(ex["probs"]), torch.tensor(ex["experts"])  # (L, n, E), (L, n, K)
    assert probs.shape == (L, len(ex["tokens"]), E) and experts.shape == (L, len(ex["tokens"]), K)
    # the chosen experts are the top-K of the recorded probabilities, and the answer route sits after the prompt
    assert (probs.topk(K, -1).indices.sort(-1).values == experts.sort(-1).values).all()
    assert "".join(ex["tokens"][: ex["answer_index"] + 1]) == ITEMS[0]["prompt"]


def test_run_eval_writes_eval_json_with_pass_at_k_and_routing(tiny_moe, tokenizer, tmp_path, capsys):
    save_model(tiny_moe, tokenizer, tmp_path / "model")
    cfg = EvalConfig(
        model=ModelConfig(path=str(tmp_path / "model")),
        task=TaskConfig(train_size=4, eval_size=6),
        max_new_tokens=4,
        batch_size=8,
        seed=0,
        num_samples=3,
        temperature=1.0,
        pass_k=[1, 3],
    )
    result = run_eval(cfg)
    saved = json.loads((tmp_path / "model" / "eval.json").read_text())
    assert saved["task"] == "addition" and saved["accuracy"] == result["accuracy"]
    assert set(saved["pass_at_k"]) == {"1", "3"} and saved["num_samples"] == 3
    assert set(saved["routing"]["categories"]) == set(saved["per_category"])
    out = capsys.readouterr().out
    assert "pass@3" in out and "router H" in out and "usage H" in out and "log2" in out


def test_format_table_without_routing_or_sampling():
    text = format_table("t", {"accuracy": 0.5, "per_category": {"x": 0.5}, "n": 2})
    assert "accuracy" in text and "router H" not in text and "pass@" not in text


def test_run_eval_of_a_dense_model_skips_the_routing_pass(tmp_path):
    """A dense checkpoint (no router) evaluates; there are no routing statistics to collect."""
    from expertrl.models import build_tiny_dense
    from expertrl.tokenizer import build_char_tokenizer

    save_model(build_tiny_dense("qwen3", "tiny"), build_char_tokenizer(), tmp_path / "dense")
    cfg = EvalConfig(model=ModelConfig(path=str(tmp_path / "dense")), task=TaskConfig(train_size=4, eval_size=4))
    result = run_eval(cfg)
    assert "routing" not in result and result["n"] == 4


def test_a_second_eval_keeps_the_first_result(tiny_moe, tokenizer, tmp_path, capsys):
    """Re-evaluating a model (other settings) must not lose the earlier eval.json: it is kept as eval-1.json, then
    eval-2.json; an identical result is simply rewritten. No temporary file is left behind."""
    model = tmp_path / "model"
    save_model(tiny_moe, tokenizer, model)

    def run(**settings) -> str:
        cfg = EvalConfig(model=ModelConfig(path=str(model)), task=TaskConfig(train_size=4, eval_size=4),
                         max_new_tokens=2, batch_size=8, seed=0, **settings)  # fmt: skip
        run_eval(cfg)
        return capsys.readouterr().out

    run(num_samples=2, temperature=1.0, pass_k=[1, 2])
    first = (model / "eval.json").read_text()
    assert "kept as" not in run(num_samples=2, temperature=1.0, pass_k=[1, 2])  # the same result: nothing to keep
    out = run()  # no pass@k this time
    assert "the previous eval.json, another result, kept as eval-1.json" in out
    assert (model / "eval-1.json").read_text() == first and "pass_at_k" not in json.loads(
        (model / "eval.json").read_text()
    )
    run(num_samples=2, temperature=1.0, pass_k=[1])
    assert (model / "eval-2.json").is_file() and "pass_at_k" in json.loads((model / "eval.json").read_text())
    assert sorted(p.name for p in model.glob("*eval*")) == ["eval-1.json", "eval-2.json", "eval.json"]
