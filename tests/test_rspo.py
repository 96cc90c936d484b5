"""RSPO router shift (METHODS.md §1.2-1.3, §8 rows 1-4): golden γ, floor, stop-gradient, v1/v2 placements."""

import math

import pytest
import torch

from expertrl.losses import LOSSES
from expertrl.losses.aggregate import aggregate
from expertrl.losses.gmpo import gmpo
from expertrl.losses.grpo import grpo
from expertrl.losses.rspo import _masked_quantile, after_clip_weight, apply_router_shift, router_shift


def _golden_gate_logp():
    # L = 2 layers, B = 1, T = 1, K = 2 old experts. Current − old router log-probs:
    #   layer 0: [+0.1, −0.3] → d^0 = (0.1 + 0.3)/2 = 0.2
    #   layer 1: [ 0.0, +0.2] → d^1 = (0.0 + 0.2)/2 = 0.1
    old = torch.log(torch.tensor([[0.5, 0.25], [0.4, 0.4]])).view(2, 1, 1, 2)
    diff = torch.tensor([[0.1, -0.3], [0.0, 0.2]]).view(2, 1, 1, 2)
    return old + diff, old


def test_router_shift_golden_mean_over_layers():
    # Δ = (0.2 + 0.1)/2 = 0.15, γ = e^−0.15 = 0.8607 > 0.8: no floor, log γ̃ = −0.15.
    new, old = _golden_gate_logp()
    log_gamma, m = router_shift(new, old, torch.ones(1, 1))
    torch.testing.assert_close(log_gamma, torch.tensor([[-0.15]]))
    torch.testing.assert_close(m["router/shift/gamma_mean"], torch.tensor(math.exp(-0.15)))
    torch.testing.assert_close(m["router/shift/gamma_p10"], torch.tensor(math.exp(-0.15)))
    torch.testing.assert_close(m["router/shift/delta_mean"], torch.tensor(0.15))
    torch.testing.assert_close(m["router/shift/delta_per_layer"], torch.tensor([0.2, 0.1]))
    assert m["router/shift/frac_below_floor"] == 0


def test_router_shift_product_hits_the_floor():
    # "product": Δ = 0.2 + 0.1 = 0.3, γ = e^−0.3 = 0.7408 < 0.8 → γ̃ = 0.8, log γ̃ = log 0.8 = −0.2231.
    # With gamma_min = 0 there is no floor: log γ̃ = −0.3.
    new, old = _golden_gate_logp()
    log_gamma, m = router_shift(new, old, torch.ones(1, 1), layer_agg="product")
    torch.testing.assert_close(log_gamma, torch.tensor([[math.log(0.8)]]))
    torch.testing.assert_close(m["router/shift/gamma_mean"], torch.tensor(math.exp(-0.3)))  # raw γ, before the floor
    assert m["router/shift/frac_below_floor"] == 1
    log_gamma, _ = router_shift(new, old, torch.ones(1, 1), layer_agg="product", gamma_min=0.0)
    torch.testing.assert_close(log_gamma, torch.tensor([[-0.3]]))


def test_router_shift_median_and_upper_percentiles_golden():
    # One layer, K = 1, five tokens with |Δ log r| = 0.0, 0.1, 0.2, 0.3, 1.0 (a sixth, masked, would be 9.0):
    # γ median = e^-0.2; Δ p90 = 0.3 + 0.6 (1.0 - 0.3) = 0.72; Δ p99 = 0.3 + 0.96 (0.7) = 0.972 (linear interpolation).
    old = torch.zeros(1, 1, 6, 1)
    new = torch.tensor([0.0, -0.1, 0.2, -0.3, 1.0, 9.0]).view(1, 1, 6, 1)
    _, m = router_shift(new, old, torch.tensor([[1.0, 1, 1, 1, 1, 0]]))
    torch.testing.assert_close(m["router/shift/gamma_p50"], torch.tensor(math.exp(-0.2)))
    torch.testing.assert_close(m["router/shift/delta_p90"], torch.tensor(0.72))
    torch.testing.assert_close(m["router/shift/delta_p99"], torch.tensor(0.972))
    ref = torch.quantile(torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0]), torch.tensor([0.9, 0.99]))
    torch.testing.assert_close(torch.stack([m["router/shift/delta_p90"], m["router/shift/delta_p99"]]), ref)


