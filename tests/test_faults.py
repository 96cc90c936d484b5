"""What a user does wrong, and what the machine does to a run (issue 13), one row each: the exact exit code, the
message, and that the run folder's earlier contents survived byte for byte (and, where the run can go on, that it
does and ends where an undisturbed run ends).

Exit codes: 0 done, 1 the run stopped itself (NaN/Inf or collapse, full disk), 2 bad input at start-up (nothing run),
75 interrupted by Ctrl-C/SIGTERM after writing a checkpoint (``--resume`` continues).

The full-disk rows use a small tmpfs (``mount -t tmpfs``: root only, else skipped) so the file system really fills
up: writes fail the way they fail on a full disk, with torch's and safetensors' own errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file, save_file

from expertrl import stops as stops_module
from expertrl import train as train_module
from expertrl.checkpoint import checkpoint_path, checkpoint_problem, prune_checkpoints, save_model
from expertrl.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, main
from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.logging import MetricsLogger
from expertrl.models import build_tiny_moe
from expertrl.prompts import fit_prompts
from expertrl.tokenizer import build_char_tokenizer
from expertrl.train import collapse

RUN = tiny_args(**{"sft.steps": 2})
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*argv: str) -> int:
    """``expertrl ...`` in this process; its exit code."""
    try:
        return main(list(argv))
    except SystemExit as e:
        return int(e.code)


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock file aside) with its SHA-256: the folder byte for byte."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".expertrl.lock"
    }


def records(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock keys."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def train_args(out: Path, *more: str) -> list[str]:
    return ["train", *RUN, "--output_dir", str(out), *more]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An undisturbed 3-step run with a checkpoint after every step: what every recovered run must end as."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli(*train_args(out, "--steps", "3", "--save_every", "1")) == 0
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs; yields its path. Skipped where mounting is not allowed (not root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about ``leave_bytes`` free on ``disk``."""
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    ballast.write_bytes(b"\0" * max(free - leave_bytes, 0))
    return ballast


# ----- bad input at start-up: exit 2, one line, nothing written or changed ------------------------------------------


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]
    """builds the earlier state under the test folder and returns the command's arguments"""
    fragments: list[str]
    code: int = EXIT_BAD_INPUT
    watched: Callable[[Path], Path] = lambda t: t
    """the folder whose earlier contents must survive byte for byte"""
    extra: dict = field(default_factory=dict)


def _finished_run(t: Path) -> list[str]:
    assert cli(*train_args(t / "run", "--steps", "1")) == 0
    return train_args(t / "run", "--steps", "1")


def _overwrite_that_cannot_start(t: Path) -> list[str]:
    """--overwrite consents to replacing the earlier run, but only by a run that starts."""
    return [*_finished_run(t), "--overwrite", "true", "--rollout.max_new_tokens", "100000"]


def _output_is_a_file(t: Path) -> list[str]:
    (t / "notes.txt").write_text("my notes\n")
    return train_args(t / "notes.txt")


