"""GRPO-family losses (GSPO, GSPO-token, GMPO, SAPO, CISPO, dual-clip GRPO), KL estimators and method presets.

Golden values are worked by hand in the comments; each loss also has a naive reference implementation of the paper's
formula that the per-token form must match after ``aggregate`` (STYLE.md §13-14). The contract tests over every
registry entry live in test_losses.py.
"""

import math

import pytest
import torch

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.losses import LOSSES, get_loss
from expertrl.losses.aggregate import aggregate
from expertrl.losses.cispo import cispo
from expertrl.losses.gmpo import gmpo
from expertrl.losses.grpo import grpo
from expertrl.losses.gspo import gspo, gspo_token
from expertrl.losses.kl import kl_penalty
from expertrl.losses.sapo import sapo
from expertrl.presets import PRESETS, preset_overrides

SEQ_MEAN = "seq_mean_token_mean"


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).requires_grad_()


def _grad(loss, logp, mask, how=SEQ_MEAN):
    aggregate(loss, mask, how).backward()
    return logp.grad


# ---------------------------------------------------------------- GSPO


def test_gspo_clips_sequence_ratio_above_for_positive_advantage():
    # log ρ = [0.2, 0.4] → mean 0.3, s = e^0.3 = 1.3499 > 1 + 0.2; A = 1 → −min(1.3499, 1.2) = −1.2 at both tokens,
    # and the clipped branch is constant: no gradient to either token.
    logp = _leaf([[0.2, 0.4]])
    loss, m = gspo(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2]]))
    assert m["clip_frac"] == 1 and m["clip_frac_high"] == 1
    torch.testing.assert_close(m["ratio_mean"], torch.tensor(math.exp(0.3)))
    assert (_grad(loss, logp, torch.ones(1, 2)) == 0).all()


def test_gspo_clips_sequence_ratio_below_for_negative_advantage():
    # log ρ = [−0.5, −0.3] → s = e^−0.4 = 0.6703 < 0.8; A = −1 → −min(−0.6703, −0.8) = 0.8
    logp = _leaf([[-0.5, -0.3]])
    loss, m = gspo(logp, torch.zeros(1, 2), -torch.ones(1), torch.ones(1, 2), eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.8, 0.8]]))
    assert m["clip_frac_low"] == 1 and m["clip_frac_high"] == 0


def test_gspo_unclipped_both_signs_and_gradient():
    # seq 0: log ρ = [0.1, −0.1] → s = 1, A = 1 → loss −1; gradient −A·s/|y|/B = −1/2/2 = −0.25 per token.
    # seq 1: log ρ = [0.3, 0.3] → s = e^0.3 = 1.3499 > 1.2 but A = −2 → −min(−2.6997, −2.4) = 2.6997 (not clipped:
    #        the min keeps the unclipped branch); gradient −A·s/|y|/B = 2·1.3499/2/2 = 0.6749 per token.
    logp = _leaf([[0.1, -0.1], [0.3, 0.3]])
    mask = torch.ones(2, 2)
    loss, m = gspo(logp, torch.zeros(2, 2), torch.tensor([1.0, -2.0]), mask, eps_low=0.2, eps_high=0.2)
    s1 = math.exp(0.3)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.0], [2 * s1, 2 * s1]]))
    assert m["clip_frac"] == 0
    torch.testing.assert_close(_grad(loss, logp, mask), torch.tensor([[-0.25, -0.25], [s1 / 2, s1 / 2]]))


def test_gspo_masked_token_does_not_enter_the_sequence_ratio():
    # log ρ = [0.2, 0.4, 5.0], third token masked → s = e^0.3 as before; defaults ε = 3e-4/4e-4 clip it at 1.0004.
    logp = _leaf([[0.2, 0.4, 5.0]])
    loss, m = gspo(logp, torch.zeros(1, 3), torch.ones(1), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(loss[:, :2], torch.tensor([[-1.0004, -1.0004]]))
    torch.testing.assert_close(m["ratio_max"], torch.tensor(math.exp(0.3)))


def test_gspo_refuses_per_token_advantages():
    with pytest.raises(ValueError, match="gspo_token"):
        gspo(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))


