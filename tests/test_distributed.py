"""Data-parallel training: two CPU processes under torchrun (gloo DDP) take the same steps as one process.

Deterministic settings (top-K routing, greedy tokens) make the 1-process and 2-process rollouts identical, so the
only difference is how the global batch is split and reduced. Every group has identical completions, hence zero
advantages; the gradient comes from the Switch LB loss and a k1 KL term, which exercise the loss normalisation
(``token_mean`` over the gathered token count) and the DDP gradient average. Micro-batches of one sequence keep
the (per-micro-batch, non-linear) LB loss independent of how sequences are grouped.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = [
    "--model.preset", "tiny", "--sft.steps", "0", "--steps", "2", "--rollout.prompts_per_step", "4",
    "--rollout.group_size", "4", "--rollout.max_new_tokens", "4", "--task.train_size", "50", "--task.eval_size", "4",
    "--micro_batch_size", "1", "--progress", "false", "--routing.policy", "topk", "--loss.gate_coef", "0",
    "--rollout.do_sample", "false", "--optim.lr", "1e-2", "--loss.lb_coef", "0.1", "--loss.kl_coef", "0.5",
    "--loss.kl_estimator", "k1", "--loss.agg", "token_mean",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

needs_torchrun = pytest.mark.skipif(
    not TORCHRUN.is_file() and shutil.which("torchrun") is None, reason="torchrun is not installed next to python"
)


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    exe = str(TORCHRUN) if TORCHRUN.is_file() else shutil.which("torchrun")
    cmd = [exe, "--standalone", "--nproc_per_node", str(nproc), "-m", "expertrl", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def step_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


@needs_torchrun
def test_two_processes_match_one(tmp_path):
    proc = torchrun(2, [*ARGS, "--output_dir", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("=== expertrl train: summary ===") == 1  # rank 0 prints
    one = subprocess.run(
        [sys.executable, "-m", "expertrl", "train", *ARGS, "--output_dir", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    ddp, ref = step_records(tmp_path / "ddp"), step_records(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in ref] == [0, 1]  # rank 0 alone wrote metrics.jsonl
    for a, b in zip(ddp, ref, strict=True):
        assert a["num_tokens"] == b["num_tokens"]  # summed over ranks: the global count
        for key in ("reward", "loss/token", "loss/kl", "loss/lb", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert ref[0]["grad_norm"] > 0.1  # the comparison is not vacuous
    wa = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < 1e-5, name


@needs_torchrun
def test_prompts_must_split_evenly(tmp_path):
    proc = torchrun(2, [*ARGS, "--rollout.prompts_per_step", "3", "--output_dir", str(tmp_path / "r")])
    assert proc.returncode != 0
    assert "rollout.prompts_per_step" in proc.stderr and "divisible by the number of processes (2)" in proc.stderr
