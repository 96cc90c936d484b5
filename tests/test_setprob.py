"""Set log-probabilities of expert choices: golden values, Monte-Carlo agreement with torch.multinomial, and
precision on peaked routers (1 − p_top down to 1e-12) against a float64 re-derivation."""

import itertools
import math

import pytest
import torch

from expertrl.moe.setprob import (
    SET_LOGPROBS,
    independent_logp,
    logsumexp_or_neg_inf,
    plackett_luce_logp,
    set_logprob,
    set_statistics,
    unordered_set_logp,
)

P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _of(probs: torch.Tensor, chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rest) of the experts ``chosen`` under ``probs`` (log-probs as scores)."""
    return set_statistics(probs.log()[None], torch.tensor([chosen]))


def test_plackett_luce_golden():
    # ordered (0, 1): p0 · p1 / (1 − p0) = 0.5 · 0.3 / 0.5 = 0.3
    # ordered (1, 0): p1 · p0 / (1 − p1) = 0.3 · 0.5 / 0.7 = 0.2142857...
    # ordered (2, 0, 1): 0.2 · 0.5/0.8 · 0.3/0.3 = 0.125
    assert plackett_luce_logp(*_of(P, [0, 1])).exp().item() == pytest.approx(0.3)
    assert plackett_luce_logp(*_of(P, [1, 0])).exp().item() == pytest.approx(0.15 / 0.7)
    assert plackett_luce_logp(*_of(P, [2, 0, 1])).exp().item() == pytest.approx(0.125)


def test_unordered_golden():
    # {0, 1}: 0.5·0.3/0.5 + 0.3·0.5/0.7 = 0.3 + 0.2142857 = 0.5142857
    # {0, 2}: 0.5·0.2/0.5 + 0.2·0.5/0.8 = 0.2 + 0.125 = 0.325
    assert unordered_set_logp(*_of(P, [0, 1])).exp().item() == pytest.approx(0.3 + 0.15 / 0.7)
    assert unordered_set_logp(*_of(P, [1, 0])).exp().item() == pytest.approx(0.3 + 0.15 / 0.7)  # order-free
    assert unordered_set_logp(*_of(P, [2, 0])).exp().item() == pytest.approx(0.325)
    # the three 2-sets of 3 experts exhaust the outcomes
    total = sum(unordered_set_logp(*_of(P, list(s))).exp().item() for s in itertools.combinations(range(3), 2))
    assert total == pytest.approx(1.0)


def test_independent_golden():
    assert independent_logp(*_of(P, [0, 1])).exp().item() == pytest.approx(0.15)  # 0.5 · 0.3


def test_registry_names_and_unknown_name():
    assert set(SET_LOGPROBS) == {"plackett_luce", "unordered", "independent"}
    with pytest.raises(ValueError, match="plackett_luce"):
        set_logprob("ordered", torch.zeros(1, 3), torch.tensor([[0]]))


def test_scores_may_be_any_common_shift():
    logits = torch.randn(5, 8, dtype=torch.float64)
    experts = torch.stack([torch.randperm(8)[:3] for _ in range(5)])
    for name in SET_LOGPROBS:
        a = set_logprob(name, logits, experts)
        b = set_logprob(name, torch.log_softmax(logits, -1), experts)
        c = set_logprob(name, logits + 123.0, experts)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("name", sorted(SET_LOGPROBS))
def test_k1_is_log_p(name):
    logits = torch.randn(5, 7, dtype=torch.float64)
    experts = torch.randint(0, 7, (5, 1))
    torch.testing.assert_close(
        set_logprob(name, logits, experts), torch.log_softmax(logits, -1).gather(1, experts)[:, 0]
    )


@pytest.mark.parametrize("name", sorted(SET_LOGPROBS))
def test_batch_shape_and_finite_gradient(name):
    logits = torch.randn(6, 8, requires_grad=True)
    experts = torch.stack([torch.randperm(8)[:3] for _ in range(6)])  # distinct experts per token
    out = set_logprob(name, logits, experts)
    assert out.shape == (6,)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def _pl_reference(logits: torch.Tensor, experts: list[int]) -> float:
    """Plackett-Luce in float64 from probabilities, the mass left summed over the experts still in the urn (no
    subtraction from 1): the independent re-derivation the library's log-space form is checked against."""
    p = torch.softmax(logits.double(), -1)
    left = list(range(len(p)))
    total = 0.0
    for e in experts:
        total += math.log(p[e].item()) - math.log(sum(p[j].item() for j in left))
        left.remove(e)
    return total


def test_plackett_luce_matches_direct_formula_and_gradcheck():
    logits = torch.randn(4, 6, dtype=torch.float64)
    experts = torch.tensor([[3, 0, 5]] * 4)
    got = set_logprob("plackett_luce", logits, experts)
    for row in range(4):
        assert got[row].item() == pytest.approx(_pl_reference(logits[row], [3, 0, 5]), abs=1e-12)
    fn = lambda x: set_logprob("plackett_luce", x, experts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("gap", [6.0, 10.0, 14.0, 18.0, 21.0, 27.6])  # 1 − p_top from ~1.7e-2 down to ~1e-12
@pytest.mark.parametrize("name", sorted(SET_LOGPROBS))
def test_peaked_router_is_exact_in_float32(name, gap):
    """1 − p_top = E·e^{-gap}-ish: the float32 set log-prob stays within 1e-4 nats of float64, however peaked (the
    old per-expert form lost 0.18 nats at 1 − p_top = 7e-6 and several nats below 3e-7)."""
    gen = torch.Generator().manual_seed(0)
    E, K = 64, (4 if name == "unordered" else 8)  # unordered enumerates K! orders
    logits = torch.randn(32, E, generator=gen, dtype=torch.float64)
    logits[:, 0] += gap  # expert 0 dominates
    one_minus_ptop = 1 - torch.softmax(logits, -1)[:, 0]
    # draws: the top expert first (the likely draw), or later (a rare draw whose later terms need 1 − p_top)
    experts = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(E - 1, generator=gen)[: K - 1] + 1])
                           for _ in range(16)] + [torch.randperm(E, generator=gen)[:K] for _ in range(16)])  # fmt: skip
    reference = set_logprob(name, logits, experts)  # float64
    got = set_logprob(name, logits.float(), experts)  # float32
    err = (got.double() - reference).abs().max().item()
    assert err < 1e-4, (gap, one_minus_ptop.min().item(), err)
    for row in (0, 20):
        if name == "plackett_luce":
            assert reference[row].item() == pytest.approx(_pl_reference(logits[row], experts[row].tolist()), abs=1e-9)


