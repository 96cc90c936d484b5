"""Alternative training-time routers (MoE-GRPO Table 7 baselines): Expert Choice, Sinkhorn, and raw-logit recording."""

import math

import pytest
import torch
import torch.nn.functional as F

from expertrl.losses.routing import router_z_loss
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import RoutingRecorder, route
from expertrl.moe.policies import (
    POLICIES,
    ExpertChoice,
    Multinomial,
    NoisyTopK,
    Replay,
    Sinkhorn,
    TopK,
    make_policy,
    sinkhorn_balance,
)
from expertrl.tokenizer import PAD_ID
from expertrl.types import UNROUTED

IDS = torch.tensor([[PAD_ID, PAD_ID, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35]])  # (B=2, S=6), row 0 left-padded
MASK = (IDS != PAD_ID).long()
B, S = IDS.shape


def _skewed_logp(n: int, e: int, seed: int = 0) -> torch.Tensor:
    """(N, E) routing log-probs whose top-1 piles onto the last experts (a linear bias of 3 nats across E)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g) + 3.0 * torch.linspace(0, 1, e)
    return logits.log_softmax(-1)


def _load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) number of used slots per expert (UNROUTED slots ignored)."""
    used = experts[experts >= 0]
    return torch.bincount(used.flatten(), minlength=num_experts)


def _capture(sites):
    """Forward hooks on the (patched) routers storing each call's input (N, H) and output (logits, weights, ids)."""
    seen = {}
    handles = [
        s.module.register_forward_hook(lambda mod, args, out, pos=pos: seen.setdefault(pos, []).append((args[0], out)))
        for pos, s in enumerate(sites)
    ]
    return seen, handles


# --- Expert Choice: the policy ----------------------------------------------------------------------------------


def test_expert_choice_golden_4_tokens_2_experts():
    # c = 1.5, N = 4, E = 2 -> C = ceil(4 * 1.5 / 2) = 3 tokens per expert.
    # Expert 0 column p = [0.9, 0.6, 0.3, 0.2] -> takes tokens 0, 1, 2; expert 1 column [0.1, 0.4, 0.7, 0.8] ->
    # takes tokens 3, 2, 1. Token 0 gets {0}, token 1 {0 (0.6), 1 (0.4)}, token 2 {1 (0.7), 0 (0.3)}, token 3 {1}:
    # K' = 2, experts by decreasing probability, the unused slot UNROUTED.
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    policy = ExpertChoice(capacity_factor=1.5)
    assert policy.capacity(4, 2) == 3
    experts = policy.select(p.log(), k=1, generator=None)
    assert experts.dtype == torch.long
    assert experts.tolist() == [[0, UNROUTED], [0, 1], [1, 0], [1, UNROUTED]]


