"""Training with ``rollout.engine=vllm``: every ``expertrl train --rollout.engine vllm`` command of the README runs
(with a tiny run's sizes), MoE-GRPO's first-update token and gate ratios are 1 and the engine's token log-probs are
the trainer's up to float32 round-off, and under R3 the engine's top-K routes are the trainer's (no token's expert set
differs). Each run is a fresh process: the in-process engine's side effects stay out of pytest's."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

from expertrl.engines.vllm import import_vllm

ROOT = Path(__file__).parent.parent
ENGINE_MISMATCH = 1e-5
"""Measured: the engine's and the trainer's token log-probs differ by <= 4e-7 (float32, 5M preset)."""


def _readme_commands() -> list[list[str]]:
    """The README's ``expertrl train --rollout.engine vllm`` commands, as argument lists (comments dropped)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")  # continuation lines joined
    lines = re.findall(r"^\.venv/bin/expertrl train (.*--rollout\.engine vllm.*)$", text, flags=re.MULTILINE)
    return [line.split("#")[0].split() for line in lines]


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    try:
        import_vllm()
    except ImportError as err:
        pytest.skip(f"vLLM is not installed: {err}")


def _train(args: list[str], out: Path) -> list[dict]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "expertrl", "train", *args, "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_readme_has_vllm_commands():
    assert len(_readme_commands()) >= 2


@pytest.mark.parametrize("index", [0, 1])
def test_readme_vllm_commands_train(tmp_path, index):
    """Each README command with a tiny run's sizes on the 5M preset (vLLM's CPU attention needs head_dim 32) and one
    inner update, so the metrics are the first update's. The MoE-GRPO run is then resumed for a third step: the
    engine starts on the checkpoint's weights (else its log-probs would be far from the trainer's)."""
    readme = _readme_commands()[index]
    args = [*readme, *tiny_args(**{"model.preset": "5M", "inner_updates": 1, "save_every": 1})]
    rows = _train(args, tmp_path / "run")
    if index == 0:
        more = [*args, "--steps", "3", "--resume", str(tmp_path / "run")]
        rows = _train(more, tmp_path / "run")
    steps = [r for r in rows if r["step"] >= 0 and "loss/ratio_mean" in r]
    assert [r["step"] for r in steps] == ([0, 1, 2] if index == 0 else [0, 1])
    for r in steps:
        assert r["loss/ratio_mean"] == 1.0  # the first update's forward is the old policy
        assert r["rollout/engine_logp_diff_max"] < ENGINE_MISMATCH
        assert r["rollout/engine_prob_corr"] > 0.9999
        assert r["time/engine_sync"] > 0
        if "--preset" in readme:  # R3: vLLM's top-K routes, replayed; IcePop drops nothing at this mismatch
            assert r["router/shift/rollout_train_mismatch"] == 0.0
            assert r["loss/mismatch_frac"] == 0.0 and abs(r["loss/mismatch_weight_mean"] - 1) < ENGINE_MISMATCH
        else:  # MoE-GRPO: experts sampled inside the engine, Gate-GRPO on the engine's sets
            assert r["loss/gate_ratio_mean"] == 1.0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
