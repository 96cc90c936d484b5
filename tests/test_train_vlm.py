"""MoE-GRPO on the tiny Qwen3-VL-MoE (issue #5): image and video tasks through `expertrl train`, the multimodal
rollout (vision kwargs in generate and in every replayed forward), modality-aware router guidance over vision/text
token groups, its checkpointed counts on resume, SFT warm-up and evaluation on multimodal items."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

import expertrl.collect as collect_module
import expertrl.start as start_module
from expertrl.batching import concat_rollouts
from expertrl.checkpoint import checkpoint_path
from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import load_config
from expertrl.evaluate import evaluate, generate_greedy, routing_statistics_pass
from expertrl.moe.guidance import GuidanceState
from expertrl.moe.guide import TEXT_VISION, Guide, calibrate_guide
from expertrl.moe.policies import Multinomial, TopK
from expertrl.objective import Denominators
from expertrl.policy import policy_forward
from expertrl.rollout import encode_prompts, generate_rollout
from expertrl.run import objective_for
from expertrl.sft import supervised_mm_batch
from expertrl.tasks import load_task
from expertrl.tokenizer import EOS_ID, PAD_ID
from expertrl.train import train
from expertrl.types import UNROUTED
from expertrl.vlm import vision_special_ids, vision_token_ids
from expertrl.vlm_models import build_tiny_vlm, load_vlm, save_vlm

L, E, K, G = 2, 4, 2, 2
VISION_PER_IMAGE = 16  # 32x32 image: 8x8 patches of 4 px, merged 2x2
UNTIMED = "time/"
ARGS = [
    "--task.train_size", "8", "--task.eval_size", "4", "--steps", "2", "--rollout.prompts_per_step", "2",
    "--rollout.group_size", "2", "--rollout.max_new_tokens", "2", "--micro_batch_size", "4", "--eval_every", "0",
    "--progress", "false",
]  # fmt: skip
IMAGE_RUN = [
    "--task.name", "mm:digits_mc", "--sft.steps", "2", "--sft.batch_size", "4", "--guidance.enabled", "true",
    "--guidance.groups", "modality", "--guidance.calibration_batches", "2", "--save_every", "1",
    "--keep_checkpoints", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm(seed=0)


@pytest.fixture(scope="module")
def vlm_dir(vlm, tmp_path_factory):
    """The tiny VLM saved like a local Qwen3-VL-MoE checkpoint: model.path points here."""
    path = tmp_path_factory.mktemp("vlm") / "tiny-vlm"
    save_vlm(*vlm, path)
    return path


@pytest.fixture(scope="module")
def digits():
    return load_task("mm:digits_mc", train_size=6, eval_size=4, seed=0)


def config(vlm_dir, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [*ARGS, "--model.path", str(vlm_dir), "--output_dir", str(out), *overrides])


def step_records(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "reward/mean" in r]
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in rows]


def all_finite(record: dict) -> bool:
    values = [x for v in record.values() for x in (v if isinstance(v, list) else [v])]
    return all(math.isfinite(x) for x in values)


@pytest.fixture(scope="module")
def image_run(vlm_dir, tmp_path_factory):
    """2 MoE-GRPO steps on digit images after 2 SFT steps, modality guidance on, a checkpoint after each step. Every
    rollout the loop generates is kept, with the guide it used."""
    out = tmp_path_factory.mktemp("image") / "run"
    seen = []

    def recording(*args, **kwargs):
        rollout = generate_rollout(*args, **kwargs)
        seen.append((rollout, kwargs["guide"]))
        return rollout

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(collect_module, "generate_rollout", recording)
        summary = train(config(vlm_dir, out, *IMAGE_RUN))
    return out, summary, seen


def assert_trained(out, summary):
    records = step_records(out)
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert all_finite(r), r
        for key in ("loss/token", "loss/gate", "loss/gate_ratio_mean", "loss/ratio_mean", "loss/lb", "optim/grad_norm"):
            assert key in r, key
        assert len(r["router/load/layer0"]) == E and abs(sum(r["router/load/layer0"]) - 1) < 1e-5
    assert 0.0 <= summary["accuracy_end"] <= 1.0
    model, processor = load_vlm(out / "final")  # the final model is a loadable Qwen3-VL-MoE checkpoint
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"


def test_two_steps_on_images_with_sft_and_modality_guidance(image_run, vlm):
    out, summary, seen = image_run
    assert_trained(out, summary)
    sft = [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]
    assert len(sft) == 2 and all(math.isfinite(r["loss/ce"]) and r["loss/ce"] > 0 for r in sft)
    state = GuidanceState.load(out / "guidance.json")
    assert state.group_names == TEXT_VISION and state.layers == (0, 1)
    assert state.counts.sum(-1).min() > 0  # both modalities were counted at every layer
    assert (state.allowed.sum(-1) == E - 1).all()  # 25 % of E=4: one expert off per (layer, group)
    assert len(seen) == 2 and all(isinstance(guide, Guide) and guide.generated_group == 0 for _, guide in seen)
    for rollout, guide in seen:
        assert_routes_respect_the_mask(rollout, guide.state.allowed, vision_token_ids(vlm[0]))


def test_two_steps_on_video(vlm_dir, tmp_path):
    """Video frames, micro-batches of 2 (the vision tensors are sliced per micro-batch), gate loss on all tokens."""
    out = tmp_path / "run"
    cfg = config(vlm_dir, out, "--task.name", "mm:motion_video", "--sft.steps", "0", "--micro_batch_size", "2",
                 "--loss.gate_tokens", "all")  # fmt: skip
    summary = train(cfg)
    assert_trained(out, summary)
    assert not (out / "guidance.json").exists()


def assert_routes_respect_the_mask(rollout, allowed, vision_ids):
    """Every routed, attended position uses experts its group allows: vision placeholders group 1, text 0."""
    experts = rollout.routing.experts.long()  # (L, B, S, K)
    routed = rollout.attention_mask.bool().clone()
    routed[:, -1] = False  # the last token is never fed back
    assert (experts[:, routed] >= 0).all()
    is_vision = torch.isin(rollout.input_ids, torch.tensor(sorted(vision_ids)))  # (B, S)
    assert (is_vision & routed).sum() > 0 and (~is_vision & routed).sum() > 0
    for li in range(experts.shape[0]):
        for group, where in ((1, is_vision & routed), (0, ~is_vision & routed)):
            used = experts[li][where].unique()
            assert allowed[li, group][used].all(), (li, group, used.tolist())


def test_resume_restores_guidance_and_continues_the_same_run(image_run, vlm_dir, tmp_path, monkeypatch):
    """Drop the step-2 checkpoint of the image run and resume: the guidance counts come from the checkpoint (no
    recalibration), guidance.json is rewritten identically and step 1 logs the same metrics."""
    done, _, _ = image_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    shutil.rmtree(checkpoint_path(out, 2))
    shutil.rmtree(out / "final")
    (out / "guidance.json").unlink()
    (out / "summary.json").unlink()

    def no_recalibration(*args, **kwargs):
        raise AssertionError("a resumed run must restore the guidance counts, not recount")

    monkeypatch.setattr(start_module, "calibrate", no_recalibration)
    cfg = dataclasses.replace(config(vlm_dir, out, *IMAGE_RUN), resume=str(out))
    train(cfg)
    assert (out / "guidance.json").read_text() == (done / "guidance.json").read_text()
    assert step_records(out) == step_records(done)


def test_rollout_traces_vision_and_text_and_masked_experts_are_never_sampled(vlm, digits):
    """Hand-made counts: text tokens favour experts 0, 1 and vision tokens 2, 3, so at 50 % the vision group may use
    only {2, 3} and the text group (prompt text and generated tokens) only {0, 1}."""
    model, processor = vlm
    counts = torch.tensor([[10, 10, 1, 1], [1, 1, 10, 10]]).expand(L, 2, E)  # (L, G, E)
    state = GuidanceState.from_counts(counts, percent=50.0, top_k=K, group_names=TEXT_VISION, layers=(0, 1))
    assert state.allowed[:, 1].tolist() == [[False, False, True, True]] * L
    guide = Guide.for_groups(state, groups="modality", vision_ids=vision_token_ids(model))
    rollout = generate_rollout(
        model,
        processor,
        digits.train[:2],
        group_size=G,
        max_new_tokens=3,
        policy=Multinomial(),
        generator=torch.Generator().manual_seed(0),
        guide=guide,
    )
    B, S = rollout.input_ids.shape
    P = rollout.prompt_width
    assert rollout.routing.experts.shape == (L, B, S, K) and (rollout.routing.experts[:, :, -1] == UNROUTED).all()
    is_vision = torch.isin(rollout.input_ids, torch.tensor(sorted(vision_token_ids(model))))
    assert (is_vision.sum(-1) == VISION_PER_IMAGE).all() and not is_vision[:, P:].any()  # vision only in prompts
    assert not torch.isin(rollout.input_ids[:, P:], torch.tensor(vision_special_ids(model))).any()
    assert rollout.mm_inputs["mm_token_type_ids"].shape == (B, P)
    assert torch.equal(rollout.mm_inputs["mm_token_type_ids"] == 1, is_vision[:, :P])
    assert_routes_respect_the_mask(rollout, state.allowed, vision_token_ids(model))
    vision_routes = rollout.routing.experts.long()[:, is_vision]  # (L, n, K)
    assert set(vision_routes.unique().tolist()) == {2, 3}


@pytest.fixture(scope="module")
def guided_rollout(vlm, digits):
    model, processor = vlm
    topk = generate_rollout(model, processor, digits.train[:3], group_size=1, max_new_tokens=3, policy=TopK(),
                            old_routing=None)  # fmt: skip
    state = calibrate_guide(model, [topk], groups="modality", percent=25.0, vision_ids=vision_token_ids(model))
    guide = Guide.for_groups(state, groups="modality", vision_ids=vision_token_ids(model))
    rollout = generate_rollout(
        model,
        processor,
        digits.train[:2],
        group_size=G,
        max_new_tokens=3,
        policy=Multinomial(),
        generator=torch.Generator().manual_seed(1),
        guide=guide,
    )
    return rollout, guide


def test_calibrate_modality_counts_every_routed_position_by_group(vlm, digits, guided_rollout):
    _, guide = guided_rollout
    topk = generate_rollout(vlm[0], vlm[1], digits.train[:3], group_size=1, max_new_tokens=3, policy=TopK(),
                            old_routing=None)  # fmt: skip  # the calibration rollout of the fixture, again
    ids, attn = topk.input_ids[:, :-1], topk.attention_mask[:, :-1].bool()  # the last position is never routed
    vision = torch.isin(ids, torch.tensor(sorted(vision_token_ids(vlm[0])))) & attn
    text = ~vision & attn  # prompt text and generated tokens
    counts = guide.state.counts  # (L, 2, E): every attended routed position chose K experts at every layer
    assert counts[:, 1].sum(-1).tolist() == [int(vision.sum()) * K] * L == [3 * VISION_PER_IMAGE * K] * L
    assert counts[:, 0].sum(-1).tolist() == [int(text.sum()) * K] * L


def test_replayed_old_logp_gives_ratio_one_at_the_first_update(vlm, guided_rollout):
    """The old-log-prob forward is the training forward: replaying the rollout (whole, or a shuffled micro-batch
    whose vision tensors are sliced) gives the rollout's log-probs bit for bit, so the first update has ratio 1."""
    model, _ = vlm
    rollout, guide = guided_rollout
    with torch.no_grad():
        again = policy_forward(model, rollout, rollout.routing)  # the rollout carries its mask and vision inputs
    assert rollout.expert_mask is not None and rollout.sampling.suppress_tokens  # guided, placeholders suppressed
    assert torch.equal(again.logp, rollout.old_logp) and torch.equal(again.set_logp, rollout.old_set_logp)
    cfg = TrainConfig()
    micro = dataclasses.replace(rollout, advantages=torch.linspace(-1.0, 1.0, rollout.batch_size))
    micro = micro.index_batch(torch.tensor([3, 0, 2]))  # a shuffled micro-batch
    assert micro.mm_inputs["pixel_values"].shape[0] == 3 * 64 and micro.mm_inputs["image_grid_thw"].shape == (3, 3)
    model.zero_grad(set_to_none=True)
    loss, metrics, _ = objective_for(cfg)(model, micro, Denominators(micro.batch_size), first_update=False)
    assert metrics["loss/ratio_mean"].item() == 1.0 and metrics["loss/gate_ratio_mean"].item() == 1.0
    assert metrics["loss/approx_kl"].item() == 0.0 and metrics["loss/gate_approx_kl"].item() == 0.0
    loss.backward()
    router = model.model.language_model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_concat_rollouts_repads_types_and_joins_vision_tensors(vlm, digits):
    """Two rollouts of different prompt widths (digits vs shapes prompts) become one batch whose replay gives each
    rollout's log-probs: mm_token_type_ids are left-padded like input_ids, pixel tensors concatenated in row order."""
    model, processor = vlm
    shapes = load_task("mm:shapes_count", train_size=1, eval_size=1, seed=0)
    gen = torch.Generator().manual_seed(2)
    a = generate_rollout(model, processor, digits.train[:1], group_size=G, max_new_tokens=3, policy=Multinomial(),
                         generator=gen)  # fmt: skip
    b = generate_rollout(model, processor, shapes.train[:1], group_size=G, max_new_tokens=2, policy=Multinomial(),
                         generator=gen)  # fmt: skip
    assert a.prompt_width != b.prompt_width
    c = concat_rollouts([a, b], PAD_ID)
    P, wide, narrow = c.prompt_width, max(a, b, key=lambda r: r.prompt_width), min(a, b, key=lambda r: r.prompt_width)
    assert c.mm_inputs["mm_token_type_ids"].shape == (2 * G, P)
    assert torch.equal(
        c.mm_inputs["pixel_values"], torch.cat([a.mm_inputs["pixel_values"], b.mm_inputs["pixel_values"]])
    )
    pad = P - narrow.prompt_width
    rows = slice(0, G) if narrow is a else slice(G, 2 * G)
    assert (c.mm_inputs["mm_token_type_ids"][rows, :pad] == 0).all() and wide.prompt_width == P
    assert torch.equal(c.mm_inputs["mm_token_type_ids"][rows, pad:], narrow.mm_inputs["mm_token_type_ids"])
    with torch.no_grad():
        fwd = policy_forward(model, c, c.routing)
    torch.testing.assert_close(fwd.logp * c.mask, c.old_logp * c.mask, atol=1e-5, rtol=0)


