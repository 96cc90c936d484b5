"""End-to-end: the CLI runs two RL steps after a short warm-up, writes its run directory, and the final model
loads with plain transformers."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.train import train

TINY = tiny_args(**{"task.eval_size": 8})


def test_cli_train_two_steps(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "expertrl", "train", *TINY, "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy, end of RL" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for key in ("loss/clip_frac", "loss/gate_clip_frac", "router/entropy", "router/usage_entropy", "optim/grad_norm"):
        assert key in steps[0], key
    for key in ("gamma_p50", "delta_p90", "delta_p99", "rollout_train_overlap", "rollout_train_mismatch"):
        assert 0 <= steps[0][f"router/shift/{key}"] <= 1 + 1e-6, key  # METHODS §1.5 / §6.6 diagnostics
    for key in ("topk_overlap_per_layer", "rollout_train_overlap_per_layer", "delta_per_layer"):
        assert len(steps[0][f"router/shift/{key}"]) == 2, key  # one value per MoE layer
    assert len(steps[0]["router/load/layer0"]) == 4 and abs(sum(steps[0]["router/load/layer0"]) - 1) < 1e-4
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_end"] <= 1.0
    assert (out / "config.yaml").is_file()
    # the final model is plain Hugging Face format
    model = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out / "final", local_files_only=True)
    ids = torch.tensor([tok("1+2=", add_special_tokens=False)["input_ids"]])
    assert model(ids).logits.shape == (1, 4, len(tok))


def test_train_updates_router_and_experts(tmp_path):
    cfg = load_config(TrainConfig, None, [*TINY, "--sft.steps", "0", "--output_dir", str(tmp_path / "r")])
    cfg.optim.lr = 1e-2
    from expertrl.runtime import model_and_tokenizer

    before, _ = model_and_tokenizer(cfg.model, cfg.seed)
    train(cfg)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final", local_files_only=True)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert not torch.equal(b["model.layers.0.mlp.gate.weight"], a["model.layers.0.mlp.gate.weight"])
    assert not torch.equal(b["model.layers.0.mlp.experts.gate_up_proj"], a["model.layers.0.mlp.experts.gate_up_proj"])


def test_bad_config_is_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "expertrl", "train", "--rollout.group_size", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "rollout.group_size" in proc.stderr and "Traceback" not in proc.stderr


PRESET_RUNS = ["grpo", "dr_grpo", "dapo", "gspo", "gmpo", "sapo", "cispo", "rspo", "grpo,r3", "grpo,r2"]
PRESET_RUNS += ["grpo,freeze_router", "moe_grpo"]


@pytest.mark.parametrize("preset", PRESET_RUNS)
def test_every_preset_trains(tmp_path, preset):
    """The ablation grid runs end to end: each preset does two real RL steps and logs router-shift diagnostics."""
    from expertrl.presets import preset_overrides

    overrides = [*preset_overrides(preset), *TINY, "--sft.steps", "0", "--eval_every", "0"]
    cfg = load_config(TrainConfig, None, [*overrides, "--output_dir", str(tmp_path / "r"), "--loss.kl_coef", "0.01"])
    cfg.task.eval_size = 2
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2
    if "loss/kl" not in steps[0]:  # dynamic sampling may have dropped every group of this tiny batch
        assert preset == "dapo"
        return
    for key in ("router/shift/gamma_mean", "router/shift/topk_overlap", "loss/clip_frac", "loss/kl"):
        assert key in steps[0], key
    assert 0 < steps[0]["router/shift/gamma_mean"] <= 1


def test_router_shift_appears_without_replay(tmp_path):
    """Live top-K routing with 2 inner updates: the second update sees the router moved (gamma < 1). With a frozen
    router the router weights stay bit-identical, yet gamma still moves: it reads the router at the hidden state the
    current forward produces, so drift in earlier layers counts too (METHODS.md §1.2)."""
    from expertrl.presets import preset_overrides

    def run(preset, name):
        out = tmp_path / name
        cfg = load_config(
            TrainConfig,
            None,
            [*preset_overrides(preset), *TINY, "--sft.steps", "0", "--eval_every", "0", "--output_dir", str(out)],
        )
        cfg.optim.lr = 3e-2
        cfg.task.eval_size = 2
        train(cfg)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "reward/mean" in r]

    live = run("grpo", "live")
    frozen = run("grpo,freeze_router", "frozen")
    assert min(r["router/shift/gamma_mean"] for r in live) < 1.0
    assert min(r["router/shift/gamma_mean"] for r in frozen) < 1.0
    from expertrl.models import build_tiny_moe

    start = build_tiny_moe("qwen3_moe", "tiny")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "frozen" / "final", local_files_only=True)
    for name, p in start.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert torch.equal(p, dict(final.named_parameters())[name]), name


def test_eval_command_scores_a_saved_checkpoint(tmp_path, capsys):
    from expertrl.checkpoint import save_model
    from expertrl.cli import main
    from expertrl.models import build_tiny_moe
    from expertrl.tokenizer import build_char_tokenizer

    save_model(build_tiny_moe("qwen3_moe", "tiny"), build_char_tokenizer(), tmp_path / "ckpt")
    args = ["eval", "--model.path", str(tmp_path / "ckpt"), "--task.eval_size", "8", "--max_new_tokens", "3"]
    assert main(args) == 0
    assert "held-out prompts" in capsys.readouterr().out
    result = json.loads((tmp_path / "ckpt" / "eval.json").read_text())
    assert result["n"] == 8 and 0.0 <= result["accuracy"] <= 1.0