def test_peaked_router_gradient_matches_float64_finite_differences():
    """Finite, correct gradients of a set log-prob at a near-deterministic router (1 − p_top ≈ 1e-9)."""
    logits = torch.tensor([[25.0, 3.0, 1.0, 0.5, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    assert 1 - torch.softmax(logits, -1)[0, 0].item() < 1e-8
    for experts in ([[0, 1]], [[1, 0]], [[2, 3]]):  # the likely draw, and draws that need 1 − p_top exactly
        idx = torch.tensor(experts)
        fn = lambda x, idx=idx: set_logprob("plackett_luce", x, idx)  # noqa: E731
        (grad,) = torch.autograd.grad(fn(logits).sum(), logits)
        assert torch.isfinite(grad).all()
        h = 1e-6
        numeric = torch.zeros_like(logits)
        for j in range(logits.shape[1]):
            up, down = logits.detach().clone(), logits.detach().clone()
            up[0, j] += h
            down[0, j] -= h
            numeric[0, j] = (fn(up) - fn(down)).sum() / (2 * h)
        torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=1e-5)


def test_masked_experts_and_k_equal_e():
    # masked experts (-inf) are outside the distribution; K = E leaves nothing in the rest (-inf), still finite
    logits = torch.tensor([[1.0, 2.0, float("-inf"), 0.5]], requires_grad=True)
    out = set_logprob("plackett_luce", logits, torch.tensor([[1, 0]]))
    p = torch.softmax(logits.detach().double(), -1)[0]
    expected = math.log(p[1] * p[0] / (1 - p[1]))
    assert out.item() == pytest.approx(expected, abs=1e-6)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0
    full = torch.randn(3, 5, requires_grad=True)
    experts = torch.stack([torch.randperm(5) for _ in range(3)])  # K = E: every expert drawn, order matters
    for name in ("plackett_luce", "independent"):
        lp = set_logprob(name, full, experts)
        assert torch.isfinite(lp).all()
        (g,) = torch.autograd.grad(lp.sum(), full)
        assert torch.isfinite(g).all()
    orders = torch.tensor(list(itertools.permutations(range(3))))  # all 3! orders of K = E = 3
    logits3 = torch.randn(1, 3, dtype=torch.float64).expand(6, 3)
    assert set_logprob("plackett_luce", logits3, orders).exp().sum().item() == pytest.approx(1.0)
    assert set_logprob("unordered", logits3[:1], orders[:1]).item() == pytest.approx(0.0, abs=1e-12)


def test_logsumexp_or_neg_inf_has_a_finite_gradient():
    x = torch.tensor([[float("-inf")] * 3, [0.0, 1.0, float("-inf")]], requires_grad=True)
    out = logsumexp_or_neg_inf(x)
    assert out[0].item() == float("-inf") and out[1].item() == pytest.approx(math.log(1 + math.e))
    out[1].backward()
    assert torch.isfinite(x.grad).all()


def test_unordered_rejects_large_k():
    with pytest.raises(AssertionError, match="plackett_luce"):
        unordered_set_logp(torch.zeros(7), torch.tensor(0.0))


@pytest.mark.parametrize("probs, k", [([0.5, 0.3, 0.2], 2), ([0.4, 0.3, 0.2, 0.1], 3)])
def test_matches_multinomial_frequencies(probs, k):
    n = 200_000
    p = torch.tensor(probs)
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.expand(n, -1), k, replacement=False, generator=gen)  # (n, K) in draw order
    logits = p.double().log()

    ordered = torch.tensor(list(itertools.permutations(range(len(probs)), k)))  # (M, K) all ordered tuples
    code = lambda t: (t * len(probs) ** torch.arange(k)).sum(-1)  # noqa: E731  base-E code of a tuple
    freq = torch.bincount(code(draws), minlength=len(probs) ** k).double()[code(ordered)] / n  # (M,)
    expected = set_logprob("plackett_luce", logits.expand(len(ordered), -1), ordered).exp()  # (M,)
    torch.testing.assert_close(expected.sum(), torch.tensor(1.0, dtype=torch.float64))
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() < 4 * sigma).all(), (freq, expected)

    sets = torch.tensor(list(itertools.combinations(range(len(probs)), k)))  # (S, K) sorted
    set_freq = torch.bincount(code(draws.sort(-1).values), minlength=len(probs) ** k).double()[code(sets)] / n
    set_expected = set_logprob("unordered", logits.expand(len(sets), -1), sets).exp()  # (S,)
    set_sigma = (set_expected * (1 - set_expected) / n).sqrt()
    assert ((set_freq - set_expected).abs() < 4 * set_sigma).all(), (set_freq, set_expected)
