"""Upcycling a dense Qwen3-VL into a Qwen3-VL-MoE: the dense function at init on image and video batches, the vision
tower copied exactly, the config mapped per part, checkpoints that plain transformers and ``load_vlm`` read back."""

import json

import pytest
import torch
from conftest import vlm_items
from transformers import AutoModelForImageTextToText

from expertrl.cli import upcycle_main
from expertrl.models import build_tiny_dense
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial
from expertrl.moe.upcycle import count_params, upcycle, upcycle_checkpoint
from expertrl.vlm import encode_mm_batch, vision_special_ids
from expertrl.vlm_models import build_tiny_dense_vlm, build_tiny_vlm, load_vlm, save_vlm

L, E, K = 2, 4, 2  # text layers of the tiny VLM; experts and top-K of the upcycled one (build_tiny_vlm's E and K)


@pytest.fixture(scope="module")
def dense_vlm():
    return build_tiny_dense_vlm(seed=0)


@pytest.fixture(scope="module")
def items():
    """Image items (one image each, two prompt lengths: left padding) and a video item (3 frames -> 2 groups)."""
    image, video = vlm_items()["image"], vlm_items()["video"]
    return {"image": [image, dict(image, prompt="A longer prompt, so the first row is padded")], "video": [video]}


@pytest.fixture(scope="module")
def batches(dense_vlm, items):
    _, processor = dense_vlm
    return {kind: encode_mm_batch(processor, item_list) for kind, item_list in items.items()}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _decoder_ffn(name: str) -> bool:
    return name.startswith("model.language_model.layers.") and ".mlp." in name


# --------------------------------------------------------------------------------------------- function preservation


@pytest.mark.parametrize("kind", ["image", "video"])
def test_noise_free_upcycle_computes_the_dense_function(dense_vlm, batches, kind):
    dense, _ = dense_vlm
    batch = batches[kind]
    assert ("pixel_values" in batch) == (kind == "image") and ("pixel_values_videos" in batch) == (kind == "video")
    moe = upcycle(dense, num_experts=E, top_k=K)
    assert type(moe).__name__ == "Qwen3VLMoeForConditionalGeneration" and not moe.training
    ref = _logits(dense, batch)
    torch.testing.assert_close(_logits(moe, batch), ref, atol=1e-5, rtol=0)

    sites = find_routers(moe)
    assert [s.name for s in sites] == [f"model.language_model.layers.{i}.mlp.gate" for i in range(L)]
    assert all(s.num_experts == E and s.top_k == K and s.renormalize for s in sites)  # renormalised: sum_k w_k = 1

    # Any expert set gives the dense function at noise 0, at vision and text positions alike.
    with route(moe, Multinomial(), generator=torch.Generator().manual_seed(0)) as rec:
        sampled = _logits(moe, batch)
    torch.testing.assert_close(sampled, ref, atol=1e-5, rtol=0)
    experts = rec.trace(batch_size=len(batch["input_ids"])).experts  # (L, B, S, K)
    assert len(experts.unique()) == E, "multinomial routing should have used every expert"
    if kind == "image":  # the same greedy completion (vision pads suppressed, as in rollouts)
        kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=vision_special_ids(dense))
        assert torch.equal(moe.generate(**batch, **kw), dense.generate(**batch, **kw))


