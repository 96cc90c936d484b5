"""Policy losses, aggregation, Gate-GRPO and router losses: golden values and contracts over every LOSSES entry."""

import math

import pytest
import torch

from expertrl.losses import LOSSES, get_loss, register_loss
from expertrl.losses.aggregate import AGGREGATIONS, aggregate
from expertrl.losses.gate import gate_grpo
from expertrl.losses.grpo import clipped_surrogate, grpo
from expertrl.losses.routing import router_z_loss, switch_load_balancing

ONE = torch.ones(1, 1)

# ---------------------------------------------------------------- GRPO golden values


def test_grpo_clips_ratio_above_one_plus_eps():
    # ρ = e ≈ 2.718 > 1.2, A = 1: −min(2.718·1, 1.2·1) = −1.2
    loss, m = grpo(ONE, torch.zeros(1, 1), torch.ones(1), ONE)
    torch.testing.assert_close(loss, torch.tensor([[-1.2]]))
    assert m["clip_frac"] == 1 and m["clip_frac_high"] == 1 and m["clip_frac_low"] == 0


def test_grpo_clips_ratio_below_one_minus_eps_for_negative_advantage():
    # ρ = 0.5 < 0.8, A = −1: −min(0.5·(−1), 0.8·(−1)) = −min(−0.5, −0.8) = −(−0.8) = 0.8
    loss, m = grpo(torch.full((1, 1), math.log(0.5)), torch.zeros(1, 1), -torch.ones(1), ONE)
    torch.testing.assert_close(loss, torch.tensor([[0.8]]))
    assert m["clip_frac_low"] == 1 and m["clip_frac_high"] == 0


def test_grpo_unclipped_sides():
    # ρ = e, A = −1: −min(−2.718, −1.2) = 2.718 (no clip: large ratio on a bad token keeps its gradient)
    # ρ = 0.5, A = 1: −min(0.5, 0.8) = −0.5 (no clip)
    logp = torch.tensor([[1.0, math.log(0.5)]])
    loss, m = grpo(logp, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    torch.testing.assert_close(loss, torch.tensor([[math.e, -0.5]]))
    assert m["clip_frac"] == 0
    # ratio_mean = (2.718 + 0.5)/2; ratio_max = e; approx_kl = mean(e − 1 − 1, 0.5 − 1 − log 0.5)
    torch.testing.assert_close(m["ratio_mean"], torch.tensor((math.e + 0.5) / 2))
    torch.testing.assert_close(m["ratio_max"], torch.tensor(math.e))
    torch.testing.assert_close(m["approx_kl"], torch.tensor((math.e - 2 + (-0.5 - math.log(0.5))) / 2))


def test_grpo_asymmetric_clip_and_metric_masking():
    # eps_high = 0.28: ρ = e, A = 1 → −1.28. Second token is masked: its (huge) ratio must not enter the metrics.
    logp = torch.tensor([[1.0, 10.0]])
    loss, m = grpo(logp, torch.zeros(1, 2), torch.ones(1), torch.tensor([[1.0, 0.0]]), eps_high=0.28)
    torch.testing.assert_close(loss[0, 0], torch.tensor(-1.28))
    torch.testing.assert_close(m["ratio_max"], torch.tensor(math.e))
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_grpo_on_policy_gradient_is_reinforce():
    # ρ ≡ 1 numerically, d loss/d logp = −A (METHODS.md §0: one update per rollout = REINFORCE with baseline)
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo(logp, logp.detach(), torch.tensor([2.0, -1.0]), torch.ones(2, 3))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0] * 3, [1.0] * 3]))


def test_log_ratio_clamp_keeps_finite():
    loss, log_ratio, _, _ = clipped_surrogate(torch.tensor([1000.0, -1000.0]), torch.tensor(-1.0), 0.2, 0.2)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(log_ratio, torch.tensor([20.0, -20.0]))


# ---------------------------------------------------------------- contracts over every registered loss


