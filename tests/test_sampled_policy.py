"""The policy we score is the policy we sampled: end to end on tiny models at non-default settings.

Every log-prob that enters a ratio is re-derived here in float64 from the router's own inputs, independently of the
library: routing temperature 0.5 / 1 / 2, a guidance mask on and off, a deliberately peaked router (1 − p_top down
to ~1e-8 and below), K = 1 and K = E, and a real router shape (E = 64, K = 8); sampled tokens at T = 0.7; a
checkpoint whose generation_config would reshape the token distribution; Monte-Carlo frequencies of tempered draws;
Gate-GRPO's gradient at a near-deterministic router against float64 finite differences.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from expertrl.config import TrainConfig
from expertrl.losses.gate import gate_grpo
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.guidance import GuidanceState, expand_allowed
from expertrl.moe.guide import Guide
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial
from expertrl.objective import Denominators
from expertrl.policy import policy_forward
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for
from expertrl.tokenizer import build_char_tokenizer
from expertrl.types import Sampling

ITEMS = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7+70=", "answer": "77"}, {"prompt": "5=", "answer": "5"}]
G, MAX_NEW = 4, 5


def _peaked_model(E: int, K: int, *, scale: float, dtype=torch.float32):
    """A tiny Qwen3-MoE whose routers are scaled up until the top expert dominates."""
    impl = "grouped_mm" if dtype == torch.float32 else "eager"  # grouped_mm takes no float64
    model = build_tiny_moe("qwen3_moe", "tiny", num_experts=E, top_k=K, experts_implementation=impl).eval().to(dtype)
    with torch.no_grad():
        for site in find_routers(model):
            site.weight.mul_(scale)
    return model


@contextmanager
def _router_inputs(model):
    """Capture every router call's input (n, H), per router, in call order."""
    sites = find_routers(model)
    chunks: list[list[torch.Tensor]] = [[] for _ in sites]
    handles = [
        s.module.register_forward_pre_hook(lambda mod, args, pos=pos: chunks[pos].append(args[0].detach().clone()))
        for pos, s in enumerate(sites)
    ]
    try:
        yield sites, chunks
    finally:
        for h in handles:
            h.remove()


