"""Modality-aware router guidance (MoE-GRPO Eq. 7): golden scores and masks, token groups, counting, the
GuidanceMask under plain forwards and generate, calibration, and the saved state."""

import json

import pytest
import torch

from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers
from expertrl.moe.guidance import (
    GuidanceMask,
    GuidanceState,
    awareness_scores,
    bottom_percent_mask,
    count_expert_choices,
    expand_allowed,
    num_deactivated,
    prompt_completion_groups,
    token_id_groups,
)
from expertrl.moe.guide import Guide, calibrate_guide
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial, Replay, TopK
from expertrl.rollout import generate_rollout
from expertrl.tokenizer import PAD_ID

# Layer 0: N_v = [6, 2, 2, 0] (10 tokens·K)  -> s_v = [.6, .2, .2, 0]
#          N_t = [2, 2, 6, 10] (20)          -> s_t = [.1, .1, .3, .5]   (raw counts would give other ratios)
#          s_v + s_t = [.7, .3, .5, .5]      -> ŝ_v = [6/7, 2/3, .4, 0],  ŝ_t = [1/7, 1/3, .6, 1]
# Layer 1: N_v = [4, 4, 0, 0] (8)            -> s_v = [.5, .5, 0, 0]
#          N_t = [0, 1, 0, 3] (4)            -> s_t = [0, .25, 0, .75]
#          s_v + s_t = [.5, .75, 0, .75]     -> ŝ_v = [1, 2/3, 0 (nobody chose e2), 0],  ŝ_t = [0, 1/3, 0, 1]
COUNTS = torch.tensor(
    [
        [[6, 2, 2, 0], [2, 2, 6, 10]],
        [[4, 4, 0, 0], [0, 1, 0, 3]],
    ]
)  # (L=2, G=2 (vision, text), E=4)
SCORES = torch.tensor(
    [
        [[6 / 7, 2 / 3, 0.4, 0.0], [1 / 7, 1 / 3, 0.6, 1.0]],
        [[1.0, 2 / 3, 0.0, 0.0], [0.0, 1 / 3, 0.0, 1.0]],
    ],
    dtype=torch.float64,
)
T, F = True, False


# --- Eq. 7 and the bottom-P mask ---------------------------------------------------------------------------------


def test_awareness_scores_golden():
    torch.testing.assert_close(awareness_scores(COUNTS), SCORES)


def test_awareness_scores_of_a_group_never_seen_raise():
    counts = COUNTS.clone()
    counts[1, 0] = 0
    with pytest.raises(ValueError, match="group 0 has no counted token at layer position 1"):
        awareness_scores(counts)


def test_bottom_percent_mask_golden_and_ties():
    # 25 % of 4 = 1 expert off. Layer 0: vision drops e3 (ŝ 0), text drops e0 (1/7).
    # Layer 1: vision ties e2 = e3 = 0 -> the lower index e2 goes; text ties e0 = e2 = 0 -> e0 goes.
    expected = torch.tensor([[[T, T, T, F], [F, T, T, T]], [[T, T, F, T], [F, T, T, T]]])
    assert torch.equal(bottom_percent_mask(SCORES, 25.0, top_k=2), expected)
    # 50 % = 2 off: layer 0 vision e3, e2 (.4); text e0, e1; layer 1 vision e2, e3; text e0, e2.
    expected50 = torch.tensor([[[T, T, F, F], [F, F, T, T]], [[T, T, F, F], [F, T, F, T]]])
    assert torch.equal(bottom_percent_mask(SCORES, 50.0, top_k=2), expected50)
    assert bottom_percent_mask(SCORES, 0.0, top_k=2).all()


def test_all_tied_scores_deactivate_the_lowest_indices():
    allowed = bottom_percent_mask(torch.zeros(1, 1, 8), 25.0, top_k=2)
    assert allowed.tolist() == [[[F, F, T, T, T, T, T, T]]]


