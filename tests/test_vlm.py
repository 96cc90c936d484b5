"""Tiny Qwen3-VL-MoE: build/save/load, multimodal batches, modality groups, routed generate and exact replay."""

import numpy as np
import pytest
import torch
from conftest import vlm_items
from PIL import Image

from expertrl.moe.adapters import find_routers
from expertrl.moe.guidance import modality_token_groups
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial, replay_policy_for
from expertrl.ops import pad_along, token_logp
from expertrl.policy import position_ids_from_mask
from expertrl.rollout import completion_mask
from expertrl.tokenizer import EOS_ID, PAD_ID
from expertrl.types import UNROUTED, RoutingTrace
from expertrl.vlm import encode_mm_batch, index_mm_batch, mm_forward_kwargs, vision_special_ids, vision_token_ids
from expertrl.vlm_models import build_tiny_vlm, load_vlm, save_vlm

L, E, K, G, MAX_NEW = 2, 4, 2, 2, 2
MERGE = 2  # spatial merge: 2x2 patches become one token


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm(seed=0)


@pytest.fixture(scope="module")
def items():
    return vlm_items()


def expected_vision_tokens(batch: dict) -> torch.Tensor:
    """(B,) placeholders each row should have: grid t*h*w / merge^2 summed over the row's images and videos."""
    per = []
    for grid in ("image_grid_thw", "video_grid_thw"):
        if grid in batch:
            per.append(batch[grid].prod(-1) // MERGE**2)
    return torch.cat(per)


def test_tiny_vlm_builds_with_routers_only_in_the_text_decoder(vlm):
    model, processor = vlm
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration" and not model.training
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    sites = find_routers(model)
    assert [s.name for s in sites] == [f"model.language_model.layers.{i}.mlp.gate" for i in range(L)]
    assert all(s.num_experts == E and s.top_k == K and s.renormalize for s in sites)
    tok = processor.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD_ID, EOS_ID)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>") == processor.video_token_id
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert vision_token_ids(processor) == vision_token_ids(model) == {model.config.image_token_id,
                                                                      model.config.video_token_id}  # fmt: skip
    again, _ = build_tiny_vlm(seed=0)
    other, _ = build_tiny_vlm(seed=1)
    w = model.model.language_model.layers[0].mlp.gate.weight
    assert torch.equal(again.model.language_model.layers[0].mlp.gate.weight, w)
    assert not torch.equal(other.model.language_model.layers[0].mlp.gate.weight, w)


def test_save_and_load_give_identical_inputs_and_logits(vlm, items, tmp_path):
    model, processor = vlm
    save_vlm(model, processor, tmp_path / "vlm")
    loaded, loaded_processor = load_vlm(tmp_path / "vlm")
    batch = encode_mm_batch(processor, [items["image"], items["video"]])
    batch2 = encode_mm_batch(loaded_processor, [items["image"], items["video"]])
    assert batch.keys() == batch2.keys()
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch2).logits)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vlm(tmp_path)


def test_encode_mm_batch_groups_padding_and_vision_kwargs(vlm, items):
    _, processor = vlm
    batch = encode_mm_batch(processor, [items["image"], items["video"], items["two"]], group_size=G)
    B, S = batch["input_ids"].shape
    assert B == 3 * G
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                          "pixel_values_videos", "video_grid_thw"}  # fmt: skip
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()  # left pads
    for i in range(0, B, G):  # groups are contiguous copies of one prompt
        assert all(torch.equal(batch["input_ids"][i], batch["input_ids"][j]) for j in range(i, i + G))
    # 32x32 images are 8x8 patches of 4 px; 3 frames are padded to 4 and grouped in temporal pairs.
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * (G + 2 * G)
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]] * G
    assert batch["pixel_values"].shape == (3 * G * 64, 3 * 2 * 4 * 4)
    assert batch["pixel_values_videos"].shape == (G * 128, 3 * 2 * 4 * 4)
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|vision_end|>" + items["image"]["prompt"])

    with pytest.raises(ValueError, match=r"items\[0\]: give either 'images' or 'video'"):
        encode_mm_batch(processor, [dict(prompt="q", images=[], video=[])])
    with pytest.raises(TypeError, match=r"items\[0\].images\[0\] must be a PIL.Image"):
        encode_mm_batch(processor, [dict(prompt="q", images=[np.zeros((32, 32, 3))])])


