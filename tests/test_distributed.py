"""Data-parallel training: two CPU processes under torchrun (gloo DDP, or FSDP2 ``fully_shard`` with
``parallel=fsdp2``) take the same steps as one process.

Deterministic settings (top-K routing, greedy tokens) make the 1-process and 2-process rollouts identical, so the
only difference is how the global batch is split and reduced. Every group has identical completions, hence zero
advantages; the gradient comes from the Switch LB loss and a k1 KL term, which exercise the loss normalisation
(``token_mean`` over the gathered token count) and the DDP gradient average. Micro-batches of one sequence keep
the (per-micro-batch, non-linear) LB loss independent of how sequences are grouped.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from expertrl.checkpoint import checkpoint_path
from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import load_config
from expertrl.parallel import fixed_length_generate

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = tiny_args(micro_batch_size=1, **{
    "sft.steps": 0, "rollout.prompts_per_step": 4, "routing.policy": "topk", "loss.gate_coef": 0,
    "rollout.do_sample": False, "optim.lr": "1e-2", "loss.lb_coef": 0.1, "loss.kl_coef": 0.5,
    "loss.kl_estimator": "k1", "loss.agg": "token_mean",
})  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

needs_torchrun = pytest.mark.skipif(
    not TORCHRUN.is_file() and shutil.which("torchrun") is None, reason="torchrun is not installed next to python"
)


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    exe = str(TORCHRUN) if TORCHRUN.is_file() else shutil.which("torchrun")
    cmd = [exe, "--standalone", "--nproc_per_node", str(nproc), "-m", "expertrl", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def step_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r]


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
        assert a["rollout/num_tokens"] == b["rollout/num_tokens"]  # summed over ranks: the global count
        for key in ("reward/mean", "loss/token", "loss/kl", "loss/lb", "optim/grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert ref[0]["optim/grad_norm"] > 0.1  # the comparison is not vacuous
    wa = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:  # AdamW divides by sqrt(v): on a coordinate whose gradient is round-off, round-off moves the
        # update by up to lr * |g| / (|g| + eps); measured after issue 13: <= 2e-5 of lr 1e-2
        assert (wa[name] - wb[name]).abs().max().item() < 1e-4, name


DEFAULT_JOB = tiny_args(**{"sft.steps": 20, "steps": 3, "rollout.prompts_per_step": 4, "micro_batch_size": 3})
"""The default method at tiny size: K of E sampled at routing temperature 0.5, Gate-GRPO, Switch LB 0.01, two inner
updates; micro-batches of 3 rows split a rank's 8 rows unevenly, and differently at world size 1 and 2."""


