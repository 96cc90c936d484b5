"""RO-GRPO routing rewards (METHODS.md §2.3-2.6): golden statistics, Smooth weights, the Relative history and its
timing, the Shuffled control, exact resume, and the loop detector, each against hand-worked numbers or a slow loop."""

import json
import math

import pytest
import torch

from expertrl.rewards.routing import (
    RoutingHistory,
    RoutingRewarder,
    relative_reward,
    routing_statistics,
    shuffle_within_batch,
    smooth_reward,
    smooth_weights,
)
from expertrl.rewards.shaping import repetition_rate

LN2 = math.log(2.0)
H_09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / LN2  # 0.32508297 / 0.69314718 = 0.46899559


def close(actual, expected, **kw):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), **kw)


# ---------------------------------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("E", [2, 3, 8])
def test_uniform_routing_is_full_entropy_and_perfect_balance(E):
    probs = torch.full((3, 2, 5, E), 1.0 / E)  # (M, B, T, E)
    stats = routing_statistics(probs, torch.ones(2, 5))
    close(stats["h_norm"], [1.0, 1.0])
    close(stats["m_norm"], [0.0, 0.0])
    close(stats["utilisation"], torch.full((3, 2, E), 1.0 / E))


@pytest.mark.parametrize("E", [2, 3, 8])
def test_collapse_on_one_expert_is_zero_entropy_and_full_imbalance(E):
    probs = torch.zeros(2, 3, 4, E)
    probs[..., E - 1] = 1.0  # every token of every module on the last expert
    stats = routing_statistics(probs, torch.ones(3, 4))
    close(stats["h_norm"], torch.zeros(3))
    close(stats["m_norm"], torch.ones(3))
    close(stats["m_raw"], torch.full((3,), (E - 1) / E**2))  # (1/E)‖onehot − u‖² = (E−1)/E²


def _two_module_case():
    # M=2 modules, B=1, T=3, E=2. Per-token normalised entropies: (.5,.5) -> 1, (1,0) -> 0, (.9,.1) -> H_09.
    module0 = [[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]]
    module1 = [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]
    return torch.tensor([[module0], [module1]])  # (2, 1, 3, 2)


def test_two_modules_shared_mask_hand_computed():
    stats = routing_statistics(_two_module_case(), torch.ones(1, 3))
    # H: pairs (1 + 0 + 0.468996 + 0 + 0 + 1) / 6 = 0.411499; with a shared mask the module mean is the same number
    close(stats["h_norm"], [(2 + H_09) / 6])
    close(routing_statistics(_two_module_case(), torch.ones(1, 3), pool="module")["h_norm"], [(2 + H_09) / 6])
    # p̄_0 = (2.4/3, 0.6/3) = (0.8, 0.2): (1/2)(0.3² + 0.3²) = 0.09, / (1/4) = 0.36
    # p̄_1 = (2.5/3, 0.5/3): (1/2)(2 · (1/3)²) = 1/9 = 0.111111, / (1/4) = 0.444444
    close(stats["utilisation"], [[[0.8, 0.2]], [[2.5 / 3, 0.5 / 3]]])
    close(stats["m_norm_per_module"], [[0.36], [4 / 9]])
    close(stats["m_raw"], [(0.09 + 1 / 9) / 2])  # 0.100556
    close(stats["m_norm"], [(0.36 + 4 / 9) / 2])  # 0.402222


