"""Routers of every supported family: discovery, bit-exact TopK, scoped patching, record/replay, sampling laws."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from expertrl.families import FAMILIES as ADAPTER_FAMILIES
from expertrl.families import TINY_MOE as FAMILIES
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial, Replay, TopK, replay_policy_for
from expertrl.moe.setprob import set_logprob
from expertrl.tokenizer import PAD_ID
from expertrl.types import UNROUTED, RoutingTrace, expert_id_dtype

IDS = torch.tensor([[PAD_ID, PAD_ID, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35]])  # (B=2, S=6), row 0 left-padded
MASK = (IDS != PAD_ID).long()
B, S = IDS.shape
SOFTMAX_FAMILIES = [f for f in FAMILIES if ADAPTER_FAMILIES[f].scoring == "softmax"]
NORM_FLAG_FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe")  # renormalise iff config.norm_topk_prob


def _forward(model, **kwargs):
    return model(IDS, attention_mask=MASK, **kwargs).logits


def _capture_router_inputs(sites):
    """Forward hooks storing each router's input (N, H); they keep firing on the patched instance forward."""
    captured = {}
    handles = [
        s.module.register_forward_hook(lambda mod, args, out, pos=pos: captured.__setitem__(pos, args[0]))
        for pos, s in enumerate(sites)
    ]
    return captured, handles


# --- discovery ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_find_routers_one_site_per_moe_layer(family):
    model = build_tiny_moe(family, "tiny", num_experts=6, top_k=3)
    sites = find_routers(model)
    assert [s.layer for s in sites] == [0, 1]
    assert [s.name for s in sites] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    for s in sites:
        assert (s.num_experts, s.top_k) == (6, 3)
        assert s.weight.shape == (6, 32) and s.weight is s.module.weight
        assert s.family is ADAPTER_FAMILIES[family]
        if family == "mixtral":
            assert s.renormalize is True
        else:
            assert s.renormalize is bool(model.config.norm_topk_prob)


ID_DTYPES = [(8, torch.int8), (128, torch.int8), (129, torch.int16), (256, torch.int16)]


@pytest.mark.parametrize("num_experts, dtype", ID_DTYPES)
def test_trace_ids_take_one_byte_up_to_128_experts_and_keep_unrouted(num_experts, dtype):
    ids = torch.tensor([[[[num_experts - 1, 0], [UNROUTED, UNROUTED]]]])  # (L=1, B=1, S=2, K=2) int64: the widest id
    trace = RoutingTrace(experts=ids, set_logp=torch.zeros(1, 1, 2), layers=(0,), num_experts=num_experts)
    assert trace.experts.dtype == dtype == expert_id_dtype(num_experts)
    assert torch.equal(trace.experts.long(), ids)  # ids and UNROUTED (-1) survive the narrowing
    assert trace.nbytes() == 4 * dtype.itemsize + 2 * 4  # L·S·K ids + L·S float32 set log-probs


def test_routed_trace_bytes_per_token_at_qwen3_30b_shape():
    """48 layers, K = 8 of E = 128: 8 one-byte ids + one float32 set log-prob per layer = 576 bytes per token."""
    model = build_tiny_moe("qwen3_moe", "tiny", num_experts=128, top_k=8)
    with torch.no_grad(), route(model, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
        _forward(model)
    trace = rec.trace(B)
    assert trace.experts.dtype == torch.int8 and trace.experts.long().max() < 128
    assert trace.nbytes() / (B * S) == 2 * (8 + 4)  # L = 2 here; 48 layers: 48 * 12 = 576 bytes per token


@pytest.mark.parametrize("family", NORM_FLAG_FAMILIES)
def test_renormalize_follows_norm_topk_prob(family):
    assert all(s.renormalize for s in find_routers(build_tiny_moe(family, "tiny", norm_topk_prob=True)))
    assert not any(s.renormalize for s in find_routers(build_tiny_moe(family, "tiny", norm_topk_prob=False)))


def test_layer_indices_are_absolute_when_some_layers_are_dense():
    qwen = build_tiny_moe("qwen3_moe", "tiny", num_hidden_layers=3, mlp_only_layers=[1])
    assert [s.layer for s in find_routers(qwen)] == [0, 2]
    dsv3 = build_tiny_moe("deepseek_v3", "tiny", num_hidden_layers=3, first_k_dense_replace=1)
    assert [s.layer for s in find_routers(dsv3)] == [1, 2]


def test_unknown_family_lists_supported_ones():
    dense = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=32)
    )  # fmt: skip
    with pytest.raises(ValueError, match="qwen3.*is a dense model.*lora_moe.*upcycle"):
        find_routers(dense)
    dense.config.model_type = "gpt2"  # a family expertrl does not know at all
    with pytest.raises(ValueError, match="'gpt2' is not a supported family") as err:
        find_routers(dense)
    for family in ADAPTER_FAMILIES:
        if ADAPTER_FAMILIES[family].kind == "moe":
            assert family in str(err.value)


