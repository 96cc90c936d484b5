"""Every ``.venv/bin/expertrl`` command of the README runs as written, in order, in one folder (later commands read
what earlier ones wrote: ``runs/default/final``, ``runs/base/final``, ``my.yaml``), after the default job that
``make train`` runs. Only sizes are shrunk, by flags appended after the README's (later flags win). The sections
with their own tests are left to them: "Your own model" (test_readme.py) and the vLLM engine (test_vllm_train.py)."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from expertrl.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text()
OWN_TESTS = ("Your own model", "A real rollout engine (vLLM)")
TRAIN = ["--steps", "2", "--sft.steps", "2", "--sft.batch_size", "4", "--rollout.prompts_per_step", "2",
         "--rollout.group_size", "2", "--rollout.max_new_tokens", "4", "--task.train_size", "8", "--task.eval_size",
         "2", "--micro_batch_size", "4", "--eval_every", "0", "--guidance.calibration_batches", "1",
         "--progress", "false"]  # fmt: skip
SFT = ["--sft.steps", "2", "--sft.batch_size", "4", "--task.train_size", "8", "--task.eval_size", "2",
       "--progress", "false"]  # fmt: skip
EVAL = ["--task.eval_size", "2", "--progress", "false"]
SHRINK = {"train": TRAIN, "sft": SFT, "eval": EVAL}


def readme_commands() -> list[tuple[str, list[str], str | None]]:
    """(section, argv after ``expertrl``, file stdout goes to) of every expertrl command outside OWN_TESTS."""
    out = []
    for section in re.split(r"\n## ", README)[1:]:
        title = section.split("\n", 1)[0].strip()
        if title in OWN_TESTS:
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if not line.startswith(".venv/bin/expertrl "):
                    continue
                argv = shlex.split(line, comments=True)[1:]
                target = None
                if ">" in argv:
                    argv, target = argv[: argv.index(">")], argv[argv.index(">") + 1]
                out.append((title, argv, target))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_expects():
    names = [argv[0] for _, argv, _ in COMMANDS]
    assert {"train", "sft", "eval", "report", "upcycle"} <= set(names) and len(COMMANDS) >= 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder where the default job (``make train``) has run: runs/default exists."""
    root = tmp_path_factory.mktemp("readme")
    with contextlib.chdir(root):
        assert main(["train", *TRAIN]) == 0
    return root


@pytest.mark.parametrize(("section", "argv", "target"), COMMANDS, ids=[" ".join(a)[:70] for _, a, _ in COMMANDS])
def test_readme_command_runs(workdir, section, argv, target):
    shrink = [a for a in SHRINK.get(argv[0], []) if "--help" not in argv and "--print-config" not in argv]
    with contextlib.chdir(workdir):
        if target is None:
            code = main([*argv, *shrink])
        else:  # `expertrl train --print-config > my.yaml`
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                code = main(argv)
            Path(target).write_text(buffer.getvalue())
    assert code == 0, (section, argv)