@pytest.mark.parametrize(
    ("percent", "E", "off"), [(25, 8, 2), (25, 6, 1), (12.5, 8, 1), (50, 6, 3), (0, 4, 0), (100, 4, 4), (33.4, 3, 1)]
)
def test_rounding_is_floor(percent, E, off):
    assert num_deactivated(percent, E) == off


def test_never_fewer_than_k_experts_left():
    assert bottom_percent_mask(SCORES, 50.0, top_k=2).sum(-1).min() == 2  # exactly K left is fine
    with pytest.raises(ValueError, match=r"percent=75.0 deactivates 3 of E=4 experts, leaving 1 < top_k K=2.*<= 50"):
        bottom_percent_mask(SCORES, 75.0, top_k=2)
    with pytest.raises(ValueError, match="percent=-5"):
        bottom_percent_mask(SCORES, -5, top_k=2)


# --- token groups and counting -----------------------------------------------------------------------------------


def test_prompt_completion_groups():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # P = 3: row 0 left-padded, EOS then pad
    assert prompt_completion_groups(mask, 3).tolist() == [[-1, 0, 0, 1, 1, -1], [0, 0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="prompt_width=7"):
        prompt_completion_groups(mask, 7)


def test_token_id_groups():
    ids = torch.tensor([[PAD_ID, 5, 9, 9, 7], [4, 9, 8, 5, 6]])
    mask = (ids != PAD_ID).long()
    assert token_id_groups(ids, mask, {1: {9}, 2: {5, 6}}).tolist() == [[-1, 2, 1, 1, 0], [0, 1, 0, 2, 2]]
    assert token_id_groups(ids, mask, [set(), {9}], default_group=0).tolist() == [[-1, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="token id 9 is listed in groups 1 and 2"):
        token_id_groups(ids, mask, {1: {9}, 2: {9}})


def _count_loop(experts, groups, G, E):
    counts = torch.zeros(experts.shape[0], G, E, dtype=torch.long)
    L, B, S, K = experts.shape
    for l in range(L):
        for b in range(B):
            for s in range(S):
                for k in range(K):
                    e, g = int(experts[l, b, s, k]), int(groups[b, s])
                    if e >= 0 and g >= 0:
                        counts[l, g, e] += 1
    return counts


def test_count_expert_choices_ignores_unrouted_and_padding():
    experts = torch.tensor([[[[0, 1], [2, 3], [-1, -1]], [[1, 2], [3, 0], [0, 3]]]], dtype=torch.int16)  # (1,2,3,2)
    groups = torch.tensor([[0, 1, 1], [-1, 0, 1]])
    # counted: (b0,s0) g0 {0,1}; (b0,s1) g1 {2,3}; (b0,s2) unrouted; (b1,s0) padding; (b1,s1) g0 {3,0}; (b1,s2) g1 {0,3}
    expected = torch.tensor([[[2, 1, 0, 1], [1, 0, 1, 2]]])
    assert torch.equal(count_expert_choices(experts, groups, 2, 4), expected)
    rand_e = torch.randint(-1, 5, (3, 4, 7, 2), generator=torch.Generator().manual_seed(0))
    rand_g = torch.randint(-1, 3, (4, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(count_expert_choices(rand_e, rand_g, 3, 5), _count_loop(rand_e, rand_g, 3, 5))
    with pytest.raises(ValueError, match="raise num_groups"):
        count_expert_choices(experts, groups, 1, 4)


# --- GuidanceMask ------------------------------------------------------------------------------------------------

# Exactly K = 2 experts per (layer, group), different in each, so a wrong row would show at once.
ALLOWED = torch.tensor([[[T, T, F, F], [F, F, T, T]], [[T, F, T, F], [F, T, F, T]]])  # (L=2, G=2, E=4)


def test_guidance_mask_rows_golden():
    groups = torch.tensor([[-1, 0, 1], [1, 1, 0]])  # (B=2, S=3)
    mask = GuidanceMask(ALLOWED, groups, generated_group=0)
    rows = mask(0, 6).reshape(2, 3, 4)  # one full forward chunk
    assert rows[0].tolist() == [[T, T, T, T], [T, T, F, F], [F, F, T, T]]  # padding: every expert
    assert rows[1].tolist() == [[F, F, T, T], [F, F, T, T], [T, T, F, F]]
    assert torch.equal(mask(1, 6).reshape(2, 3, 4), expand_allowed(ALLOWED, groups)[1])
    assert torch.equal(mask(0, 2), ALLOWED[0, 0].expand(2, 4))  # past the labels: generated group 0
    assert mask.positions == (4, 3)


def test_guidance_mask_misuse_is_a_clear_error():
    groups = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="N=5 tokens is not a multiple of the B=2"):
        GuidanceMask(ALLOWED, groups)(0, 5)
    mask = GuidanceMask(ALLOWED, groups)
    mask(0, 6), mask(1, 6)
    with pytest.raises(ValueError, match="only S=3 positions are labelled and generated_group is None"):
        mask(0, 2)  # a second forward without reset()
    mask.reset()
    assert mask(0, 6).shape == (6, 4)
    with pytest.raises(RuntimeError, match="out of step"):
        GuidanceMask(ALLOWED, groups)(1, 6)  # layer 1 before layer 0
    with pytest.raises(ValueError, match="outside the mask's L=2"):
        GuidanceMask(ALLOWED, groups)(2, 6)
    with pytest.raises(ValueError, match="generated_group=2"):
        GuidanceMask(ALLOWED, groups, generated_group=2)


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _digit_ids(tokenizer):
    return {tokenizer.convert_tokens_to_ids(c) for c in "0123456789"}


@pytest.mark.parametrize("exactly_k", [True, False], ids=["K_left", "3_left"])
def test_masked_experts_are_never_sampled(tiny_moe, tokenizer, exactly_k):
    texts = [f"{i * 37} plus {i + 5} is {(i * 37 + i + 5) // (1 + i % 3)} ok" for i in range(12)]
    ids, attn = _batch(tokenizer, texts)  # (B=12, S), digits are "vision" (group 1)
    groups = token_id_groups(ids, attn, {1: _digit_ids(tokenizer)})
    allowed = ALLOWED if exactly_k else bottom_percent_mask(SCORES, 25.0, top_k=2)
    with torch.no_grad(), route(tiny_moe, Multinomial(), allowed=GuidanceMask(allowed, groups),
                                generator=torch.Generator().manual_seed(0)) as rec:  # fmt: skip
        tiny_moe(ids, attention_mask=attn)
    experts = rec.trace(ids.shape[0]).experts.long()  # (L, B, S, K)
    ok = expand_allowed(allowed, groups).gather(-1, experts)  # (L, B, S, K) was each chosen expert allowed?
    assert ok.all()
    real = groups >= 0
    counts = count_expert_choices(experts, groups, 2, 4)
    assert (counts[~allowed] == 0).all() and counts.sum() == 2 * 2 * real.sum()  # every (layer, group, expert)
    if not exactly_k:  # sampling really explored: every allowed (layer, group, expert) was used
        assert (counts[allowed] > 0).all()


class _Spy:
    """Wraps an ``allowed`` callable and keeps (layer_pos, n_tokens, rows) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, layer_pos, n_tokens):
        rows = self.fn(layer_pos, n_tokens)
        self.calls.append((layer_pos, n_tokens, rows))
        return rows

    def per_position(self, layer_pos, batch_size):
        """(B, S_routed, E) rows of one layer, chunks re-assembled in time."""
        chunks = [r.reshape(batch_size, -1, r.shape[-1]) for p, _, r in self.calls if p == layer_pos]
        return torch.cat(chunks, dim=1)


GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)


def test_generate_chunks_follow_prompt_labels_then_generated_group(tiny_moe, tokenizer):
    ids, attn = _batch(tokenizer, ["a1b2", "77x", "hello 9"])  # (B=3, P=7), left-padded
    B, P = ids.shape
    groups = token_id_groups(ids, attn, {1: _digit_ids(tokenizer)})  # (B, P) with -1 padding
    spy = _Spy(GuidanceMask(ALLOWED, groups, generated_group=1))
    with torch.no_grad(), route(tiny_moe, Multinomial(), allowed=spy, generator=torch.Generator().manual_seed(0)):
        tiny_moe.generate(ids, attention_mask=attn, **GEN)
    assert [(p, n) for p, n, _ in spy.calls] == [(0, B * P), (1, B * P)] + [(0, B), (1, B)] * 3
    for layer in range(2):
        rows = spy.per_position(layer, B)  # (B, P + 3, E)
        assert torch.equal(rows[:, :P], expand_allowed(ALLOWED, groups)[layer])  # prefill: prompt labels
        assert torch.equal(rows[:, P:], ALLOWED[layer, 1].expand(B, 3, 4))  # decode: the generated group


def test_full_forward_gets_the_generate_masks_and_reproduces_its_log_probs(tiny_moe, tokenizer):
    ids, attn = _batch(tokenizer, ["12+3=", "x", "abc 45"])
    B, P = ids.shape
    gen_mask = GuidanceMask(ALLOWED, prompt_completion_groups(attn, P), generated_group=1)
    gen_spy = _Spy(gen_mask)
    with torch.no_grad():
        with route(tiny_moe, Multinomial(), allowed=gen_spy, generator=torch.Generator().manual_seed(3)) as rec:
            seqs = tiny_moe.generate(ids, attention_mask=attn, **GEN)  # (B, S)
        S = seqs.shape[1]
        gen_trace = rec.trace(B)  # (L, B, S-1, K)
        full_attn = torch.cat([attn, torch.ones(B, S - P, dtype=attn.dtype)], dim=1)  # (B, S) no EOS: min_new_tokens
        full_spy = _Spy(GuidanceMask(ALLOWED, prompt_completion_groups(full_attn, P)))
        last = torch.full_like(gen_trace.experts[:, :, :1], -1)  # the last token is never routed by generate
        replay = Replay(torch.cat([gen_trace.experts, last], dim=2).reshape(2, B * S, 2))
        with route(tiny_moe, replay, allowed=full_spy) as rec_full:
            tiny_moe(seqs, attention_mask=full_attn, position_ids=(full_attn.cumsum(-1) - 1).clamp(min=0))
    assert [(p, n) for p, n, _ in full_spy.calls] == [(0, B * S), (1, B * S)]
    labels = prompt_completion_groups(full_attn, P)  # (B, S): 0 prompt, 1 completion, -1 left padding
    for layer in range(2):
        full_rows = full_spy.per_position(layer, B)  # (B, S, E)
        assert torch.equal(full_rows, expand_allowed(ALLOWED, labels)[layer])
        assert torch.equal(full_rows[:, : S - 1], gen_spy.per_position(layer, B))
    # Same masked softmax in both paths (ambiguity 10): the replayed forward gives the sampled experts the same
    # log-probs the rollout sampled them with.
    full_logp = rec_full.trace(B).set_logp[:, :, : S - 1]  # (L, B, S-1)
    real = full_attn[:, : S - 1].bool()[None].expand_as(full_logp)
    torch.testing.assert_close(full_logp[real], gen_trace.set_logp[real], atol=1e-5, rtol=0)
    assert torch.isfinite(full_logp).all()


# --- calibration and the saved state -----------------------------------------------------------------------------


def test_calibrate_guide_counts_the_top_k_routes_of_every_attended_routed_position(tiny_moe, tokenizer):
    items = [{"prompt": p} for p in ("ab 12", "345", "x", "9 lives")]
    rollouts = [
        generate_rollout(
            tiny_moe, tokenizer, items[i : i + 2], group_size=1, max_new_tokens=3, policy=TopK(), old_routing=None
        )  # fmt: skip
        for i in (0, 2)
    ]
    state = calibrate_guide(tiny_moe, rollouts, groups="prompt_completion", percent=25.0)
    assert state.group_names == ("prompt", "completion") and state.layers == (0, 1)
    ref = torch.zeros(2, 2, 4, dtype=torch.long)  # slow reference: position by position
    for r in rollouts:
        P = r.prompt_width
        for b in range(r.batch_size):
            for s in range(r.input_ids.shape[1] - 1):  # the last position is never routed
                if r.attention_mask[b, s]:
                    for layer in range(2):
                        for e in r.routing.experts[layer, b, s].tolist():
                            ref[layer, int(s >= P), e] += 1
    assert torch.equal(state.counts, ref)
    with torch.no_grad(), route(tiny_moe, TopK()) as rec:  # the counts are top-K choices: replay them unforced
        r = rollouts[0]
        tiny_moe(r.input_ids, attention_mask=r.attention_mask,
                 position_ids=(r.attention_mask.cumsum(-1) - 1).clamp(min=0))  # fmt: skip
    live = rec.trace(r.batch_size).experts[:, :, :-1]
    real = r.attention_mask[:, :-1].bool()
    assert torch.equal(live[:, real], r.routing.experts[:, :, :-1][:, real])
    guide = Guide.for_groups(state, groups="prompt_completion")
    assert guide.generated_group == 1 and torch.equal(
        guide.groups(r.input_ids, r.attention_mask, r.prompt_width),
        prompt_completion_groups(r.attention_mask, r.prompt_width),
    )
    with pytest.raises(ValueError, match="recalibrate"):
        Guide.for_groups(state, groups="modality", vision_ids={5})
    with pytest.raises(ValueError, match="vision placeholder"):
        Guide.for_groups(state, groups="modality")


def _state():
    return GuidanceState.from_counts(COUNTS, percent=25.0, top_k=2, group_names=("vision", "text"), layers=(0, 1))


def test_guidance_state_round_trip_and_model_check(tiny_moe, tmp_path):
    state = _state()
    torch.testing.assert_close(state.scores, SCORES)
    path = tmp_path / "guidance.json"
    state.save(path)
    loaded = GuidanceState.load(path, model=tiny_moe)
    for name in ("counts", "scores", "allowed"):
        a, b = getattr(state, name), getattr(loaded, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (loaded.percent, loaded.top_k, loaded.group_names, loaded.layers) == (25.0, 2, ("vision", "text"), (0, 1))
    mask = loaded.mask(torch.tensor([[0, 1]]), generated_group="text")
    assert mask.generated_group == 1 and torch.equal(mask(0, 2), loaded.allowed[0])


def test_guidance_state_from_another_model_is_rejected(tmp_path):
    path = tmp_path / "guidance.json"
    _state().save(path)
    other = build_tiny_moe("qwen3_moe", "tiny", num_experts=6)
    assert [s.layer for s in find_routers(other)] == [0, 1]
    with pytest.raises(ValueError, match=r"E=4, K=2, but the model has layers \(0, 1\), E=6.*recalibrate"):
        GuidanceState.load(path, model=other)
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a guidance state file"):
        GuidanceState.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"GuidanceState.counts has shape \(2, 2, 4\); expected \(L, G, E\) = \(3"):
        GuidanceState(COUNTS, SCORES, ALLOWED, 25.0, 2, ("vision", "text"), (0, 1, 2))


def test_guidance_state_dict_round_trip():
    counts = torch.tensor([[[5, 1, 0, 4], [0, 2, 6, 2]]])  # (L=1, G=2, E=4)
    state = GuidanceState.from_counts(counts, percent=25.0, top_k=2, group_names=("text", "vision"), layers=(3,))
    back = GuidanceState.from_state_dict(json.loads(json.dumps(state.state_dict())))  # through JSON, as checkpoints
    assert torch.equal(back.counts, state.counts) and torch.equal(back.allowed, state.allowed)
    assert (back.percent, back.top_k, back.group_names, back.layers) == (25.0, 2, ("text", "vision"), (3,))
