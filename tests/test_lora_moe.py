"""LoRA-MoE on dense bases: identity start, fast path vs loop, routing contract, files, counts, PEFT baseline."""

import json
import math

import pytest
import torch
from torch import nn

from expertrl.families import LORA_MOE
from expertrl.families import TINY_DENSE as DENSE_FAMILIES
from expertrl.losses.aggregate import aggregate
from expertrl.losses.gate import gate_grpo
from expertrl.models import build_tiny_dense, build_tiny_moe
from expertrl.moe.adapters import find_routers, site_labels
from expertrl.moe.hooks import route
from expertrl.moe.lora import attach_lora
from expertrl.moe.lora_moe import (
    LoraMoeLinear,
    adapter_settings,
    attach_lora_moe,
    count_parameters,
    describe_trainable,
    load_adapter,
    lora_moe_count,
    matched_lora_rank,
    save_adapter,
)
from expertrl.moe.policies import Multinomial, TopK, replay_policy_for
from expertrl.policy import policy_forward
from expertrl.rollout import generate_rollout
from expertrl.tokenizer import PAD_ID

IDS = torch.tensor([[PAD_ID, PAD_ID, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35]])  # (B=2, S=6), row 0 left-padded
MASK = (IDS != PAD_ID).long()
B, S = IDS.shape


def _forward(model):
    return model(IDS, attention_mask=MASK).logits


def _adapted(family="qwen3", **kwargs):
    return attach_lora_moe(build_tiny_dense(family, "tiny").eval(), **kwargs)