def test_supported_family_without_routers_raises():
    dense = build_tiny_moe("qwen3_moe", "tiny", mlp_only_layers=[0, 1])
    with pytest.raises(ValueError, match="has no Qwen3MoeTopKRouter module.*no MoE layers"):
        find_routers(dense)


# --- TopK is the native router -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, norm", [(f, None) for f in FAMILIES] + [(f, False) for f in NORM_FLAG_FAMILIES], ids=str
)
def test_topk_route_reproduces_native_logits_bit_exactly(family, norm):
    overrides = {} if norm is None else {"norm_topk_prob": norm}
    model = build_tiny_moe(family, "tiny", **overrides).eval()
    with torch.no_grad():
        native = _forward(model)
        with route(model, TopK()) as rec:
            routed = _forward(model)
    assert torch.equal(routed, native)
    trace = rec.trace(B)
    assert trace.experts.shape == (2, B, S, 2) and trace.experts.dtype == torch.int8  # 1 byte per id (E <= 128)
    assert trace.layers == (0, 1) and trace.num_experts == 4
    assert ((trace.experts >= 0) & (trace.experts < 4)).all()
    assert (trace.experts[..., 0] != trace.experts[..., 1]).all()  # K distinct experts


# --- scoped patching ---------------------------------------------------------------------------------------------


def test_route_restores_router_forward_on_exit_and_on_error(tiny_moe):
    sites = find_routers(tiny_moe)
    with torch.no_grad():
        native = _forward(tiny_moe)
        with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0)):
            assert all("forward" in s.module.__dict__ for s in sites)
            sampled = _forward(tiny_moe)
        assert not torch.equal(sampled, native)  # the patch was live
        assert all("forward" not in s.module.__dict__ for s in sites)
        assert torch.equal(_forward(tiny_moe), native)

        with pytest.raises(RuntimeError, match="boom"):
            with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0)):
                _forward(tiny_moe)
                raise RuntimeError("boom")
        assert all("forward" not in s.module.__dict__ for s in sites)
        assert torch.equal(_forward(tiny_moe), native)


def test_nested_route_restores_the_outer_policy(tiny_moe):
    sites = find_routers(tiny_moe)
    with torch.no_grad():
        native = _forward(tiny_moe)
        with route(tiny_moe, TopK()) as outer:
            outer_forwards = [s.module.__dict__["forward"] for s in sites]
            with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0)) as inner:
                _forward(tiny_moe)
            assert all(s.module.__dict__["forward"] is f for s, f in zip(sites, outer_forwards, strict=True))
            after = _forward(tiny_moe)
        assert all("forward" not in s.module.__dict__ for s in sites)
    assert torch.equal(after, native)  # the outer TopK routed the second forward
    assert [len(c) for c in outer.experts] == [1, 1] and [len(c) for c in inner.experts] == [1, 1]