def _inputs(b=3, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g)).requires_grad_()
    old_logp = logp.detach() + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logp, old_logp, adv, mask


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contract_shape_and_metrics(name):
    logp, old_logp, adv, mask = _inputs()
    loss, metrics = LOSSES[name](logp, old_logp, adv, mask)
    assert loss.shape == logp.shape
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("how", sorted(AGGREGATIONS))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contract_masked_tokens_get_no_gradient(name, how):
    logp, old_logp, adv, mask = _inputs()
    loss, _ = LOSSES[name](logp, old_logp, adv, mask)
    aggregate(loss, mask, how, norm_const=5.0).backward()
    assert (logp.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).any()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contract_zero_advantages_give_zero_gradient(name):
    logp, old_logp, adv, mask = _inputs()
    loss, _ = LOSSES[name](logp, old_logp, torch.zeros_like(adv), mask)
    aggregate(loss, mask, "token_mean").backward()
    assert (logp.grad == 0).all()


SEQUENCE_ADVANTAGE_LOSSES = {"gspo", "gmpo"}
"""Losses defined only for one advantage per sequence: they must refuse (B, T) advantages with a clear error."""


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contract_per_token_advantages_accepted(name):
    logp, old_logp, adv, mask = _inputs()
    loss_seq, _ = LOSSES[name](logp, old_logp, adv, mask)
    if name in SEQUENCE_ADVANTAGE_LOSSES:
        with pytest.raises(ValueError, match=r"one advantage per sequence"):
            LOSSES[name](logp, old_logp, adv[:, None].expand_as(logp), mask)
        return
    loss_tok, _ = LOSSES[name](logp, old_logp, adv[:, None].expand_as(logp), mask)
    torch.testing.assert_close(loss_seq, loss_tok)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contract_on_policy_gradient_is_reinforce(name):
    # ρ ≡ 1 (one update per rollout batch): every loss in the family reduces to REINFORCE with baseline,
    # d/d logp of the seq_mean_token_mean aggregate = −A_i / (|y_i| · B) (METHODS.md §0).
    _, _, adv, mask = _inputs()
    logp = (-torch.rand(mask.shape, generator=torch.Generator().manual_seed(3))).requires_grad_()
    loss, _ = LOSSES[name](logp, logp.detach(), adv, mask)
    aggregate(loss, mask, "seq_mean_token_mean").backward()
    expected = -adv[:, None] * mask / (mask.sum(-1, keepdim=True) * mask.shape[0])
    torch.testing.assert_close(logp.grad, expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contract_metrics_have_clip_frac_and_ratio_mean(name):
    logp, old_logp, adv, mask = _inputs()
    _, metrics = LOSSES[name](logp, old_logp, adv, mask)
    assert {"clip_frac", "ratio_mean"} <= set(metrics), sorted(metrics)
    assert not any(k.startswith("loss/") for k in metrics), "metric keys are un-prefixed; the caller adds loss/"


# ---------------------------------------------------------------- registry


def test_get_loss_binds_kwargs():
    fn = get_loss("grpo", eps_high=0.28)
    loss, _ = fn(ONE, torch.zeros(1, 1), torch.ones(1), ONE)
    torch.testing.assert_close(loss, torch.tensor([[-1.28]]))


def test_get_loss_misspelled_kwarg():
    with pytest.raises(ValueError, match=r"eps_hihg.*eps_low.*eps_high"):
        get_loss("grpo", eps_hihg=0.28)


def test_get_loss_positional_param_is_not_a_kwarg():
    with pytest.raises(ValueError, match="mask"):
        get_loss("grpo", mask=ONE)


def test_get_loss_unknown_name():
    with pytest.raises(ValueError, match=r"grpo"):
        get_loss("gpro")


def test_register_twice_fails():
    with pytest.raises(AssertionError, match="registered twice"):
        register_loss("grpo")(grpo)


# ---------------------------------------------------------------- aggregate


def test_aggregate_golden():
    # loss [[1, 2, 3], [4, 0, 0]], mask [[1, 1, 1], [1, 0, 0]]
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token_mean: (1+2+3+4)/4 = 2.5
    torch.testing.assert_close(aggregate(loss, mask, "token_mean"), torch.tensor(2.5))
    torch.testing.assert_close(aggregate(loss, mask, "token_mean", num_tokens=10), torch.tensor(1.0))
    # seq_mean_token_mean: (6/3 + 4/1)/2 = 3
    torch.testing.assert_close(aggregate(loss, mask, "seq_mean_token_mean"), torch.tensor(3.0))
    # seq_mean_token_sum_norm, norm 4: (6/4 + 4/4)/2 = 1.25
    torch.testing.assert_close(aggregate(loss, mask, "seq_mean_token_sum_norm", norm_const=4), torch.tensor(1.25))


def test_aggregate_errors():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(loss, mask, "token-mean")
    with pytest.raises(ValueError, match="norm_const"):
        aggregate(loss, mask, "seq_mean_token_sum_norm")


def test_aggregate_empty_sequence_is_finite():
    loss, mask = torch.ones(2, 3), torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(aggregate(loss, mask, "seq_mean_token_mean"), torch.tensor(0.5))


@pytest.mark.parametrize("how", sorted(AGGREGATIONS))
def test_aggregate_micro_batches_sum_to_full_batch(how):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 7, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.3).float()
    full = aggregate(loss, mask, how, norm_const=7.0)
    kw = dict(num_tokens=mask.sum(), num_seqs=6, norm_const=7.0)  # the full batch's denominators
    parts = sum(aggregate(lo, ma, how, **kw) for lo, ma in zip(loss.split(2), mask.split(2), strict=True))
    torch.testing.assert_close(parts, full)


