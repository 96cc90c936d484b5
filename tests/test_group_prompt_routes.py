"""``routing.prompt_routes=group``: a group's G rollouts share one draw of the prompt's sampled routes (one seed per
group at prompt positions, ``gumbel.RouteSeeds``), so generation prefills each distinct prompt once and every
training forward computes it once (``policy.shared_prompt_forward``). Tested end to end on real (tiny) models at
non-default settings: the routes are the float64 Gumbel-top-k draws of the group seed from the router's own logits,
sharing changes no token, route or log-prob, a trained step equals the unshared one, and the completion routes
still differ between a group's rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import load_config
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.gumbel import gumbel_noise, row_seeds
from expertrl.moe.policies import Multinomial, NoisyTopK, TopK
from expertrl.objective import Denominators
from expertrl.policy import distinct_prompts, policy_forward, position_ids_from_mask
from expertrl.presets import preset_overrides
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for
from expertrl.types import Sampling

ITEMS = [{"prompt": p, "answer": "0"} for p in ("12+3=", "7+70=", "5=", "12+3=")]  # widths differ; a repeat
G = 3


def _seeds(n_items: int, group_size: int = G) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(n_items * group_size)
    return row_seeds(11, rows), row_seeds(22, rows // group_size)  # completion seeds per row, prompt seeds per group


def _rollout(model, tokenizer, *, share: bool, policy=None, temperature=0.7, prompt_seeds=True, **kw):
    seeds, groups = _seeds(len(ITEMS))
    return generate_rollout(
        model, tokenizer, ITEMS, group_size=G, max_new_tokens=5, policy=policy or Multinomial(),
        sampling=Sampling(routing_temperature=temperature, **kw), old_routing=None, routes="experts",
        route_seeds=seeds, prompt_route_seeds=groups if prompt_seeds else None, share_prompts=share,
    )  # fmt: skip


SHAPES = [  # (family, preset, E, K): the tiny shape, K = 1, K = E, a real router shape (OLMoE: E 64, K 8)
    ("qwen3_moe", "tiny", None, None),
    ("qwen3_moe", "tiny", 4, 1),
    ("qwen3_moe", "tiny", 4, 4),
    ("olmoe", "olmoe-shape", None, None),
]


@pytest.mark.parametrize("family, preset, E, K", SHAPES)
def test_group_prompt_routes_are_the_group_seeds_draws_and_sharing_changes_nothing(family, preset, E, K, tokenizer):
    model = build_tiny_moe(family, preset, num_experts=E, top_k=K).eval()
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    shared = _rollout(model, tokenizer, share=True)
    handle.remove()
    plain = _rollout(model, tokenizer, share=False)
    B, P = shared.batch_size, shared.prompt_width
    # generation computed each distinct (prompt, seed) once: 4 groups (the repeated prompt has its own seed)
    assert seen[0] == (len(ITEMS), P - 1) and seen[1] == (B, 1)
    assert torch.equal(shared.input_ids, plain.input_ids)
    assert torch.equal(shared.routing.experts, plain.routing.experts)
    torch.testing.assert_close(shared.sample_logp, plain.sample_logp, rtol=0, atol=1e-6)
    # the prompt routes: one draw per group, and the float64 Gumbel-top-k of the group seed on the router's logits
    fwd = policy_forward(model, shared, shared.routing, keep_logits=True)
    T = shared.sampling.routing_temperature
    scores = torch.log_softmax(fwd.logits.double() / T, dim=-1)  # (L, B, S, E)
    pos = position_ids_from_mask(shared.attention_mask)  # (B, S)
    _, groups = _seeds(len(ITEMS))
    completion_seeds, _ = _seeds(len(ITEMS))
    K_ = shared.routing.experts.shape[-1]
    for b in range(B):
        for s in range(shared.input_ids.shape[1] - 1):
            if not shared.attention_mask[b, s]:
                continue
            seed = groups[b] if s < P - 1 else completion_seeds[b]  # P-1 predicts the first token: per row
            noise = gumbel_noise(seed.view(1), pos[b, s].view(1), scores.shape[0], scores.shape[-1])[0]  # (L, E)
            want = (scores[:, b, s] + noise).topk(K_, dim=-1).indices  # (L, K) draw order
            assert torch.equal(shared.routing.experts[:, b, s].long(), want), (b, s)
    prompt = shared.routing.experts[:, :, : P - 1].unflatten(1, (len(ITEMS), G))  # (L, prompts, G, P-1, K)
    assert (prompt == prompt[:, :, :1]).all()  # a group's rows share the draw
    assert not torch.equal(prompt[:, 0, 0], prompt[:, 3, 0]) or K_ == scores.shape[-1]  # same prompt, other group
    completion = shared.routing.experts[:, :, P - 1 : -1].unflatten(1, (len(ITEMS), G))  # P-1: the first token's
    if K_ < scores.shape[-1]:
        assert (completion[:, :, :, 0] != completion[:, :, :1, 0]).any()  # the first token's routes draw per row
        assert (completion != completion[:, :, :1]).any()  # completions still draw per row


def test_row_prompt_routes_draw_per_row_and_share_nothing(tokenizer):
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    r = _rollout(model, tokenizer, share=True, prompt_seeds=False)
    handle.remove()
    assert seen[0] == (r.batch_size, r.prompt_width)  # no shared prefill: every row's own prefill
    rows, _ = distinct_prompts(r.input_ids, r.attention_mask, r.prompt_width, r.routing)
    assert len(rows) == r.batch_size


def test_noisy_top_k_shares_group_prompt_routes_too(tokenizer):
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    r = _rollout(model, tokenizer, share=True, policy=NoisyTopK(noise_std=0.5))
    prompt = r.routing.experts[:, :, : r.prompt_width - 1].unflatten(1, (len(ITEMS), G))
    assert (prompt == prompt[:, :, :1]).all()
    assert torch.equal(r.input_ids, _rollout(model, tokenizer, share=False, policy=NoisyTopK(noise_std=0.5)).input_ids)


def _step(cfg, model, batch):
    objective = objective_for(cfg, find_routers(model))
    model.zero_grad(set_to_none=True)
    dens = Denominators(num_seqs=float(batch.batch_size), num_tokens=batch.mask.sum())
    out = objective(model, batch, dens, first_update=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_moe_grpo_update_on_group_routes_equals_the_unshared_one(tokenizer):
    """The trainer's first update (old policy = its own forward) with sampled tokens at T = 0.8, routing T = 0.7 and
    Switch LB: loss, every metric and every gradient equal the forward over every row, which it no longer runs."""
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    batch = _rollout(model, tokenizer, share=True, do_sample=True, token_temperature=0.8)
    batch.advantages = torch.randn(batch.batch_size, generator=torch.Generator().manual_seed(1))
    results, rows = {}, {}
    for share in (False, True):
        args = [*tiny_args(), "--routing.prompt_routes", "group", "--share_prompts", str(share).lower()]
        rows[share] = seen = []
        handle = model.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)  # fmt: skip
        results[share] = _step(load_config(TrainConfig, None, args), model, batch)
        handle.remove()
    assert rows == {False: [batch.batch_size], True: [len(ITEMS), batch.batch_size]}  # the prompt once per group
    (full, full_grads), (shared, shared_grads) = results[False], results[True]
    torch.testing.assert_close(shared.loss, full.loss, rtol=2e-6, atol=2e-6)
    for key in full.metrics:
        torch.testing.assert_close(shared.metrics[key], full.metrics[key], rtol=2e-6, atol=2e-6, msg=key)
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert shared.metrics["loss/gate_ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)


def test_group_prompt_routes_refuse_gate_grpo_over_prompt_tokens():
    args = [*tiny_args(), "--routing.prompt_routes", "group", "--loss.gate_tokens", "all"]
    with pytest.raises(ConfigError, match=r"routing\.prompt_routes.*gate_tokens=completion"):
        load_config(TrainConfig, None, args).check_combination()
    load_config(TrainConfig, None, [*args, "--loss.gate_coef", "0"])  # no Gate-GRPO: nothing to credit
    for preset in ("grpo", "moe_grpo"):  # top-K ignores it; MoE-GRPO over completion tokens takes it
        load_config(TrainConfig, None, [*tiny_args(), *preset_overrides(preset), "--routing.prompt_routes", "group"])


def test_a_training_run_with_group_prompt_routes(tmp_path, monkeypatch):
    """The trainer end to end (routing T = 0.7, sampled tokens at T = 0.9): its rollouts carry one prompt draw per
    group, the first update's ratios are 1, and the run finishes with finite metrics."""
    import json

    import expertrl.collect as collect
    from expertrl.train import train

    seen = []
    generate = collect.generate_rollout

    def recording(*args, **kwargs):
        seen.append(generate(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(collect, "generate_rollout", recording)
    args = tiny_args(**{"sft.steps": 0, "routing.prompt_routes": "group", "routing.temperature": 0.7,
                        "rollout.do_sample": True, "rollout.temperature": 0.9, "inner_updates": 1})  # fmt: skip
    cfg = load_config(TrainConfig, None, [*args, "--output_dir", str(tmp_path / "run")])
    train(cfg)
    G_ = cfg.rollout.group_size
    assert len(seen) == cfg.steps
    for r in seen:
        prompt = r.routing.experts[:, :, : r.prompt_width - 1].unflatten(1, (-1, G_))
        assert (prompt == prompt[:, :, :1]).all()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == cfg.steps
    for s in steps:  # one update per rollout: the old policy is the update's own forward
        assert s["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert s["loss/gate_ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_without_a_shared_prefill_the_group_draws_are_the_same(tokenizer):
    """Kept routing probabilities (RO-GRPO's rewards) route every row's whole prompt under ``route`` (no shared
    prefill): the group seeds still give the same draws as the shared prefill."""
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    shared = _rollout(model, tokenizer, share=True)
    seeds, groups = _seeds(len(ITEMS))
    kept = generate_rollout(
        model, tokenizer, ITEMS, group_size=G, max_new_tokens=5, policy=Multinomial(),
        sampling=Sampling(routing_temperature=0.7), old_routing=None, routes="experts", keep_probs=True,
        route_seeds=seeds, prompt_route_seeds=groups,
    )  # fmt: skip
    assert kept.route_probs is not None
    assert torch.equal(kept.input_ids, shared.input_ids)
    assert torch.equal(kept.routing.experts, shared.routing.experts)


@pytest.mark.parametrize("prompts", [("5", "12+3="), ("5", "7")])  # a one-token prompt beside longer ones; P == 1
@pytest.mark.parametrize("sampled", [False, True])
def test_one_token_prompts_share_nothing_wrongly(prompts, sampled, tokenizer):
    """A one-token prompt is all padding in the shared positions 0..P-2 (or there are none: P == 1): the rollout and
    every forward output equal the unshared ones, and stay finite."""
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    items = [{"prompt": p, "answer": "0"} for p in prompts]
    rows = torch.arange(len(items) * G)
    kw = dict(route_seeds=row_seeds(1, rows), prompt_route_seeds=row_seeds(2, rows // G)) if sampled else {}
    policy = Multinomial() if sampled else TopK()
    out = {}
    for share in (False, True):
        r = generate_rollout(
            model, tokenizer, items, group_size=G, max_new_tokens=4, policy=policy,
            sampling=Sampling(routing_temperature=0.7), old_routing=None, routes="experts", share_prompts=share, **kw,
        )  # fmt: skip
        out[share] = (r, policy_forward(model, r, r.routing if sampled else None, keep_probs=True, share_prompts=share))
    (a, fa), (b, fb) = out[False], out[True]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.routing.experts, b.routing.experts)
    for name in ("logp", "set_logp", "probs"):
        assert torch.isfinite(getattr(fb, name)).all(), name
        torch.testing.assert_close(getattr(fb, name), getattr(fa, name), rtol=2e-6, atol=2e-6, msg=name)