def _assemble(chunks: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Chunks of (n, H) router inputs (a prefill, then one per decode step) -> (B, S, H)."""
    return torch.cat([c.reshape(batch_size, -1, c.shape[-1]) for c in chunks], dim=1)


def _pl64(logits: torch.Tensor, allowed: torch.Tensor | None, temperature: float, experts: torch.Tensor):
    """float64 Plackett-Luce log-prob of ordered draws, naively from probabilities: the mass left before each draw
    is summed over the experts still in the urn (never 1 − Σ). logits (..., E), allowed (..., E), experts (..., K)."""
    scores = logits.double() / temperature
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (..., E)
    left = torch.ones_like(p, dtype=torch.bool)
    total = torch.zeros(p.shape[:-1], dtype=torch.float64)
    for k in range(experts.shape[-1]):
        e = experts[..., k : k + 1].long().clamp(min=0)  # unrouted positions (-1) are not compared
        total = total + p.gather(-1, e)[..., 0].log() - (p * left).sum(-1).log()
        left = left.scatter(-1, e, False)
    return total


def _guide(model, E: int, K: int, seed: int = 0) -> Guide:
    L = len(find_routers(model))
    counts = torch.randint(1, 50, (L, 2, E), generator=torch.Generator().manual_seed(seed))
    state = GuidanceState.from_counts(counts, percent=25.0, top_k=K, group_names=("prompt", "completion"),
                                      layers=tuple(range(L)))  # fmt: skip
    assert (~state.allowed).any()  # the mask really removes experts
    return Guide.for_groups(state, groups="prompt_completion")


CASES = [
    # (E, K, routing temperature, guidance mask)
    (8, 2, 0.5, False),
    (8, 2, 0.5, True),
    (8, 2, 1.0, False),
    (8, 2, 1.0, True),
    (8, 2, 2.0, False),
    (8, 2, 2.0, True),
    (8, 1, 0.5, True),  # K = 1
    (4, 4, 0.5, False),  # K = E: the whole order is the action
    (64, 8, 0.5, True),  # a real router shape (OLMoE, Qwen3-30B-A3B's K)
]


@pytest.mark.parametrize("E, K, T, masked", CASES, ids=[f"E{e}-K{k}-T{t}-{'mask' if m else 'nomask'}"
                                                        for e, k, t, m in CASES])  # fmt: skip
def test_every_set_logp_is_the_float64_plackett_luce_of_the_sampled_distribution(E, K, T, masked):
    model = _peaked_model(
        E, K, scale=(250.0 if E > 8 else 160.0) * T
    )  # the sampling distribution equally peaked at every T
    tok = build_char_tokenizer()
    guide = _guide(model, E, K) if masked else None
    sampling = Sampling(routing_temperature=T)
    with _router_inputs(model) as (sites, gen_inputs):
        gen = torch.Generator().manual_seed(0)
        rollout = generate_rollout(model, tok, ITEMS, group_size=G, max_new_tokens=MAX_NEW, policy=Multinomial(),
                                   sampling=sampling, generator=gen, guide=guide)  # fmt: skip
    B, S, P = rollout.batch_size, rollout.input_ids.shape[1], rollout.prompt_width
    assert rollout.sampling.routing_temperature == T and (rollout.expert_mask is not None) == masked
    L = len(sites)
    n_gen = 1 + (S - 1 - P)  # chunks of generate: one prefill, then one per fed-back token
    gen_h = [_assemble(c[:n_gen], B) for c in gen_inputs]  # (B, S-1, H) what the routers saw while sampling
    with torch.no_grad(), _router_inputs(model) as (_, old_inputs):
        old = policy_forward(model, rollout, rollout.routing)  # the old-log-prob forward, exactly as the rollout's
    assert torch.equal(old.set_logp, rollout.old_set_logp)
    old_h = [_assemble(c, B) for c in old_inputs]  # (B, S, H)

    experts = rollout.routing.experts.long()  # (L, B, S, K)
    routed = (experts[..., 0] >= 0) & rollout.attention_mask.bool()[None]  # (L, B, S) attended, recorded positions
    allowed = expand_allowed(rollout.expert_mask.allowed, rollout.expert_mask.groups) if masked else None
    peak = []
    for li, site in enumerate(sites):
        W = site.weight.detach().double()
        for where, h, recorded in (
            ("rollout", gen_h[li], rollout.routing.set_logp[li, :, : S - 1]),
            ("old forward", old_h[li], rollout.old_set_logp[li]),
        ):
            width = h.shape[1]
            logits = h.double() @ W.T  # (B, width, E) float64 logits from the router's own inputs
            mask_l = allowed[li][:, :width] if masked else None
            ref = _pl64(logits, mask_l, T, experts[li, :, :width])  # (B, width)
            sel = routed[li, :, :width]
            err = (recorded[sel].double() - ref[sel]).abs().max().item()
            assert err <= 1e-4, (where, li, err)
            peak.append((1 - torch.softmax(logits / T, -1).amax(-1))[sel].min().item())
    assert min(peak) < 1e-8, peak  # the router really was peaked where it was checked

    # The training forward scores the same distribution, so the first update's ratios are 1: exactly for the batch
    # the old forward saw, and to float round-off for a shuffled micro-batch (the grouped expert kernel's sums depend
    # slightly on which rows share a call).
    cfg = TrainConfig()
    full = dataclasses.replace(rollout, advantages=torch.linspace(-1.0, 1.0, B))
    objective = objective_for(cfg)
    loss, metrics, _ = objective(model, full, Denominators(B), first_update=False)
    assert metrics["loss/gate_ratio_mean"].item() == 1.0 and metrics["loss/gate_approx_kl"].item() == 0.0
    assert metrics["loss/ratio_mean"].item() == 1.0 and metrics["loss/approx_kl"].item() == 0.0
    micro = full.index_batch(torch.randperm(B, generator=torch.Generator().manual_seed(1))[:5])
    _, m2, _ = objective(model, micro, Denominators(micro.batch_size), first_update=False)
    assert abs(m2["loss/gate_ratio_mean"].item() - 1.0) < 1e-6 and abs(m2["loss/ratio_mean"].item() - 1.0) < 1e-6
    # What the trainer does: the first update's own forward is the old policy, so its ratios are exactly 1 for any
    # micro-batch, and the old log-probs it defines equal the separate old forward's to float round-off.
    _, m3, behaviour = objective(model, micro, Denominators(micro.batch_size), first_update=True)
    assert m3["loss/gate_ratio_mean"].item() == 1.0 and m3["loss/ratio_mean"].item() == 1.0
    assert m3["loss/gate_approx_kl"].item() == 0.0 and m3["loss/approx_kl"].item() == 0.0
    # float32 round-off of a sum of K = 8 draws' terms: 1.1e-5 on a log-prob of -2.5 (4.5e-6 relative) on an AVX2
    # EPYC, where MKL blocks the matmuls differently than on the Intel machine this was first measured on
    torch.testing.assert_close(behaviour.set_logp, micro.old_set_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(behaviour.logp, micro.old_logp, atol=1e-5, rtol=0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(s.weight.grad).all() and s.weight.grad.abs().sum() > 0 for s in sites)
    assert L == 2


def test_sampled_tokens_are_scored_under_the_sampling_temperature():
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    tok = build_char_tokenizer()
    sampling = Sampling(do_sample=True, token_temperature=0.7, routing_temperature=0.5)
    torch.manual_seed(0)
    r = generate_rollout(model, tok, ITEMS, group_size=G, max_new_tokens=MAX_NEW, policy=Multinomial(),
                         sampling=sampling, generator=torch.Generator().manual_seed(0))  # fmt: skip
    m = r.mask.bool()
    err = (r.sample_logp[m] - r.old_logp[m]).abs().max().item()
    assert err <= 1e-5, err
    # float64 re-derivation of the tempered token log-prob from the replayed forward's logits
    with torch.no_grad(), route(model, __import__("expertrl.moe.policies", fromlist=["Replay"]).replay_policy_for(
            r.routing), temperature=0.5):  # fmt: skip
        P = r.prompt_width
        logits = model(r.input_ids, attention_mask=r.attention_mask,
                       position_ids=(r.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1 : -1]  # fmt: skip
    ref = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, r.input_ids[:, P:, None])[..., 0]
    assert (r.old_logp.double() - ref)[m].abs().max().item() < 1e-5
    untempered = torch.log_softmax(logits.double(), -1).gather(-1, r.input_ids[:, P:, None])[..., 0]
    assert (untempered - ref)[m].abs().max().item() > 1e-2  # the temperature matters, so this test would see a miss
    cfg = TrainConfig()
    micro = dataclasses.replace(r, advantages=torch.linspace(-1.0, 1.0, r.batch_size))
    _, metrics, _ = objective_for(cfg)(model, micro, Denominators(r.batch_size), first_update=False)
    assert metrics["loss/ratio_mean"].item() == 1.0 and metrics["loss/gate_ratio_mean"].item() == 1.0


def test_a_checkpoint_generation_config_cannot_reshape_the_sampled_distribution():
    """Qwen checkpoints ship top_k, top_p, temperature (and some repetition_penalty) in generation_config.json; HF's
    generate would apply them, the trainer would not. The rollout pins them to neutral values."""
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    gc = model.generation_config
    gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.min_p = 3, 0.5, 0.3, 1.8, 0.2
    gc.no_repeat_ngram_size = 1
    tok = build_char_tokenizer()
    torch.manual_seed(1)
    r = generate_rollout(model, tok, ITEMS, group_size=G, max_new_tokens=MAX_NEW, policy=Multinomial(),
                         sampling=Sampling(do_sample=True, token_temperature=1.3),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    m = r.mask.bool()
    assert (r.sample_logp[m] - r.old_logp[m]).abs().max().item() <= 1e-5  # no penalty reshaped what was recorded
    # top_k=3 was not applied after the recorder: tokens outside the distribution's top 3 were drawn
    with torch.no_grad():
        fwd_logits = model(r.input_ids, attention_mask=r.attention_mask,
                           position_ids=(r.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits  # fmt: skip
    P = r.prompt_width
    scores = fwd_logits[:, P - 1 : -1]
    rank = (scores > scores.gather(-1, r.input_ids[:, P:, None])).sum(-1)  # (B, C) 0 = the argmax
    assert (rank[m] >= 3).any()


def test_tempered_multinomial_draws_match_the_recorded_set_probability(tiny_moe):
    """Monte-Carlo at T = 0.5: the frequency of each ordered draw is exp(the set log-prob the hook recorded)."""
    N, E, T = 40_000, 4, 0.5
    site = find_routers(tiny_moe)[0]
    h = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        spread = F.linear(h, site.weight)
        h = h * (3.0 / (spread.max() - spread.min()))
        hidden = h.expand(N, 32).contiguous()
        with route(tiny_moe, Multinomial(), temperature=T, generator=torch.Generator().manual_seed(0),
                   sites=[site]) as rec:  # fmt: skip
            logits, _, experts = site.module(hidden)
    set_logp = rec.trace(N).set_logp.reshape(N)  # (N,) one layer, one position per row
    recorded: dict[tuple[int, int], float] = {}
    for (a, b), lp in zip(experts.tolist(), set_logp.tolist()):
        recorded.setdefault((a, b), lp)
    p = torch.softmax(logits[0].double() / T, -1)
    for (a, b), lp in recorded.items():  # every draw of the same tuple recorded the same probability
        assert lp == pytest.approx(math.log(p[a] * p[b] / (1 - p[a])), abs=1e-5)
    counts = torch.bincount(experts[:, 0] * E + experts[:, 1], minlength=E * E).double() / N
    for a, b in itertools.permutations(range(E), 2):
        expected = math.exp(recorded[(a, b)]) if (a, b) in recorded else (p[a] * p[b] / (1 - p[a])).item()
        sigma = math.sqrt(expected * (1 - expected) / N)
        assert abs(counts[a * E + b].item() - expected) <= 4 * sigma + 1e-12, ((a, b), counts[a * E + b], expected)
    untempered = torch.softmax(logits[0].double(), -1)
    assert abs(untempered.max() - p.max()) > 0.05  # T = 0.5 really reshaped the distribution


def test_gate_grpo_gradient_at_a_near_deterministic_router_matches_float64_finite_differences():
    torch.manual_seed(0)
    model = _peaked_model(4, 2, scale=60.0, dtype=torch.float64)
    tok = build_char_tokenizer()
    gen, sampling = torch.Generator().manual_seed(1), Sampling(routing_temperature=0.5)
    r = generate_rollout(model, tok, ITEMS[:2], group_size=2, max_new_tokens=3, policy=Multinomial(),
                         sampling=sampling, generator=gen)  # fmt: skip
    P = r.prompt_width
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0], dtype=torch.float64)
    old = r.old_set_logp[:, :, P - 1 : -1] - 0.05  # ratios e^0.05, inside the clip: a smooth loss

    sites = find_routers(model)
    # The last router: its inputs do not depend on its weight, so the finite differences stay exact in float64
    # (HF's RMSNorm computes in float32 even in a float64 model, which blurs differences through earlier layers).
    weight = sites[-1].weight

    def loss_fn() -> torch.Tensor:
        fwd = policy_forward(model, r, r.routing)
        per_token, _ = gate_grpo(fwd.set_logp[:, :, P - 1 : -1], old, adv, r.mask.double())
        return (per_token * r.mask).sum()

    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grad = weight.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        probs = torch.softmax(F.linear(torch.randn(64, weight.shape[1], dtype=torch.float64), weight) / 0.5, -1)
    assert (1 - probs.amax(-1)).min() < 1e-6  # near-deterministic
    h = 1e-6
    for e, j in ((0, 0), (1, 5), (2, 17), (3, 31)):
        with torch.no_grad():
            weight[e, j] += h
            up = loss_fn()
            weight[e, j] -= 2 * h
            down = loss_fn()
            weight[e, j] += h
        numeric = ((up - down) / (2 * h)).item()
        assert grad[e, j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), (e, j)