def test_two_modules_per_module_mask_pool_modes_differ():
    mask = torch.tensor([[[1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]])  # (M, B, T): module 1 counts only token 0, (1, 0)
    pairs = routing_statistics(_two_module_case(), mask, pool="pairs")
    module = routing_statistics(_two_module_case(), mask, pool="module")
    close(pairs["h_norm"], [(1 + 0 + H_09 + 0) / 4])  # 4 counted pairs: 0.367249
    close(module["h_norm"], [((1 + 0 + H_09) / 3 + 0) / 2])  # module means 0.489665 and 0: 0.244833
    # p̄_0 = (0.8, 0.2) -> 0.36; p̄_1 = (1, 0) -> 1 (raw 0.25); pool does not change M̄
    for stats in (pairs, module):
        close(stats["m_norm"], [(0.36 + 1.0) / 2])
        close(stats["m_raw"], [(0.09 + 0.25) / 2])


def test_three_experts_hand_computed():
    # one token p = (0.5, 0.5, 0): H = ln 2, H_norm = ln2/ln3 = 0.630930; p̄ − u = (1/6, 1/6, −1/3):
    # (1/3)(1/36 + 1/36 + 1/9) = 1/18, / ((3−1)/9) = 0.25
    stats = routing_statistics(torch.tensor([0.5, 0.5, 0.0]).view(1, 1, 1, 3), torch.ones(1, 1))
    close(stats["h_norm"], [math.log(2) / math.log(3)])
    close(stats["m_raw"], [1 / 18])
    close(stats["m_norm"], [0.25])


def test_padding_is_ignored_even_when_it_holds_nan():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 2, 6, 4, generator=g).softmax(-1)  # (M, B, T, E)
    mask = torch.tensor([[1.0, 1, 1, 1, 0, 0], [1.0, 1, 0, 0, 0, 0]])
    padded = probs.clone()
    padded[:, 0, 4:] = float("nan")
    padded[:, 1, 2:] = torch.tensor([1.0, 0, 0, 0])  # a collapse that must not count
    stats = routing_statistics(padded, mask)
    for b, n in enumerate([4, 2]):
        alone = routing_statistics(probs[:, b : b + 1, :n], torch.ones(1, n))
        for key in ("h_norm", "m_norm", "m_raw"):
            close(stats[key][b : b + 1], alone[key])


def _slow_statistics(probs, mask, pool):
    """Loop reference over completions, modules and tokens (mask (M, B, T))."""
    M, B, T, E = probs.shape
    h_out, m_out = [], []
    for b in range(B):
        pairs, module_means, mses = [], [], []
        for m in range(M):
            hs = [
                -sum(p * math.log(max(p, 1e-12)) for p in probs[m, b, t].tolist()) / math.log(E)
                for t in range(T)
                if mask[m, b, t] > 0
            ]
            if not hs:
                continue
            pairs += hs
            module_means.append(sum(hs) / len(hs))
            rows = [probs[m, b, t] for t in range(T) if mask[m, b, t] > 0]
            pbar = torch.stack(rows).double().mean(0)
            mses.append(((pbar - 1 / E) ** 2).mean().item() / ((E - 1) / E**2))
        if not pairs:
            h_out.append(0.0)
        elif pool == "pairs":
            h_out.append(sum(pairs) / len(pairs))
        else:
            h_out.append(sum(module_means) / len(module_means))
        m_out.append(sum(mses) / len(mses) if mses else 0.0)
    return torch.tensor(h_out), torch.tensor(m_out)


@pytest.mark.parametrize("pool", ["pairs", "module"])
def test_vectorised_statistics_match_slow_loop(pool):
    g = torch.Generator().manual_seed(1)
    probs = (3 * torch.randn(3, 4, 5, 4, generator=g)).softmax(-1)
    mask = (torch.rand(3, 4, 5, generator=g) > 0.4).float()
    mask[:, 3] = 0.0  # an empty completion
    mask[1, 2] = 0.0  # module 1 counts nothing for completion 2
    h, m = _slow_statistics(probs, mask, pool)
    stats = routing_statistics(probs, mask, pool=pool)
    close(stats["h_norm"], h)
    close(stats["m_norm"], m)
    assert stats["empty"].tolist() == [False, False, False, True]


def test_empty_completion_is_zero_and_flagged():
    stats = routing_statistics(torch.full((1, 2, 3, 2), 0.5), torch.tensor([[1.0, 1, 0], [0, 0, 0]]))
    close(stats["h_norm"], [1.0, 0.0])
    close(stats["m_norm"], [0.0, 0.0])
    assert stats["empty"].tolist() == [False, True]


def test_statistics_carry_no_gradient():
    probs = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    stats = routing_statistics(probs, torch.ones(1, 2))
    assert not any(v.requires_grad for v in stats.values())


# ---------------------------------------------------------------------------------------------------------------------
# Smooth


