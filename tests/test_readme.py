"""The README's "Your own model" command runs as written, on local stand-ins at the paths it names: a tiny Qwen3-MoE
checkpoint whose tokenizer is a BPE instruct tokenizer with a chat template (trained in-process), and a GSM8K-style
parquet file. Only sizes are shrunk, by flags appended after the README's (later flags win)."""

import json
import re
import shlex
from pathlib import Path

import torch
from safetensors.torch import load_file
from standins import bpe_chat_tokenizer, gsm8k_rows, moe_checkpoint, write_dataset

from expertrl.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text()
SHRINK = ["--steps", "2", "--rollout.prompts_per_step", "2", "--rollout.group_size", "2", "--rollout.max_new_tokens",
          "4", "--task.train_size", "8", "--task.eval_size", "2", "--micro_batch_size", "4", "--eval_every", "0",
          "--progress", "false"]  # fmt: skip


def readme_commands(section: str) -> list[list[str]]:
    """The shell commands of the ```bash blocks of a README section (continuation lines joined), as argv lists."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(shlex.split(command, comments=True))
    return commands


def test_your_own_model_command_runs_on_local_stand_ins(tmp_path, monkeypatch):
    (command,) = readme_commands("Your own model")
    assert command[0] == ".venv/bin/expertrl" and command[1] == "train"
    flags = dict(zip(command[2::2], command[3::2]))
    model, data = Path(flags["--model.path"]), Path(flags["--task.name"].removeprefix("hf:"))
    assert data.suffix == ".parquet" and flags["--report_to"] == "tensorboard"
    assert flags["--model.dtype"] == "bfloat16" and flags["--model.gradient_checkpointing"] == "true"
    monkeypatch.chdir(tmp_path)
    moe_checkpoint(model, bpe_chat_tokenizer(tmp_path / "tokenizer"), family="qwen3_moe")
    write_dataset(gsm8k_rows(16), data.with_suffix(""), "parquet")
    assert main([*command[1:], *SHRINK]) == 0
    out = Path(flags["--output_dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/format" in r and "reward/task" in r for r in records if "reward/mean" in r)
    assert list((out / "runs").glob("events.out.tfevents.*"))  # --report_to tensorboard
    final = load_file(out / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}  # --model.dtype bfloat16 trained and saved bf16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples_end"][0][0].startswith("Tom has")  # the GSM8K question reached the model