def _nan_weights(t: Path) -> list[str]:
    model = build_tiny_moe("qwen3_moe", "tiny")
    save_model(model, build_char_tokenizer(), t / "ckpt")
    weights = load_file(t / "ckpt" / "model.safetensors")
    weights["model.layers.1.mlp.gate.weight"][0, 0] = float("nan")
    save_file(weights, t / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    return train_args(t / "run", "--model.path", str(t / "ckpt"))


def _truncated_weights(t: Path) -> list[str]:
    save_model(build_tiny_moe("qwen3_moe", "tiny"), build_char_tokenizer(), t / "ckpt")
    f = t / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return train_args(t / "run", "--model.path", str(t / "ckpt"))


def _all_checkpoints_damaged(t: Path) -> list[str]:
    assert cli(*train_args(t / "run", "--steps", "2", "--save_every", "1")) == 0
    for step in (1, 2):
        (checkpoint_path(t / "run", step) / "trainer_state.json").write_text("")
    return train_args(t / "run", "--steps", "3", "--resume", str(t / "run"))


def _long_rows(t: Path, answer: str = "1") -> Path:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    rows[2] = {"prompt": "1+" * 5_000_000 + "1=", "answer": answer}  # a 10 MB line
    data = t / "long.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def _long_row(t: Path) -> list[str]:
    return train_args(t / "run", "--task.name", f"jsonl:{_long_rows(t)}", "--task.train_size", "6",
                      "--task.eval_size", "2")  # fmt: skip


BAD_INPUT = [
    Case("finished run's folder", _finished_run, ["already holds a run", "summary.json", "--overwrite true"]),
    Case("--overwrite, then a start-up error", _overwrite_that_cannot_start, ["rollout.max_new_tokens 100000"]),
    Case("output_dir is a file", _output_is_a_file, ["output_dir", "notes.txt", "it is a file"]),
    Case("output_dir under /proc", lambda t: train_args(Path("/proc/expertrl-run")), ["output_dir", "/proc"]),
    Case("lr = inf", lambda t: train_args(t / "run", "--optim.lr", "inf"), ["optim.lr", "finite", "inf"]),
    Case("lr = -1 in SFT", lambda t: train_args(t / "run", "--sft.optim.lr", "-1"), ["sft.optim.lr", "> 0"]),
    Case("NaN weights at load", _nan_weights, ["model.layers.1.mlp.gate.weight", "NaN"]),
    Case("truncated model.safetensors", _truncated_weights, ["model.safetensors"]),
    Case("every checkpoint damaged", _all_checkpoints_damaged, ["no checkpoint", "reads back whole", "trainer_state"]),
    Case("K > E", lambda t: train_args(t / "run", "--model.top_k", "16"), ["model.top_k", "16"]),
    Case(
        "--resume of a misspelled folder",
        lambda t: (_finished_run(t), train_args(t / "rnu", "--resume", str(t / "rnu")))[1],  # meant t / "run"
        ["resume:", "rnu", "is not a directory"],
    ),
    Case(
        "a 10 MB JSONL row",
        _long_row,
        [
            "rollout.max_new_tokens",
            "long.jsonl:3",
            "exceeds the model's context of 512",
            "task.max_prompt_tokens <= 508",
        ],
    ),  # fmt: skip
    Case(
        "vLLM engine shorter than prompt + completion",
        lambda t: train_args(t / "run", "--rollout.engine", "vllm", "--rollout.engine_max_len", "8"),
        ["rollout.engine_max_len", "exceed the engine's 8 per sequence", "set rollout.engine_max_len >="],
    ),
    Case(
        "max_new_tokens past the context",
        lambda t: train_args(t / "run", "--rollout.max_new_tokens", "100000"),
        ["rollout.max_new_tokens 100000", "exceeds the model's context of 512", "lower rollout.max_new_tokens"],
    ),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.name for c in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, capsys):
    argv = case.setup(tmp_path)
    capsys.readouterr()
    before = tree(tmp_path)
    code = cli(*argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    line = [x for x in err.splitlines() if x.startswith("expertrl train: error:")]
    assert len(line) == 1, err
    for fragment in case.fragments:
        assert fragment in line[0], (fragment, line[0])
    assert tree(tmp_path) == before  # nothing earlier was touched, nothing half-written was left


def test_overwrite_replaces_only_a_runs_own_files(tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(out, "--steps", "1")) == 0
    (out / "my_notes.txt").write_text("keep me")
    (out / "report").mkdir()  # `expertrl report`'s default output: it describes the run being replaced
    (out / "report" / "report.md").write_text("the old run")
    assert cli(*train_args(out, "--steps", "1", "--overwrite", "true")) == 0
    assert (out / "my_notes.txt").read_text() == "keep me" and not (out / "report").exists()
    assert [r["step"] for r in records(out / "metrics.jsonl")] == [-1, 0, 1]  # not appended to the old run's


def test_an_sft_overwrite_that_cannot_start_keeps_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", "--model.preset", "tiny", "--sft.steps", "2", "--task.train_size", "8", "--task.eval_size", "4",
            "--progress", "false", "--output_dir", str(out)]  # fmt: skip
    assert cli(*args) == 0
    before = tree(tmp_path)
    capsys.readouterr()
    assert cli(*args, "--overwrite", "true", "--model.path", str(tmp_path / "missing")) == EXIT_BAD_INPUT
    assert "missing" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_overwrite_keeps_the_new_runs_tracker_files(tmp_path):
    """The earlier run's tensorboard events go; the new run's, opened at start-up, stay and grow."""
    pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path / "run"
    assert cli(*train_args(out, "--steps", "1", "--report_to", "[tensorboard]")) == 0
    old = {p.name for p in (out / "runs").iterdir()}
    assert cli(*train_args(out, "--steps", "1", "--report_to", "[tensorboard]", "--overwrite", "true")) == 0
    new = {p.name for p in (out / "runs").iterdir()}
    assert new and not new & old, (old, new)


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    """A live run holds the folder's lock (released when it ends, even by kill -9)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from expertrl.rundir import claim_run_dir; "
         f"claim_run_dir({str(out)!r}, resume=False, overwrite=False); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = tree(out)
        assert cli(*train_args(out)) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"in use by another running expertrl process (pid {holder.pid})" in err
        assert tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert cli(*train_args(out, "--steps", "1")) == 0  # the kill released the lock


def test_a_moved_run_folder_resumes_and_names_its_new_place(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    assert cli(*train_args(old, "--steps", "1", "--save_every", "1")) == 0
    old.rename(new)
    assert cli(*train_args(new, "--steps", "2", "--save_every", "1", "--resume", str(new))) == 0
    assert json.loads((new / "summary.json").read_text())["output_dir"] == str(new)


# ----- the run goes wrong: exit 1, the last good checkpoint intact, and the run goes on from it -----------------------


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: _truncate(c / "model" / "model.safetensors"), "model.safetensors"),
        (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt"),
        (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json"),
    ],
    ids=["truncated model.safetensors", "truncated optimizer.pt", "empty trainer_state.json"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, named, tmp_path, reference):
    out = tmp_path / "run"
    assert cli(*train_args(out, "--steps", "2", "--save_every", "1")) == 0
    damage(checkpoint_path(out, 2))
    damaged = tree(checkpoint_path(out, 2))
    kept = tree(checkpoint_path(out, 1))
    first = (out / "metrics.jsonl").read_text().splitlines()[:2]  # steps -1 and 0, before the step-1 checkpoint
    with pytest.warns(UserWarning, match="skipping damaged checkpoint step-000002") as warned:
        assert cli(*train_args(out, "--steps", "3", "--save_every", "1", "--resume", str(out))) == 0
    assert named in str(warned[0].message)
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == first
    assert records(out / "metrics.jsonl") == records(reference / "metrics.jsonl")
    assert kept  # the fallback read step-000001 as it was
    # the damaged one is set aside, not deleted, and no longer counts: the run wrote a whole step-000002 again
    assert tree(out / "checkpoints" / "damaged-step-000002") == damaged
    assert "skipping damaged" not in str([w.message for w in warned[1:]])
    assert checkpoint_problem(checkpoint_path(out, 2)) is None


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_run_goes_on(small_disk, reference, capsys):
    out = small_disk / "run"
    assert cli(*train_args(out, "--steps", "1", "--save_every", "1")) == 0
    kept = tree(checkpoint_path(out, 1))
    ballast = fill(small_disk, leave_bytes=300_000)  # a checkpoint needs ~750 kB
    capsys.readouterr()
    resume = train_args(out, "--steps", "3", "--save_every", "1", "--resume", str(out))
    assert cli(*resume) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("expertrl train: error:") == 1, err
    for fragment in ["could not write the checkpoint after step 2", "no space left on", "needed ~",
                     "step-000001 is intact", f"--resume {out}"]:  # fmt: skip
        assert fragment in err, (fragment, err)
    assert tree(checkpoint_path(out, 1)) == kept
    assert not list((out / "checkpoints").glob(".step-*"))  # no half-written checkpoint left behind
    ballast.unlink()
    assert cli(*resume) == 0
    assert records(out / "metrics.jsonl") == records(reference / "metrics.jsonl")


def _fill_before_the_final_save(monkeypatch, disk: Path) -> dict:
    """The disk fills up (another job's file) between the last checkpoint and the final model."""
    ballast = {}
    real = stops_module.save_model

    def save_model_on_a_full_disk(*args, **kwargs):
        if not ballast:
            ballast["file"] = fill(disk, leave_bytes=100_000)  # the final model needs ~240 kB
        return real(*args, **kwargs)

    monkeypatch.setattr(stops_module, "save_model", save_model_on_a_full_disk)
    return ballast


def test_a_full_disk_at_the_final_save_names_the_checkpoint_that_finishes_the_run(small_disk, monkeypatch, capsys):
    out = small_disk / "run"
    ballast = _fill_before_the_final_save(monkeypatch, small_disk)
    args = train_args(out, "--steps", "2", "--save_every", "2", "--final_save_wait_s", "0")
    assert cli(*args) == EXIT_FAILED
    err = capsys.readouterr().err
    for fragment in ["could not write the final model", "no space left on", "step-000002 is intact", "--resume"]:
        assert fragment in err, (fragment, err)
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    kept = tree(checkpoint_path(out, 2))
    ballast["file"].unlink()
    monkeypatch.undo()
    assert cli(*train_args(out, "--steps", "2", "--save_every", "2", "--resume", str(out))) == 0
    assert (out / "final" / "model.safetensors").is_file() and tree(checkpoint_path(out, 2)) == kept


def test_a_full_disk_at_the_final_save_waits_for_space(small_disk, monkeypatch, capsys):
    """Without a checkpoint the final weights exist only in memory: the save is retried until space is freed."""
    out = small_disk / "run"
    ballast = _fill_before_the_final_save(monkeypatch, small_disk)
    monkeypatch.setattr(stops_module, "RETRY_S", 0.2)
    timer = threading.Timer(1.0, lambda: ballast["file"].unlink())
    timer.start()
    try:
        assert cli(*train_args(out, "--steps", "1", "--final_save_wait_s", "60")) == 0
    finally:
        timer.cancel()
    assert "retrying every 0.2 s" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()


def test_a_blown_up_policy_stops_the_run(tmp_path, capsys):
    """lr 1e3: the first inner update blows the weights up and the second is NaN and not applied. What the blown-up
    weights do next depends on the CPU's float arithmetic: on the Intel machine this was written on the routers
    saturate (gradient exactly 0: a collapsed policy), on an AVX2 EPYC every later loss is NaN. Either way the run
    stops with exit 1 and says why, instead of exiting 0 with a dead model, and writes no final model."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"optim\.lr: 1000 is far above"):  # the start-up warning
        code = cli(*train_args(out, "--sft.steps", "20", "--steps", "8", "--optim.lr", "1e3", "--save_every", "1",
                               "--keep_checkpoints", "1"))  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    assert "NaN/Inf loss or gradient norm in inner update 2 of 2, not applied (1 earlier applied" in captured.out
    collapsed = "3 steps in a row showed a collapsed policy (the gradient norm was exactly 0" in captured.err
    assert collapsed or "3 steps in a row had a NaN/Inf loss or gradient norm" in captured.err, captured.err
    assert "No healthy checkpoint had been written" in captured.err  # step 0 was NaN, the streak followed
    if collapsed:  # the streak's steps were applied and saved: the message says that is not a healthy policy
        assert re.search(r"step-\d{6} holds the policy of the streak, not a healthy one", captured.err), captured.err
    assert not (out / "final").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):  # whatever was saved holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model" / "model.safetensors").values())


def test_a_collapse_streak_stops_the_run_pointing_at_the_last_healthy_checkpoint(tmp_path, capsys, monkeypatch):
    """The collapse stop's wiring on any CPU: two healthy steps (saved), then ``collapse`` reports a saturated router
    every step; the third in a row stops the run with exit 1, naming the reason and the last healthy checkpoint,
    which pruning kept although later ones were saved."""
    calls = []

    def collapsing_from_step_2(metrics, cfg):
        calls.append(1)
        return "the gradient norm was exactly 0 (saturated routers)" if len(calls) > 2 else None

    monkeypatch.setattr(train_module, "collapse", collapsing_from_step_2)
    out = tmp_path / "run"
    code = cli(*train_args(out, "--steps", "8", "--save_every", "1", "--keep_checkpoints", "1", "--max_bad_steps", "3"))
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert (
        "step 4: 3 steps in a row showed a collapsed policy (the gradient norm was exactly 0 (saturated routers))"
        in err
    )
    healthy = checkpoint_path(out, 2)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert (
        f"The last good checkpoint {healthy} is intact" in err
        and "after deleting the checkpoints saved after it" in err
    )
    assert (healthy / "trainer_state.json").is_file() and not (out / "final").exists()


def test_pruning_never_deletes_the_checkpoint_a_collapse_stop_points_to(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint_path(tmp_path, step).mkdir(parents=True)
        (checkpoint_path(tmp_path, step) / "trainer_state.json").write_text("{}")
    prune_checkpoints(tmp_path, keep=1, protect=checkpoint_path(tmp_path, 1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000004"]
    prune_checkpoints(tmp_path, keep=1)  # healthy again: the old one goes at the next save
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004"]


def test_non_ascii_prompts_train(tmp_path):
    pairs = [("€3 + £4 =", "7"), ("3 × 4 =", "12"), ("日本 1+1=", "2"), ("👽 2+2=", "4"), ("naïve 5-1=", "4"),
             ("∫ 0 =", "0")]  # fmt: skip
    rows = [{"prompt": p, "answer": a} for p, a in pairs * 3]
    data = tmp_path / "odd.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert (
        cli(*train_args(out, "--task.name", f"jsonl:{data}", "--task.train_size", "12", "--task.eval_size", "4")) == 0
    )
    assert json.loads((out / "summary.json").read_text())["accuracy_end"] >= 0.0


def test_max_prompt_tokens_cuts_long_prompts_and_counts_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = _long_row(tmp_path)
    assert cli(*args, "--task.max_prompt_tokens", "64") == 0
    assert (
        "task.max_prompt_tokens: cut 1 of 6 train and 0 of 2 held-out prompts to 64 tokens" in capsys.readouterr().out
    )
    assert json.loads((out / "summary.json").read_text())["prompts_truncated"] == 1


def test_sft_refuses_an_answer_that_does_not_fit(tmp_path, capsys):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    rows[1]["answer"] = "9" * 600
    data = tmp_path / "answers.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = cli("sft", "--model.preset", "tiny", "--task.name", f"jsonl:{data}", "--task.train_size", "6",
               "--task.eval_size", "2", "--output_dir", str(tmp_path / "run"))  # fmt: skip
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"task.max_prompt_tokens: {data}:2: the prompt + answer + EOS (4 + 601 tokens) = 605 tokens exceeds" in err
    assert err.rstrip().endswith("shorten or drop that row")


def test_progress_off_a_terminal_is_plain_lines_and_off_is_silent(tmp_path):
    """Issue 13: non-TTY logs got 1,850-character carriage-return lines, and Hugging Face's bars ignored the switch."""
    args = [sys.executable, "-m", "expertrl", "train", *tiny_args(**{"progress": True}), "--save_every", "1"]
    shown = subprocess.run([*args, "--output_dir", str(tmp_path / "a")], capture_output=True, text=True, env=ENV)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "\r" not in shown.stderr and "rl: 2/2" in shown.stderr and "sft: 3/3" in shown.stderr
    quiet = subprocess.run([*args, "--progress", "false", "--output_dir", str(tmp_path / "b")], capture_output=True,
                           text=True, env=ENV)  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr[-2000:]


# ----- interrupted: exit 75 after a checkpoint, and --resume ends where an undisturbed run ends -----------------------


def interrupt(argv: list[str], log: Path, lines: int, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run ``expertrl argv`` in a subprocess and send ``sig`` once ``log`` has ``lines`` lines."""
    proc = subprocess.Popen([sys.executable, "-m", "expertrl", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= lines:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


SFT = ["--model.preset", "tiny", "--sft.steps", "300", "--sft.batch_size", "8", "--task.train_size", "50",
       "--task.eval_size", "4", "--progress", "false"]  # fmt: skip


def test_sigint_during_sft_checkpoints_and_resumes_exactly(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert cli("sft", *SFT, "--output_dir", str(ref)) == 0
    stopped = interrupt(["sft", *SFT, "--output_dir", str(out)], out / "metrics.jsonl", 20, signal.SIGINT)
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert "SIGINT: stopped supervised fine-tuning (checkpoint written)" in stopped.stdout
    resume = f"expertrl sft --config {out}/config.yaml --resume {out}"
    assert resume in stopped.stdout
    assert not (out / "final").exists()
    (ckpt,) = (out / "checkpoints").glob("sft-step-*")
    kept = tree(ckpt)
    assert cli(*resume.split()[1:], "--progress", "false") == 0
    assert records(out / "metrics.jsonl") == records(ref / "metrics.jsonl")
    assert tree(ref / "final") == tree(out / "final")  # the same weights, byte for byte
    assert kept


def test_sigterm_during_the_warm_up_of_train_checkpoints_and_resumes_exactly(tmp_path):
    args = [*tiny_args(**{"sft.steps": 300}), "--steps", "1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert cli("train", *args, "--output_dir", str(ref)) == 0
    stopped = interrupt(["train", *args, "--output_dir", str(out)], out / "sft_metrics.jsonl", 20, signal.SIGTERM)
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert "SIGTERM: stopped the warm-up (checkpoint written)" in stopped.stdout
    assert cli("train", "--config", f"{out}/config.yaml", "--resume", str(out)) == 0
    for name in ("sft_metrics.jsonl", "metrics.jsonl"):
        assert records(out / name) == records(ref / name), name
    assert tree(ref / "final") == tree(out / "final")


@pytest.mark.parametrize(
    ("metrics", "overrides", "collapsed"),
    [
        ({"rollout/empty_frac": 1.0, "optim/grad_norm": 0.5}, {}, True),
        ({"optim/grad_norm": 0.0, "reward/frac_zero_std": 0.5}, {}, True),
        ({"optim/grad_norm": 0.0, "reward/frac_zero_std": 1.0}, {"loss.lb_coef": 0.0}, False),  # every answer right
        ({"optim/grad_norm": 0.0, "reward/frac_zero_std": 1.0}, {}, True),  # the LB loss acts: saturated routers
        (
            {"optim/grad_norm": 0.0, "reward/frac_zero_std": 1.0},
            {"routing.freeze_router": True, "loss.gate_coef": 0.0},
            False,
        ),
        ({"optim/grad_norm": 1e-9, "reward/frac_zero_std": 0.5}, {}, False),
        # DAPO: the groups with an advantage may all be cut completions, which mask_truncated gives no loss
        (
            {"optim/grad_norm": 0.0, "reward/frac_zero_std": 0.5, "reward/frac_informative_in_loss": 0.0},
            {"rollout.mask_truncated": True, "loss.lb_coef": 0.0},
            False,
        ),  # fmt: skip
        (
            {"optim/grad_norm": 0.0, "reward/frac_zero_std": 0.5, "reward/frac_informative_in_loss": 0.25},
            {"rollout.mask_truncated": True},
            True,
        ),  # fmt: skip
    ],
)
def test_what_counts_as_a_collapsed_policy(metrics, overrides, collapsed):
    cfg = load_config(TrainConfig, None, [f"--{k}={v}" for k, v in overrides.items()])
    assert (collapse(metrics, cfg) is not None) == collapsed


def test_an_sft_answer_may_fill_the_context_but_for_its_eos():
    tok = build_char_tokenizer()  # one token per character; the tiny preset's context is 512
    fits = [{"prompt": "1+1=", "answer": "2" * 507}]  # 4 + 507 + EOS = 512
    fit_prompts(fits, tok, max_positions=512, new_tokens=0, answers=True)
    with pytest.raises(ValueError, match=r"prompt \+ answer \+ EOS \(4 \+ 509 tokens\) = 513 tokens"):
        fit_prompts([{"prompt": "1+1=", "answer": "2" * 508}], tok, max_positions=512, new_tokens=0, answers=True)


def test_a_full_disk_while_logging_stops_the_run_naming_the_checkpoint(small_disk, monkeypatch, capsys):
    out = small_disk / "run"
    real_log = MetricsLogger.log

    def log_on_a_full_disk(self, metrics, step):
        if step == 1 and self.path.name == "metrics.jsonl":  # after the step-1 checkpoint, another job fills the disk
            fill(small_disk, leave_bytes=0)
            with self.path.open("a") as f:  # and the slack of the log's last page (JSON allows the leading spaces)
                f.write(" " * (-self.path.stat().st_size % 4096))
        return real_log(self, metrics, step)

    monkeypatch.setattr(MetricsLogger, "log", log_on_a_full_disk)
    assert cli(*train_args(out, "--steps", "3", "--save_every", "1")) == EXIT_FAILED
    err = capsys.readouterr().err
    for fragment in ["could not write the metrics of step 1", "no space left", "step-000001 is intact", "--resume"]:
        assert fragment in err, (fragment, err)


def test_an_error_mid_run_is_a_failed_run_not_bad_input(tmp_path, monkeypatch, capsys):
    """Past start-up a ValueError (a reward function's, a row's) exits 1 naming the step and the checkpoint, not 2."""
    out = tmp_path / "run"
    real = train_module.collect

    def collect_that_fails(run, step):
        if step == 1:
            raise ValueError("a reward function could not parse 'x'")
        return real(run, step)

    monkeypatch.setattr(train_module, "collect", collect_that_fails)
    assert cli(*train_args(out, "--steps", "3", "--save_every", "1")) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("expertrl train: error:") == 1, err
    for fragment in ["step 1: ValueError: a reward function could not parse 'x'", "step-000001 is intact",
                     f"--resume {out}", "EXPERTRL_DEBUG=1"]:  # fmt: skip
        assert fragment in err, (fragment, err)