# --- record / replay ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_replay_reproduces_a_sampled_forward(family):
    model = build_tiny_moe(family, "tiny").eval()
    with torch.no_grad():
        native = _forward(model)
        with route(model, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
            sampled = _forward(model)
        trace = rec.trace(B)
        with route(model, replay_policy_for(trace)) as rec_replay:
            replayed = _forward(model)
    assert not torch.equal(sampled, native)  # sampling left top-K somewhere
    assert torch.equal(replayed, sampled)
    again = rec_replay.trace(B)
    assert torch.equal(again.experts, trace.experts)
    assert torch.equal(again.set_logp, trace.set_logp)  # the same set log-prob, recomputed from all E scores
    assert torch.equal(rec_replay.router_logp(B), rec.router_logp(B))


def test_replay_of_a_topk_trace_on_deepseek_v3_is_native():
    model = build_tiny_moe("deepseek_v3", "tiny").eval()
    with torch.no_grad():
        with route(model, TopK()) as rec:
            native = _forward(model)
        trace = rec.trace(B)
        with route(model, replay_policy_for(trace)) as rec_replay:
            replayed = _forward(model)
    assert torch.equal(replayed, native)
    assert torch.equal(rec_replay.trace(B).experts, trace.experts)
    torch.testing.assert_close(rec_replay.router_logp(B), rec.router_logp(B))
    assert (trace.set_logp == 0).all()  # a sigmoid router has no set probability


def test_unrouted_entries_fall_back_to_topk(tiny_moe):
    L, K = 2, 2
    with torch.no_grad():
        native = _forward(tiny_moe)
        with route(tiny_moe, TopK()) as rec_topk:
            _forward(tiny_moe)
        with route(tiny_moe, Replay(torch.full((L, B * S, K), UNROUTED, dtype=torch.int16))) as rec_all:
            all_unrouted = _forward(tiny_moe)
    assert torch.equal(all_unrouted, native)
    assert torch.equal(rec_all.trace(B).experts, rec_topk.trace(B).experts)

    # Only the last position unrouted: earlier positions replay the sample, the last one is top-K of its router.
    with torch.no_grad():
        with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(1)) as rec:
            sampled = _forward(tiny_moe)
        trace = rec.trace(B)
        trace.experts[:, :, -1] = UNROUTED
        with route(tiny_moe, replay_policy_for(trace), keep_probs=True) as rec_part:
            partial = _forward(tiny_moe)
    # causal: the last position changes nothing before it (up to round-off: an expert's matmul sees one token more
    # or less, and the kernel's blocking follows the token count)
    torch.testing.assert_close(partial[:, :-1], sampled[:, :-1], rtol=0, atol=1e-6)
    got = rec_part.trace(B).experts
    assert torch.equal(got[:, :, :-1], trace.experts[:, :, :-1])
    last_topk = rec_part.probs(B)[:, :, -1].topk(K, dim=-1).indices  # (L, B, K)
    assert torch.equal(got[:, :, -1].long(), last_topk)


# --- gate log-probs ----------------------------------------------------------------------------------------------


def test_set_logp_is_differentiable_and_matches_plackett_luce_of_the_router_softmax(tiny_moe):
    sites = find_routers(tiny_moe)
    captured, handles = _capture_router_inputs(sites)
    with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
        _forward(tiny_moe)
    for h in handles:
        h.remove()
    set_logp = rec.set_logp(B)  # (L, B, S)
    experts = rec.trace(B).experts.long()
    assert set_logp.requires_grad and set_logp.shape == experts.shape[:3]
    set_logp.sum().backward()
    assert all(s.weight.grad is not None and s.weight.grad.abs().sum() > 0 for s in sites)

    # Slow reference: router logits from the captured hidden states. The last router's weight influences nothing
    # upstream of it, so its gradient is exactly the reference's gradient with the hidden states held fixed.
    for pos, s in enumerate(sites):
        weight = s.weight.detach().clone().requires_grad_(True)
        hidden = captured[pos].detach().reshape(-1, weight.shape[1])  # (N, H)
        ref = set_logprob("plackett_luce", F.linear(hidden, weight).float(), experts[pos].reshape(-1, 2))  # (N,)
        torch.testing.assert_close(set_logp[pos].reshape(-1), ref)
        exact = set_logprob("plackett_luce", F.linear(hidden.double(), weight.double()), experts[pos].reshape(-1, 2))
        torch.testing.assert_close(set_logp[pos].reshape(-1).double(), exact, atol=1e-5, rtol=0)
        if pos == len(sites) - 1:
            ref.sum().backward()
            torch.testing.assert_close(s.weight.grad, weight.grad)


