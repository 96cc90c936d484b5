"""Activation checkpointing inside ``route``: gradients equal those without it (to 1e-6; here bit for bit) on every
family, the recompute records nothing and draws nothing, and the memory held for backward is smaller.

Memory is measured two ways: the bytes of the tensors autograd saves outside the checkpointed regions (a
``saved_tensors_hooks`` probe, deterministic: exactly what checkpointing removes), and the peak resident set size of a
forked child running one forward + backward (``/proc/self/status`` VmHWM after a reset, in
``test_peak_rss_is_lower_with_checkpointing``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.families import TINY_MOE
from expertrl.models import build_tiny_dense, build_tiny_moe
from expertrl.moe import recompute
from expertrl.moe.adapters import find_routers
from expertrl.moe.guidance import GuidanceMask
from expertrl.moe.hooks import route
from expertrl.moe.lora_moe import attach_lora_moe
from expertrl.moe.policies import ExpertChoice, Multinomial, NoisyTopK, TopK, replay_policy_for
from expertrl.moe.recompute import checkpointing_layers
from expertrl.objective import Denominators
from expertrl.ops import token_logp
from expertrl.policy import with_old_policy
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for
from expertrl.tokenizer import build_char_tokenizer
from expertrl.train import train
from expertrl.vlm_models import build_tiny_vlm

FAMILIES = [*TINY_MOE, "qwen3_vl_moe", "lora_moe"]  # every MoE family, the VLM's text decoder, LoRA-MoE on Qwen3
IDS = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(0))  # (B, S)
B = IDS.shape[0]


def _model(family: str):
    """A tiny model of ``family`` at non-default E and K."""
    if family == "qwen3_vl_moe":
        return build_tiny_vlm(0)[0]
    if family == "lora_moe":
        return attach_lora_moe(build_tiny_dense("qwen3", "tiny"), num_experts=5, top_k=2, seed=0).eval()
    return build_tiny_moe(family, "tiny", num_experts=6, top_k=3).eval()


def _checkpointed(model):
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointing_layers(model)
    return model


def _loss_and_grads(model, policy, **route_kwargs):
    """A loss touching everything a router feeds: token log-probs, set log-probs (Gate-GRPO), probabilities (load
    balancing) and raw logits (z-loss). Returns (grads by name, recorder)."""
    model.zero_grad(set_to_none=True)
    with route(model, policy, keep_probs=True, keep_logits=True, **route_kwargs) as rec:
        logits = model(input_ids=IDS, use_cache=False).logits  # (B, S, V)
    loss = -token_logp(logits[:, :-1].float(), IDS[:, 1:]).mean() + (logits.float() ** 2).mean()
    if rec.sites:
        set_lp = rec.set_logp(B)
        loss = loss - set_lp.mean() + rec.probs(B).pow(2).sum() + rec.logits(B).float().pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, rec


def _assert_same(g0: dict, g1: dict, tol: float = 1e-6) -> None:
    assert g0.keys() == g1.keys() and g0
    worst = max((g0[n] - g1[n]).abs().max().item() for n in g0)
    assert worst <= tol, worst


def _sampled_trace(model, family: str):
    """Routes as a MoE-GRPO rollout samples them (top-K on DeepSeek-V3's sigmoid router: R3)."""
    policy = TopK() if family == "deepseek_v3" else Multinomial()
    with torch.no_grad(), route(model, policy, generator=torch.Generator().manual_seed(1)) as rec:
        model(input_ids=IDS, use_cache=False)
    return rec.trace(B)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_routes_give_the_same_gradients_with_checkpointing(family):
    model = _model(family)
    trace = _sampled_trace(model, family)
    g0, rec0 = _loss_and_grads(model, replay_policy_for(trace))
    g1, rec1 = _loss_and_grads(_checkpointed(model), replay_policy_for(trace))
    _assert_same(g0, g1)
    assert [len(c) for c in rec1.experts] == [len(c) for c in rec0.experts] == [1] * len(rec0.sites)  # once each
    assert torch.equal(rec1.trace(B).experts, trace.experts)


@pytest.mark.parametrize(
    "policy", [Multinomial(), NoisyTopK(noise_std=0.5), ExpertChoice(capacity_factor=1.5)], ids=str
)
def test_live_sampled_routes_are_replayed_in_the_recompute_never_redrawn(policy):
    """SFT with a stochastic (or non-causal) policy routes live in a training forward: the recompute must reuse the
    forward's draws. Same seed, same draws in the forward; the generator is not touched again by the backward."""
    model = build_tiny_moe("olmoe", "tiny", num_experts=8, top_k=2).eval()
    runs = []
    for m in (model, _checkpointed(model)):
        gen = torch.Generator().manual_seed(3)
        grads, rec = _loss_and_grads(m, policy, generator=gen)
        runs.append((grads, rec.trace(B).experts, gen.get_state()))
    _assert_same(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


def test_a_stateful_expert_mask_and_scored_experts_survive_the_recompute():
    """Guidance masks keep a per-layer cursor, and live top-K scores an older trace's experts (RSPO without replay):
    the recompute reuses the forward's mask rows and records no second score."""
    model = build_tiny_moe("qwen2_moe", "tiny", num_experts=6, top_k=2).eval()
    L, E = len(find_routers(model)), 6
    allowed = torch.ones(L, 2, E, dtype=torch.bool)
    allowed[:, 1, :2] = False  # group 1 may not use experts 0 and 1
    groups = (torch.arange(IDS.shape[1]) >= 4).long().expand(B, -1)  # (B, S) positions 4.. are group 1
    old = _sampled_trace(model, "qwen2_moe")
    runs = []
    for m in (model, _checkpointed(model)):
        mask = GuidanceMask(allowed, groups)
        score = old.experts.flatten(1, 2)  # (L, B*S, K)
        grads, rec = _loss_and_grads(m, Multinomial(), generator=torch.Generator().manual_seed(2), allowed=mask,
                                     score_experts=score)  # fmt: skip
        assert mask.positions == (IDS.shape[1],) * L  # each position routed once
        assert [len(c) for c in rec.scored_logp] == [1] * L
        runs.append((grads, rec.trace(B).experts, rec.scored(B)))
    _assert_same(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    assert not (runs[1][1][:, :, 4:].long() < 2).any()  # the mask held in the forward


def test_deepseek_native_topk_is_rerun_and_matches_in_the_recompute():
    model = build_tiny_moe("deepseek_v3", "tiny", num_experts=6, top_k=2).eval()
    g0, _ = _loss_and_grads(model, TopK())
    g1, rec = _loss_and_grads(_checkpointed(model), TopK())
    _assert_same(g0, g1)
    assert [len(c) for c in rec.experts] == [1] * len(rec.sites)


@pytest.mark.parametrize("family", [*TINY_MOE, "lora_moe"])
def test_rl_inner_updates_give_the_same_gradients_with_checkpointing(family):
    """The trainer's objective (MoE-GRPO: Gate-GRPO + RSPO + load balancing; R3 on DeepSeek-V3) on a sampled rollout:
    the first inner update (its forward is the old policy) and a later one."""
    model = _model(family)
    tok = build_char_tokenizer()
    items = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7+7=", "answer": "14"}]
    policy = TopK() if family == "deepseek_v3" else Multinomial()
    r = generate_rollout(model, tok, items, group_size=3, max_new_tokens=4, policy=policy, old_routing=None,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    micro = dataclasses.replace(r, advantages=torch.linspace(-1.0, 1.0, r.batch_size))
    cfg = TrainConfig()
    cfg.loss.lb_coef = 0.01
    if family == "deepseek_v3":
        cfg.loss.gate_coef, cfg.routing.policy = 0.0, "topk"
    else:
        cfg.rspo.enabled = True
    objective, dens = objective_for(cfg), Denominators(r.batch_size)
    grads = []
    for m in (model, _checkpointed(model)):
        m.zero_grad(set_to_none=True)
        first = objective(m, micro, dens, first_update=True)
        first.loss.backward()
        later = objective(m, with_old_policy(micro, first.behaviour), dens, first_update=False)
        later.loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    _assert_same(*grads)


def _saved_bytes(model, policy) -> int:
    """Bytes of the distinct storages autograd keeps for backward outside checkpointed regions (inside one, the
    checkpoint's own hooks take the tensors and drop them)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with route(model, policy, keep_probs=True) as rec:
            logits = model(input_ids=IDS.repeat(4, 8), use_cache=False).logits
    loss = logits.float().logsumexp(-1).mean() + rec.probs(IDS.shape[0] * 4).sum()
    loss.backward()
    return sum(storages.values())


def test_checkpointing_keeps_fewer_bytes_for_backward():
    model = build_tiny_moe("qwen3_moe", "small", num_experts=8, top_k=2, num_hidden_layers=4).eval()
    plain = _saved_bytes(model, Multinomial())
    checkpointed = _saved_bytes(_checkpointed(model), Multinomial())
    assert checkpointed < 0.5 * plain, (plain, checkpointed)  # measured: see benchmarks/README.md


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _peak_rss_of_a_step(model, ids, conn) -> None:
    """In a forked child: reset the peak RSS to the current RSS (``/proc/self/clear_refs``), run one forward +
    backward, send the rise of the peak (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    with route(model, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
        logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().logsumexp(-1).mean() - rec.set_logp(ids.shape[0]).mean()).backward()
    conn.send(_status_kib("VmHWM") - before)


def test_peak_rss_is_lower_with_checkpointing():
    """Peak resident memory of one forward + backward (8 layers, 4 x 512 tokens, ``small`` width), each in a child
    forked from this process (same heap to start from, no re-import). Measured (2026-05, 2 shared cores): 217-226 MiB
    of peak rise without checkpointing, 138-143 MiB with it; part of both is a fixed cost of the child (~60 MiB)."""
    model = build_tiny_moe("qwen3_moe", "small", num_experts=8, top_k=2, num_hidden_layers=8).eval()
    ids = torch.randint(3, 300, (4, 512), generator=torch.Generator().manual_seed(0))
    peak = {}
    fork = multiprocessing.get_context("fork")
    for name, m in (("off", model), ("on", _checkpointed(model))):
        receive, send = fork.Pipe()
        child = fork.Process(target=_peak_rss_of_a_step, args=(m, ids, send))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0 and receive.poll(), f"the {name} child failed (exit code {child.exitcode})"
        peak[name] = receive.recv()
    assert peak["on"] < 0.8 * peak["off"], peak


def test_the_config_switch_checkpoints_rl_and_sft_and_changes_no_number(tmp_path, monkeypatch):
    """``model.gradient_checkpointing`` (TRL's name) in a run with a supervised warm-up and MoE-GRPO steps: the
    metrics equal those of the same run without it, value for value."""
    records, calls = {}, []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for flag in (False, True):
        out = tmp_path / str(flag)
        cfg = load_config(TrainConfig, None, [*tiny_args(**{"model.gradient_checkpointing": flag}), "--output_dir",
                                              str(out)])  # fmt: skip
        train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        records[flag] = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
        sft = (out / "sft_metrics.jsonl").read_text().splitlines()
        records[flag].append([{k: v for k, v in json.loads(x).items() if k != "time/step"} for x in sft])
        assert bool(calls) is flag  # decoder layers were checkpointed in this run's grad forwards, and only in it
    assert records[True] == records[False]