def test_modality_groups_golden():
    ids = torch.tensor([[0, 0, 5, 9, 9, 6, 7], [0, 5, 8, 8, 9, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[-1, -1, 0, 1, 1, 0, 0], [-1, 0, 1, 1, 1, 0, 0]])
    groups = modality_token_groups(ids, mask, {8, 9})
    assert groups.dtype == torch.int64 and torch.equal(groups, expected)


def test_modality_groups_line_up_with_the_expanded_placeholders(vlm, items):
    model, processor = vlm
    batch = encode_mm_batch(processor, [items["image"], items["video"], items["two"]])
    groups = modality_token_groups(batch["input_ids"], batch["attention_mask"], vision_token_ids(processor))
    per_item = expected_vision_tokens(batch)  # images in row order: [image, two, two], then the video
    expected = torch.stack([per_item[0], per_item[3], per_item[1] + per_item[2]])  # (3,) per row
    assert torch.equal((groups == 1).sum(-1), expected)
    assert expected.tolist() == [16, 32, 32]
    assert torch.equal(groups == 1, batch["mm_token_type_ids"] > 0)  # the processor's own modality labels
    assert torch.equal(groups == -1, batch["attention_mask"] == 0)
    cfg = model.config
    assert ((batch["input_ids"] == cfg.image_token_id) | (batch["input_ids"] == cfg.video_token_id))[groups == 1].all()


def test_index_mm_batch_matches_encoding_the_subset(vlm, items):
    _, processor = vlm
    order = [items["two"], items["video"], items["image"]]
    full = encode_mm_batch(processor, order, group_size=G)
    index = torch.tensor([5, 0, 2])  # image item, then the two-image item, then the video item
    sub = index_mm_batch(full, index)
    direct = encode_mm_batch(processor, [items["image"], items["two"], items["video"]])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(sub[key], direct[key]), key
    assert torch.equal(sub["input_ids"], full["input_ids"][index])
    assert torch.equal(sub["mm_token_type_ids"], full["mm_token_type_ids"][index])
    images_only = index_mm_batch(full, torch.tensor([0, 1]))
    assert "pixel_values_videos" in images_only and images_only["video_grid_thw"].shape == (0, 3)
    assert images_only["pixel_values"].shape[0] == 2 * 2 * 64


def rollout(model, processor, item_list, seed=0):
    """generate under multinomial routing, like rollout.generate_rollout with the vision kwargs passed."""
    batch = encode_mm_batch(processor, item_list, group_size=G)
    B, P = batch["input_ids"].shape
    with torch.no_grad(), route(model, Multinomial(), generator=torch.Generator().manual_seed(seed)) as rec:
        out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                             suppress_tokens=vision_special_ids(model))  # fmt: skip
    return batch, out, rec.trace(B)


@pytest.mark.parametrize("kinds", [("image",), ("video",), ("image", "video", "two")])
def test_routed_generate_traces_every_vision_and_text_position(vlm, items, kinds):
    model, processor = vlm
    batch, out, trace = rollout(model, processor, [items[k] for k in kinds])
    B, P = batch["input_ids"].shape
    S = out.sequences.shape[1]
    assert S == P + MAX_NEW and B == len(kinds) * G
    assert trace.experts.shape == (L, B, S - 1, K)  # S is the *expanded* prompt + completion
    assert trace.set_logp.shape == (L, B, S - 1)
    assert ((trace.experts >= 0) & (trace.experts < E)).all()  # every position routed, vision and pads included
    assert not torch.isin(out.sequences[:, P:], torch.tensor(vision_special_ids(model))).any()
    assert (trace.experts[..., 0] != trace.experts[..., 1]).all()  # K distinct experts per token
    attn = torch.cat([batch["attention_mask"], torch.ones(B, MAX_NEW, dtype=torch.long)], 1)
    groups = modality_token_groups(out.sequences, attn, vision_token_ids(processor))[:, :-1]  # (B, S-1)
    assert (groups == 1).sum() == expected_vision_tokens(batch).sum()  # the placeholders are inside the trace
    assert torch.isfinite(trace.set_logp).all() and (trace.set_logp <= 0).all()


