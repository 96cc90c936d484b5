"""Dense-to-MoE upcycling: function preservation, weight copies, config mapping, checkpoints and the CLI body."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertrl.cli import upcycle_main
from expertrl.models import build_tiny_dense, build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial
from expertrl.moe.upcycle import count_params, expert_weights, upcycle, upcycle_checkpoint

TARGETS = {"qwen3": "qwen3_moe", "qwen2": "qwen2_moe", "llama": "mixtral"}


def _batch(tokenizer):
    enc = tokenizer(["2+3=", "a long prompt:"], return_tensors="pt", padding=True)  # left-padded
    assert enc["attention_mask"][0, 0] == 0, "the first prompt must be left-padded"
    return enc["input_ids"], enc["attention_mask"]


def _greedy(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------------------------- expert_weights


def test_expert_weights_golden_layout_gate_rows_first():
    gate, up, down = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0], [6.0]])  # I=1, H=2
    gate_up, down_e = expert_weights(gate, up, down, num_experts=3)
    assert gate_up.shape == (3, 2, 2) and down_e.shape == (3, 2, 1)
    for e in range(3):
        torch.testing.assert_close(gate_up[e], torch.tensor([[1.0, 2.0], [3.0, 4.0]]), rtol=0, atol=0)
        torch.testing.assert_close(down_e[e], torch.tensor([[5.0], [6.0]]), rtol=0, atol=0)


def test_expert_weights_match_the_dense_ffn_in_a_real_experts_module():
    dense = build_tiny_dense("qwen3").eval()
    moe = build_tiny_moe("qwen3_moe", num_experts=4, top_k=2).eval()
    ffn, experts = dense.model.layers[0].mlp, moe.model.layers[0].mlp.experts
    gate_up, down = expert_weights(ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight, num_experts=4)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
        x = torch.randn(5, 32)  # (N, H)
        idx = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [0, 1]])  # (N, K) any experts
        w = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5], [0.0, 1.0], [0.9, 0.1]])  # (N, K) sums to 1
        torch.testing.assert_close(experts(x, idx, w), ffn(x), atol=1e-6, rtol=1e-5)


def test_expert_weights_noise_is_seeded_and_relative():
    w = torch.randn(64, 32) * 3.0
    a = expert_weights(w, w, w.T, num_experts=4, noise_std=0.1, generator=torch.Generator().manual_seed(1))
    b = expert_weights(w, w, w.T, num_experts=4, noise_std=0.1, generator=torch.Generator().manual_seed(1))
    c = expert_weights(w, w, w.T, num_experts=4, noise_std=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    rel = (a[1] - w.T) / w.std()  # (E, H, I) noise in units of std(W)
    assert abs(rel.std().item() - 0.1) < 0.01
    assert not torch.equal(a[1][0], a[1][1]), "experts must get different noise"


# --------------------------------------------------------------------------------------------- function preservation


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_noise_free_upcycle_computes_the_dense_function(family, tokenizer):
    dense = build_tiny_dense(family).eval()
    moe = upcycle(dense, num_experts=8, top_k=2)
    assert moe.config.model_type == TARGETS[family] and not moe.training
    ids, mask = _batch(tokenizer)
    ref = _logits(dense, ids, mask)
    torch.testing.assert_close(_logits(moe, ids, mask), ref, atol=1e-5, rtol=0)
    assert torch.equal(_greedy(moe, ids, mask), _greedy(dense, ids, mask))

    sites = find_routers(moe)
    assert [s.layer for s in sites] == list(range(dense.config.num_hidden_layers))  # every layer sparse
    assert all(s.num_experts == 8 and s.top_k == 2 and s.renormalize for s in sites)

    # Any expert set gives the dense function at noise 0: sampled routes change nothing.
    g = torch.Generator().manual_seed(0)
    with route(moe, Multinomial(), generator=g) as rec:
        sampled = _logits(moe, ids, mask)
    torch.testing.assert_close(sampled, ref, atol=1e-5, rtol=0)
    experts = rec.trace(batch_size=2).experts  # (L, B, S, K)
    assert len(experts.unique()) > 2, "multinomial routing should have used more than the top-2 experts"


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_non_ffn_weights_are_copied_exactly_and_input_untouched(family):
    dense = build_tiny_dense(family).eval()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rng = torch.get_rng_state()
    moe = upcycle(dense, num_experts=4, top_k=2, noise_std=0.1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng), "upcycle must not move the global RNG"
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    moe_sd = moe.state_dict()
    copied = [k for k in before if ".mlp." not in k]
    assert "lm_head.weight" in copied and "model.embed_tokens.weight" in copied
    assert all(torch.equal(moe_sd[k], before[k]) for k in copied)
    assert moe.generation_config.to_dict() == dense.generation_config.to_dict()
    assert (moe.config.pad_token_id, moe.config.bos_token_id, moe.config.eos_token_id) == (0, 1, 2)


def test_routers_are_seeded_normal():
    dense = build_tiny_dense("qwen3").eval()
    a, b = upcycle(dense, num_experts=8, seed=0), upcycle(dense, num_experts=8, seed=0)
    c = upcycle(dense, num_experts=8, seed=1, router_init_std=0.5)
    ra, rb, rc = (torch.stack([s.weight for s in find_routers(m)]) for m in (a, b, c))  # (L, E, H)
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    assert 0.015 < ra.std().item() < 0.025 and 0.4 < rc.std().item() < 0.6  # 2*8*32 = 512 draws each
    assert not torch.equal(ra[0], ra[1]), "each layer gets its own router"


def test_noise_makes_experts_differ_and_deviation_grows_with_noise(tokenizer):
    dense = build_tiny_dense("qwen3").eval()
    ids, mask = _batch(tokenizer)
    ref = _logits(dense, ids, mask)
    devs = []
    for noise in (0.0, 1e-3, 1e-2, 1e-1):
        moe = upcycle(dense, num_experts=4, top_k=2, noise_std=noise)
        gate_up = moe.model.layers[0].mlp.experts.gate_up_proj  # (E, 2I, H)
        assert torch.equal(gate_up[0], gate_up[1]) == (noise == 0)
        devs.append((_logits(moe, ids, mask) - ref).abs().max().item())
    assert devs[0] < 1e-5
    assert devs[0] < devs[1] < devs[2] < devs[3], devs
    assert devs[1] < 1e-2, devs  # small noise, small deviation (logits are O(1))


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_unnormalised_weights_scale_the_ffn_by_the_top_k_probability_mass(family, tokenizer):
    """MoE-GRPO Eq. 2: MLP(x) = sum_k p_k FFN(x) = (top-K probability mass) * dense FFN(x) at noise 0."""
    dense = build_tiny_dense(family).eval()
    moe = upcycle(dense, num_experts=4, top_k=2, norm_topk_prob=False, router_init_std=0.1)
    assert not any(s.renormalize for s in find_routers(moe))
    seen = {}
    moe.model.layers[1].mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    ids, mask = _batch(tokenizer)
    _logits(moe, ids, mask)
    x = seen["x"].reshape(-1, 32)  # (N, H)
    probs = torch.softmax(x @ moe.model.layers[1].mlp.gate.weight.T, dim=-1)  # (N, E)
    mass = probs.topk(2, dim=-1).values.sum(-1, keepdim=True)  # (N, 1)
    assert mass.min() >= 0.5 - 1e-6 and mass.max() <= 1  # E=4, K=2: between K/E (pads: zero hidden) and 1 ...
    assert mass.std() > 0.05  # ... and different per token, so the check below is not a constant rescaling
    with torch.no_grad():
        expected = mass * dense.model.layers[1].mlp(x)  # (N, H)
    torch.testing.assert_close(seen["y"].reshape(-1, 32), expected, atol=1e-6, rtol=1e-5)


def test_qwen2_shared_expert_is_inert_output_and_gradients_zero(tokenizer):
    moe = upcycle(build_tiny_dense("qwen2"), num_experts=4, top_k=2, noise_std=0.1)
    ids, mask = _batch(tokenizer)
    moe(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    for layer in moe.model.layers:
        block = layer.mlp
        assert block.shared_expert.down_proj.weight.shape == (32, 1)
        for p in (*block.shared_expert.parameters(), *block.shared_expert_gate.parameters()):
            assert not p.any() and p.grad is not None and not p.grad.any()
        assert block.gate.weight.grad.abs().sum() > 0, "routers must get gradient"


# --------------------------------------------------------------------------------------------- config mapping


def test_fields_carry_over_head_dim_rope_and_mistral():
    # head_dim != hidden/heads and a non-default rope theta must survive (both targets would otherwise default).
    qwen = build_tiny_dense("qwen3", head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    llama = build_tiny_dense(
        "llama", head_dim=16, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    mistral_cfg = AutoConfig.for_model(
        "mistral", vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=3, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mistral = AutoModelForCausalLM.from_config(mistral_cfg).eval()
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for dense in (qwen.eval(), llama.eval(), mistral):
        moe = upcycle(dense, num_experts=4, top_k=2)
        assert moe.model.layers[0].self_attn.head_dim == 16
        assert moe.config.rope_parameters == dense.config.rope_parameters
        assert moe.config.rms_norm_eps == dense.config.rms_norm_eps
        torch.testing.assert_close(_logits(moe, ids, mask), _logits(dense, ids, mask), atol=1e-5, rtol=0)
    assert upcycle(mistral).config.sliding_window == 3


def test_unmappable_config_fields_fail_loudly():
    with pytest.raises(ValueError, match="attention_bias=True; mixtral can only express False"):
        upcycle(build_tiny_dense("llama", attention_bias=True))
    with pytest.raises(ValueError, match="mlp_bias"):
        upcycle(build_tiny_dense("llama", mlp_bias=True))
    dense = build_tiny_dense("qwen3")
    dense.config.my_custom_field = 1
    with pytest.raises(ValueError, match=r"no field\(s\) \['my_custom_field'\]"):
        upcycle(dense)
    mixed = build_tiny_dense("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="mixes full and sliding-window"):
        upcycle(mixed)
    with pytest.raises(ValueError, match="norm_topk_prob=False is impossible for mixtral"):
        upcycle(build_tiny_dense("llama"), norm_topk_prob=False)


def test_bad_arguments_and_families_name_the_problem():
    dense = build_tiny_dense("qwen3")
    with pytest.raises(ValueError, match="top_k must be between 1 and num_experts=4, got top_k=5"):
        upcycle(dense, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="noise_std"):
        upcycle(dense, noise_std=-1.0)
    with pytest.raises(ValueError, match="router_init_std"):
        upcycle(dense, router_init_std=0.0)
    with pytest.raises(ValueError, match="already a Mixture-of-Experts.*'llama', 'mistral', 'qwen2', 'qwen3'"):
        upcycle(build_tiny_moe("qwen3_moe"))
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(ValueError, match=r"cannot upcycle model_type 'gpt2'; supported dense model_types: \['llama'"):
        upcycle(gpt2)


def test_count_params_active_counts_k_of_e_experts():
    dense = build_tiny_dense("qwen3")
    moe = upcycle(dense, num_experts=8, top_k=2)
    total, active = count_params(moe)
    ffn = 3 * 32 * 32  # gate, up, down of one dense FFN (H = I = 32)
    router = 8 * 32
    n_dense = sum(p.numel() for p in dense.parameters())
    assert count_params(dense) == (n_dense, n_dense)
    assert total == n_dense + 2 * (7 * ffn + router)  # L=2 layers: E-1 more FFN copies and a router each
    assert active == n_dense + 2 * (1 * ffn + router)  # K=2 experts active = one extra FFN per layer


# --------------------------------------------------------------------------------------------- checkpoints and CLI


def test_upcycle_checkpoint_round_trip(tmp_path, tokenizer):
    dense = build_tiny_dense("qwen3").eval()
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    kwargs = dict(num_experts=4, top_k=2, noise_std=0.05, seed=7)
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", **kwargs)
    assert out == tmp_path / "moe"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.model_type == "qwen3_moe"
    ids, mask = _batch(tokenizer)
    in_memory = upcycle(dense, **kwargs)
    assert torch.equal(_logits(loaded, ids, mask), _logits(in_memory, ids, mask))
    assert loaded.generation_config.pad_token_id == 0 and loaded.generation_config.eos_token_id == 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "dense" / name).read_bytes()
    record = json.loads((out / "upcycled_from.json").read_text())
    assert record["source"] == str((tmp_path / "dense").resolve())
    assert (record["source_model_type"], record["model_type"]) == ("qwen3", "qwen3_moe")
    assert (record["num_experts"], record["top_k"], record["noise_std"], record["seed"]) == (4, 2, 0.05, 7)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_upcycle_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upcycle_checkpoint(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        upcycle_checkpoint(tmp_path / "empty", tmp_path / "out")
    build_tiny_moe("qwen3_moe").save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="already a Mixture-of-Experts"):
        upcycle_checkpoint(tmp_path / "moe", tmp_path / "out")
    build_tiny_dense("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="top_k must be between"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="bad upcycle option.*num_expert"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_expert=2)
    with pytest.raises(ValueError, match="must differ from src_dir"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "dense")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_upcycle_main_runs_and_reports(tmp_path, capsys):
    dense = build_tiny_dense("qwen2")
    dense.save_pretrained(tmp_path / "dense")
    argv = [str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "1", "--seed", "3"]
    assert upcycle_main([*argv, "--no-norm-topk-prob"]) == 0
    printed = capsys.readouterr().out
    assert "qwen2_moe" in printed and "E=4, K=1" in printed and "norm_topk_prob=False" in printed
    assert f"{sum(p.numel() for p in dense.parameters()):,} params" in printed  # the dense model's count
    record = json.loads((tmp_path / "moe" / "upcycled_from.json").read_text())
    assert (record["num_experts"], record["top_k"], record["norm_topk_prob"], record["seed"]) == (4, 1, False, 3)
    with pytest.raises(SystemExit) as exit_info:
        upcycle_main(argv)  # DST exists now
    assert exit_info.value.code == 2
    assert "expertrl upcycle: error: dst_dir" in capsys.readouterr().err
    assert upcycle_main([*argv, "--overwrite"]) == 0
