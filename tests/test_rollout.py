"""Rollout engine: completion masks, Rollout shapes and alignment, behaviour log-probs, ratio 1 at the first update."""

import dataclasses

import pytest
import torch

from expertrl.collect import routing_usage
from expertrl.config import TrainConfig
from expertrl.models import build_tiny_moe
from expertrl.moe.gumbel import row_seeds
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial
from expertrl.objective import Denominators
from expertrl.ops import pad_along, token_logp
from expertrl.policy import policy_forward
from expertrl.rollout import completion_mask, generate_rollout
from expertrl.run import objective_for
from expertrl.tokenizer import EOS_ID, PAD_ID, build_char_tokenizer
from expertrl.types import UNROUTED, Sampling

ITEMS = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "ab", "answer": "c"}]  # different widths: left padding
G, MAX_NEW, SEED = 4, 6, 0
L, K, E = 2, 2, 4


def test_completion_mask_golden():
    completion = torch.tensor(
        [
            [5, EOS_ID, PAD_ID, PAD_ID],  # EOS in the middle: counted, the padding after it is not
            [5, 6, 7, EOS_ID],  # EOS at the end
            [5, 6, 7, 8],  # no EOS: the whole budget counts
            [EOS_ID, PAD_ID, PAD_ID, PAD_ID],  # EOS first
            [5, EOS_ID, EOS_ID, 9],  # only the first EOS counts
        ]
    )
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(completion_mask(completion, EOS_ID), expected)


@pytest.fixture(scope="module")
def model_and_rollout():
    model = build_tiny_moe("qwen3_moe", "tiny").eval()
    tok = build_char_tokenizer()
    with torch.no_grad():  # EOS outscores the token that leads after "ab" wherever it leads: that group stops early
        lead = model(torch.tensor([tok("ab")["input_ids"]])).logits[0, -1].argmax()
        model.lm_head.weight[EOS_ID] = model.lm_head.weight[lead] * 1.05
    gen = torch.Generator().manual_seed(SEED)
    rollout = generate_rollout(
        model, tok, ITEMS, group_size=G, max_new_tokens=MAX_NEW, policy=Multinomial(), generator=gen
    )
    return model, tok, rollout


