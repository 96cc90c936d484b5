"""Runs that survive: a killed run resumes to the same metrics, partial checkpoints are ignored, NaN steps are
skipped (and too many in a row stop the run), SIGTERM saves and exits, and a resume with other settings fails."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

import expertrl.collect as collect_module
import expertrl.run as run_module
from expertrl.checkpoint import checkpoint_path, latest_checkpoint, load_trainer_state
from expertrl.cli import main
from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import load_config
from expertrl.train import train

ARGS = tiny_args(steps=4, save_every=1)
UNTIMED = "time/"


def run(out, *overrides):
    return train(load_config(TrainConfig, None, [*ARGS, "--output_dir", str(out), *overrides]))


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_metrics(out):
    """Per-step records without the wall-clock ones."""
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in records(out) if "reward/mean" in r]


def step_dirs(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with a checkpoint after every step (keep_checkpoints=2 leaves the last two)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(out, "--steps", "3")
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """Run A goes straight through 4 steps. Run B is SIGKILLed once its step-2 checkpoint exists, then resumed."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(a)
    cmd = [sys.executable, "-m", "expertrl", "train", *ARGS, "--output_dir", str(b), "--keep_checkpoints", "4"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the same arithmetic as this process (conftest: one thread)
    log = tmp_path / "b.log"
    with log.open("w") as err:  # a file, not a pipe nobody reads: the child can never block on a full pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    marker = checkpoint_path(b, 2) / "trainer_state.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()  # SIGKILL: no handler runs, whatever it was writing stays half-written
        proc.wait()
    else:  # it finished before we could kill it: crash it after step 2 by hand
        assert proc.returncode == 0, log.read_text()[-3000:]
        for step in (3, 4):
            shutil.rmtree(checkpoint_path(b, step), ignore_errors=True)
        shutil.rmtree(b / "final")
    assert load_trainer_state(latest_checkpoint(b))["step"] >= 2
    assert not (b / "summary.json").exists() or proc.returncode == 0

    resume = [sys.executable, "-m", "expertrl", "train", "--config", str(b / "config.yaml"), "--resume", str(b)]
    done = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout

    assert [r["step"] for r in records(b)] == [-1, 0, 1, 2, 3, 4]  # no duplicates, no cut lines
    assert step_metrics(b) == step_metrics(a)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.filterwarnings("ignore:ignoring incomplete checkpoint")  # asserted in its own test
def test_partial_checkpoints_are_ignored(run_copy, capsys):
    ckpts = run_copy / "checkpoints"
    (ckpts / "step-000009" / "model").mkdir(parents=True)  # no trainer_state.json: never completed
    tmp = ckpts / ".step-000004.tmp-x1y2"  # what a killed atomic_save_dir leaves behind
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")
    run(run_copy, "--steps", "4", "--resume", str(run_copy))
    assert f"resuming from {checkpoint_path(run_copy, 3)}" in capsys.readouterr().out
    assert not tmp.exists()
    assert step_dirs(run_copy) == ["step-000003", "step-000004", "step-000009"]
    assert [r["step"] for r in records(run_copy)] == [-1, 0, 1, 2, 3, 4]


def test_keep_checkpoints_leaves_the_latest(finished_run):
    assert step_dirs(finished_run) == ["step-000002", "step-000003"]
    ckpt = checkpoint_path(finished_run, 3)
    for name in ("model/model.safetensors", "model/config.json", "optimizer.pt", "trainer_state.json", "config.yaml"):
        assert (ckpt / name).is_file(), name
    state = load_trainer_state(ckpt)
    assert state["step"] == 3 and "accuracy_start" in state["summary"]


def nan_at(monkeypatch, bad_steps):
    """Make the loss NaN in the RL steps ``bad_steps`` (counted by rollouts, so only for a run from step 0)."""
    step = {"n": -1}
    real_rollout, real_objective = collect_module.generate_rollout, run_module.objective_for

    def rollout(*args, **kwargs):
        step["n"] += 1
        return real_rollout(*args, **kwargs)

    def objective_for(*args, **kwargs):
        objective = real_objective(*args, **kwargs)

        @functools.wraps(objective)  # keeps the objective's settings (soft_dispatch...) readable
        def nan_loss(*a, **k):
            out = objective(*a, **k)
            return out._replace(loss=out.loss * float("nan")) if step["n"] in bad_steps else out

        return nan_loss

    monkeypatch.setattr(collect_module, "generate_rollout", rollout)
    monkeypatch.setattr(run_module, "objective_for", objective_for)


def test_a_nan_step_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {1})
    out = tmp_path / "run"
    summary = run(out, "--steps", "3", "--sft.steps", "0")
    rows = step_metrics(out)
    assert [r["optim/skipped_steps"] for r in rows] == [0, 1, 1]
    assert "loss/token" in rows[0] and "loss/token" not in rows[1] and "optim/grad_norm" not in rows[1]
    assert rows[1]["optim/lr"] == rows[0]["optim/lr"]  # no optimiser step, so the schedule did not move either
    assert "step 1: NaN/Inf loss or gradient norm in inner update 1 of 2, not applied (0 earlier applied" in (
        capsys.readouterr().out
    )
    assert [r["optim/applied_updates"] for r in rows] == [2, 0, 2]
    assert summary["skipped_steps"] == 1
    assert step_dirs(out) == ["step-000001", "step-000003"]  # nothing saved right after the bad step