def test_smooth_weights_endpoints_and_center():
    s0 = 1 / (1 + math.exp(5))  # σ(10 · (0 − 0.5)) = 0.0066929
    w_h, w_b = smooth_weights(0.0)
    assert w_h == pytest.approx(0.5 * (1 - s0)) and w_b == pytest.approx(2.0 * s0)  # 0.496654, 0.013386
    assert w_h == pytest.approx(0.5, abs=0.005) and w_b == pytest.approx(0.0, abs=0.015)
    w_h, w_b = smooth_weights(1.0)
    assert w_h == pytest.approx(0.5 * s0) and w_b == pytest.approx(2.0 * (1 - s0))
    assert w_h == pytest.approx(0.0, abs=0.005) and w_b == pytest.approx(2.0, abs=0.015)
    assert smooth_weights(0.5) == (0.25, 1.0)  # s(c) = 1/2 exactly
    assert smooth_weights(0.3, lambda_h_start=1.0, lambda_b_end=4.0, center=0.3) == (0.5, 2.0)


def test_smooth_weights_huge_steepness_does_not_overflow():
    assert smooth_weights(0.0, steepness=1e4) == (0.5, 0.0)
    assert smooth_weights(1.0, steepness=1e4) == (0.0, 2.0)


def test_smooth_reward_golden():
    # t = 0.5: (w_H, w_B) = (0.25, 1.0); R = −0.2 (0.25 · 0.4 + 1.0 · 0.2) = −0.06; uniform: −0.2 · 0.25 = −0.05
    r = smooth_reward(torch.tensor([0.4, 1.0, 0.0]), torch.tensor([0.2, 0.0, 1.0]), 0.5)
    close(r, [-0.06, -0.05, -0.2])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_progress_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"progress .* \[0, 1\]"):
        smooth_weights(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Relative


def test_relative_bonus_only_when_both_statistics_improve():
    h = torch.tensor([0.4, 0.4, 0.6, 0.6, 0.5])
    m = torch.tensor([0.4, 0.6, 0.4, 0.6, 0.4])
    # both better | only h | only m | neither | h equal to the history (strict: no bonus)
    close(relative_reward(h, m, (0.5, 0.5), bonus=0.2), [0.2, 0.0, 0.0, 0.0, 0.0])
    close(relative_reward(h, m, None, bonus=0.2), torch.zeros(5))  # no history yet


def _batch(kinds):
    """(M=1, B, T=2, E=2) probs and mask; "uniform": (h, m) = (1, 0); "collapse": (0, 1); "ideal": one-hot tokens on
    different experts, (0, 0); "empty": no counted token."""
    rows = {
        "uniform": [[0.5, 0.5], [0.5, 0.5]],
        "collapse": [[1.0, 0.0], [1.0, 0.0]],
        "ideal": [[1.0, 0.0], [0.0, 1.0]],
    }
    probs = torch.tensor([[rows.get(k, rows["uniform"]) for k in kinds]])
    mask = torch.tensor([[0.0, 0.0] if k == "empty" else [1.0, 1.0] for k in kinds])
    return probs, mask


def test_history_is_updated_after_scoring():
    rewarder = RoutingRewarder(kind="relative", bonus=0.2)
    r1, metrics1 = rewarder.score(*_batch(["uniform", "collapse", "ideal"]), progress=0.0)
    # first batch: no history, no bonus; had the batch been added first, "ideal" (0, 0) would beat (1/3, 1/3)
    close(r1, [0.0, 0.0, 0.0])
    assert "reward/routing_h_hist" not in metrics1 and metrics1["reward/routing_hit_rate"] == 0
    assert rewarder.history.reference() == pytest.approx((1 / 3, 1 / 3))  # h (1, 0, 0), m (0, 1, 0)
    r2, metrics2 = rewarder.score(*_batch(["ideal", "uniform"]), progress=0.1)
    close(r2, [0.2, 0.0])  # compared with batch 1 only: (0, 0) beats (1/3, 1/3); (1, 0) does not
    close(metrics2["reward/routing_h_hist"], 1 / 3)
    close(metrics2["reward/routing_m_hist"], 1 / 3)
    close(metrics2["reward/routing_hit_rate"], 0.5)
    close(metrics2["reward/routing"], 0.1)
    assert rewarder.history.reference() == pytest.approx((0.4, 0.2))  # h (1, 0, 0, 0, 1), m (0, 1, 0, 0, 0)


def test_window_keeps_only_the_last_samples():
    hist = RoutingHistory("window", window=3)
    assert hist.reference() is None
    hist.update(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0]))
    hist.update(torch.tensor([0.3, 0.4]), torch.tensor([3.0, 4.0]))
    h, m = hist.reference()
    assert len(hist) == 3 and h == pytest.approx(0.3) and m == pytest.approx(3.0)  # 0.1 and 1.0 dropped


