"""A prompt shared by several rows is computed once (``policy.shared_prompt_forward``, ``share_prompts``): the loss,
every metric, every gradient and the old policy equal the forward over every row to float rounding, for every
family and for live top-K routing (GRPO), a replayed first forward (R2), replayed top-K rollouts (R3), the z-loss and
Gate-GRPO over prompt tokens; under sampled routes (MoE-GRPO) no row shares its prompt routes, so nothing is shared."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.families import TINY_MOE
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.policies import make_policy
from expertrl.objective import BehaviourStore, Denominators
from expertrl.policy import distinct_prompts, policy_forward, with_old_policy
from expertrl.presets import preset_overrides
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for, sampling_of
from expertrl.types import RoutingTrace

ITEMS = [{"prompt": p, "answer": "0"} for p in ("12+3=", "7+70=", "5=")]  # different widths: left padding


def _rollout(model, tokenizer, cfg, group_size=3, policy=None):
    torch.manual_seed(0)
    batch = generate_rollout(
        model, tokenizer, ITEMS, group_size=group_size, max_new_tokens=5,
        policy=make_policy(policy or cfg.routing.policy), sampling=sampling_of(cfg),
        generator=torch.Generator().manual_seed(0), old_routing=None,
    )  # fmt: skip
    batch.advantages = torch.randn(batch.batch_size, generator=torch.Generator().manual_seed(1))
    return batch


def _close(a, b, what, tol=2e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


def test_distinct_prompts_golden():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 5, 6], [0, 5, 6], [7, 5, 6]])
    att = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])
    rows, inverse = distinct_prompts(ids, att, 3)
    assert rows.tolist() == [0, 2] and inverse.tolist() == [0, 0, 1, 0, 1]
    experts = torch.zeros(1, 5, 4, 1, dtype=torch.int16)
    experts[0, 3, 1] = 2  # row 3 routed its prompt differently: not the same computation
    experts[0, 4, 3] = 1  # row 4 differs after the prompt only: still shares
    trace = RoutingTrace(experts, torch.zeros(1, 5, 4), (0,), 4)
    rows, inverse = distinct_prompts(ids, att, 3, trace, None)
    assert rows.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2, 1]


@pytest.mark.parametrize("family", TINY_MOE)
def test_policy_forward_shares_prompts_on_every_family(family, tokenizer):
    cfg = load_config(TrainConfig, None, [*tiny_args(), *preset_overrides("grpo"), "--routing.temperature", "1.0"])
    model = build_tiny_moe(family, "tiny").eval()  # routing temperature 1: DeepSeek-V3's sigmoid router has no other
    batch = _rollout(model, tokenizer, cfg)
    for routes in (None, batch.routing):  # live top-K, and a replay of the rollout's top-K routes
        outs = []
        for share in (False, True):
            model.zero_grad(set_to_none=True)
            out = policy_forward(model, batch, routes, keep_probs=True, keep_logits=True, share_prompts=share)
            (out.logp.sum() + out.set_logp.sum() + out.probs.square().sum() + out.logits.square().sum()).backward()
            outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (full, full_grads), (shared, shared_grads) = outs
        for name in ("logp", "set_logp", "router_logp", "probs", "logits"):
            _close(getattr(shared, name), getattr(full, name), name)
        assert torch.equal(shared.routing.experts, full.routing.experts)
        assert set(shared_grads) == set(full_grads)
        for name, grad in full_grads.items():
            _close(shared_grads[name], grad, name, tol=1e-5)


def test_sampled_prompt_routes_are_not_shared(tokenizer):
    cfg = load_config(TrainConfig, None, tiny_args())  # MoE-GRPO: experts sampled per row, prompt positions too
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    batch = _rollout(model, tokenizer, cfg)
    rows, _ = distinct_prompts(batch.input_ids, batch.attention_mask, batch.prompt_width, batch.routing)
    assert len(rows) == batch.batch_size
    top = _rollout(model, tokenizer, load_config(TrainConfig, None, [*tiny_args(), *preset_overrides("grpo")]))
    rows, inverse = distinct_prompts(top.input_ids, top.attention_mask, top.prompt_width, top.routing)
    assert len(rows) == len(ITEMS) and inverse.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _objective_run(objective, model, micro, dens, first):
    model.zero_grad(set_to_none=True)
    out = objective(model, micro, dens, first_update=first)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("grpo", []),
        ("rspo", ["--loss.z_coef", "0.001"]),
        ("grpo,r2", []),
        ("grpo,r3", []),
        ("moe_grpo", ["--loss.gate_tokens", "all"]),  # Gate-GRPO over prompt tokens, replaying a top-K rollout
        ("dapo", ["--loss.kl_coef", "0.1"]),
    ],
)
def test_the_objective_is_unchanged_by_sharing(preset, extra, tokenizer):
    results = {}
    for share in (False, True):
        args = [*tiny_args(), *preset_overrides(preset), *extra, "--share_prompts", str(share).lower()]
        cfg = load_config(TrainConfig, None, args)
        model = build_tiny_moe("qwen3_moe", "tiny").eval()
        objective = objective_for(cfg, find_routers(model))
        assert objective.share_prompts is share
        batch = _rollout(model, tokenizer, cfg, policy="topk")  # groups share their prompt routes
        if cfg.loss.kl_coef > 0:
            batch.ref_logp = policy_forward(model, batch, None, share_prompts=share).logp.detach() - 0.01
        dens = Denominators(num_seqs=float(batch.batch_size), num_tokens=batch.mask.sum())
        first = _objective_run(objective, model, batch, dens, True)
        store = BehaviourStore(batch.batch_size, batch.input_ids.shape[1], batch.completion_width)
        store.store(torch.arange(batch.batch_size), first[0].behaviour)
        later = _objective_run(objective, model, with_old_policy(batch, store.behaviour()), dens, False)
        results[share] = (first, later)
    for (full, full_grads), (shared, shared_grads) in zip(results[False], results[True]):
        _close(shared.loss, full.loss, "loss")
        assert set(shared.metrics) == set(full.metrics)
        for key in full.metrics:
            _close(shared.metrics[key], full.metrics[key], key)
        for name in full_grads:
            _close(shared_grads[name], full_grads[name], name, tol=1e-5)


def test_a_batch_without_shared_prompts_takes_the_plain_path(tiny_moe, tokenizer):
    cfg = load_config(TrainConfig, None, [*tiny_args(), *preset_overrides("grpo")])
    batch = _rollout(tiny_moe, tokenizer, cfg, group_size=1)
    calls = []
    grouped = _rollout(tiny_moe, tokenizer, cfg)
    handle = tiny_moe.register_forward_pre_hook(lambda m, a: calls.append(1))
    policy_forward(tiny_moe, batch, None, share_prompts=True)
    policy_forward(tiny_moe, grouped, None, share_prompts=True)
    handle.remove()
    assert len(calls) == 3  # one forward without sharing, two (prompts, then completions) with
