"""Generation without work nobody reads (issue 16): the fast paths give the rollout the full path gives.

- ``routes="experts"``: top-K routing runs the native routers with a capture hook (``moe.capture``) instead of
  ``route``'s patched routers; ``routes="none"``: no hook at all. Same tokens, sampled log-probs and expert ids: bit
  for bit when no prompt repeats, to float rounding when a group's copies of a prompt share one prefill.
- ``decoding.rollout_cache``: a KV cache written in place instead of concatenated at every decode step; the same
  tokens and logits as ``generate``'s own cache, bit for bit, on every family (MLA's unequal key/value widths too).
"""

from __future__ import annotations

import pytest
import torch

from expertrl.decoding import decoding_kwargs, rollout_cache
from expertrl.families import TINY_MOE
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.capture import capture_experts
from expertrl.moe.policies import Multinomial, TopK
from expertrl.rollout import generate_rollout
from expertrl.types import Sampling

ITEMS = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "a", "answer": "b"}, {"prompt": "7*8=", "answer": "56"}]
"""Prompts of unequal length, left-padded; "a"'s first P-1 positions (a shared prefill's) are all padding."""
SAMPLED = Sampling(do_sample=True, token_temperature=0.7)


def _rollout(model, tokenizer, routes, *, policy=None, sampling=SAMPLED, keep_probs=False, group_size=3):
    torch.manual_seed(0)  # token sampling draws from the global RNG
    return generate_rollout(
        model, tokenizer, ITEMS, group_size=group_size, max_new_tokens=6, policy=policy or TopK(), sampling=sampling,
        generator=torch.Generator().manual_seed(0), old_routing=None, routes=routes, keep_probs=keep_probs,
    )  # fmt: skip


@pytest.mark.parametrize("group_size", [1, 3])  # 3: each group's prompt is prefilled once
@pytest.mark.parametrize("family", TINY_MOE)
def test_the_native_routers_give_the_rollout_the_patched_ones_give(family, group_size, tokenizer):
    model = build_tiny_moe(family, "tiny").eval()
    full = _rollout(model, tokenizer, "full", group_size=group_size)
    experts = _rollout(model, tokenizer, "experts", group_size=group_size)
    none = _rollout(model, tokenizer, "none", group_size=group_size)
    for fast in (experts, none):
        assert torch.equal(fast.input_ids, full.input_ids)
        if group_size == 1:
            assert torch.equal(fast.sample_logp, full.sample_logp)
        else:
            torch.testing.assert_close(fast.sample_logp, full.sample_logp, rtol=0, atol=1e-5)
        assert fast.completions == full.completions
    assert torch.equal(experts.routing.experts, full.routing.experts)
    assert experts.routing.layers == full.routing.layers and experts.routing.num_experts == full.routing.num_experts
    assert not experts.routing.set_logp.any()  # not recorded on this path
    assert none.routing.shape[0] == 0  # nothing recorded
    assert all(not s.module._forward_hooks for s in find_routers(model))  # hooks removed


def test_policies_that_sample_or_need_probabilities_still_route(tiny_moe, tokenizer):
    sampled = _rollout(tiny_moe, tokenizer, "none", policy=Multinomial())
    again = _rollout(tiny_moe, tokenizer, "full", policy=Multinomial())
    assert torch.equal(sampled.input_ids, again.input_ids)  # the sampled routes shaped the tokens: same draws
    assert torch.equal(sampled.routing.experts, again.routing.experts)
    with_probs = _rollout(tiny_moe, tokenizer, "experts", keep_probs=True)  # routed under route (probs kept)
    assert with_probs.route_probs is not None and with_probs.route_probs.any()
    assert not with_probs.routing.set_logp.any()  # ids only: generation's set log-probs are not computed


def test_capture_hooks_are_removed_on_error(tiny_moe):
    with pytest.raises(RuntimeError, match="boom"), capture_experts(tiny_moe):
        raise RuntimeError("boom")
    assert all(not s.module._forward_hooks for s in find_routers(tiny_moe))


def test_replaying_generation_routes_needs_them_recorded(tiny_moe, tokenizer):
    with pytest.raises(AssertionError, match="replaying"):
        generate_rollout(tiny_moe, tokenizer, ITEMS, group_size=1, max_new_tokens=2, policy=TopK(), routes="none")


@pytest.mark.parametrize("family", TINY_MOE)
def test_the_in_place_cache_decodes_bit_identically(family, tokenizer):
    model = build_tiny_moe(family, "tiny").eval()
    enc = tokenizer([it["prompt"] for it in ITEMS], return_tensors="pt", padding=True, add_special_tokens=False)
    P, new = enc["input_ids"].shape[1], 7
    outs = []
    for cache in (None, rollout_cache(model, P + new)):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(
                model.generate(
                    **enc,
                    past_key_values=cache,
                    output_logits=True,
                    return_dict_in_generate=True,
                    **decoding_kwargs(tokenizer, max_new_tokens=new, sampling=SAMPLED),
                )  # fmt: skip
            )
    default, filled = outs
    assert torch.equal(default.sequences, filled.sequences)
    for a, b in zip(default.logits, filled.logits):
        assert torch.equal(a, b)


def test_the_cache_refuses_more_positions_than_it_holds(tiny_moe, tokenizer):
    enc = tokenizer(["12+3="], return_tensors="pt", add_special_tokens=False)
    with pytest.raises(AssertionError, match="holds"), torch.no_grad():
        tiny_moe.generate(
            **enc, past_key_values=rollout_cache(tiny_moe, 6), **decoding_kwargs(tokenizer, max_new_tokens=4)
        )


def test_a_shared_prefill_runs_each_distinct_prompt_once(tiny_moe, tokenizer):
    seen = []
    handle = tiny_moe.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    rollout = _rollout(tiny_moe, tokenizer, "experts", group_size=4)
    handle.remove()
    P = rollout.prompt_width
    assert seen[0] == (len(ITEMS), P - 1)  # the prefill: one row per distinct prompt, positions 0 .. P-2
    assert seen[1] == (len(ITEMS) * 4, 1)  # then generate, on every row, from position P-1
    groups = rollout.routing.experts[:, :, : P - 1].unflatten(1, (len(ITEMS), 4))  # (L, prompts, G, P-1, K)
    assert (groups == groups[:, :, :1]).all()  # a group's rows carry its prompt's routes