# ---------------------------------------------------------------- Gate-GRPO


def test_gate_grpo_golden_two_layers():
    # L = 2, one token, A = 1, ε = 0.2. Layer 0: r̂ = e → −min(e, 1.2) = −1.2. Layer 1: r̂ = 0.9 → −0.9.
    # Mean over layers: (−1.2 − 0.9)/2 = −1.05
    set_logp = torch.tensor([1.0, math.log(0.9)]).view(2, 1, 1)
    loss, m = gate_grpo(set_logp, torch.zeros(2, 1, 1), torch.ones(1), ONE)
    torch.testing.assert_close(loss, torch.tensor([[-1.05]]))
    torch.testing.assert_close(m["gate_clip_frac"], torch.tensor(0.5))  # layer 0 clipped, layer 1 not
    torch.testing.assert_close(m["gate_ratio_mean"], torch.tensor((math.e + 0.9) / 2))
    assert set(m) == {"gate_clip_frac", "gate_ratio_mean", "gate_approx_kl"}


def test_gate_grpo_matches_eq5_with_seq_mean_token_mean():
    # Eq. 5: −(1/(L|y|)) Σ_l Σ_t min(...) per sequence, then mean over sequences.
    g = torch.Generator().manual_seed(2)
    L, B, T = 3, 2, 4
    set_logp = torch.randn(L, B, T, generator=g) * 0.3
    old = torch.zeros(L, B, T)
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loss, _ = gate_grpo(set_logp, old, adv, mask)
    got = aggregate(loss, mask, "seq_mean_token_mean")
    ref = 0.0
    for i in range(B):
        n = int(mask[i].sum())
        total = 0.0
        for layer in range(L):
            for t in range(n):
                r = set_logp[layer, i, t].exp()
                total += min(r * adv[i], r.clamp(0.8, 1.2) * adv[i])
        ref += -total / (L * n)
    torch.testing.assert_close(got, torch.as_tensor(ref / B))


