"""Engine/trainer mismatch corrections (``losses.mismatch``: TIS, MIS, IcePop) on golden values, their metrics, and
how the Objective applies them to the token loss at k = pi_train,old / pi_engine."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from expertrl.losses import get_loss
from expertrl.losses.mismatch import icepop_weight, mis_weight, mismatch_metrics, mismatch_weight, tis_weight
from expertrl.models import build_tiny_moe
from expertrl.moe.policies import Multinomial
from expertrl.objective import Denominators, Objective
from expertrl.rollout import generate_rollout
from expertrl.tokenizer import build_char_tokenizer

K = torch.tensor([[0.4, 1.0, 3.0]])  # k = pi_train / pi_engine of three tokens
LOG_K = K.log()


def test_tis_truncates_at_the_cap():
    weight, hit = tis_weight(LOG_K, cap=2.0)
    torch.testing.assert_close(weight, torch.tensor([[0.4, 1.0, 2.0]]))
    assert hit.tolist() == [[False, False, True]]


def test_mis_drops_tokens_above_the_cap():
    weight, dropped = mis_weight(LOG_K, cap=2.0)
    torch.testing.assert_close(weight, torch.tensor([[0.4, 1.0, 0.0]]))
    assert dropped.tolist() == [[False, False, True]]


def test_icepop_drops_tokens_outside_the_band():
    weight, dropped = icepop_weight(LOG_K, low=0.5, high=5.0)
    torch.testing.assert_close(weight, torch.tensor([[0.0, 1.0, 3.0]]))
    assert dropped.tolist() == [[True, False, False]]
    weight, _ = icepop_weight(LOG_K, low=0.3, high=2.5)
    torch.testing.assert_close(weight, torch.tensor([[0.4, 1.0, 0.0]]))


def test_mismatch_weight_is_detached_and_its_metrics_are_masked():
    train = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    engine = train.detach() - LOG_K  # so that train - engine = log k
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weight, metrics = mismatch_weight("tis", train, engine, mask, cap=2.0)
    assert not weight.requires_grad
    torch.testing.assert_close(weight, torch.tensor([[0.4, 1.0, 2.0]]))
    assert metrics["mismatch_weight_mean"].item() == pytest.approx(0.7)  # the third token is masked
    assert metrics["mismatch_frac"].item() == 0.0
    _, metrics = mismatch_weight("icepop", train, engine, mask)
    assert metrics["mismatch_frac"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown mismatch correction 'pis'.*tis"):
        mismatch_weight("pis", train, engine, mask)


def test_mismatch_metrics_golden():
    train = torch.tensor([[0.5, 0.25, 0.1, 0.9]]).log()
    engine = torch.tensor([[0.5, 0.2, 0.3, 0.1]]).log()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    m = mismatch_metrics(train, engine, mask)
    diffs = [0.0, math.log(1.25), math.log(3.0)]
    assert m["logp_diff"].item() == pytest.approx(sum(diffs) / 3, rel=1e-6)
    assert m["logp_diff_max"].item() == pytest.approx(math.log(3.0), rel=1e-6)
    expected = np.corrcoef([0.5, 0.25, 0.1], [0.5, 0.2, 0.3])[0, 1]
    assert m["prob_corr"].item() == pytest.approx(expected, rel=1e-5)
    same = mismatch_metrics(train, train, mask)
    assert same["logp_diff"].item() == 0.0 and same["prob_corr"].item() == pytest.approx(1.0)
    one = mismatch_metrics(train, engine, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert one["prob_corr"].item() == 1.0  # nothing to correlate


@pytest.fixture(scope="module")
def model_and_rollout():
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    rollout = generate_rollout(
        model, build_char_tokenizer(), [{"prompt": "12+3="}, {"prompt": "ab"}], group_size=2, max_new_tokens=4,
        policy=Multinomial(), generator=torch.Generator().manual_seed(0), old_routing=None,
    )  # fmt: skip
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return model, dataclasses.replace(rollout, advantages=advantages)


@pytest.mark.parametrize("kind", ["tis", "mis", "icepop"])
def test_objective_weights_the_token_loss_by_the_correction(model_and_rollout, kind):
    """At the first update rho = 1, so the GRPO token loss of each token is -A; the correction multiplies it by
    w(k) with k = exp(old_logp - sample_logp). The hf engine's own log-probs give k = 1 up to float round-off."""
    model, r = model_and_rollout
    shift = torch.zeros_like(r.sample_logp)
    shift[:, 0] = torch.tensor([math.log(3.0), -math.log(3.0), 0.0, math.log(1.5)])  # k = 3, 1/3, 1, 1.5
    micro = dataclasses.replace(r, sample_logp=r.sample_logp - shift)
    base = Objective(token_loss=get_loss("grpo"), agg="seq_mean_token_mean")
    corrected = dataclasses.replace(base, mismatch=kind, mismatch_cap=2.0, icepop_low=0.5, icepop_high=5.0)
    out = corrected(model, micro, Denominators(num_seqs=r.batch_size), first_update=True)
    plain = base(model, r, Denominators(num_seqs=r.batch_size), first_update=True)
    assert plain.metrics["rollout/engine_logp_diff"].item() < 1e-5  # hf engine vs trainer at the same weights
    k = (out.behaviour.logp.detach() - micro.sample_logp).exp()
    w = {"tis": k.clamp(max=2.0), "mis": k * (k <= 2.0), "icepop": k * ((k >= 0.5) & (k <= 5.0))}[kind]
    m = r.mask
    expected = ((-r.advantages[:, None] * w * m).sum(-1) / m.sum(-1)).mean()
    torch.testing.assert_close(out.metrics["loss/token"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.metrics["loss/mismatch_weight_mean"], (w * m).sum() / m.sum())
    assert out.metrics["rollout/engine_logp_diff_max"].item() == pytest.approx(math.log(3.0), abs=1e-4)


def test_a_correction_needs_the_engines_log_probs(model_and_rollout):
    model, r = model_and_rollout
    objective = Objective(token_loss=get_loss("grpo"), mismatch="tis")
    with pytest.raises(ValueError, match="loss.mismatch=tis needs the rollout engine's token log-probs"):
        objective(model, dataclasses.replace(r, sample_logp=None), Denominators(r.batch_size), first_update=True)
    with pytest.raises(ValueError, match="unknown mismatch correction"):
        Objective(token_loss=get_loss("grpo"), mismatch="cap")