def test_tiny_dense_vlm_upcycles_to_the_shapes_and_config_of_build_tiny_vlm(dense_vlm):
    dense, processor = dense_vlm
    assert type(dense).__name__ == "Qwen3VLForConditionalGeneration" and not dense.training
    ref, ref_processor = build_tiny_vlm(seed=0)
    assert processor.tokenizer.get_vocab() == ref_processor.tokenizer.get_vocab()
    assert processor.image_processor.to_dict() == ref_processor.image_processor.to_dict()
    moe = upcycle(dense, num_experts=E, top_k=K)
    assert {k: v.shape for k, v in moe.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert moe.config.to_dict() == ref.config.to_dict()  # text, vision and top-level fields alike
    assert moe.config.text_config.intermediate_size == dense.config.text_config.intermediate_size == 32


def test_vision_tower_and_non_ffn_weights_are_copied_exactly_and_input_untouched(dense_vlm):
    dense, _ = dense_vlm
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rng = torch.get_rng_state()
    moe = upcycle(dense, num_experts=E, top_k=K, noise_std=0.1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng), "upcycle must not move the global RNG"
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    moe_sd = moe.state_dict()
    copied = [k for k in before if not _decoder_ffn(k)]
    vision_ffn = [k for k in copied if k.startswith("model.visual.") and ".mlp." in k]
    assert len(vision_ffn) == 4 * 2, "the vision blocks' FFNs (fc1, fc2: weight, bias; 2 blocks) are copied too"
    assert "model.language_model.embed_tokens.weight" in copied and "lm_head.weight" in copied
    assert all(torch.equal(moe_sd[k], before[k]) for k in copied)
    for i in range(L):  # the noisy experts are near, not equal to, the dense FFN; routers are new
        ffn = f"model.language_model.layers.{i}.mlp."
        gate_up = torch.cat([before[ffn + "gate_proj.weight"], before[ffn + "up_proj.weight"]])  # (2I, H)
        rel = (moe_sd[ffn + "experts.gate_up_proj"] - gate_up) / gate_up.std()  # (E, 2I, H) in units of std(W)
        assert 0.07 < rel.std().item() < 0.13  # noise_std=0.1 relative (per matrix); 4*64*32 draws
        assert moe_sd[ffn + "gate.weight"].shape == (E, 32)
    assert moe.generation_config.to_dict() == dense.generation_config.to_dict()


def test_count_params_of_the_upcycled_vlm(dense_vlm):
    dense, _ = dense_vlm
    ffn, router = 3 * 32 * 32, E * 32  # gate, up, down of one dense FFN (H = I = 32); (E, H) router
    n_dense = sum(p.numel() for p in dense.parameters())
    assert count_params(dense) == (n_dense, n_dense)  # no experts: everything active
    total, active = count_params(upcycle(dense, num_experts=E, top_k=K))
    assert total == n_dense + L * ((E - 1) * ffn + router)  # E-1 more FFN copies and a router per text layer
    assert active == n_dense + L * ((K - 1) * ffn + router)  # K=2 active experts = one extra FFN per layer


# --------------------------------------------------------------------------------------------- errors


def test_config_and_argument_errors_name_the_problem():
    dense, _ = build_tiny_dense_vlm(seed=0)
    with pytest.raises(ValueError, match="norm_topk_prob=False is impossible for qwen3_vl_moe"):
        upcycle(dense, norm_topk_prob=False)
    with pytest.raises(ValueError, match="top_k must be between 1 and num_experts=4, got top_k=5"):
        upcycle(dense, num_experts=4, top_k=5)
    dense.config.text_config.my_text_field = 1
    with pytest.raises(ValueError, match=r"qwen3_vl_moe_text config has no field\(s\) \['my_text_field'\] of the q"):
        upcycle(dense)
    del dense.config.text_config.my_text_field
    dense.config.vision_config.my_vision_field = 1
    with pytest.raises(ValueError, match=r"qwen3_vl_moe_vision config has no field\(s\) \['my_vision_field'\]"):
        upcycle(dense)
    moe, _ = build_tiny_vlm(seed=0)
    with pytest.raises(ValueError, match=r"'qwen3_vl_moe' is already a Mixture-of-Experts.*'qwen3_vl'\]"):
        upcycle(moe)


# --------------------------------------------------------------------------------------------- checkpoints and CLI


def test_upcycle_checkpoint_round_trip(dense_vlm, items, batches, tmp_path):
    dense, processor = dense_vlm
    save_vlm(dense, processor, tmp_path / "dense")
    loaded_dense, _ = load_vlm(tmp_path / "dense", experts_implementation="eager")  # a dense model ignores the kernel
    assert type(loaded_dense).__name__ == "Qwen3VLForConditionalGeneration"
    assert torch.equal(_logits(loaded_dense, batches["image"]), _logits(dense, batches["image"]))

    kwargs = dict(num_experts=E, top_k=K, noise_std=0.05, seed=7)
    out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", **kwargs)
    assert out == tmp_path / "moe"
    in_memory = upcycle(dense, **kwargs)
    loaded, loaded_processor = load_vlm(out)
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(loaded).__name__ == type(plain).__name__ == "Qwen3VLMoeForConditionalGeneration"
    for kind, batch in batches.items():
        again = encode_mm_batch(loaded_processor, items[kind])
        assert again.keys() == batch.keys() and all(torch.equal(batch[k], again[k]) for k in batch)
        ref = _logits(in_memory, batch)
        assert torch.equal(_logits(loaded, batch), ref) and torch.equal(_logits(plain, batch), ref)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tmp_path / "dense" / name).read_bytes()
    record = json.loads((out / "upcycled_from.json").read_text())
    assert (record["source_model_type"], record["model_type"]) == ("qwen3_vl", "qwen3_vl_moe")
    assert (record["num_experts"], record["top_k"], record["noise_std"], record["seed"]) == (E, K, 0.05, 7)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_upcycle_main_on_a_vlm_and_load_vlm_errors(dense_vlm, tmp_path, capsys):
    dense, processor = dense_vlm
    save_vlm(dense, processor, tmp_path / "dense")
    assert upcycle_main([str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    n, ffn, router = sum(p.numel() for p in dense.parameters()), 3 * 32 * 32, 4 * 32  # as in test_count_params_...
    assert f"(qwen3_vl, {n:,} params)" in printed and "(qwen3_vl_moe, E=4, K=2" in printed
    assert f"{n + 2 * (3 * ffn + router):,} params, {n + 2 * (ffn + router):,} active per token" in printed
    with pytest.raises(SystemExit) as exit_info:  # norm_topk_prob=False cannot be expressed by Qwen3-VL-MoE
        upcycle_main([str(tmp_path / "dense"), str(tmp_path / "other"), "--no-norm-topk-prob"])
    assert exit_info.value.code == 2 and "impossible for qwen3_vl_moe" in capsys.readouterr().err
    build_tiny_dense("qwen3").save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match=r"a 'qwen3' model; load_vlm reads the model_types \['qwen3_vl', 'qwen3_vl_m"):
        load_vlm(tmp_path / "text")


def test_training_settings_upcycle_a_dense_vlm_checkpoint(tmp_path):
    """`model.path` = a dense Qwen3-VL directory + `model.upcycle` gives the Qwen3-VL-MoE the loop trains."""
    from expertrl.config import ModelConfig, UpcycleConfig
    from expertrl.runtime import is_vlm, model_and_tokenizer
    from expertrl.vlm_models import build_tiny_dense_vlm, save_vlm

    dense, processor = build_tiny_dense_vlm()
    save_vlm(dense, processor, tmp_path / "dense")
    cfg = ModelConfig(path=str(tmp_path / "dense"), upcycle=UpcycleConfig(num_experts=4, top_k=2))
    model, proc = model_and_tokenizer(cfg, seed=0)
    assert is_vlm(model) and model.config.model_type == "qwen3_vl_moe"
    assert [(s.num_experts, s.top_k) for s in find_routers(model)] == [(4, 2)] * len(find_routers(model))
    assert proc.tokenizer is not None