def test_ema_matches_hand_computation():
    hist = RoutingHistory("ema", decay=0.9)
    assert hist.reference() is None
    hist.update(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))  # starts at (1, 0) -> (0.9, 0.1)
    hist.update(torch.tensor([0.5]), torch.tensor([0.5]))  # (0.81 + 0.05, 0.09 + 0.05)
    h, m = hist.reference()
    assert h == pytest.approx(0.86) and m == pytest.approx(0.14)


def test_empty_completion_gets_the_worst_reward_and_stays_out_of_the_history():
    smooth = RoutingRewarder(kind="smooth")
    r, metrics = smooth.score(*_batch(["ideal", "empty"]), progress=0.5)
    close(r, [0.0, -0.2 * (0.25 + 1.0)])  # ideal: H = M = 0; empty: as if H = M = 1
    close(metrics["router/entropy_norm"], 0.0)  # the empty completion is not averaged in
    relative = RoutingRewarder(kind="relative", window=10)
    relative.score(*_batch(["uniform", "collapse", "empty"]), progress=0.0)
    assert len(relative.history) == 2 and relative.history.reference() == (0.5, 0.5)
    r, metrics = relative.score(*_batch(["empty", "ideal"]), progress=0.0)
    close(r, [0.0, 0.2])  # the empty one's placeholder statistics (0, 0) would beat (0.5, 0.5): no bonus all the same
    close(metrics["reward/routing_hit_rate"], 1.0)  # over the non-empty completions


# ---------------------------------------------------------------------------------------------------------------------
# Shuffled control


def test_shuffle_preserves_the_multiset_and_really_permutes():
    values = torch.arange(8, dtype=torch.float32)
    out = shuffle_within_batch(values, torch.Generator().manual_seed(0))
    assert sorted(out.tolist()) == values.tolist()
    assert not torch.equal(out, values)
    assert torch.equal(out, shuffle_within_batch(values, torch.Generator().manual_seed(0)))  # reproducible


def test_shuffled_rewarder_permutes_the_plain_rewards():
    probs, mask = _batch(["uniform", "collapse", "ideal", "uniform", "collapse", "ideal"])
    plain, _ = RoutingRewarder(kind="smooth").score(probs, mask, progress=0.3)
    shuffled, _ = RoutingRewarder(kind="smooth", shuffled=True).score(
        probs, mask, progress=0.3, generator=torch.Generator().manual_seed(3)
    )
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    close(shuffled, plain[perm])
    assert not torch.equal(shuffled, plain)
    with pytest.raises(ValueError, match="generator"):
        RoutingRewarder(kind="smooth", shuffled=True).score(probs, mask, progress=0.3)


# ---------------------------------------------------------------------------------------------------------------------
# metrics and resume


def test_metrics_keys_and_values():
    probs, mask = _batch(["uniform", "collapse"])
    _, smooth = RoutingRewarder(kind="smooth").score(probs, mask, progress=0.5)
    expected = {"reward/routing", "router/entropy_norm", "router/load_mse_norm", "router/load_mse"}
    expected |= {"reward/routing_w_h", "reward/routing_w_b"}
    assert expected | {"router/utilisation", "router/load_mse_norm_per_module"} == set(smooth)
    assert all(smooth[k].dim() == 0 and not smooth[k].requires_grad for k in expected)
    close(smooth["router/entropy_norm"], 0.5)
    close(smooth["router/load_mse_norm"], 0.5)
    close(smooth["router/load_mse"], 0.125)  # (0 + 1/4) / 2
    close(smooth["router/utilisation"], [[0.75, 0.25]])  # (M, E): mean of (0.5, 0.5) and (1, 0)
    close(smooth["reward/routing"], -0.2 * (0.25 * 0.5 + 1.0 * 0.5))
    _, relative = RoutingRewarder(kind="relative").score(probs, mask, progress=0.5)
    assert "reward/routing_w_h" not in relative and "reward/routing_hit_rate" in relative