def test_gspo_token_clips_per_token_by_advantage_sign():
    # s = e^0.3 = 1.3499 (ε = 0.2). Token 0, A = 1: −min(1.3499, 1.2) = −1.2, clipped (no gradient).
    # Token 1, A = −1: −min(−1.3499, −1.2) = 1.3499, unclipped; gradient −A·s/|y| = 1.3499/2 (B = 1).
    logp = _leaf([[0.2, 0.4]])
    mask = torch.ones(1, 2)
    loss, m = gspo_token(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), mask, eps_low=0.2, eps_high=0.2)
    s = math.exp(0.3)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, s]]))
    torch.testing.assert_close(m["clip_frac"], torch.tensor(0.5))
    torch.testing.assert_close(_grad(loss, logp, mask), torch.tensor([[0.0, s / 2]]))


def _random_batch(b=6, t=7, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g)).requires_grad_()
    old_logp = logp.detach() + scale * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[:, 0] = 1  # no empty sequence
    return logp, old_logp, adv, mask


def test_gspo_matches_paper_formula_value_and_gradient():
    # Reference: s_i = exp(masked mean of log ρ) with the gradient flowing through the mean (no sg trick), then
    # J = mean_i min(s_i A_i, clip(s_i) A_i). ε = 0.05 so that some sequences clip and some do not.
    logp, old_logp, adv, mask = _random_batch()
    loss, m = gspo(logp, old_logp, adv, mask, eps_low=0.05, eps_high=0.05)
    got = aggregate(loss, mask, SEQ_MEAN)
    (g_got,) = torch.autograd.grad(got, logp)
    s = torch.exp(((logp - old_logp) * mask).sum(-1) / mask.sum(-1))  # (B,)
    ref = -torch.minimum(s * adv, s.clamp(0.95, 1.05) * adv).mean()
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    assert 0 < m["clip_frac"] < 1


def test_gspo_token_equals_gspo_for_sequence_advantages():
    logp, old_logp, adv, mask = _random_batch(seed=1)
    a, _ = gspo(logp, old_logp, adv, mask, eps_low=0.05, eps_high=0.05)
    b, _ = gspo_token(logp, old_logp, adv[:, None].expand_as(logp), mask, eps_low=0.05, eps_high=0.05)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(aggregate(a, mask, SEQ_MEAN), logp)
    (gb,) = torch.autograd.grad(aggregate(b, mask, SEQ_MEAN), logp)
    torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------- GMPO


def test_gmpo_positive_advantage_clips_high_token():
    # A = 1, ℓ = [0.2, 0.6]: ℓ̃ = min(ℓ, clip(ℓ, −0.4, 0.4)) = [0.2, 0.4] → mean 0.3 → J = e^0.3 = 1.3499;
    # loss −1.3499 at both tokens. Token 1 is clipped (no gradient); token 0: d/dℓ_0 of −e^{mean} = −e^0.3/2.
    logp = _leaf([[0.2, 0.6]])
    mask = torch.ones(1, 2)
    loss, m = gmpo(logp, torch.zeros(1, 2), torch.ones(1), mask)
    e = math.exp(0.3)
    torch.testing.assert_close(loss, torch.tensor([[-e, -e]]))
    torch.testing.assert_close(m["clip_frac"], torch.tensor(0.5))
    assert m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0
    torch.testing.assert_close(m["seq_ratio_mean"], torch.tensor(e))
    torch.testing.assert_close(_grad(loss, logp, mask), torch.tensor([[-e / 2, 0.0]]))


def test_gmpo_negative_advantage_clips_low_token():
    # A = −1, ℓ = [−0.6, 0.2]: ℓ̃ = max(ℓ, clip(ℓ)) = [−0.4, 0.2] → mean −0.1 → J = −e^−0.1 → loss e^−0.1 = 0.9048.
    # Token 0 is clipped; token 1: d/dℓ_1 of e^{mean} = e^−0.1/2 = 0.4524.
    logp = _leaf([[-0.6, 0.2]])
    mask = torch.ones(1, 2)
    loss, m = gmpo(logp, torch.zeros(1, 2), -torch.ones(1), mask)
    e = math.exp(-0.1)
    torch.testing.assert_close(loss, torch.tensor([[e, e]]))
    assert m["clip_frac_low"] == 0.5 and m["clip_frac_high"] == 0
    torch.testing.assert_close(_grad(loss, logp, mask), torch.tensor([[0.0, e / 2]]))


