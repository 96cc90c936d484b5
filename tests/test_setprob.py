"""Set log-probabilities of expert choices: golden values, Monte-Carlo agreement with torch.multinomial."""

import itertools
import math

import pytest
import torch

from expertrl.moe.setprob import SET_LOGPROBS, independent_logp, plackett_luce_logp, unordered_set_logp

P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def test_plackett_luce_golden():
    # ordered (0, 1): p0 · p1 / (1 − p0) = 0.5 · 0.3 / 0.5 = 0.3
    # ordered (1, 0): p1 · p0 / (1 − p1) = 0.3 · 0.5 / 0.7 = 0.2142857...
    # ordered (2, 0, 1): 0.2 · 0.5/0.8 · 0.3/0.3 = 0.125
    logp = P.log()
    assert plackett_luce_logp(logp[[0, 1]]).exp().item() == pytest.approx(0.3)
    assert plackett_luce_logp(logp[[1, 0]]).exp().item() == pytest.approx(0.15 / 0.7)
    assert plackett_luce_logp(logp[[2, 0, 1]]).exp().item() == pytest.approx(0.125)


def test_unordered_golden():
    # {0, 1}: 0.5·0.3/0.5 + 0.3·0.5/0.7 = 0.3 + 0.2142857 = 0.5142857
    # {0, 2}: 0.5·0.2/0.5 + 0.2·0.5/0.8 = 0.2 + 0.125 = 0.325
    logp = P.log()
    assert unordered_set_logp(logp[[0, 1]]).exp().item() == pytest.approx(0.3 + 0.15 / 0.7)
    assert unordered_set_logp(logp[[1, 0]]).exp().item() == pytest.approx(0.3 + 0.15 / 0.7)  # order-free
    assert unordered_set_logp(logp[[2, 0]]).exp().item() == pytest.approx(0.325)
    # the three 2-sets of 3 experts exhaust the outcomes: 0.5142857 + 0.325 + {1,2}: 0.3·0.2/0.7 + 0.2·0.3/0.8
    total = sum(unordered_set_logp(logp[list(s)]).exp().item() for s in itertools.combinations(range(3), 2))
    assert total == pytest.approx(1.0)


def test_independent_golden():
    # 0.5 · 0.3 = 0.15
    assert independent_logp(P.log()[[0, 1]]).exp().item() == pytest.approx(0.15)


def test_registry_names():
    assert set(SET_LOGPROBS) == {"plackett_luce", "unordered", "independent"}


@pytest.mark.parametrize("name", sorted(SET_LOGPROBS))
def test_k1_is_log_p(name):
    logp = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)[:, :1]  # (5, 1)
    torch.testing.assert_close(SET_LOGPROBS[name](logp), logp[:, 0])


@pytest.mark.parametrize("name", sorted(SET_LOGPROBS))
def test_batch_shape_and_finite_gradient(name):
    logits = torch.randn(2, 3, 8, requires_grad=True)
    logp_all = torch.log_softmax(logits, -1)  # (2, 3, 8)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(6)]).view(2, 3, 3)  # distinct experts per token
    out = SET_LOGPROBS[name](logp_all.gather(-1, idx))  # (2, 3)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_plackett_luce_matches_direct_formula_and_gradcheck():
    logp = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)[:, [3, 0, 5]]  # (4, 3)
    p = logp.exp()
    excl = p.cumsum(-1) - p
    direct = (logp - torch.log1p(-excl)).sum(-1)
    torch.testing.assert_close(plackett_luce_logp(logp), direct)
    assert torch.autograd.gradcheck(plackett_luce_logp, (logp.clone().requires_grad_(),))


def test_plackett_luce_dominant_expert_is_accurate_in_float32():
    # p = [1 − 1e-7, 6e-8, 4e-8]; ordered (0, 1): p1 / (1 − p0) = 0.6 exactly. 1 − p0 in float32 probability
    # space would be ~1.19e-7 or 0; the log-space form keeps it.
    logits = torch.tensor([0.0, math.log(6e-8), math.log(4e-8)], dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)
    exact = plackett_luce_logp(logp[[0, 1]]).exp().item()
    approx32 = plackett_luce_logp(logp.float()[[0, 1]]).exp().item()
    assert exact == pytest.approx((1 - 1e-7) * 0.6, rel=1e-6)
    assert approx32 == pytest.approx(exact, rel=1e-3)


def test_unrouted_rows_are_finite():
    # types.RoutingTrace stores log p = 0 for unrouted slots; they must not produce NaN (the caller masks them).
    zeros = torch.zeros(3, 2, requires_grad=True)
    for fn in SET_LOGPROBS.values():
        out = fn(zeros)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(zeros.grad).all()
    torch.testing.assert_close(plackett_luce_logp(torch.zeros(3, 2)), torch.zeros(3))


def test_unordered_rejects_large_k():
    with pytest.raises(AssertionError, match="plackett_luce"):
        unordered_set_logp(torch.zeros(7))


@pytest.mark.parametrize("probs, k", [([0.5, 0.3, 0.2], 2), ([0.4, 0.3, 0.2, 0.1], 3)])
def test_matches_multinomial_frequencies(probs, k):
    n = 200_000
    p = torch.tensor(probs)
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.expand(n, -1), k, replacement=False, generator=gen)  # (n, K) in draw order
    logp = p.double().log()

    ordered = torch.tensor(list(itertools.permutations(range(len(probs)), k)))  # (M, K) all ordered tuples
    code = lambda t: (t * len(probs) ** torch.arange(k)).sum(-1)  # noqa: E731  base-E code of a tuple
    freq = torch.bincount(code(draws), minlength=len(probs) ** k).double()[code(ordered)] / n  # (M,)
    expected = plackett_luce_logp(logp[ordered]).exp()  # (M,)
    torch.testing.assert_close(expected.sum(), torch.tensor(1.0, dtype=torch.float64))
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() < 4 * sigma).all(), (freq, expected)

    sets = torch.tensor(list(itertools.combinations(range(len(probs)), k)))  # (S, K) sorted
    set_freq = torch.bincount(code(draws.sort(-1).values), minlength=len(probs) ** k).double()[code(sets)] / n
    set_expected = unordered_set_logp(logp[sets]).exp()  # (S,)
    set_sigma = (set_expected * (1 - set_expected) / n).sqrt()
    assert ((set_freq - set_expected).abs() < 4 * set_sigma).all(), (set_freq, set_expected)