def test_gate_grpo_gradient_and_mask():
    set_logp = torch.zeros(2, 2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = gate_grpo(set_logp, set_logp.detach(), torch.tensor([1.0, -1.0]), mask)
    assert loss.shape == (2, 3)
    aggregate(loss, mask, "token_mean").backward()
    assert (set_logp.grad[:, mask == 0] == 0).all()
    # on-policy: d/d set_logp = −A / (L · n_tokens) = −1/(2·3) for sequence 0
    torch.testing.assert_close(set_logp.grad[0, 0, 0], torch.tensor(-1 / 6))


# ---------------------------------------------------------------- router losses


def test_load_balancing_uniform_is_one():
    # E = 4, K = 2, uniform probs 1/4, slots spread evenly: f_e = 1/4, P_e = 1/4 → 4 · 4 · 1/16 = 1
    probs = torch.full((2, 4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]).expand(2, 4, 2)
    torch.testing.assert_close(switch_load_balancing(probs, experts, torch.ones(4)), torch.tensor(1.0))


def test_load_balancing_collapse():
    # E = 4, K = 2, router puts p = 1 on expert 0; the second slot goes to expert 1 (p = 0).
    # f = [1/2, 1/2, 0, 0], P = [1, 0, 0, 0] → 4 · (1/2 · 1) = 2 = E/K  (HF top-K form: E)
    probs = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(3, 4)
    experts = torch.tensor([[0, 1]]).expand(3, 2)
    torch.testing.assert_close(switch_load_balancing(probs, experts, torch.ones(3)), torch.tensor(2.0))


def test_load_balancing_ignores_unrouted_slots_and_masked_tokens():
    # Token 1 is unrouted (-1), token 2 is masked out; both carry junk probs. Only token 0 counts:
    # f = [1/2, 1/2, 0], P = [0.5, 0.3, 0.2] → 3 · (0.25 + 0.15) = 1.2
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    experts = torch.tensor([[0, 1], [-1, -1], [2, 2]])
    got = switch_load_balancing(probs, experts, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor(1.2))


def test_load_balancing_gradient_reaches_probs():
    logits = torch.randn(2, 5, 4, requires_grad=True)
    experts = torch.randint(0, 4, (2, 5, 2))
    switch_load_balancing(torch.softmax(logits, -1), experts, torch.ones(5)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_load_balancing_layer_mean():
    # layer 0 uniform (1.0), layer 1 collapsed (E/K = 2.0) → mean 1.5
    probs = torch.stack([torch.full((2, 4), 0.25), torch.tensor([1.0, 0, 0, 0]).expand(2, 4)])
    experts = torch.stack([torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [0, 1]])])
    torch.testing.assert_close(switch_load_balancing(probs, experts, torch.ones(2)), torch.tensor(1.5))


def test_router_z_loss_golden():
    # zero logits over E = 4: logsumexp = log 4 → (log 4)²; token 1 masked out (its logits are huge)
    logits = torch.zeros(2, 2, 4)
    logits[:, 1] = 100.0
    got = router_z_loss(logits, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor(math.log(4) ** 2))


def test_switch_lb_dense_mixture_uses_soft_dispatch():
    # K = E = 2: every token uses both experts. Mean probabilities P = (0.75, 0.25) over the two tokens, so the soft
    # loss is E * (0.75^2 + 0.25^2) = 2 * 0.625 = 1.25, and its gradient favours the under-used expert.
    from expertrl.losses.routing import switch_load_balancing

    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]], requires_grad=True)  # (N=2, E=2); mean (0.75, 0.25)
    experts = torch.tensor([[0, 1], [1, 0]])  # (N, K=E)
    loss = switch_load_balancing(probs, experts, torch.ones(2), soft_dispatch=True)
    assert torch.isclose(loss, torch.tensor(1.25))
    hard = switch_load_balancing(probs.detach(), experts, torch.ones(2))  # hard f is uniform: no balancing signal
    assert torch.isclose(hard, torch.tensor(1.0))
    loss.backward()
    # d/dP_e of E * sg(P_e) P_e = E * P_e / N per token: (2*0.75/2, 2*0.25/2) = (0.75, 0.25)
    assert torch.allclose(probs.grad, torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    uniform = torch.full((3, 2), 0.5)
    dense = torch.tensor([[0, 1]] * 3)
    assert torch.isclose(switch_load_balancing(uniform, dense, torch.ones(3), soft_dispatch=True), torch.tensor(1.0))