def test_gmpo_unclipped_sides_both_signs():
    # seq 0: A = 1,  ℓ = [−0.6, 0.0]: min(−0.6, −0.4) = −0.6 (a low ratio on a good sample keeps its gradient)
    #        → mean −0.3 → loss −e^−0.3 = −0.7408.
    # seq 1: A = −2, ℓ = [0.6, 0.0]: max(0.6, 0.4) = 0.6 → mean 0.3 → loss −(−2)·e^0.3 = 2.6997.
    logp = _leaf([[-0.6, 0.0], [0.6, 0.0]])
    loss, m = gmpo(logp, torch.zeros(2, 2), torch.tensor([1.0, -2.0]), torch.ones(2, 2))
    torch.testing.assert_close(loss[:, 0], torch.tensor([-math.exp(-0.3), 2 * math.exp(0.3)]))
    assert m["clip_frac"] == 0


def test_gmpo_matches_product_formula():
    # Paper (METHODS §4.5): J_i = sgn(A_i) · (Π_t |min(ρ A_i, clip(ρ, e^−ε, e^ε) A_i)|)^{1/|y_i|}; loss = −mean_i J_i.
    logp, old_logp, adv, mask = _random_batch(seed=2, scale=0.5)
    loss, m = gmpo(logp, old_logp, adv, mask)
    got = aggregate(loss, mask, SEQ_MEAN)
    (g_got,) = torch.autograd.grad(got, logp)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    term = torch.minimum(ratio * a, ratio.clamp(math.exp(-0.4), math.exp(0.4)) * a).abs()  # (B, T)
    geo = torch.exp((term.log() * mask).sum(-1) / mask.sum(-1))  # (B,)
    ref = -(torch.sign(adv) * geo).mean()
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    assert 0 < m["clip_frac"] < 1


def test_gmpo_refuses_per_token_advantages():
    with pytest.raises(ValueError, match="one advantage per sequence"):
        gmpo(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))


# ---------------------------------------------------------------- SAPO


def test_sapo_on_policy_value_and_reinforce_gradient():
    # ρ = 1: f = (4/τ)·σ(0) = 2/τ. A = 1 (τ_pos = 1): loss −2. A = −1 (τ_neg = 1.05): loss 2/1.05 = 1.9048.
    # d loss/d logp = −A·4σ(1 − σ)·ρ = −A·4·¼·1 = −A (w = 1 at ρ = 1, any τ).
    logp = _leaf([[-0.5], [-0.7]])
    mask = torch.ones(2, 1)
    loss, m = sapo(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-2.0], [2 / 1.05]]))
    assert m["clip_frac"] == 0
    torch.testing.assert_close(m["soft_weight_mean"], torch.tensor(1.0))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0], [1.0]]))


def test_sapo_off_policy_soft_gate_both_signs():
    # ρ = 2. A = 1, τ = 1: p = σ(1) = 0.7311, loss −4p = −2.9242; d/dlogp = −4p(1 − p)·ρ = −0.7864·2 = −1.5729.
    # A = −1, τ = 1.05: p = σ(1.05) = 0.7408, loss (4/1.05)p = 2.8220; d/dlogp = +4p(1 − p)·2 = 1.5362.
    logp = _leaf([[math.log(2.0)], [math.log(2.0)]])
    loss, m = sapo(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    p1, p2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-1.05))
    torch.testing.assert_close(loss, torch.tensor([[-4 * p1], [4 / 1.05 * p2]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-8 * p1 * (1 - p1)], [8 * p2 * (1 - p2)]]))
    assert m["clip_frac"] == 0 and m["soft_weight_mean"] < 1


def test_sapo_weight_decays_smoothly_instead_of_clipping():
    # Far off-policy, ρ = e^2 = 7.389, A = 1 (GRPO would clip: gradient 0): p = σ(6.389) = 0.99832,
    # d/dlogp = −4p(1 − p)ρ = −4·0.99832·0.00168·7.389 = −0.0495: small, but not zero.
    logp = _leaf([[2.0]])
    loss, _ = sapo(logp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1))
    loss.sum().backward()
    p = 1 / (1 + math.exp(-(math.exp(2.0) - 1)))
    torch.testing.assert_close(logp.grad, torch.tensor([[-4 * p * (1 - p) * math.exp(2.0)]]))
    assert 0 < -logp.grad.item() < 0.1


# ---------------------------------------------------------------- CISPO