@pytest.mark.parametrize("history", ["window", "ema"])
def test_state_dict_round_trip_continues_identically(history):
    batches = [_batch(k) for k in (["uniform", "collapse"], ["ideal", "collapse"], ["ideal", "uniform", "collapse"])]
    batches.append(_batch(["ideal", "ideal"]))
    kwargs = dict(kind="relative", history=history, window=3, ema_decay=0.5, shuffled=True)
    a = RoutingRewarder(**kwargs)
    for step, (probs, mask) in enumerate(batches[:2]):
        a.score(probs, mask, progress=step / 4, generator=torch.Generator().manual_seed(step))
    b = RoutingRewarder(**kwargs)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step, (probs, mask) in enumerate(batches[2:], start=2):
        ra, ma = a.score(probs, mask, progress=step / 4, generator=torch.Generator().manual_seed(step))
        rb, mb = b.score(probs, mask, progress=step / 4, generator=torch.Generator().manual_seed(step))
        assert torch.equal(ra, rb) and ma.keys() == mb.keys()
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="window"):
        RoutingRewarder(kind="relative", window=4).load_state_dict(RoutingRewarder(kind="relative").state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="both"), "kind"),
        (dict(pool="tokens"), "pool"),
        (dict(history="mean", kind="relative"), "history"),
        (dict(kind="relative", window=0), "window"),
        (dict(kind="relative", history="ema", ema_decay=1.0), "decay"),
        (dict(w_route=-0.1), "w_route"),
        (dict(steepness=0.0), "steepness"),
        (dict(center=1.5), "center"),
        (dict(bonus=float("inf")), "bonus"),
    ],
)
def test_bad_rewarder_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingRewarder(**kwargs)


def test_bad_statistics_inputs_are_explained():
    with pytest.raises(ValueError, match=r"probs must be \(M, B, T, E\)"):
        routing_statistics(torch.ones(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="E >= 2"):
        routing_statistics(torch.ones(1, 2, 3, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must be"):
        routing_statistics(torch.full((1, 2, 3, 2), 0.5), torch.ones(3, 2))


# ---------------------------------------------------------------------------------------------------------------------
# looping


def _ids(texts, width=None):
    width = width or max(map(len, texts))
    ids = torch.full((len(texts), width), ord("z"))  # padding that would loop if it counted
    mask = torch.zeros(len(texts), width)
    for b, t in enumerate(texts):
        ids[b, : len(t)] = torch.tensor([ord(c) for c in t])
        mask[b, : len(t)] = 1.0
    return ids, mask


def test_repetition_rate_golden():
    texts = ["ab ab ab ab", "abcdefg", "xyxyxy", "xyxy", "abababa", "abc$", ""]
    # "ab ab ab ab" ends in 3 copies of " ab"; "xyxyxy" in 3 of "xy"; "xyxy" has only 2; "abababa" ends in 3 copies
    # of "ba"; "abcdefg" and "abc$" (an EOS-like last token) have no repeated tail; "" has no tokens
    looping, rate = repetition_rate(*_ids(texts, width=16))
    assert looping.tolist() == [True, False, True, False, True, False, False]
    close(rate, 3 / 7)
    looping, _ = repetition_rate(*_ids(["ab ab ab ab", "xyxyxy"]), min_repeats=4)
    assert looping.tolist() == [False, False]
    looping, _ = repetition_rate(*_ids(["aaaaaa", "abcabcabc"]), min_ngram=2, max_ngram=2)
    assert looping.tolist() == [True, False]  # "aaaaaa" is 3 copies of "aa"; "abc" (n = 3) is out of range


def _slow_looping(row, n_tokens, min_ngram, max_ngram, r):
    seq = row[:n_tokens]
    return any(
        len(seq) >= n * r and seq[len(seq) - n * r :] == seq[len(seq) - n :] * r
        for n in range(min_ngram, max_ngram + 1)
    )


def test_repetition_rate_matches_slow_loop():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 2, (64, 12), generator=g)  # a 2-token vocabulary makes tails repeat often
    lengths = torch.randint(0, 13, (64,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).float()
    looping, _ = repetition_rate(ids, mask, min_ngram=1, max_ngram=3, min_repeats=3)
    expected = [_slow_looping(ids[b].tolist(), int(lengths[b]), 1, 3, 3) for b in range(64)]
    assert looping.tolist() == expected and 0 < sum(expected) < 64


def test_repetition_rate_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        repetition_rate(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0.0, 1.0, 1.0]]))