@needs_torchrun
@pytest.mark.parametrize("prompt_routes", ["row", "group"])
def test_the_default_job_does_not_depend_on_the_number_of_processes(prompt_routes, tmp_path):
    """Issue 13: sampled routes are a function of (seed, step, global row), the Switch LB loss is the global batch's,
    and routing statistics are reduced globally, so world size 1 and 2 log the same rollouts and reach the same
    weights (up to float summation order). With ``routing.prompt_routes=group`` the prompt seeds are a function of
    the global group index; one process then also shares each group's prompt in the training forward (two do not)."""
    job = [*DEFAULT_JOB, "--routing.prompt_routes", prompt_routes]
    proc = torchrun(2, [*job, "--output_dir", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "expertrl", "train", *job, "--output_dir", str(tmp_path / "one")]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two, ref = step_records(tmp_path / "two"), step_records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in ref] == [0, 1, 2]
    loads = [k for k in ref[0] if k.startswith("router/load/")]
    assert loads and "loss/gate" in ref[0] and ref[0]["optim/grad_norm"] > 0  # the default method: Gate-GRPO on
    for a, b in zip(two, ref, strict=True):
        for key in ("rollout/num_tokens", "rollout/completion_length", "rollout/trace_bytes", "reward/mean"):
            assert a[key] == b[key], key  # the same rollouts: same completions, same routes
        for key in loads:
            assert a[key] == pytest.approx(b[key], abs=3e-6), key  # global loads (lists are logged to 6 decimals)
        assert a["router/usage_entropy"] == pytest.approx(b["router/usage_entropy"], abs=1e-6)
        assert a["optim/grad_norm"] == pytest.approx(b["optim/grad_norm"], rel=1e-5)  # the same global gradient
    wa = load_file(tmp_path / "two" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < 1e-6, name


@needs_torchrun
def test_prompts_must_split_evenly(tmp_path):
    proc = torchrun(2, [*ARGS, "--rollout.prompts_per_step", "3", "--output_dir", str(tmp_path / "r")])
    assert proc.returncode != 0
    assert "rollout.prompts_per_step" in proc.stderr and "divisible by the number of processes (2)" in proc.stderr


# FSDP2: a supervised warm-up first, so completions end at EOS after different numbers of tokens (rows and ranks
# differ) and fixed_length_generate's padding is exercised; a checkpoint after every step for the resume test. The
# Switch LB loss is off: its mask drops the last column of a batch, which depends on how wide the batch is padded,
# and FSDP2 rollouts are always max_new_tokens wide (the KL term still gives the gradient).
FSDP2_ARGS = [
    *ARGS, "--loss.lb_coef", "0", "--sft.steps", "40", "--rollout.max_new_tokens", "8", "--save_every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """The same 2-step run with parallel=fsdp2 on two processes and on one process (where it shards nothing)."""
    root = tmp_path_factory.mktemp("fsdp2")
    proc = torchrun(2, [*FSDP2_ARGS, "--parallel", "fsdp2", "--output_dir", str(root / "fsdp2")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "expertrl", "train", *FSDP2_ARGS, "--output_dir", str(root / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return root, proc


def final_weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


@needs_torchrun
def test_fsdp2_two_processes_match_one(fsdp2_runs):
    root, proc = fsdp2_runs
    assert "2 processes" in proc.stdout and proc.stdout.count("=== expertrl train: summary ===") == 1
    fsdp, ref = step_records(root / "fsdp2"), step_records(root / "one")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ref] == [0, 1]
    assert min(r["rollout/completion_length"] for r in ref) < 8  # some completions stopped at EOS: padding is tested
    for a, b in zip(fsdp, ref, strict=True):
        assert a["rollout/num_tokens"] == b["rollout/num_tokens"]
        assert a["rollout/completion_length"] == b["rollout/completion_length"]
        for key in ("reward/mean", "loss/token", "loss/kl", "optim/grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert ref[0]["optim/grad_norm"] > 1.0  # above optim.grad_clip=1: clipping of the sharded gradient is tested too
    wa, wb = final_weights(root / "fsdp2"), final_weights(root / "one")
    assert wa.keys() == wb.keys()
    for name in wa:  # AdamW divides by sqrt(v): on a coordinate whose gradient is round-off, round-off moves the
        # update by up to lr * |g| / (|g| + eps); measured after issue 13: <= 2e-5 of lr 1e-2
        assert (wa[name] - wb[name]).abs().max().item() < 1e-4, name
    evals = [
        r for r in map(json.loads, (root / "fsdp2" / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r
    ]
    assert [r["step"] for r in evals] == [-1, 2]  # start and end evaluation, every rank in step, rank 0 logs


@needs_torchrun
def test_fsdp2_checkpoint_resumes(fsdp2_runs, tmp_path):
    """Gathered checkpoints load back: resumed from step 1, the FSDP2 run repeats step 1 and its final weights."""
    root, _ = fsdp2_runs
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp2", run)
    shutil.rmtree(checkpoint_path(run, 2))
    shutil.rmtree(run / "final")
    opt = torch.load(checkpoint_path(run, 1) / "optimizer.pt", weights_only=True)
    assert "model.embed_tokens.weight" in opt["state"]  # the full optimizer state, keyed by parameter name
    proc = torchrun(2, ["--config", str(run / "config.yaml"), "--resume", str(run), "--output_dir", str(run)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [untimed(r) for r in step_records(run)] == [untimed(r) for r in step_records(root / "fsdp2")]
    wa, wb = final_weights(run), final_weights(root / "fsdp2")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_fixed_length_generate_pads_after_eos(tiny_moe, tokenizer):
    """Slow reference: plain ``generate`` with EOS stopping; the fixed-length one decodes all max_new_tokens steps
    and equals it, right-padded with the pad token."""
    with torch.no_grad():
        # chosen by trying: with this shift every row stops at EOS, at steps 10, 4 and 3
        tiny_moe.lm_head.weight[tokenizer.eos_token_id] -= 0.1
    prompt = tokenizer(["12+3=", "7+8=", "99+1="], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(
        max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    plain = tiny_moe.generate(**prompt, **kw)  # (B, P + C), C < 12: every row stopped
    fixed_length_generate(tiny_moe)
    fixed = tiny_moe.generate(**prompt, **kw)  # (B, P + 12)
    P = prompt["input_ids"].shape[1]
    assert plain.shape[1] < P + 12 and fixed.shape[1] == P + 12
    assert torch.equal(fixed[:, : plain.shape[1]], plain)
    assert (fixed[:, plain.shape[1] :] == tokenizer.pad_token_id).all()
    completion = plain[:, P:]
    assert (completion == tokenizer.eos_token_id).any(-1).all()  # every row ended at EOS
    assert len({int(r.tolist().index(tokenizer.eos_token_id)) for r in completion}) > 1  # at different steps


@pytest.mark.parametrize(
    "args",
    [
        ["--model.adapter.kind", "lora_moe", "--model.family", "qwen3"],
        ["--model.family", "qwen3_vl_moe", "--task.name", "mm:digits_mc"],
    ],
)
def test_fsdp2_refuses_what_it_cannot_shard(args):
    with pytest.raises(ConfigError, match="^parallel: fsdp2"):
        load_config(TrainConfig, None, ["--parallel", "fsdp2", *args])


README_TORCHRUN = re.findall(
    r"^OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m expertrl train (.*?)#",
    (Path(__file__).parent.parent / "README.md").read_text().replace("\\\n", " "),
    flags=re.MULTILINE,
)


@needs_torchrun
@pytest.mark.parametrize("line", README_TORCHRUN, ids=["ddp", "fsdp2"])
def test_the_readmes_torchrun_commands_run(line, tmp_path):
    """The README's CPU torchrun lines, as written (in tmp_path: their --output_dir is relative), sizes shrunk."""
    assert len(README_TORCHRUN) == 2
    args = shlex.split(line)
    shrunk = tiny_args(**{"sft.steps": 2, "steps": 1, "rollout.prompts_per_step": 16})
    exe = str(TORCHRUN) if TORCHRUN.is_file() else shutil.which("torchrun")
    cmd = [exe, "--standalone", "--nproc_per_node", "2", "-m", "expertrl", "train", *args, *shrunk]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / args[args.index("--output_dir") + 1]
    assert (out / "final" / "model.safetensors").is_file()