def test_multinomial_matches_plackett_luce_frequencies(tiny_moe):
    N, E = 20000, 4
    site = find_routers(tiny_moe)[0]
    h = torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    with torch.no_grad():
        spread = F.linear(h, site.weight)
        h = h * (3.0 / (spread.max() - spread.min()))  # a clearly non-uniform router distribution
        hidden = h.expand(N, 32).contiguous()  # (N, H): one token, N times
        with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0), sites=[site]) as rec:
            logits, weights, experts = site.module(hidden)
    p = torch.softmax(logits[0].double(), dim=-1)  # (E,)
    assert p.max() - p.min() > 0.2
    assert experts.shape == (N, 2) and (experts[:, 0] != experts[:, 1]).all()

    def within_4_sigma(empirical, prob):
        sigma = (prob * (1 - prob) / N).sqrt()
        assert ((empirical - prob).abs() <= 4 * sigma + 1e-12).all(), (empirical, prob)

    first = torch.bincount(experts[:, 0], minlength=E).double() / N
    within_4_sigma(first, p)  # the first draw is the router softmax
    included = torch.stack([(experts == e).any(-1).double().mean() for e in range(E)])
    inclusion = torch.stack([p[e] + sum(p[j] * p[e] / (1 - p[j]) for j in range(E) if j != e) for e in range(E)])
    torch.testing.assert_close(inclusion.sum(), torch.tensor(2.0, dtype=torch.float64))  # K experts per row
    within_4_sigma(included, inclusion)
    pairs = torch.bincount(experts[:, 0] * E + experts[:, 1], minlength=E * E).double().reshape(E, E) / N
    ordered = p[:, None] * p[None, :] / (1 - p[:, None])  # P(first a, then b) = p_a p_b / (1 - p_a)
    ordered.fill_diagonal_(0.0)
    within_4_sigma(pairs, ordered)

    router_logp = rec.router_logp(N).reshape(N, 2)  # one layer, N sequences of one position
    assert torch.equal(router_logp, torch.log_softmax(logits.float(), dim=-1).gather(1, experts))
    set_logp = rec.trace(N).set_logp.reshape(N)
    pl = ordered[experts[:, 0], experts[:, 1]].log()  # the float64 Plackett-Luce probability of each ordered draw
    torch.testing.assert_close(set_logp.double(), pl, atol=1e-6, rtol=0)
    ref_w = torch.softmax(logits.float(), dim=-1).gather(1, experts)
    torch.testing.assert_close(weights, ref_w / ref_w.sum(-1, keepdim=True))  # qwen3 tiny: norm_topk_prob=True


# --- masks and temperature ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [Multinomial(), TopK()], ids=lambda p: type(p).__name__)
def test_allowed_mask_forbids_experts_per_layer(policy):
    E = 6
    model = build_tiny_moe("qwen3_moe", "tiny", num_experts=E).eval()
    sites = find_routers(model)

    def allowed(layer_pos, n_tokens):
        if layer_pos != 0:
            return None  # every expert allowed
        mask = torch.ones(n_tokens, E, dtype=torch.bool)
        mask[:, :2] = False
        return mask

    captured, handles = _capture_router_inputs(sites)
    with torch.no_grad():
        with route(model, policy, allowed=allowed, generator=torch.Generator().manual_seed(0), keep_probs=True) as r:
            _forward(model)
    for h in handles:
        h.remove()
    trace = r.trace(B)
    assert not ((trace.experts[0] == 0) | (trace.experts[0] == 1)).any()
    probs = r.probs(B)  # (L, B, S, E) untempered masked softmax
    assert (probs[0, ..., :2] == 0).all()
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(B, S))
    assert (probs[1, ..., :2] > 0).all()  # layer 1 unmasked

    hidden = captured[0].reshape(-1, 32)  # (N, H)
    masked = F.linear(hidden, sites[0].weight).float()
    masked[:, :2] = float("-inf")
    ref = torch.log_softmax(masked, dim=-1)  # (N, E)
    torch.testing.assert_close(ref[:, 2:].exp().sum(-1), torch.ones(B * S))
    chosen = trace.experts[0].reshape(-1, 2).long()
    torch.testing.assert_close(r.router_logp(B)[0].reshape(-1, 2), ref.gather(1, chosen))  # masked, T = 1
    torch.testing.assert_close(trace.set_logp[0].reshape(-1), set_logprob("plackett_luce", masked, chosen))