def _randomise_lora_b(model, seed=1):
    """B = 0 makes every adapter a no-op; give the experts non-zero B so routing changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraMoeLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
                m.router.weight.mul_(50.0)  # sharper routing, so the choice of experts matters
    return model


def _slow_reference(module: LoraMoeLinear, x):
    """Token by token, expert by expert: y_n = W0 x_n + (α/r) Σ_k w_nk B_{e_nk} A_{e_nk} x_n."""
    h = x.reshape(-1, x.shape[-1])
    _, weights, experts = module.router(h)
    rows = []
    for n in range(h.shape[0]):
        y = module.base(h[n])
        for k in range(experts.shape[1]):
            e = int(experts[n, k])
            y = y + module.scaling * weights[n, k] * (module.lora_B[e] @ (module.lora_A[e] @ h[n]))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], -1)


# --- the layer ---------------------------------------------------------------------------------------------------


def test_golden_two_experts_rank_one():
    # W0 = I; router rows (0, 0), (ln 3, -ln 3); A_0 = (1, 2), A_1 = (3, 4); B_0 = (1, 0)ᵀ, B_1 = (0, 2)ᵀ; α/r = 2.
    # x = (1, 0): logits (0, ln 3), p = (1/4, 3/4); B_0A_0x = (1, 0), B_1A_1x = (0, 6)
    #   dense: x + 2 (1/4 (1, 0) + 3/4 (0, 6)) = (1.5, 9);  top-1: x + 2 · 3/4 (0, 6) = (1, 9);  renormalised: (1, 12)
    # x = (0, 1): logits (0, -ln 3), p = (3/4, 1/4); B_0A_0x = (2, 0), B_1A_1x = (0, 8)
    #   dense: x + 2 (3/4 (2, 0) + 1/4 (0, 8)) = (3, 5);  top-1: x + 2 · 3/4 (2, 0) = (3, 1);  renormalised: (4, 1)
    base = nn.Linear(2, 2, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = {
        (None, False): [[1.5, 9.0], [3.0, 5.0]],
        (1, False): [[1.0, 9.0], [3.0, 1.0]],
        (1, True): [[1.0, 12.0], [4.0, 1.0]],
    }
    for (top_k, norm), want in expected.items():
        layer = LoraMoeLinear(base, num_experts=2, rank=1, alpha=2.0, top_k=top_k, norm_topk_prob=norm)
        with torch.no_grad():
            layer.base.weight.copy_(torch.eye(2))
            layer.router.weight.copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]]))
            layer.lora_A.copy_(torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]))
            layer.lora_B.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]))
        torch.testing.assert_close(layer(x), torch.tensor(want), msg=f"top_k={top_k} norm={norm}")


@pytest.mark.parametrize("top_k, norm", [(None, False), (2, True), (2, False), (1, True)])
def test_fast_path_matches_slow_reference(top_k, norm):
    g = torch.Generator().manual_seed(0)
    layer = LoraMoeLinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6.0, top_k=top_k, norm_topk_prob=norm)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
    x = torch.randn(2, 5, 8, generator=g)  # (B, S, d_in)
    torch.testing.assert_close(layer(x), _slow_reference(layer, x))


def test_dense_router_weights_are_the_softmax_over_all_experts():
    layer = LoraMoeLinear(nn.Linear(8, 6), num_experts=4, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    h = torch.randn(7, 8)
    logits, weights, experts = layer.router(h)
    assert weights.shape == experts.shape == (7, 4)
    dense = torch.zeros(7, 4).scatter(1, experts, weights)  # back to expert order
    torch.testing.assert_close(dense, torch.softmax(h @ layer.router.weight.T, dim=-1))
    torch.testing.assert_close(logits, h @ layer.router.weight.T)


# --- attaching ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_adapters_start_as_the_identity_of_the_base(family):
    base = build_tiny_dense(family, "tiny").eval()
    with torch.no_grad():
        want = _forward(base)
        got = _forward(attach_lora_moe(base))
    assert torch.equal(got, want)
    assert type(base.model.layers[1].mlp.down_proj) is LoraMoeLinear
    assert "model.layers.0.mlp.gate_proj.base.weight" in base.state_dict()


def test_only_adapter_parameters_get_gradients():
    model = _randomise_lora_b(_adapted(top_k=2))
    _forward(model).sum().backward()
    for name, p in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B", "router.weight"))
        assert p.requires_grad is is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) if is_adapter else p.grad is None, name


def test_attach_refuses_bad_arguments():
    with pytest.raises(ValueError, match="native MoE routers"):
        attach_lora_moe(build_tiny_moe("qwen3_moe", "tiny"))
    with pytest.raises(ValueError, match=r"targets \['gate'\] match no .*\['down_proj', 'gate_proj', 'up_proj'\]"):
        attach_lora_moe(build_tiny_dense("qwen3", "tiny"), targets=("gate",))
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, num_experts=4\]"):
        attach_lora_moe(build_tiny_dense("qwen3", "tiny"), top_k=5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        attach_lora_moe(build_tiny_dense("qwen3", "tiny"), rank=0)
    with pytest.raises(ValueError, match="already has lora_moe adapters"):
        attach_lora_moe(_adapted())


def test_settings_and_trainable_count_by_hand():
    model = _adapted("llama", num_experts=3, rank=2, alpha=4.0, targets=("up_proj",))
    # 2 layers x up_proj (32 -> 32): A 3·2·32 + B 3·32·2 + router 3·32 = 480 per layer
    trainable, total = count_parameters(model)
    assert trainable == 2 * (3 * 2 * 32 + 3 * 32 * 2 + 3 * 32) == 960
    assert total == sum(p.numel() for p in build_tiny_dense("llama", "tiny").parameters()) + 960
    assert adapter_settings(model) == dict(
        kind="lora_moe", num_experts=3, rank=2, alpha=4.0, top_k=3, norm_topk_prob=False, targets=["up_proj"],
        router_init_std=0.02, seed=0,
    )  # fmt: skip
    assert adapter_settings(build_tiny_dense("llama", "tiny")) is None
    line = describe_trainable(model)
    assert line.startswith("trainable 960 / ") and line.endswith("LoRA-MoE E=3 r=2 dense on up_proj")
    assert lora_moe_count([(32, 32)] * 2, num_experts=3, rank=2) == 960


# --- the routing contract ----------------------------------------------------------------------------------------


def test_find_routers_gives_one_site_per_adapted_module():
    sites = find_routers(_adapted(num_experts=4, top_k=2))
    assert len(sites) == 3 * 2
    assert [s.layer for s in sites] == [0, 0, 0, 1, 1, 1]
    assert [s.name for s in sites][:3] == [
        f"model.layers.0.mlp.{t}.router" for t in ("gate_proj", "up_proj", "down_proj")
    ]
    assert all(s.family is LORA_MOE and (s.num_experts, s.top_k, s.renormalize) == (4, 2, True) for s in sites)
    assert site_labels(sites)[:3] == ["layer0.gate_proj", "layer0.up_proj", "layer0.down_proj"]
    assert site_labels(find_routers(build_tiny_moe("qwen3_moe", "tiny"))) == ["layer0", "layer1"]


def test_dense_model_without_adapters_points_to_lora_moe():
    with pytest.raises(ValueError, match="qwen3.*is a dense model.*model.adapter.kind=lora_moe"):
        find_routers(build_tiny_dense("qwen3", "tiny"))


@pytest.mark.parametrize("top_k", [None, 2])
def test_topk_route_reproduces_the_native_forward_bit_for_bit(top_k):
    model = _randomise_lora_b(_adapted(top_k=top_k))
    with torch.no_grad():
        native = _forward(model)
        with route(model, TopK()) as rec:
            routed = _forward(model)
    assert torch.equal(routed, native)
    K = 4 if top_k is None else 2
    assert rec.trace(B).experts.shape == (6, B, S, K)


@pytest.mark.parametrize("top_k", [None, 2])
def test_sampled_routes_replay_exactly(top_k):
    model = _randomise_lora_b(_adapted(top_k=top_k))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        with route(model, Multinomial(), generator=g) as rec:
            sampled = _forward(model)
        trace = rec.trace(B)
        with route(model, replay_policy_for(trace)):
            replayed = _forward(model)
    K = 4 if top_k is None else 2
    assert trace.experts.shape == (6, B, S, K) and trace.layers == (0, 0, 0, 1, 1, 1)
    assert torch.equal(replayed, sampled)
    if top_k == 2:  # sparse: the sampled choice differs from top-K somewhere, and so does the output
        assert not torch.equal(sampled, _forward(model).detach())


def test_gate_grpo_on_replayed_routes_reaches_every_router():
    model = _randomise_lora_b(_adapted(top_k=2))
    with torch.no_grad(), route(model, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
        _forward(model)
    trace = rec.trace(B)
    with route(model, replay_policy_for(trace)) as rec:
        _forward(model)
    set_logp = rec.set_logp(B)  # (L, B, S)
    mask = MASK.float()
    loss, _ = gate_grpo(set_logp, trace.set_logp, torch.tensor([1.0, -0.5]), mask)
    aggregate(loss, mask, "token_mean").backward()
    for s in find_routers(model):
        assert s.weight.grad is not None and s.weight.grad.abs().sum() > 0, s.name


def test_rollout_and_policy_forward_run_on_lora_moe(tokenizer):
    model = _randomise_lora_b(_adapted(top_k=2))
    items = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "30+4=", "answer": "34"}]
    rollout = generate_rollout(
        model, tokenizer, items, group_size=2, max_new_tokens=4, policy=Multinomial(),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    L, Bt, St, K = rollout.routing.experts.shape
    assert (L, Bt, St, K) == (6, 4, rollout.input_ids.shape[1], 2)
    out = policy_forward(model, rollout, rollout.routing)
    assert torch.equal(out.logp, rollout.old_logp)  # the first inner update has ratio exactly 1
    assert torch.equal(out.set_logp, rollout.old_set_logp)
    live = policy_forward(model, rollout, None, score=rollout.routing)  # RSPO: live top-K, old experts scored
    assert live.router_logp.shape == (6, 4, St, 2) and torch.isfinite(live.router_logp).all()


# --- adapter files -----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = _randomise_lora_b(_adapted("qwen2", top_k=2, rank=4))
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base"]["model_type"] == "qwen2" and config["kind"] == "lora_moe" and config["top_k"] == 2
    loaded = load_adapter(build_tiny_dense("qwen2", "tiny").eval(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(_forward(loaded), _forward(model))
    assert adapter_settings(loaded) == adapter_settings(model)


def test_load_onto_a_different_base_names_the_field(tmp_path):
    save_adapter(_adapted("qwen3"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"adapter_config.json: base.hidden_size is 32 .* config.hidden_size is 64"):
        load_adapter(build_tiny_dense("qwen3", "small"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"adapter_config.json: base.model_type is 'qwen3' .* 'llama'"):
        load_adapter(build_tiny_dense("llama", "tiny"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_adapter(build_tiny_dense("qwen3", "tiny"), tmp_path / "missing")


# --- single-LoRA baseline (PEFT) ---------------------------------------------------------------------------------


def test_peft_lora_baseline_trains_only_lora_and_runs_like_the_base(tokenizer):
    base = build_tiny_dense("qwen3", "tiny").eval()
    with torch.no_grad():
        want = _forward(base)
    model = attach_lora(base, rank=16, alpha=32.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert count_parameters(model)[0] == 16 * 6 * (32 + 32)  # r · Σ(d_in + d_out) over 2 layers x 3 linears
    assert describe_trainable(model).endswith("LoRA r=16 on gate_proj, up_proj, down_proj")
    with torch.no_grad():
        assert torch.equal(_forward(model), want)  # B = 0: starts at the base
        out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False)
    assert out.shape == (B, S + 3)


def test_matched_lora_rank_is_within_one_rank_step():
    model = _adapted(num_experts=4, rank=8)
    moe = count_parameters(model)[0]
    r = matched_lora_rank(model, num_experts=4, rank=8)
    step = 6 * (32 + 32)  # one rank of single LoRA on 2 layers x 3 linears
    assert r == 34 and abs(r * step - moe) <= step / 2
    assert matched_lora_rank(build_tiny_dense("qwen3", "tiny"), num_experts=4, rank=8) == r
    # RO-GRPO on Qwen2.5-7B (hidden 3584, FFN 18944), E = 2, r = 8: experts are exactly r = 16, the routers add
    # 2 · 26112 / 67584 = 0.77 of a rank, so the matched rank is 17 (the paper's baseline uses 16)
    qwen7b = [(3584, 18944), (3584, 18944), (18944, 3584)] * 28
    assert matched_lora_rank(qwen7b, num_experts=2, rank=8) == 17