def test_too_many_nan_steps_stop_the_run(tmp_path, monkeypatch):
    nan_at(monkeypatch, {1, 2, 3})
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match=r"step 3: 3 steps in a row .*checkpoint .*step-000001 is intact"):
        run(out, "--steps", "5", "--sft.steps", "0")  # max_bad_steps=3 by default
    assert step_dirs(out) == ["step-000001"]
    assert signal.getsignal(signal.SIGINT) is handler


def test_sigterm_saves_and_stops_then_resumes(tmp_path, monkeypatch, capsys):
    """save_every=0, yet SIGTERM in step 1 still ends the step, writes a checkpoint and exits cleanly; the resumed
    run (with a KL reference model, which the checkpoint carries) logs what an uninterrupted one does."""
    settings = ["--steps", "3", "--save_every", "0", "--sft.steps", "0", "--loss.kl_coef", "0.1"]
    run(tmp_path / "straight", *settings)
    real_rollout = collect_module.generate_rollout
    step = {"n": -1}

    def rollout(*args, **kwargs):
        step["n"] += 1
        if step["n"] == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(collect_module, "generate_rollout", rollout)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    summary = run(out, *settings)
    assert summary["interrupted"] == "SIGTERM" and summary["steps_done"] == 2
    assert signal.getsignal(signal.SIGTERM) is handler
    assert f"--config {out}/config.yaml --resume {out}" in capsys.readouterr().out
    assert step_dirs(out) == ["step-000002"] and not (out / "final").exists()
    monkeypatch.setattr(collect_module, "generate_rollout", real_rollout)
    assert (checkpoint_path(out, 2) / "reference" / "model.safetensors").is_file()
    run(out, *settings, "--resume", str(out))
    assert [r["step"] for r in records(out)] == [-1, 0, 1, 2, 3]
    assert step_metrics(out) == step_metrics(tmp_path / "straight")
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_with_other_settings_names_them(run_copy, capsys):
    run_dir = str(run_copy)  # a copied run directory: its config.yaml names the old output_dir, so pass the new one
    args = ["train", "--config", f"{run_dir}/config.yaml", "--resume", run_dir, "--output_dir", run_dir]
    args += ["--loss.gate_coef", "0.5"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "loss.gate_coef" in err and "1.0 there, 0.5 now" in err and "Traceback" not in err


def test_resume_into_another_model_is_refused(run_copy):
    config_json = checkpoint_path(run_copy, 3) / "model" / "config.json"
    config = json.loads(config_json.read_text())
    config["num_experts_per_tok"] = 1
    config_json.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^model: .*num_experts_per_tok: 2 vs 1"):
        run(run_copy, "--steps", "4", "--resume", str(run_copy))


def test_a_fresh_run_does_not_reuse_old_checkpoints(run_copy):
    with pytest.raises(ConfigError, match="--resume"):
        run(run_copy, "--steps", "4")


def test_incomplete_checkpoint_is_ignored_with_a_warning(tmp_path):
    from expertrl.checkpoint import complete_checkpoints

    (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)  # cut short: no trainer_state.json
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert complete_checkpoints(tmp_path) == []