def test_temperature_tempers_set_logp_but_not_weights_or_router_logp(tiny_moe):
    site = find_routers(tiny_moe)[0]
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))  # (N, H)
    with torch.no_grad():
        with route(tiny_moe, TopK(), sites=[site]) as r1:
            logits, w1, e1 = site.module(hidden)
        with route(tiny_moe, TopK(), temperature=2.0, sites=[site]) as r2:
            _, w2, e2 = site.module(hidden)
        gen = torch.Generator().manual_seed(0)
        with route(tiny_moe, Multinomial(), temperature=2.0, generator=gen, sites=[site]) as r3:
            _, w3, e3 = site.module(hidden)
        with route(tiny_moe, Replay(e3[None].to(torch.int16)), sites=[site]) as r4:  # T=1, the sample's experts
            _, w4, e4 = site.module(hidden)
    assert torch.equal(e2, e1) and torch.equal(w2, w1)  # top-K of logits/2 = top-K of logits; weights at T=1
    assert torch.equal(e4, e3) and torch.equal(w3, w4)
    scores = logits.float()
    pl = lambda s, e: set_logprob("plackett_luce", s, e)  # noqa: E731
    torch.testing.assert_close(r2.trace(64).set_logp.reshape(64), pl(scores / 2.0, e2))  # tempered
    torch.testing.assert_close(r3.trace(64).set_logp.reshape(64), pl(scores / 2.0, e3))
    torch.testing.assert_close(r1.trace(64).set_logp.reshape(64), pl(scores, e1))
    torch.testing.assert_close(r4.trace(64).set_logp.reshape(64), pl(scores, e3))
    assert not torch.allclose(pl(scores / 2.0, e1), pl(scores, e1))  # the temperature mattered
    plain = torch.log_softmax(scores, dim=-1)  # RSPO's router log-probs never use the routing temperature
    for r, e in ((r1, e1), (r2, e2), (r3, e3), (r4, e3)):
        torch.testing.assert_close(r.router_logp(64).reshape(64, 2), plain.gather(1, e))


def test_stochastic_routing_on_sigmoid_router_raises():
    model = build_tiny_moe("deepseek_v3", "tiny")
    sites = find_routers(model)
    for kwargs in (
        dict(policy=Multinomial()),
        dict(policy=TopK(), temperature=2.0),
        dict(policy=TopK(), allowed=lambda pos, n: None),
    ):
        with pytest.raises(ValueError, match="sigmoid"):
            with route(model, **kwargs):
                pass
    assert all("forward" not in s.module.__dict__ for s in sites)


# --- generate ----------------------------------------------------------------------------------------------------


def test_generate_under_route(tiny_moe):
    gen_kwargs = dict(attention_mask=MASK, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        plain = tiny_moe.generate(IDS, **gen_kwargs)
        with route(tiny_moe, TopK()):
            topk = tiny_moe.generate(IDS, **gen_kwargs)
        with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
            sampled = tiny_moe.generate(IDS, **gen_kwargs)
    assert plain.shape == (B, S + 5)
    assert torch.equal(topk, plain)
    assert sampled.shape == (B, S + 5)
    assert [len(c) for c in rec.experts] == [5, 5]  # one prefill chunk, then one chunk per fed-back token
    trace = rec.trace(B)
    assert trace.experts.shape == (2, B, sampled.shape[1] - 1, 2)
    assert trace.set_logp.shape == trace.experts.shape[:3] and (trace.set_logp <= 0).all()


def test_deepseek_unrouted_replay_falls_back_to_native_choice():
    """Unrouted positions of a sigmoid router take the native bias-corrected choice, not a plain top-K."""
    from expertrl.models import build_tiny_moe
    from expertrl.moe import Replay, TopK, find_routers, route

    model = build_tiny_moe("deepseek_v3", "tiny").eval()
    sites = find_routers(model)
    with torch.no_grad():
        for s in sites:
            s.module.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # biases the choice to 3
    ids = torch.randint(3, 100, (2, 3))
    with route(model, TopK()):
        native = model(ids).logits
    unrouted = Replay(torch.full((len(sites), 6, sites[0].top_k), -1, dtype=torch.int16))
    with route(model, unrouted):
        replayed = model(ids).logits
    torch.testing.assert_close(replayed, native)


def test_route_takes_over_checkpointing_in_training_and_eval_mode(tiny_moe, monkeypatch):
    """Inside the block every flagged decoder layer is checkpointed once, by expertrl (never nested in transformers'
    own checkpoint, whatever the mode); outside it transformers' flag is back. Gradients: test_checkpointing.py."""
    from expertrl.moe import recompute

    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiny_moe.gradient_checkpointing_enable()
    layers = recompute.checkpointing_layers(tiny_moe)
    assert len(layers) == 2  # the decoder layers, not the base model that carries the legacy flag too
    for training in (True, False):
        tiny_moe.train(training)
        calls.clear()
        with route(tiny_moe, TopK()):
            assert not any(layer.gradient_checkpointing for layer in layers)
            _forward(tiny_moe).sum().backward()
        assert len(calls) == 2 and all(layer.gradient_checkpointing for layer in layers)
        assert all("forward" not in layer.__dict__ for layer in layers)  # the class forward is back
    with torch.no_grad(), route(tiny_moe, TopK()):  # nothing to recompute without grad
        calls.clear()
        _forward(tiny_moe)
    assert not calls