def test_encode_prompts_text_path_is_the_tokenizer_call(tokenizer, vlm, digits):
    items = [{"prompt": "1+2="}, {"prompt": "10+20="}]
    ids, mask, mm = encode_prompts(tokenizer, items, group_size=2)
    enc = tokenizer(["1+2=", "1+2=", "10+20=", "10+20="], return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)  # fmt: skip
    assert mm is None and torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    ids, mask, mm = encode_prompts(vlm[1], digits.train[:2], group_size=2)
    assert ids.shape[0] == 4 and set(mm) == {"mm_token_type_ids", "pixel_values", "image_grid_thw"}
    with pytest.raises(ValueError, match="text tokenizer.*qwen3_vl_moe"):
        encode_prompts(tokenizer, digits.train[:1])


def test_supervised_mm_batch_puts_the_answer_after_the_image_and_prompt(vlm, digits):
    _, processor = vlm
    items = digits.train[:2]
    ids, attn, target, mm = supervised_mm_batch(processor, items, "cpu")
    prompts, prompt_mask, _ = encode_prompts(processor, items)
    B, S = ids.shape
    assert S == prompts.shape[1] + 2  # answer letter + EOS after equal-width prompts
    for i, it in enumerate(items):
        letter = processor.tokenizer.convert_tokens_to_ids(it["answer"])
        assert ids[i, -2:].tolist() == [letter, EOS_ID]
        assert torch.equal(ids[i, :-2][prompt_mask[i].bool()], prompts[i][prompt_mask[i].bool()])
    assert target.shape == (B, S - 1) and target.sum(-1).tolist() == [2.0, 2.0]
    assert (target[:, -2:] == 1).all()  # logits at S-3, S-2 predict the answer and EOS
    assert torch.equal(mm["mm_token_type_ids"] == 1, torch.isin(ids, torch.tensor(sorted(vision_token_ids(processor)))))
    assert (mm["mm_token_type_ids"][:, -2:] == 0).all() and (ids[attn == 0] == PAD_ID).all()


