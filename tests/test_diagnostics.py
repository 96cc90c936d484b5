"""Routing diagnostics: golden values for both entropies, JSD, load-balance numbers; loops as slow references."""

import itertools
import math

import pytest
import torch

from expertrl.diagnostics import (
    coefficient_of_variation,
    dead_fraction,
    expert_counts,
    expert_counts_by_position,
    jensen_shannon,
    max_violation,
    pairwise_jsd,
    router_entropy,
    token_entropy,
    usage_distribution,
    usage_entropy,
)

UNIFORM4 = torch.full((4,), 0.25)
ONE_HOT4 = torch.tensor([0.0, 1.0, 0.0, 0.0])
HAND = torch.tensor([0.5, 0.25, 0.25, 0.0])  # H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 nats


def test_router_entropy_golden_values():
    torch.testing.assert_close(router_entropy(UNIFORM4[None]), torch.tensor(math.log(4)))
    torch.testing.assert_close(router_entropy(ONE_HOT4[None]), torch.tensor(0.0))
    torch.testing.assert_close(router_entropy(HAND[None]), torch.tensor(1.5 * math.log(2)))
    torch.testing.assert_close(router_entropy(UNIFORM4[None], normalize=True), torch.tensor(1.0))


def test_router_entropy_is_a_masked_mean_over_tokens():
    probs = torch.stack([UNIFORM4, ONE_HOT4, HAND])[None]  # (1, 3, E)
    torch.testing.assert_close(token_entropy(probs), torch.tensor([[math.log(4), 0.0, 1.5 * math.log(2)]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token does not count
    torch.testing.assert_close(router_entropy(probs, mask), torch.tensor(math.log(4) / 2))
    with pytest.raises(ValueError, match="mask selects no token"):
        router_entropy(probs, torch.zeros(1, 3))


def test_usage_distribution_and_entropy_golden():
    experts = torch.tensor([[0, 1], [0, 2], [3, 3]])  # (T=3, K=2)
    mask = torch.tensor([1.0, 1.0, 0.0])  # the last token does not count
    usage = usage_distribution(experts, mask, 4)
    torch.testing.assert_close(usage, HAND)
    torch.testing.assert_close(usage_entropy(usage), torch.tensor(1.5 * math.log(2)))
    torch.testing.assert_close(usage_entropy(UNIFORM4), torch.tensor(math.log(4)))
    torch.testing.assert_close(usage_entropy(ONE_HOT4), torch.tensor(0.0))
    # unrouted slots (-1) never count
    torch.testing.assert_close(expert_counts(torch.tensor([[0, -1], [1, 1]]), None, 3), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="no routed token"):
        usage_distribution(experts, torch.zeros(3), 4)


def test_the_two_entropies_are_different_quantities():
    # Each token is routed with certainty (per-token entropy 0), but to a different expert each time:
    # aggregate usage is uniform (usage entropy ln 4). MoE-GRPO's 1.05 -> 1.82 is the second kind.
    probs = torch.eye(4)[None]  # (1, T=4, E=4)
    experts = torch.arange(4)[None, :, None]  # (1, T, K=1)
    assert router_entropy(probs).item() == pytest.approx(0.0)
    assert usage_entropy(usage_distribution(experts, None, 4)).item() == pytest.approx(math.log(4))


def test_jensen_shannon_golden_values():
    assert jensen_shannon(HAND, HAND).item() == pytest.approx(0.0, abs=1e-7)
    assert jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)  # log2
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): KL(p||m) = ln 4/3, KL(q||m) = 1/2 ln 4/3, JSD = 3/4 ln 4/3 nats
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    assert jensen_shannon(p, q).item() == pytest.approx(0.75 * math.log2(4 / 3), rel=1e-6)
    assert jensen_shannon(p, q, base=math.e).item() == pytest.approx(0.75 * math.log(4 / 3), rel=1e-6)
    assert jensen_shannon(p, q).item() == pytest.approx(jensen_shannon(q, p).item())


def test_pairwise_jsd_matches_loop_and_is_symmetric():
    dists = torch.softmax(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), -1)  # (A, E)
    matrix, mean = pairwise_jsd(dists)
    assert matrix.shape == (5, 5)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix.diagonal(), torch.zeros(5))
    pairs = list(itertools.combinations(range(5), 2))
    ref = [jensen_shannon(dists[i], dists[j]).item() for i, j in pairs]
    for (i, j), v in zip(pairs, ref):
        assert matrix[i, j].item() == pytest.approx(v, abs=1e-6)
    assert mean.item() == pytest.approx(sum(ref) / len(ref), abs=1e-6)
    assert 0.0 <= matrix.min() and matrix.max() <= 1.0
    with pytest.raises(ValueError, match="A >= 2"):
        pairwise_jsd(dists[:1])


def test_load_balance_numbers():
    load = torch.tensor([2.0, 1.0, 1.0, 0.0])  # mean 1, max 2
    assert max_violation(load).item() == pytest.approx(1.0)
    assert max_violation(torch.ones(4)).item() == pytest.approx(0.0)
    assert dead_fraction(load).item() == pytest.approx(0.25)
    assert dead_fraction(torch.tensor([0.5, 0.4995, 0.0005, 0.0])).item() == pytest.approx(0.5)  # < 1e-3 share
    assert coefficient_of_variation(torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)  # std 1 / mean 1
    assert coefficient_of_variation(torch.ones(4)).item() == pytest.approx(0.0)
    torch.testing.assert_close(max_violation(torch.stack([load, torch.ones(4)])), torch.tensor([1.0, 0.0]))


def test_expert_counts_by_position_matches_loop():
    g = torch.Generator().manual_seed(1)
    experts = torch.randint(-1, 4, (3, 5, 2), generator=g)  # (B, S, K), some unrouted
    positions = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # (B, S) left padding repeats 0
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    fast = expert_counts_by_position(experts, positions, mask, 4, max_positions=4)  # position 4 is dropped
    ref = torch.zeros(4, 4)
    for b, s, k in itertools.product(range(3), range(5), range(2)):
        e, p = int(experts[b, s, k]), int(positions[b, s])
        if mask[b, s] and e >= 0 and p < 4:
            ref[p, e] += 1
    torch.testing.assert_close(fast, ref)
