"""Real router shapes at reduced width and depth (``families.SHAPE_PRESETS``): each builds the router of the checkpoint
it is named after, and MoE-GRPO, RSPO, R3 and the LoRA-MoE path train on it end to end."""

from __future__ import annotations

import json

import pytest
import torch

from expertrl.config import ModelConfig, TrainConfig
from expertrl.configio import load_config
from expertrl.families import PRESETS, SHAPE_PRESETS
from expertrl.moe.adapters import find_routers
from expertrl.presets import preset_overrides
from expertrl.runtime import model_and_tokenizer
from expertrl.train import train

# preset -> (family, E, K, renormalised, shared expert width or None, vocabulary or None), from the model cards
SHAPES = {
    "olmoe-shape": ("olmoe", 64, 8, False, None, None),
    "qwen3moe-30b-shape": ("qwen3_moe", 128, 8, True, None, 151_936),
    "qwen2moe-shape": ("qwen2_moe", 60, 4, False, 176, None),
    "mixtral-shape": ("mixtral", 8, 2, True, None, None),
}
RUN = ["--sft.steps", "0", "--steps", "2", "--rollout.prompts_per_step", "2", "--rollout.group_size", "2",
       "--rollout.max_new_tokens", "4", "--task.train_size", "8", "--task.eval_size", "2", "--micro_batch_size", "2",
       "--eval_every", "0", "--progress", "false"]  # fmt: skip
METHODS = {
    "moe_grpo": [],  # the default job: sampled routes replayed, Gate-GRPO on
    "rspo": preset_overrides("rspo"),
    "r3": preset_overrides("grpo,r3"),
}


def test_the_shape_table_is_the_preset_table():
    assert set(SHAPES) == set(SHAPE_PRESETS)
    for name, (family, E, K, *_) in SHAPES.items():
        p = PRESETS[name]
        assert (p["family"], p["experts"], p["top_k"]) == (family, E, K)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_shape_preset_builds_the_real_router(name):
    family, E, K, renorm, shared, vocab = SHAPES[name]
    model, tok = model_and_tokenizer(ModelConfig(family=family, preset=name), seed=0)
    sites = find_routers(model)
    assert len(sites) == 2 and all((s.num_experts, s.top_k, s.renormalize) == (E, K, renorm) for s in sites)
    assert model.config.vocab_size == len(tok) == (vocab or 357)
    if shared is not None:
        assert model.config.shared_expert_intermediate_size == shared == 4 * model.config.moe_intermediate_size
    assert tok.decode(tok("12+3=")["input_ids"]) == "12+3="  # text still encodes one id per character


def _train(tmp_path, args: list[str]) -> list[dict]:
    cfg = load_config(TrainConfig, None, [*RUN, *args, "--output_dir", str(tmp_path / "run")])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_rl_methods_train_on_each_router_shape(tmp_path, name, method):
    family, E, K, *_ = SHAPES[name]
    extra = []
    if name == "qwen3moe-30b-shape" and method == "moe_grpo":  # the real-model settings together, once
        extra = ["--model.dtype", "bfloat16", "--model.router_dtype", "float64", "--model.gradient_checkpointing",
                 "true"]  # fmt: skip
    steps = _train(tmp_path, [*METHODS[method], "--model.family", family, "--model.preset", name, *extra])
    assert [r["step"] for r in steps] == [0, 1]
    for r in steps:
        assert len(r["router/load/layer0"]) == E and r["optim/applied_updates"] == 2
        assert torch.isfinite(torch.tensor(r["loss/total"])) and r["optim/grad_norm"] > 0
        lp = 8 if extra else 4  # the set log-prob is recorded at router precision (float64 here)
        per_position = 2 * (K * 1 + lp)  # L = 2 layers of K one-byte ids (E <= 128) + a set log-prob
        assert r["rollout/trace_bytes"] % per_position == 0
    first = steps[0]
    if method == "moe_grpo":
        assert "loss/gate_ratio_mean" in first
    if method == "rspo":
        assert 0.8 <= first["router/shift/gamma_mean"] <= 1.0
    if method == "r3":  # top-K rollout routes, replayed: at the rollout's weights the trainer's top-K agrees
        assert first["router/shift/rollout_train_overlap"] > 0.99


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_lora_moe_trains_with_each_router_shape(tmp_path, name):
    """LoRA-MoE adapters with the shape's E, K and renormalisation on a dense Qwen3 base of the shape's width."""
    _, E, K, renorm, *_ = SHAPES[name]
    adapter = ["--model.adapter.kind", "lora_moe", "--model.adapter.num_experts", str(E), "--model.adapter.top_k",
               str(K), "--model.adapter.norm_topk_prob", str(renorm).lower(), "--model.adapter.rank", "4"]  # fmt: skip
    steps = _train(tmp_path, ["--model.family", "qwen3", "--model.preset", name, *adapter])
    for r in steps:
        loads = [k for k in r if k.startswith("router/load/")]
        assert len(loads) == 2 * 3 and all(len(r[k]) == E for k in loads)  # 2 layers x gate/up/down
        assert r["optim/grad_norm"] > 0 and "loss/gate_ratio_mean" in r