def test_evaluate_and_routing_statistics_on_images_and_video(vlm, digits):
    model, processor = vlm
    video = load_task("mm:motion_video", train_size=1, eval_size=2, seed=0)
    items = digits.eval[:2] + video.eval
    completions = generate_greedy(model, processor, items, max_new_tokens=3)
    assert len(completions) == 4 and all(isinstance(c, str) for c in completions)
    assert not any(t in c for c in completions for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>"))
    result = evaluate(model, processor, items, digits.score, max_new_tokens=3)
    expected = [digits.score(c, it) for c, it in zip(completions, items)]  # greedy: evaluate sees the same text
    assert result["n"] == 4 and result["accuracy"] == sum(expected) / 4
    stats = routing_statistics_pass(model, processor, items, max_new_tokens=3, batch_size=4)
    vision = 2 * VISION_PER_IMAGE + 2 * 2 * VISION_PER_IMAGE  # 4 frames = 2 temporal groups of 16
    assert stats["all"]["n_tokens"] > vision  # the vision placeholders are routed and counted, with the text
    assert abs(sum(stats["all"]["usage"][0]) - 1) < 1e-5


def test_task_and_model_mismatches_are_config_errors(vlm_dir, tmp_path):
    text_on_vlm_guidance = config(vlm_dir, tmp_path / "a", "--task.name", "addition", "--sft.steps", "0",
                                  "--guidance.enabled", "true", "--guidance.groups", "modality")  # fmt: skip
    with pytest.raises(ConfigError, match="guidance.groups: modality groups"):
        train(text_on_vlm_guidance)
    mm_on_text_model = load_config(TrainConfig, None, [*ARGS, "--model.preset", "tiny", "--task.name", "mm:digits_mc",
                                                      "--output_dir", str(tmp_path / "b")])  # fmt: skip
    with pytest.raises(ConfigError, match="task.name: 'mm:digits_mc' shows images"):
        train(mm_on_text_model)
    with pytest.raises(ValueError, match="verifier='exact_match'"):
        load_task("mm:digits_mc", train_size=1, eval_size=1, seed=0, verifier="exact_match")


def test_model_family_qwen3_vl_moe_builds_the_tiny_vlm_and_model_path_loads_it(vlm, vlm_dir):
    """model.family=qwen3_vl_moe (in-process) and model.path (a local checkpoint) both give the model + processor."""
    from expertrl.config import ModelConfig
    from expertrl.decoding import is_processor, text_tokenizer
    from expertrl.runtime import is_vlm, model_and_tokenizer

    built, processor = model_and_tokenizer(ModelConfig(family="qwen3_vl_moe"), seed=0)
    loaded, loaded_processor = model_and_tokenizer(ModelConfig(path=str(vlm_dir)), seed=123)
    for model, proc in ((built, processor), (loaded, loaded_processor)):
        assert is_vlm(model) and is_processor(proc) and text_tokenizer(proc).eos_token_id == EOS_ID
        for (name, p), q in zip(model.named_parameters(), vlm[0].parameters()):
            assert torch.equal(p, q), name  # seed 0 = the fixture's weights; a checkpoint ignores the seed
    with pytest.raises(ValueError, match="model.num_experts / model.top_k"):
        model_and_tokenizer(ModelConfig(family="qwen3_vl_moe", num_experts=8), seed=0)
