"""Padding: a micro-batch is trimmed to its longest row (``Rollout.trimmed``) before its forward, and nothing a loss
reads changes: loss, every metric, every gradient and the old policy the first update keeps (``BehaviourStore`` pads
it back to the batch's widths) equal the untrimmed micro-batch's, at the first and at a later inner update, for the
default MoE-GRPO job, RSPO (live routing), GRPO + R2 and DAPO (token mean)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.policies import make_policy
from expertrl.objective import BehaviourStore, Denominators
from expertrl.policy import with_old_policy
from expertrl.presets import preset_overrides
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for, sampling_of
from expertrl.tokenizer import PAD_ID
from expertrl.types import UNROUTED

LENGTHS = [1, 4, 2, 3, 4, 1]  # completion lengths < C = 6: the longest row ends two columns early


def _ragged_batch(cfg, model, tokenizer):
    items = [{"prompt": p, "answer": "0"} for p in ("12+3=", "7+70=", "5=")]
    torch.manual_seed(0)
    batch = generate_rollout(
        model, tokenizer, items, group_size=2, max_new_tokens=6, policy=make_policy(cfg.routing.policy),
        sampling=sampling_of(cfg), generator=torch.Generator().manual_seed(0), old_routing=None,
    )  # fmt: skip
    P, C = batch.prompt_width, batch.completion_width
    assert C == 6 and max(LENGTHS) < C
    for row, n in enumerate(LENGTHS):  # as if row had stopped after n tokens: EOS-padded, unattended, unmasked
        batch.input_ids[row, P + n :] = PAD_ID
        batch.attention_mask[row, P + n :] = 0
        batch.mask[row, n:] = 0
    batch.advantages = torch.randn(batch.batch_size, generator=torch.Generator().manual_seed(1))
    return batch


def _run(objective, model, micro, dens, first):
    model.zero_grad(set_to_none=True)
    out = objective(model, micro, dens, first_update=first)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-6, atol=1e-7)
    assert set(out_a.metrics) == set(out_b.metrics)
    for key in out_a.metrics:
        torch.testing.assert_close(out_a.metrics[key], out_b.metrics[key], rtol=1e-6, atol=1e-6, msg=key)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("preset", ["moe_grpo", "rspo", "grpo,r2", "dapo"])
def test_a_trimmed_micro_batch_scores_exactly_like_the_padded_one(preset, tokenizer):
    cfg = load_config(TrainConfig, None, [*tiny_args(), *preset_overrides(preset), "--loss.lb_coef", "0.01"])
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    objective = objective_for(cfg, find_routers(model))
    batch = _ragged_batch(cfg, model, tokenizer)
    trimmed = batch.trimmed()
    assert trimmed.completion_width == max(LENGTHS) and trimmed.input_ids.shape[1] == batch.prompt_width + 4
    dens = Denominators(num_seqs=float(batch.batch_size), num_tokens=batch.mask.sum())
    rows = torch.arange(batch.batch_size)

    stores = []
    for micro in (batch, trimmed):  # first update: the forward that defines the old policy
        stores.append(BehaviourStore(batch.batch_size, batch.input_ids.shape[1], batch.completion_width))
        result = _run(objective, model, micro, dens, first=True)
        stores[-1].store(rows, result[0].behaviour)
        if micro is batch:
            full = result
        else:
            _same(full, result)
    old_full, old_trim = (s.behaviour() for s in stores)
    m = batch.mask.bool()
    torch.testing.assert_close(old_full.logp[m], old_trim.logp[m], rtol=0, atol=1e-6)
    assert old_trim.logp.shape == old_full.logp.shape and old_trim.routing.shape == old_full.routing.shape
    assert (old_trim.routing.experts[:, :, batch.prompt_width + 4 :] == UNROUTED).all()  # padded back

    later = [with_old_policy(batch, old_full), with_old_policy(batch, old_trim).trimmed()]
    _same(_run(objective, model, later[0], dens, first=False), _run(objective, model, later[1], dens, first=False))


def test_a_batch_with_a_full_length_row_is_not_copied(tokenizer):
    cfg = load_config(TrainConfig, None, tiny_args())
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    batch = _ragged_batch(cfg, model, tokenizer)
    full = batch.index_batch(torch.arange(batch.batch_size))
    full.attention_mask[0, full.prompt_width :] = 1  # row 0 runs to the last column
    assert full.trimmed() is full
