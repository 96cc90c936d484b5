"""Whole runs of the RO-GRPO side: LoRA-MoE adapters with routing rewards, the plain-LoRA baseline, in-process
upcycling, and router guidance. Each checks what only a real run shows: the files a run leaves, that they load, and
that a resumed run repeats the uninterrupted one step for step (routing-reward history and guidance mask included).
"""

import json

import pytest
import torch
from conftest import tiny_args
from transformers import AutoModelForCausalLM

from expertrl.config import ConfigError, EvalConfig, SFTJobConfig, TrainConfig
from expertrl.configio import load_config
from expertrl.evaluate import run_eval
from expertrl.moe.adapters import find_routers
from expertrl.moe.lora_moe import adapter_settings
from expertrl.presets import preset_overrides
from expertrl.runtime import model_and_tokenizer
from expertrl.sft import run_sft
from expertrl.train import train

pytestmark = pytest.mark.slow

ARGS = tiny_args(steps=4, save_every=1, keep_checkpoints=4, **{"sft.steps": 2})
UNTIMED = "time/"


def settings(*overrides):
    """``--preset NAME`` expanded like the CLI does (presets first, explicit flags win)."""
    args, presets = [], []
    it = iter(overrides)
    for arg in it:
        if arg == "--preset":
            presets += preset_overrides(next(it))
        else:
            args.append(arg)
    return load_config(TrainConfig, None, [*ARGS, *presets, *args])


def run(out, *overrides):
    return train(settings("--output_dir", str(out), *overrides))


def step_metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in rows if "reward/mean" in r]


def test_lora_moe_relative_reward_run_resumes_exactly(tmp_path):
    """A LoRA-MoE run with the Relative routing reward, stopped after 2 steps and resumed, logs what the
    uninterrupted run logs: the adapter weights, optimiser and the reward history all come back."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--preset", "lora_moe,ro_grpo_relative", "--model.family", "qwen3"]
    run(a, *flags)
    run(b, *flags, "--steps", "2")
    run(b, *flags, "--resume", str(b))
    ma, mb = step_metrics(a), step_metrics(b)
    assert len(ma) == len(mb) == 4
    assert ma == mb
    assert "reward/routing_h_hist" in ma[3] and ma[3]["reward/routing"] >= 0.0  # relative: a bonus or nothing
    for key in ("router/entropy_norm", "router/load_mse_norm", "reward/task", "rollout/loop_rate"):
        assert key in ma[0], key
    assert any(k.startswith("router/utilisation/layer0.gate_proj") for k in ma[0])
    state = json.loads((b / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["routing_reward"]["history"]["mode"] == "window" or "history" in str(state["routing_reward"])
    # The final model is the adapter alone, and it re-attaches to the rebuilt base.
    final = a / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    cfg = settings(*flags, "--model.adapter.path", str(final))
    model, _ = model_and_tokenizer(cfg.model, cfg.seed)
    assert adapter_settings(model)["kind"] == "lora_moe" and len(find_routers(model)) == 6


def test_plain_lora_baseline_runs_without_a_router(tmp_path):
    out = tmp_path / "lora"
    summary = run(out, "--preset", "lora", "--steps", "2")
    rows = step_metrics(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/token"])) for r in rows)
    routing_keys = [k for k in rows[0] if k.startswith("router/")]
    assert routing_keys == [] and rows[0]["rollout/trace_bytes"] == 0  # nothing routes
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert summary["accuracy_end"] >= 0.0


def test_lora_asks_nothing_of_a_router():
    with pytest.raises(ConfigError, match="loss.lb_coef"):
        settings("--preset", "lora", "--loss.lb_coef", "0.01")
    with pytest.raises(ConfigError, match="loss.gate_coef"):  # a dense LoRA-MoE has no sampled expert set
        settings("--preset", "lora_moe", "--loss.gate_coef", "1.0")


def test_in_process_upcycled_run_saves_a_plain_moe_checkpoint(tmp_path):
    out = tmp_path / "up"
    run(
        out, "--model.family", "qwen3", "--model.upcycle.num_experts", "4", "--model.upcycle.top_k", "2", "--steps", "2"
    )
    model = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    assert [s.top_k for s in find_routers(model)] == [2, 2]


def test_text_guidance_masks_are_saved_and_restored(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--guidance.enabled", "true", "--guidance.calibration_batches", "2", "--guidance.percent", "25"]
    run(a, *flags)
    run(b, *flags, "--steps", "2")
    run(b, *flags, "--resume", str(b))
    assert step_metrics(a) == step_metrics(b)
    saved = json.loads((a / "guidance.json").read_text())
    assert saved["meta"]["group_names"] == ["prompt", "completion"]
    allowed = torch.tensor(saved["allowed"])  # (L, G, E): 25% of E=4 is one expert off per layer and group
    assert allowed.shape == (2, 2, 4) and (allowed.sum(-1) == 3).all()
    # the rollout never sampled a masked expert for a completion token
    state = json.loads((a / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["guidance"]["counts"] == saved["counts"]


def test_guidance_that_leaves_fewer_than_k_experts_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="guidance.percent: 75% deactivates 3 of E=4 experts"):  # at start-up
        run(tmp_path / "g", "--guidance.enabled", "true", "--guidance.percent", "75", "--steps", "1")


def test_dense_sft_then_adapter_eval(tmp_path):
    """`expertrl sft` on a dense model (no router: Det-FT), then `expertrl eval` of that checkpoint with fresh
    LoRA-MoE adapters, which start as the identity: same accuracy."""
    sft_out = tmp_path / "dense"
    common = ["--task.eval_size", "8", "--task.train_size", "50", "--model.preset", "tiny", "--progress", "false"]
    summary = run_sft(
        load_config(
            SFTJobConfig,
            None,
            [*common, "--model.family", "qwen3", "--sft.routing", "topk", "--sft.lb_coef", "0", "--sft.steps", "3",
             "--sft.batch_size", "8", "--output_dir", str(sft_out)],
        )
    )  # fmt: skip
    with pytest.raises(ConfigError, match="sft.routing"):  # a dense model cannot sample experts
        run_sft(load_config(SFTJobConfig, None, [*common, "--model.family", "qwen3", "--output_dir", str(tmp_path)]))
    ev = [
        "--model.path",
        summary["model"],
        "--task.eval_size",
        "8",
        "--task.train_size",
        "50",
        "--routing_stats",
        "false",
    ]
    plain = run_eval(load_config(EvalConfig, None, ev))
    adapted = run_eval(load_config(EvalConfig, None, [*ev, "--model.adapter.kind", "lora_moe"]))
    assert plain["accuracy"] == adapted["accuracy"] == summary["accuracy_after"]