def test_cispo_unclipped_weight_positive_advantage():
    # ρ = e^1 = 2.718 < 1 + 5; A = 1, logp = −0.5: loss = −2.718·1·(−0.5) = 1.3591; d/dlogp = −2.718·A = −2.718.
    logp = _leaf([[-0.5]])
    loss, m = cispo(logp, torch.full((1, 1), -1.5), torch.ones(1), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor([[0.5 * math.e]]))
    assert m["clip_frac"] == 0
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-math.e]]))


def test_cispo_truncated_weight_negative_advantage_keeps_gradient():
    # ρ = e^2 = 7.389 > 6 → weight 6; A = −1, logp = −1: loss = −6·(−1)·(−1) = −6; d/dlogp = −6·A = +6 (not 0: CISPO
    # bounds the weight, it never drops the token).
    logp = _leaf([[-1.0]])
    loss, m = cispo(logp, torch.full((1, 1), -3.0), -torch.ones(1), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor([[-6.0]]))
    assert m["clip_frac"] == 1 and m["clip_frac_high"] == 1
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[6.0]]))


def test_cispo_lower_bound_off_by_default_and_on_when_asked():
    # ρ = e^−3 = 0.0498, A = 1, logp = −4. Default ε_low = 1: bound 0, weight 0.0498, loss −0.0498·(−4) = 0.1991.
    # ε_low = 0.2: weight 0.8 → loss 3.2, clip_frac_low 1.
    logp, old = torch.full((1, 1), -4.0), torch.full((1, 1), -1.0)
    loss, m = cispo(logp, old, torch.ones(1), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor([[4 * math.exp(-3)]]))
    assert m["clip_frac"] == 0
    loss, m = cispo(logp, old, torch.ones(1), torch.ones(1, 1), eps_low=0.2)
    torch.testing.assert_close(loss, torch.tensor([[3.2]]))
    assert m["clip_frac_low"] == 1


# ---------------------------------------------------------------- GRPO dual clip


def test_dual_clip_bounds_negative_advantage_loss():
    # Token 0: ρ = e^2 = 7.389, A = −1: PPO loss −min(−7.389, −1.2) = 7.389 > c·|A| = 3 → 3, no gradient.
    # Token 1: ρ = 2, A = −1: PPO loss 2 < 3 → unchanged, gradient ρ|A| = 2.
    # Token 2: ρ = e^2, A = +1: upper clip → −1.2 (the dual clip only touches A < 0).
    logp = _leaf([[2.0, math.log(2.0), 2.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, m = grpo(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2]]))
    torch.testing.assert_close(m["clip_frac_dual"], torch.tensor(1 / 3))
    torch.testing.assert_close(m["clip_frac"], torch.tensor(2 / 3))  # dual (token 0) + high (token 2)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0, 0.0]]))


def test_dual_clip_off_is_plain_grpo():
    logp, old_logp, adv, mask = _random_batch(seed=3, scale=1.0)
    plain, m_plain = grpo(logp, old_logp, adv, mask)
    huge, m_huge = grpo(logp, old_logp, adv, mask, dual_clip=1e9)
    torch.testing.assert_close(plain, huge)
    assert "clip_frac_dual" not in m_plain and m_huge["clip_frac_dual"] == 0


def test_dual_clip_must_exceed_one():
    with pytest.raises(AssertionError, match="dual_clip must be > 1"):
        grpo(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), dual_clip=0.9)
    get_loss("grpo", dual_clip=3.0)  # binds


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_golden_and_gradient():
    # π_θ = 0.5, π_ref = 0.25: log r = log(π_ref/π_θ) = −log 2.
    # k1 = log 2 = 0.6931; k2 = ½ (log 2)² = 0.2402; k3 = r − log r − 1 = 0.5 + 0.6931 − 1 = 0.1931.
    # d/dlogp: k1 → 1; k2 → −log r = 0.6931; k3 → 1 − r = 0.5.
    ln2 = math.log(2.0)
    expected = {"k1": (ln2, 1.0), "k2": (0.5 * ln2**2, ln2), "k3": (0.5 + ln2 - 1.0, 0.5)}
    for est, (value, grad) in expected.items():
        logp = _leaf([[math.log(0.5)]])
        ref = torch.full((1, 1), math.log(0.25), requires_grad=True)
        kl = kl_penalty(logp, ref, estimator=est)
        kl.sum().backward()
        torch.testing.assert_close(kl, torch.tensor([[value]]))
        torch.testing.assert_close(logp.grad, torch.tensor([[grad]]))
        assert ref.grad is None  # the reference is a constant