def test_router_shift_unchanged_routing_is_one():
    old = torch.randn(3, 2, 4, 2).log_softmax(-1)
    log_gamma, m = router_shift(old.clone(), old, torch.ones(2, 4))
    assert (log_gamma == 0).all() and m["router/shift/gamma_mean"] == 1


def test_router_shift_metrics_ignore_masked_tokens():
    # Two tokens, the second masked and heavily shifted: it changes no metric.
    old = torch.zeros(1, 1, 2, 1)
    new = torch.tensor([0.1, 5.0]).view(1, 1, 2, 1)
    _, m = router_shift(new, old, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(m["router/shift/delta_mean"], torch.tensor(0.1))
    torch.testing.assert_close(m["router/shift/gamma_p10"], torch.tensor(math.exp(-0.1)))
    assert m["router/shift/frac_below_floor"] == 0
    assert all(not v.requires_grad for v in m.values())
    assert m["router/shift/delta_per_layer"].shape == (1,)


def test_masked_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 9, generator=g)
    mask = (torch.rand(5, 9, generator=g) > 0.4).float()
    for q in (0.0, 0.1, 0.5, 1.0):
        torch.testing.assert_close(_masked_quantile(x, mask, q), torch.quantile(x[mask.bool()], q))
    assert _masked_quantile(x, torch.zeros(5, 9), 0.1) == 0  # nothing counts: 0, like masked_mean


def test_router_shift_is_stop_gradient():
    old = torch.randn(2, 1, 3, 2).log_softmax(-1)
    new = (old + 0.3 * torch.randn(2, 1, 3, 2)).requires_grad_()
    log_gamma, _ = router_shift(new, old, torch.ones(1, 3))
    assert not log_gamma.requires_grad
    # Used in a host loss, no gradient reaches the router log-probs.
    logp = torch.full((1, 3), -0.5, requires_grad=True)
    loss, _ = gmpo(logp, apply_router_shift(logp.detach(), log_gamma), -torch.ones(1), torch.ones(1, 3))
    aggregate(loss, torch.ones(1, 3), "seq_mean_token_mean").backward()
    assert new.grad is None and logp.grad is not None
    # after_clip_weight detaches too, even if handed a log γ that carries gradient.
    lg = torch.full((1, 3), -0.1, requires_grad=True)
    after_clip_weight(torch.ones(1, 3, requires_grad=True), lg).sum().backward()
    assert lg.grad is None


def test_router_shift_errors():
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"geo.*mean.*product"):
        router_shift(x, x, torch.ones(1, 1), layer_agg="geo")
    with pytest.raises(AssertionError, match="gamma_min"):
        router_shift(x, x, torch.ones(1, 1), gamma_min=1.5)
    with pytest.raises(ValueError, match="after_clip_weight"):
        apply_router_shift(torch.zeros(1, 1), torch.zeros(1, 1), placement="after_clip")


# ---------------------------------------------------------------- v2: before the clip