def test_expert_choice_token_may_get_no_expert():
    # N = 3, E = 3, c = 1 -> C = 1: every expert takes its single best token. Token 0 is the best for experts 0
    # and 1, token 2 for expert 2, so token 1 gets nothing and token 0 gets two experts (0.5 before 0.4).
    p = torch.tensor([[0.4, 0.5, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    experts = ExpertChoice(capacity_factor=1.0).select(p.log(), k=2, generator=None)
    assert experts.tolist() == [[1, 0], [UNROUTED, UNROUTED], [2, UNROUTED]]


@pytest.mark.parametrize("n, e, c", [(24, 4, 2.0), (16, 8, 1.0), (10, 3, 0.3), (12, 6, 3.0)])
def test_expert_choice_every_expert_takes_exactly_c_when_integral(n, e, c):
    assert (n * c / e) == pytest.approx(round(n * c / e))  # integral capacity (10 * 0.3 / 3 is 1 + 2e-16 in float)
    capacity = round(n * c / e)
    policy = ExpertChoice(capacity_factor=c)
    assert policy.capacity(n, e) == capacity
    experts = policy.select(_skewed_logp(n, e), k=2, generator=None)
    assert _load(experts, e).tolist() == [capacity] * e  # perfect balance despite the skew
    for row in experts.tolist():  # a token uses each expert at most once, used slots first
        used = [x for x in row if x != UNROUTED]
        assert len(set(used)) == len(used) and row[: len(used)] == used


@pytest.mark.parametrize("n, e, c", [(10, 4, 1.0), (7, 3, 2.0), (5, 4, 0.5), (6, 2, 5.0)])
def test_expert_choice_never_exceeds_capacity(n, e, c):
    capacity = min(n, math.ceil(n * c / e))  # ceil(2.5) = 3, ceil(4.67) = 5, ceil(0.625) = 1, min(6, 15) = 6
    assert ExpertChoice(capacity_factor=c).capacity(n, e) == capacity
    experts = ExpertChoice(capacity_factor=c).select(_skewed_logp(n, e, seed=1), k=2, generator=None)
    assert (_load(experts, e) <= capacity).all()
    assert _load(experts, e).sum() == capacity * e  # no mask: each expert fills its capacity


def test_expert_choice_picks_tokens_by_probability_matches_loop():
    logp = _skewed_logp(20, 5, seed=2)
    experts = ExpertChoice(capacity_factor=2.0).select(logp, k=2, generator=None)  # C = 8
    for e in range(5):  # slow reference: sort the column, take the first C tokens
        best = sorted(range(20), key=lambda t: -logp[t, e].item())[:8]
        assert sorted(t for t in range(20) if e in experts[t].tolist()) == sorted(best)


def test_expert_choice_respects_masked_experts():
    logp = _skewed_logp(8, 4, seed=3)
    logp[:, 3] = float("-inf")  # expert 3 allowed for no token
    logp[0, 2] = float("-inf")
    experts = ExpertChoice(capacity_factor=2.0).select(logp, k=2, generator=None)  # C = 4
    assert _load(experts, 4)[3] == 0
    assert 2 not in experts[0].tolist()


def test_expert_choice_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        ExpertChoice(capacity_factor=0.0)


# --- Sinkhorn: the policy ---------------------------------------------------------------------------------------


def test_sinkhorn_golden_2x2():
    # p = [[0.8, 0.2], [0.64, 0.36]]: a balanced 2x2 matrix with margins 1/2 is [[s, 1/2 - s], [1/2 - s, s]] and
    # keeps the cross ratio, s² / (1/2 - s)² = (0.8 * 0.36) / (0.2 * 0.64) = 2.25, so s = 1.5 / 5 = 0.3.
    # Top-1 sends both tokens to expert 0; the balanced matrix sends token 1 to expert 1.
    p = torch.tensor([[0.8, 0.2], [0.64, 0.36]])
    balanced = sinkhorn_balance(p.log(), tol=1e-7, max_iters=1000)
    torch.testing.assert_close(balanced, torch.tensor([[0.3, 0.2], [0.2, 0.3]]), atol=1e-5, rtol=0)
    assert TopK().select(p.log(), 1, None).flatten().tolist() == [0, 0]
    assert Sinkhorn(tol=1e-7).select(p.log(), 1, None).flatten().tolist() == [0, 1]


@pytest.mark.parametrize("n, e", [(64, 8), (256, 16)])
def test_sinkhorn_balanced_matrix_has_uniform_margins(n, e):
    balanced = sinkhorn_balance(_skewed_logp(n, e), tol=1e-4)
    torch.testing.assert_close(balanced.sum(0) * e, torch.ones(e), atol=1e-3, rtol=0)  # columns 1/E
    torch.testing.assert_close(balanced.sum(1) * n, torch.ones(n), atol=1e-3, rtol=0)  # rows 1/N


def test_sinkhorn_iteration_cap_stops_early():
    logp = _skewed_logp(64, 8)
    one = sinkhorn_balance(logp, max_iters=1)
    torch.testing.assert_close(one.sum(0) * 8, torch.ones(8), atol=1e-5, rtol=0)  # columns are set last
    assert (one.sum(1) * 64 - 1).abs().max() > 0.05  # rows not yet balanced after one sweep


@pytest.mark.parametrize("n, e, k, tolerance", [(256, 8, 2, 0.15), (1024, 16, 1, 0.25), (1024, 8, 2, 0.1)])
def test_sinkhorn_load_is_balanced_where_topk_is_not(n, e, k, tolerance):
    # Top-K of the balanced matrix is not exactly balanced (the matrix is, its per-row argmax is not); the
    # tolerance shrinks as N·K/E grows. Top-K of the raw router on the same logits is off by 1.6x to 3.8x.
    logp = _skewed_logp(n, e)
    sink = _load(Sinkhorn().select(logp, k, None), e).float()
    topk = _load(TopK().select(logp, k, None), e).float()
    imbalance = lambda load: (load.max() / load.mean() - 1).item()  # noqa: E731 (verl's max_vio)
    assert imbalance(topk) > 1.5  # the skew piles top-K onto the last experts
    assert imbalance(sink) < tolerance
    assert sink.sum() == n * k


def test_sinkhorn_never_picks_a_masked_expert():
    logp = _skewed_logp(32, 4)
    logp[:, 3] = float("-inf")  # infeasible balance: the cap stops it, masked expert still never chosen
    experts = Sinkhorn(max_iters=20).select(logp, 2, None)
    assert (experts != 3).all()


def test_sinkhorn_rejects_bad_options():
    with pytest.raises(ValueError, match="tol > 0"):
        Sinkhorn(tol=0.0)
    with pytest.raises(ValueError, match="max_iters >= 1"):
        Sinkhorn(max_iters=0)


# --- registry and flags -----------------------------------------------------------------------------------------


def test_make_policy_builds_alternative_routers_with_options():
    assert make_policy("expert_choice") == ExpertChoice(capacity_factor=2.0)
    assert make_policy("expert_choice", capacity_factor=1.25) == ExpertChoice(capacity_factor=1.25)
    assert make_policy("sinkhorn", tol=1e-3, max_iters=7) == Sinkhorn(tol=1e-3, max_iters=7)
    assert make_policy("sinkhorn", tol=None) == Sinkhorn()  # None = the policy's default
    # existing callers pass noise_std for every policy
    assert make_policy("topk", noise_std=None) == TopK()
    assert make_policy("noisy_topk", noise_std=0.3) == NoisyTopK(0.3)
    assert make_policy("expert_choice", noise_std=None, capacity_factor=None) == ExpertChoice()


def test_make_policy_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match=r"unknown routing policy 'expert'; choose from .*'expert_choice'"):
        make_policy("expert")
    with pytest.raises(ValueError, match=r"'sinkhorn' has no option 'capacity_factor'; its options are .*'tol'"):
        make_policy("sinkhorn", capacity_factor=2.0)
    with pytest.raises(ValueError, match=r"'expert_choice' has no option 'capcity'.*'capacity_factor'"):
        make_policy("expert_choice", capcity=2.0)
    with pytest.raises(ValueError, match=r"'topk' has no option 'noise_std'; its options are none"):
        make_policy("topk", noise_std=0.1)


def test_policy_flags():
    assert {"expert_choice", "sinkhorn"} <= set(POLICIES)
    assert [n for n, c in POLICIES.items() if c.has_set_probability] == ["multinomial"]  # Gate-GRPO only there
    assert [n for n, c in POLICIES.items() if not c.causal] == ["expert_choice", "sinkhorn"]
    assert [n for n, c in POLICIES.items() if not c.fixed_k] == ["expert_choice"]
    assert not ExpertChoice.stochastic and not Sinkhorn.stochastic
    assert Replay.causal and Multinomial.stochastic


# --- inside route(): tiny models --------------------------------------------------------------------------------


def _expert_reference(experts_module, h, idx, w):
    """Slow reference of a fused Qwen3/Mixtral experts module: Σ over slots of w · down(silu(gate) * up)."""
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j].item()
            gate, up = F.linear(h[t], experts_module.gate_up_proj[e]).chunk(2, dim=-1)
            out[t] += w[t, j] * F.linear(F.silu(gate) * up, experts_module.down_proj[e])
    return out


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_expert_choice_forward_matches_slow_reference(impl):
    model = build_tiny_moe("qwen3_moe", "tiny", experts_implementation=impl).eval()
    sites = find_routers(model)
    experts_module = model.model.layers[0].mlp.experts
    got = {}
    handle = experts_module.register_forward_hook(lambda mod, args, out: got.update(args=args, out=out))
    seen, handles = _capture(sites)
    with torch.no_grad(), route(model, ExpertChoice(capacity_factor=2.0)) as rec:
        model(IDS, attention_mask=MASK)
    for hd in [handle, *handles]:
        hd.remove()
    h, idx, w = got["args"]
    n = B * S
    assert idx.shape[0] == n and idx.shape[1] >= 1 and ((idx >= 0) & (idx < 4)).all()  # real ids only
    torch.testing.assert_close(got["out"], _expert_reference(experts_module, h, idx, w), atol=1e-5, rtol=1e-5)
    # weights: router softmax at the used experts, renormalised over them (norm_topk_prob=True), exactly 0 elsewhere
    hidden, (logits, weights, _) = seen[0][0]
    probs = F.linear(hidden, sites[0].weight).float().softmax(-1)  # (N, E)
    trace = rec.trace(B)
    recorded = trace.experts[0].reshape(n, -1).long()  # (N, K'), UNROUTED in unused slots
    used = recorded >= 0
    expected = probs.gather(1, recorded.clamp(min=0)) * used
    expected = expected / expected.sum(-1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(weights, expected)
    assert (~used).any() and (weights[~used] == 0).all()
    assert _load(recorded, 4).tolist() == [6] * 4  # N = 12, c = 2, E = 4 -> C = 6 tokens per expert
    assert (rec.router_logp(B)[0].reshape(n, -1)[~used] == 0).all()
    assert (trace.set_logp == 0).all()  # a variable-K choice has no set probability


def test_expert_choice_without_renormalisation_keeps_the_softmax():
    model = build_tiny_moe("qwen3_moe", "tiny", norm_topk_prob=False).eval()
    sites = find_routers(model)
    seen, handles = _capture(sites)
    with torch.no_grad(), route(model, ExpertChoice()) as rec:
        model(IDS, attention_mask=MASK)
    for hd in handles:
        hd.remove()
    hidden, (_, weights, _) = seen[1][0]
    probs = F.linear(hidden, sites[1].weight).float().softmax(-1)
    recorded = rec.trace(B).experts[1].reshape(B * S, -1).long()
    torch.testing.assert_close(weights, probs.gather(1, recorded.clamp(min=0)) * (recorded >= 0))  # S[τ, e]


@pytest.mark.parametrize("policy", [ExpertChoice(), Sinkhorn()], ids=["expert_choice", "sinkhorn"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_alternative_routers_train_inside_route(policy, family):
    model = build_tiny_moe(family, "tiny").eval()
    sites = find_routers(model)
    with route(model, policy, keep_probs=True) as rec:
        logits = model(IDS, attention_mask=MASK).logits
    assert torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    for s in sites:  # the router learns through the gathered softmax weights
        assert s.weight.grad is not None and s.weight.grad.abs().sum() > 0
    trace = rec.trace(B)
    assert trace.experts.shape[:3] == (2, B, S)
    if isinstance(policy, Sinkhorn):
        assert trace.experts.shape[3] == 2 and (trace.experts >= 0).all()
    with torch.no_grad(), route(model, TopK()):
        native = model(IDS, attention_mask=MASK).logits
    assert not torch.equal(native, logits.detach())  # the alternative routing was live


def test_expert_choice_trace_cannot_be_replayed(tiny_moe):
    with torch.no_grad(), route(tiny_moe, ExpertChoice(capacity_factor=2.0)) as rec:
        tiny_moe(IDS, attention_mask=MASK)
    experts = rec.trace(B).experts[:, :, :, :2].reshape(2, B * S, 2)  # cut to K = 2 columns: still partly used
    assert ((experts[..., :1] >= 0) & (experts[..., 1:] < 0)).any()
    with pytest.raises(ValueError, match="only fixed-K traces can be replayed"):
        with torch.no_grad(), route(tiny_moe, Replay(experts)):
            tiny_moe(IDS, attention_mask=MASK)


def test_route_refuses_alternative_routers_on_sigmoid_routers():
    model = build_tiny_moe("deepseek_v3", "tiny").eval()
    for policy in (ExpertChoice(), Sinkhorn()):
        with pytest.raises(ValueError, match="sigmoid"):
            with route(model, policy):
                pass
    assert "generate" not in model.__dict__


# --- generation falls back to top-K -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [ExpertChoice(), Sinkhorn()], ids=["expert_choice", "sinkhorn"])
def test_generate_inside_route_routes_topk(tiny_moe, policy):
    gen_kwargs = dict(attention_mask=MASK, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        with route(tiny_moe, TopK()) as topk_rec:
            topk = tiny_moe.generate(IDS, **gen_kwargs)
        with route(tiny_moe, policy) as rec:
            assert "generate" in tiny_moe.__dict__
            seq = tiny_moe.generate(IDS, **gen_kwargs)
            assert rec.generating == 0
            gen_chunks = [len(c) for c in rec.experts]
            tiny_moe(IDS, attention_mask=MASK)  # a plain forward in the same block routes with the policy
        assert "generate" not in tiny_moe.__dict__
    assert torch.equal(seq, topk)
    assert gen_chunks == [4, 4]  # prefill + 3 fed-back tokens, all top-K
    torch.testing.assert_close(rec.experts[0][:4], topk_rec.experts[0])
    with torch.no_grad(), route(tiny_moe, policy) as live:
        tiny_moe(IDS, attention_mask=MASK)
    assert torch.equal(rec.experts[0][4], live.experts[0][0])
    with torch.no_grad(), route(tiny_moe, TopK()) as plain:
        tiny_moe(IDS, attention_mask=MASK)
    assert not torch.equal(live.experts[0][0], plain.experts[0][0])  # not top-K outside generate


def test_generate_patch_is_restored_on_error(tiny_moe):
    with pytest.raises(RuntimeError, match="boom"):
        with route(tiny_moe, ExpertChoice()):
            raise RuntimeError("boom")
    assert "generate" not in tiny_moe.__dict__
    assert all("forward" not in s.module.__dict__ for s in find_routers(tiny_moe))


def test_causal_policies_leave_generate_alone(tiny_moe):
    with route(tiny_moe, Multinomial(), generator=torch.Generator().manual_seed(0)):
        assert "generate" not in tiny_moe.__dict__


# --- recorder: variable widths and raw logits -------------------------------------------------------------------


def test_trace_pads_chunks_of_different_widths():
    sites = find_routers(build_tiny_moe("qwen3_moe", "tiny"))
    rec = RoutingRecorder(sites=sites, num_experts=4)
    rec.experts[0] += [torch.tensor([[1, -1], [2, 0]], dtype=torch.int16), torch.tensor([[3], [1]], dtype=torch.int16)]
    rec.experts[1] += [torch.tensor([[0, 1, 2], [1, -1, -1]], dtype=torch.int16), torch.tensor([[2], [3]]).short()]
    rec.router_lp[0] += [torch.tensor([[-0.5, 0.0], [-1.0, -2.0]]), torch.tensor([[-0.1], [-0.2]])]
    rec.router_lp[1] += [torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]]), torch.tensor([[-0.3], [-0.4]])]
    for per_layer in rec.set_lp:
        per_layer += [torch.zeros(2, 1), torch.zeros(2, 1)]
    trace = rec.trace(batch_size=2)  # 2 sequences, 2 chunks of 1 position each -> (L=2, B=2, S=2, K'=3)
    assert trace.experts.shape == (2, 2, 2, 3)
    assert trace.experts[0, :, 1].tolist() == [[3, -1, -1], [1, -1, -1]]
    assert trace.experts[1, :, 0].tolist() == [[0, 1, 2], [1, -1, -1]]
    assert rec.router_logp(2)[0, :, 0].tolist() == [[-0.5, 0.0, 0.0], [-1.0, -2.0, 0.0]]


def test_keep_logits_records_raw_router_logits_for_the_z_loss(tiny_moe):
    sites = find_routers(tiny_moe)
    seen, handles = _capture(sites)
    with route(tiny_moe, TopK(), keep_logits=True) as rec:
        tiny_moe(IDS, attention_mask=MASK)
    for hd in handles:
        hd.remove()
    logits = rec.logits(B)  # (L, B, S, E)
    assert logits.shape == (2, B, S, 4)
    for pos, s in enumerate(sites):
        hidden = seen[pos][0][0]
        assert torch.equal(logits[pos].reshape(B * S, 4), F.linear(hidden, s.weight))
    z = router_z_loss(logits.reshape(2, B * S, 4), MASK.flatten().float())
    z.backward()
    assert all(s.weight.grad is not None and s.weight.grad.abs().sum() > 0 for s in sites)
    with pytest.raises(AssertionError, match="keep_logits=True"):
        with torch.no_grad(), route(tiny_moe, TopK()) as plain:
            tiny_moe(IDS, attention_mask=MASK)
        plain.logits(B)


def test_keep_logits_under_generate_and_expert_choice(tiny_moe):
    with torch.no_grad(), route(tiny_moe, ExpertChoice(), keep_logits=True) as rec:
        seq = tiny_moe.generate(IDS, attention_mask=MASK, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert rec.logits(B).shape == (2, B, seq.shape[1] - 1, 4)
    assert not rec.logits(B).requires_grad
