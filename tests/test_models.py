import pytest
import torch

from expertrl.families import TINY_MOE as FAMILIES
from expertrl.models import PRESETS, build_moe_config, build_tiny_moe, load_model
from expertrl.tokenizer import EOS_ID, PAD_ID

IDS = torch.tensor([[PAD_ID, PAD_ID, 20, 21, 22], [20, 21, 22, 23, 24]])  # (B=2, T=5), first row left-padded
MASK = (IDS != PAD_ID).long()


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_forwards_and_generates(family):
    model = build_tiny_moe(family, "tiny")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.config._experts_implementation == "expertrl_grouped_mm"
    logits = model(IDS, attention_mask=MASK).logits
    assert logits.shape == (2, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(IDS, attention_mask=MASK, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)
    assert model.generation_config.pad_token_id == PAD_ID and model.generation_config.eos_token_id == EOS_ID


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_logits(family, tmp_path):
    model = build_tiny_moe(family, "tiny").eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32, experts_implementation="expertrl_grouped_mm").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS, attention_mask=MASK).logits, model(IDS, attention_mask=MASK).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_are_randomly_initialised(family):
    model = build_tiny_moe(family, "tiny")
    for layer in model.model.layers:
        weight = layer.mlp.gate.weight  # (E, H)
        assert weight.shape == (4, 32)
        assert weight.abs().min() > 0


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_moe(seed=3), build_tiny_moe(seed=3), build_tiny_moe(seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.gate.weight, c.model.layers[0].mlp.gate.weight)


def test_config_field_names_per_family():
    assert build_moe_config("qwen3_moe", "small", 101).num_experts == PRESETS["small"]["experts"]
    assert build_moe_config("mixtral", "small", 101, num_experts=6).num_local_experts == 6
    dsv3 = build_moe_config("deepseek_v3", "tiny", 101, top_k=1)
    assert dsv3.n_routed_experts == 4 and dsv3.num_experts_per_tok == 1
    assert dsv3.num_key_value_heads == dsv3.num_attention_heads and dsv3.first_k_dense_replace == 0
    qwen2 = build_moe_config("qwen2_moe", "tiny", 101)
    assert qwen2.shared_expert_intermediate_size == qwen2.moe_intermediate_size == 32
    for family in ("qwen3_moe", "qwen2_moe", "olmoe"):
        assert build_moe_config(family, "tiny", 101).norm_topk_prob is True
    eager = build_moe_config("olmoe", "tiny", 101, experts_implementation="eager", router_aux_loss_coef=0.0)
    assert eager._experts_implementation == "eager" and eager.router_aux_loss_coef == 0.0


def test_shape_presets_belong_to_one_family_and_vocabulary():
    assert build_moe_config("qwen3_moe", "qwen3moe-30b-shape").vocab_size == 151_936  # the preset's vocabulary
    assert build_moe_config("olmoe", "olmoe-shape").norm_topk_prob is False
    with pytest.raises(ValueError, match="router shape of olmoe, not of mixtral"):
        build_moe_config("mixtral", "olmoe-shape")
    with pytest.raises(ValueError, match="vocabulary of 151936, not 357"):
        build_moe_config("qwen3_moe", "qwen3moe-30b-shape", 357)


def test_bad_names_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="num_expert"):
        build_moe_config("qwen3_moe", "tiny", 101, num_expert=3)
    with pytest.raises(ValueError, match="choose from"):
        build_moe_config("gpt2", "tiny", 101)
    with pytest.raises(ValueError, match="choose from"):
        build_moe_config("qwen3_moe", "huge", 101)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