def test_replayed_forward_reproduces_the_rollout(vlm, items):
    model, processor = vlm
    batch, out, rec_trace = rollout(model, processor, [items["image"], items["video"]], seed=1)
    seq = out.sequences
    B, P = batch["input_ids"].shape
    S, C = seq.shape[1], seq.shape[1] - P
    trace = RoutingTrace(pad_along(rec_trace.experts, 2, 0, 1, UNROUTED), pad_along(rec_trace.set_logp, 2, 0, 1, 0.0),
                         rec_trace.layers, rec_trace.num_experts)  # fmt: skip
    attn = torch.cat([batch["attention_mask"], completion_mask(seq[:, P:], EOS_ID).long()], 1)  # (B, S)
    kwargs = mm_forward_kwargs(batch, S)
    assert kwargs["mm_token_type_ids"].shape == (B, S) and (kwargs["mm_token_type_ids"][:, P:] == 0).all()

    def replay(**extra):
        with torch.no_grad(), route(model, replay_policy_for(trace)) as rec:
            logits = model(input_ids=seq, attention_mask=attn, use_cache=False, **kwargs, **extra).logits
        return logits, rec

    logits, rec = replay()
    assert torch.equal(rec.trace(B).experts[:, :, :-1], rec_trace.experts)  # the replay used the rollout's routes
    gen_logits = torch.stack(out.logits, 1)  # (B, C, V) the scores generate saw
    torch.testing.assert_close(logits[:, P - 1 : -1], gen_logits, atol=1e-5, rtol=0)  # KV-cache numerics only
    allowed = gen_logits.index_fill(-1, torch.tensor(vision_special_ids(model)), float("-inf"))
    assert torch.equal(allowed.argmax(-1), seq[:, P:])  # greedy: the tokens are the argmaxes over allowed tokens
    torch.testing.assert_close(rec.set_logp(B)[:, :, :-1], rec_trace.set_logp, atol=1e-5, rtol=0)
    logp = token_logp(logits[:, P - 1 : -1], seq[:, P:])  # (B, C)
    assert logp.shape == (B, C) and (logp <= 0).all()

    again, _ = replay()
    assert torch.equal(again, logits)  # replay is deterministic, bit for bit
    # The text rollout's positions (index among attended tokens) are wrong for M-RoPE: vision tokens share 3-D
    # positions, so the replayed forward must leave position_ids to the model.
    wrong, _ = replay(position_ids=position_ids_from_mask(attn))
    assert (wrong[:, P - 1 : -1] - gen_logits).abs().max() > 1e-3


def test_replaying_a_forward_trace_reproduces_its_logits_exactly(vlm, items):
    model, processor = vlm
    batch = encode_mm_batch(processor, [items["video"], items["two"]], group_size=G)
    B = batch["input_ids"].shape[0]
    with torch.no_grad(), route(model, Multinomial(), generator=torch.Generator().manual_seed(2)) as rec:
        sampled = model(**batch).logits
    trace = rec.trace(B)
    assert trace.experts.shape == (L, B, batch["input_ids"].shape[1], K)
    with torch.no_grad(), route(model, replay_policy_for(trace)):
        replayed = model(**batch).logits
    assert torch.equal(replayed, sampled)


def test_gate_logp_of_replayed_routes_reaches_the_routers(vlm, items):
    """Gate-GRPO's gradient path with vision inputs: replayed experts' log-probs are differentiable in the routers."""
    model, processor = vlm
    batch = encode_mm_batch(processor, [items["image"], items["video"]])
    B = batch["input_ids"].shape[0]
    with torch.no_grad(), route(model, Multinomial(), generator=torch.Generator().manual_seed(3)) as rec:
        model(**batch)
    groups = modality_token_groups(batch["input_ids"], batch["attention_mask"], vision_token_ids(processor))  # (B, P)
    model.zero_grad(set_to_none=True)
    with route(model, replay_policy_for(rec.trace(B))) as rec2:
        model(**batch)
    set_logp = rec2.set_logp(B)  # (L, B, P)
    set_logp[:, groups == 1].sum().backward()  # vision positions only
    for site in find_routers(model):
        assert site.weight.grad is not None and site.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_torch_video_processor_normalises_and_resizes(vlm):
    """Golden values: a pure-red frame is (x/255 - 0.5)/0.5 = +1 in R, -1 in G and B, patch rows laid out as
    (C, T, p, p); 36x36 frames are resized to the nearest multiple of patch*merge = 8 (32x32)."""
    _, processor = vlm
    red = [Image.new("RGB", (32, 32), (255, 0, 0))] * 2
    batch = encode_mm_batch(processor, [dict(prompt="q", video=red)])
    assert batch["video_grid_thw"].tolist() == [[1, 8, 8]]
    expected = torch.cat([torch.ones(32), -torch.ones(64)])  # C*T*p*p = 3*2*4*4, channel-major
    assert torch.equal(batch["pixel_values_videos"], expected.expand(64, -1))
    grey = [Image.new("RGB", (36, 36), (51, 51, 51)), Image.new("RGB", (36, 36), (204, 204, 204))]
    resized = encode_mm_batch(processor, [dict(prompt="q", video=grey)])
    assert resized["video_grid_thw"].tolist() == [[1, 8, 8]]
    frames = resized["pixel_values_videos"].view(64, 3, 2, 16)  # (patches, C, T, p*p)
    torch.testing.assert_close(frames[:, :, 0], torch.full((64, 3, 16), 51 / 127.5 - 1))  # constant frames stay
    torch.testing.assert_close(frames[:, :, 1], torch.full((64, 3, 16), 204 / 127.5 - 1))  # constant when resized
