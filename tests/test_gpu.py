"""The CUDA path (``pytest -m gpu`` on a GPU machine; skipped elsewhere, so it is not counted as CPU coverage).

The routing generator lives on the model's device, routing hooks run on CUDA tensors, a short MoE-GRPO run
(sampled experts, Gate-GRPO, replay) and a LoRA-MoE run train end to end on the GPU, and ``expertrl sft`` and
``expertrl eval`` run their model there too."""

import json

import pytest
import torch
from conftest import tiny_args

from expertrl import evaluate, sft
from expertrl.cli import main
from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.models import build_tiny_moe
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial, TopK, replay_policy_for
from expertrl.presets import preset_overrides
from expertrl.runtime import place_model
from expertrl.train import train

pytestmark = pytest.mark.gpu

ARGS = tiny_args(**{"sft.steps": 2})


def test_routing_hooks_on_cuda_match_native_and_replay():
    model = build_tiny_moe("qwen3_moe", "tiny").cuda().eval()
    ids = torch.randint(3, 100, (2, 6), device="cuda")
    native = model(ids).logits
    with route(model, TopK()):
        assert torch.equal(model(ids).logits, native)
    g = torch.Generator(device="cuda").manual_seed(0)
    with route(model, Multinomial(), generator=g) as rec:
        sampled = model(ids).logits
    with route(model, replay_policy_for(rec.trace(2))):
        assert torch.equal(model(ids).logits, sampled)


@pytest.mark.parametrize("preset", ["moe_grpo", "lora_moe,ro_grpo_smooth"])
def test_short_run_on_cuda(tmp_path, preset):
    extra = ["--model.family", "qwen3"] if preset.startswith("lora") else []
    cfg = load_config(TrainConfig, None, [*ARGS, *preset_overrides(preset), *extra, "--output_dir", str(tmp_path)])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss/token"])) for r in rows if "loss/token" in r)
    assert summary["skipped_steps"] == 0


def test_sft_and_eval_run_on_the_gpu(tmp_path, monkeypatch):
    """Single-process commands take ``runtime.compute_device()``: their model's weights are on the GPU when placed."""
    placed = []

    def place(model, device=None):
        out = place_model(model, device)
        placed.append(next(out.parameters()).device.type)
        return out

    for module in (sft, evaluate):
        monkeypatch.setattr(module, "place_model", place)
    args = ["sft", "--model.preset", "tiny", "--sft.steps", "2", "--sft.batch_size", "8", "--task.train_size", "16",
            "--task.eval_size", "2", "--progress", "false", "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert main(["eval", "--model.path", str(tmp_path / "final"), "--task.eval_size", "2"]) == 0
    assert placed == ["cuda", "cuda"]