def test_v2_grpo_host_rescales_ratio_before_clip():
    # ρ = 1, γ̃ = 0.8: u = log 0.8, ρ̃ = 0.8 = 1 − ε, exactly on the lower edge (METHODS §1.3).
    # A = 1: −min(0.8, 0.8) = −0.8. A = −1, ρ = 1, γ̃ = 0.9: ρ̃ = 0.9 → −min(−0.9, −0.9) = 0.9.
    logp = torch.zeros(2, 1)
    log_gamma = torch.log(torch.tensor([[0.8], [0.9]]))
    loss, m = grpo(logp, apply_router_shift(torch.zeros(2, 1), log_gamma), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    torch.testing.assert_close(loss, torch.tensor([[-0.8], [0.9]]))
    torch.testing.assert_close(m["ratio_mean"], torch.tensor(0.85))  # host metrics describe the rescaled ratio


def test_v2_gmpo_host_golden():
    # A = −1, ℓ = [−0.3, 0.0], γ̃ = 0.8 at both tokens, log 0.8 = −0.2231:
    #   γ = 1:  ℓ̃ = max(ℓ, clip(ℓ, −0.4, 0.4)) = [−0.3, 0.0], mean −0.15 → weight e^−0.15 = 0.8607, loss 0.8607
    #   v2:     u = [−0.5231, −0.2231] → ũ = [−0.4, −0.2231] (token 0 now clipped), mean −0.31157 → loss 0.7323
    logp = torch.tensor([[-0.3, 0.0]])
    mask, adv = torch.ones(1, 2), -torch.ones(1)
    plain, _ = gmpo(logp, torch.zeros(1, 2), adv, mask)
    lg = torch.full((1, 2), math.log(0.8))
    shifted, m = gmpo(logp, apply_router_shift(torch.zeros(1, 2), lg), adv, mask)
    torch.testing.assert_close(plain[0, 0], torch.tensor(math.exp(-0.15)))
    torch.testing.assert_close(shifted[0, 0], torch.tensor(math.exp((-0.4 + math.log(0.8)) / 2)))
    assert m["clip_frac_low"] == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_v2_negative_advantage_weight_never_exceeds_gamma_one(seed):
    # METHODS §1.3 unit test: for Â < 0 and γ < 1, the v2 GMPO sequence weight exp(mean_t ũ) is <= the γ = 1 weight
    # (ũ = max(u, clip(u)) is non-decreasing in u and u = ℓ + log γ̃ <= ℓ). With A = −1, loss = weight.
    g = torch.Generator().manual_seed(seed)
    B, T = 64, 7
    logp = -torch.rand(B, T, generator=g)
    old_logp = logp + 0.5 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    gamma = 0.5 + 0.5 * torch.rand(B, T, generator=g)  # γ in [0.5, 1)
    log_gamma = torch.log(gamma).clamp(min=math.log(0.8))  # floored, as router_shift returns it
    adv = -torch.ones(B)
    plain, _ = gmpo(logp, old_logp, adv, mask)
    shifted, _ = gmpo(logp, apply_router_shift(old_logp, log_gamma), adv, mask)
    assert (shifted[:, 0] <= plain[:, 0] + 1e-6).all()
    assert (shifted[:, 0] < plain[:, 0]).any()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_v2_with_no_shift_leaves_every_host_unchanged(name):
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(3, 5, generator=g)
    old_logp = logp + 0.2 * torch.randn(3, 5, generator=g)
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 5)
    plain, _ = LOSSES[name](logp, old_logp, adv, mask)
    same, _ = LOSSES[name](logp, apply_router_shift(old_logp, torch.zeros(3, 5)), adv, mask)
    torch.testing.assert_close(plain, same)


# ---------------------------------------------------------------- v1 (generalised): after the clip


def test_after_clip_weight_scales_clipped_loss_and_gradient():
    # GRPO host, ρ = e > 1.2, A = 1: clipped loss −1.2, times γ̃ = 0.9 → −1.08.
    # Token 1: ρ = 1, A = 1, γ̃ = 0.8: −1·0.8 = −0.8, gradient −A·γ̃ = −0.8 (a sample weight, not a ratio change).
    logp = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss, _ = grpo(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    weighted = after_clip_weight(loss, torch.log(torch.tensor([[0.9, 0.8]])))
    torch.testing.assert_close(weighted, torch.tensor([[-1.08, -0.8]]))
    weighted.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.8]]))