def test_kl_k3_is_zero_at_equality_nonnegative_and_finite():
    logp = torch.tensor([[-1.0, -0.1, -50.0]])
    ref = torch.tensor([[-1.0, -3.0, -0.01]])
    kl = kl_penalty(logp, ref)
    assert kl[0, 0] == 0 and (kl >= 0).all() and torch.isfinite(kl).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match=r"k4.*k1.*k2.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), estimator="k4")


# ---------------------------------------------------------------- registry: binding and misspelled kwargs


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("gspo", {"eps_high": 4e-4}, "eps_hihg"),
        ("gspo_token", {"eps_low": 3e-4}, "epsilon_low"),
        ("gmpo", {"eps_low": 0.4}, "epsilon"),
        ("sapo", {"tau_neg": 1.05}, "tau_ng"),
        ("cispo", {"eps_high": 5.0}, "eps_hi"),
        ("grpo", {"dual_clip": 3.0}, "dualclip"),
    ],
)
def test_get_loss_binds_and_rejects_misspelled_kwargs(name, good, bad):
    get_loss(name, **good)
    with pytest.raises(ValueError, match=rf"{bad}.*{next(iter(good))}"):
        get_loss(name, **{bad: 1.0})


def test_family_is_registered():
    assert {"grpo", "gspo", "gspo_token", "gmpo", "sapo", "cispo"} <= set(LOSSES)


# ---------------------------------------------------------------- presets


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_a_valid_train_config(name):
    # stabiliser presets (no loss.name) are combined with a loss preset, as a user would: --preset grpo,r3
    combo = name if "loss.name" in PRESETS[name] else f"grpo,{name}"
    cfg = load_config(TrainConfig, None, preset_overrides(combo))  # unknown keys / bad values raise ConfigError
    for key, value in PRESETS[name].items():
        assert _get(cfg, key) == value, key
    get_loss(cfg.loss.name, **cfg.loss.kwargs)  # the loss exists and takes these kwargs


def test_nonsense_combinations_are_errors():
    from expertrl.config import ConfigError

    with pytest.raises(ConfigError, match="routing.replay"):  # sampled routes exist only in the rollout
        load_config(TrainConfig, None, ["--loss.gate_coef", "0", "--routing.replay", "none"])
    with pytest.raises(ConfigError, match="freeze_router"):
        load_config(TrainConfig, None, ["--routing.freeze_router", "true"])  # Gate-GRPO needs a live router
    with pytest.raises(ConfigError, match="multinomial"):  # Gate-GRPO needs a stochastic router
        load_config(TrainConfig, None, ["--routing.policy", "topk"])


def test_preset_values_match_the_methods():
    assert PRESETS["dapo"]["loss.kwargs"]["eps_high"] == 0.28 and PRESETS["dapo"]["loss.agg"] == "token_mean"
    assert PRESETS["dr_grpo"]["loss.advantage_scale"] == "none"
    assert PRESETS["dr_grpo"]["loss.agg"] == "seq_mean_token_sum_norm"
    assert PRESETS["moe_grpo"]["loss.gate_coef"] == 1.0
    assert PRESETS["rspo"]["loss.name"] == "gmpo"
    # GMPO's broadcast sequence loss is only right under a mean over sequences (losses.gmpo docstring).
    assert all(p["loss.agg"] == SEQ_MEAN for p in PRESETS.values() if p.get("loss.name") in {"gmpo", "gspo"})
    assert PRESETS["rspo"]["rspo.enabled"] and PRESETS["dapo"]["rollout.dynamic_sampling"]


def test_preset_overrides_keep_tiny_floats_floats(monkeypatch):
    # YAML 1.1 reads JSON's "1e-05" as a string; preset_overrides must write something it reads back as 1e-5.
    monkeypatch.setitem(PRESETS, "tiny_eps", {"loss.name": "gspo", "loss.kwargs": {"eps_low": 1e-5}})
    cfg = load_config(TrainConfig, None, preset_overrides("tiny_eps"))
    assert cfg.loss.kwargs == {"eps_low": 1e-5} and isinstance(cfg.loss.kwargs["eps_low"], float)


def test_unknown_preset():
    with pytest.raises(ValueError, match="gspo"):
        preset_overrides("gpso")