def test_rollout_shapes_and_groups(model_and_rollout):
    _, tok, r = model_and_rollout
    B, S, P, C = r.batch_size, r.input_ids.shape[1], r.prompt_width, r.completion_width
    assert B == len(ITEMS) * G and P == max(len(it["prompt"]) for it in ITEMS) and 1 <= C <= MAX_NEW
    assert r.attention_mask.shape == (B, S) and r.mask.shape == (B, C) and r.old_logp.shape == (B, C)
    assert r.routing.experts.shape == r.old_router_logp.shape == (L, B, S, K)
    assert r.routing.set_logp.shape == r.old_set_logp.shape == (L, B, S)
    assert r.sample_logp.shape == (B, C)
    assert r.routing.layers == (0, 1) and r.routing.num_experts == E and r.group_size == G
    assert (r.routing.experts[:, :, -1] == UNROUTED).all() and (r.routing.set_logp[:, :, -1] == 0).all()
    assert ((r.routing.experts[:, :, :-1] >= 0) & (r.routing.experts[:, :, :-1] < E)).all()
    assert r.rewards is None and r.advantages is None
    assert (r.mask == 0).any() and (r.mask.sum(-1) == C).any()  # some rows stopped at EOS, some used the budget
    assert (r.input_ids[:, P:][r.mask == 0] == PAD_ID).all()
    assert len(r.completions) == len(r.items) == B
    assert torch.isfinite(r.old_logp).all() and (r.old_logp <= 0).all()

    # Groups are contiguous: sequence i belongs to item i // G.
    prompts = tok([it["prompt"] for it in ITEMS], padding=True, padding_side="left", return_tensors="pt")
    for i in range(B):
        assert r.items[i] is ITEMS[i // G]
        assert torch.equal(r.input_ids[i, :P], prompts["input_ids"][i // G])
        assert torch.equal(r.attention_mask[i, :P], prompts["attention_mask"][i // G])
        n = int(r.mask[i].sum())
        assert r.completions[i] == tok.decode(r.input_ids[i, P : P + n], skip_special_tokens=True)
    assert torch.equal(r.attention_mask[:, P:], r.mask.long())  # nothing after EOS is attended


def test_old_logp_is_a_fresh_replayed_forward(model_and_rollout):
    model, _, r = model_and_rollout
    with torch.no_grad():
        fwd = policy_forward(model, r, r.routing)
    assert fwd.probs is None
    assert torch.equal(fwd.logp, r.old_logp)
    assert torch.equal(fwd.set_logp, r.old_set_logp)
    assert torch.equal(fwd.router_logp, r.old_router_logp)


def test_old_logp_matches_the_rollout_generation(model_and_rollout):
    """Re-run the rollout's generate with the same routing seed: same experts, same tokens, and the scores it saw
    agree with the replayed forward up to KV-cache numerics."""
    model, tok, r = model_and_rollout
    P, m = r.prompt_width, r.mask.bool()
    prompts = [it["prompt"] for it in ITEMS for _ in range(G)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad(), route(model, Multinomial(), generator=torch.Generator().manual_seed(SEED)) as rec:
        out = model.generate(
            **enc, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    assert torch.equal(out.sequences, r.input_ids)
    gen_logp = token_logp(torch.stack(out.logits, dim=1), out.sequences[:, P:])  # (B, C)
    torch.testing.assert_close(gen_logp[m], r.old_logp[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.sample_logp[m], r.old_logp[m], atol=1e-5, rtol=0)  # recorded while generating
    # Greedy decoding: each counted token was the argmax of the rollout's scores.
    assert torch.equal(torch.stack(out.logits, dim=1).argmax(-1)[m], out.sequences[:, P:][m])

    # The rollout's recorded set log-probs agree with the replayed forward's at every attended routed position.
    assert torch.equal(rec.trace(r.batch_size).experts, r.routing.experts[:, :, :-1])
    attended = r.attention_mask[:, :-1].bool()[None].expand(L, -1, -1)  # (L, B, S-1)
    counted = m[None].expand(L, -1, -1)  # (L, B, C) positions P-1..S-2 predict counted tokens
    assert attended[:, :, P - 1 :][counted].all()  # so the comparison below covers every one of them
    torch.testing.assert_close(
        r.routing.set_logp[:, :, :-1][attended], r.old_set_logp[:, :, :-1][attended], atol=1e-5, rtol=0
    )


def test_first_inner_update_has_ratio_exactly_one(model_and_rollout):
    model, _, r = model_and_rollout
    cfg = TrainConfig()
    micro = dataclasses.replace(r, advantages=torch.linspace(-1.0, 1.0, r.batch_size))
    model.zero_grad(set_to_none=True)
    loss, metrics, _ = objective_for(cfg)(model, micro, Denominators(r.batch_size), first_update=False)
    assert metrics["loss/ratio_mean"].item() == 1.0
    assert metrics["loss/gate_ratio_mean"].item() == 1.0
    assert metrics["loss/approx_kl"].item() == 0.0 and metrics["loss/gate_approx_kl"].item() == 0.0
    assert metrics["loss/clip_frac"].item() == 0.0 and metrics["loss/gate_clip_frac"].item() == 0.0
    assert torch.isfinite(loss)
    loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_index_batch_keeps_rows_aligned(model_and_rollout):
    _, _, r = model_and_rollout
    B = r.batch_size
    full = dataclasses.replace(
        r,
        rewards=torch.arange(B, dtype=torch.float32),
        advantages=torch.arange(B, dtype=torch.float32) * 10,
        reward_parts={"format": torch.arange(B, dtype=torch.float32) * 100},
    )
    index = torch.tensor([5, 0, 3])
    sub = full.index_batch(index)
    assert sub.batch_size == 3 and sub.prompt_width == r.prompt_width and sub.group_size == G
    assert sub.routing.layers == r.routing.layers and sub.routing.num_experts == E
    for row, i in enumerate(index.tolist()):
        assert torch.equal(sub.input_ids[row], full.input_ids[i])
        assert torch.equal(sub.attention_mask[row], full.attention_mask[i])
        assert torch.equal(sub.mask[row], full.mask[i])
        assert torch.equal(sub.old_logp[row], full.old_logp[i])
        assert torch.equal(sub.routing.experts[:, row], full.routing.experts[:, i])
        assert torch.equal(sub.routing.set_logp[:, row], full.routing.set_logp[:, i])
        assert torch.equal(sub.old_set_logp[:, row], full.old_set_logp[:, i])
        assert torch.equal(sub.old_router_logp[:, row], full.old_router_logp[:, i])
        assert torch.equal(sub.sample_logp[row], full.sample_logp[i])
        assert sub.completions[row] == full.completions[i] and sub.items[row] is full.items[i]
        assert sub.rewards[row] == i and sub.advantages[row] == 10 * i and sub.reward_parts["format"][row] == 100 * i


def test_routing_usage_loads_are_distributions(model_and_rollout):
    _, _, r = model_and_rollout
    usage = routing_usage(r)
    P = r.prompt_width
    for li, layer in enumerate(r.routing.layers):
        load = usage[f"router/load/layer{layer}"]
        assert load.shape == (E,) and (load >= 0).all()
        torch.testing.assert_close(load.sum(), torch.tensor(1.0))
        # Slow reference: count the experts of every counted completion token.
        counts = torch.zeros(E)
        for b in range(r.batch_size):
            for c in range(r.completion_width):
                if r.mask[b, c] > 0:
                    for e in r.routing.experts[li, b, P - 1 + c].tolist():
                        counts[e] += 1
        torch.testing.assert_close(load, counts / counts.sum())
    h = usage["router/usage_entropy"]
    assert 0 < h.item() <= torch.log(torch.tensor(float(E))).item() + 1e-6


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_pad_along_adds_values_on_both_sides_of_one_dim(dim):
    x = torch.arange(24, dtype=torch.int8).view(2, 3, 4)
    out = pad_along(x, dim, 1, 2, -1)
    d = dim % 3
    assert out.dtype == torch.int8 and out.shape[d] == x.shape[d] + 3
    assert torch.equal(out.narrow(d, 1, x.shape[d]), x)  # the original in the middle
    assert (out.narrow(d, 0, 1) == -1).all() and (out.narrow(d, 1 + x.shape[d], 2) == -1).all()
    assert pad_along(x, dim, 0, 0, -1) is x


@pytest.mark.parametrize("shared_prompts", [False, True])
def test_a_rollout_that_keeps_expert_ids_only_draws_the_same_routes_without_set_logprobs(shared_prompts):
    """``routes="experts"`` (the trainer's rollouts): the same experts and tokens as ``routes="full"`` from the same
    counter-based seeds, set log-probs left at 0 (not computed: the trainer takes them from its first update's
    forward), also through the shared prefill of group prompt routes."""
    model, tok = build_tiny_moe("qwen3_moe", "tiny").eval(), build_char_tokenizer()
    rows = torch.arange(len(ITEMS) * G)
    seeds = dict(route_seeds=row_seeds(3, rows), prompt_route_seeds=row_seeds(4, rows // G) if shared_prompts else None)
    out = {
        routes: generate_rollout(
            model,
            tok,
            ITEMS,
            group_size=G,
            max_new_tokens=MAX_NEW,
            policy=Multinomial(),
            sampling=Sampling(routing_temperature=0.7),
            old_routing=None,
            routes=routes,
            **seeds,
        )  # fmt: skip
        for routes in ("full", "experts")
    }
    full, ids = out["full"], out["experts"]
    assert torch.equal(full.input_ids, ids.input_ids) and torch.equal(full.routing.experts, ids.routing.experts)
    routed = full.routing.experts[..., 0] != UNROUTED  # (L, B, S)
    assert (full.routing.set_logp[routed] < 0).all() and (ids.routing.set_logp == 0).all()
