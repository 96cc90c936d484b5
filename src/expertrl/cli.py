"""The `expertrl` command: `train`, `sft` and `eval`, each generated from its config dataclass, plus two file tools
with their own flags, `upcycle` (dense checkpoint -> MoE checkpoint) and `report` (runs -> HTML + Markdown).

    expertrl train --config configs/tiny.yaml --rollout.group_size 8 --loss.kwargs '{"eps_high": 0.28}'

Settings apply in order: dataclass defaults <- ``--config FILE.yaml`` <- dotted ``--section.key VALUE`` overrides
(values are parsed as YAML). A bad setting, or bad input found at start-up (a missing file, a model without routers),
prints ``expertrl <cmd>: error: <message>`` and exits with code 2 (``EXPERTRL_DEBUG=1`` shows the traceback). A run
that stops itself (NaN/Inf steps, a collapsed policy, a full disk) exits with 1 after one such line; Ctrl-C or
SIGTERM exits with 75 once the step's checkpoint is written (continue with ``--resume``).
The command modules are imported only when their command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from expertrl.config import ConfigError, EvalConfig, RunFailed, SFTJobConfig, TrainConfig
from expertrl.configio import format_help, load_config, to_dict
from expertrl.io import DiskFullError
from expertrl.presets import preset_overrides


def _train(cfg: TrainConfig) -> dict:
    from expertrl.train import train

    return train(cfg)


def _sft(cfg: SFTJobConfig) -> dict:
    from expertrl.sft import run_sft

    return run_sft(cfg)


def _eval(cfg: EvalConfig) -> dict:
    from expertrl.evaluate import run_eval

    return run_eval(cfg)


EXIT_BAD_INPUT = 2
"""A bad setting or bad input found at start-up (nothing was run)."""
EXIT_FAILED = 1
"""The run stopped itself (NaN/Inf steps in a row, a collapsed policy, a full disk); checkpoints are intact."""
EXIT_INTERRUPTED = 75
"""Ctrl-C or SIGTERM: the step finished and a checkpoint was written; ``--resume`` continues (EX_TEMPFAIL)."""


@dataclass(frozen=True)
class Command:
    config: type
    """the config dataclass the command's settings come from"""
    run: Callable[[Any], dict]
    """runs the command on a validated config; returns its summary"""

    @property
    def summary(self) -> str:
        return (self.config.__doc__ or "").strip().splitlines()[0]


COMMANDS = {
    "train": Command(TrainConfig, _train),
    "sft": Command(SFTJobConfig, _sft),
    "eval": Command(EvalConfig, _eval),
}

# Commands with their own argparse flags (not a config dataclass): module, function(argv) -> exit code, summary.
TOOLS = {
    "upcycle": ("expertrl.cli", "upcycle_main", "turn a dense checkpoint into an MoE checkpoint (SRC DST)"),
    "report": ("expertrl.report", "report_main", "compare runs in one HTML page + Markdown (RUN_DIR [RUN_DIR ...])"),
}

_OPTIONS = "[--config FILE.yaml] [--print-config] [--section.key VALUE ...]"


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    width = max(width, *map(len, TOOLS))
    rows = [f"  {name:<{width}}  {cmd.summary.removeprefix(f'`expertrl {name}`: ')}" for name, cmd in COMMANDS.items()]
    rows += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in TOOLS.items()]
    return "\n".join(
        [
            f"usage: expertrl {{{','.join([*COMMANDS, *TOOLS])}}} ...",
            "",
            "Reinforcement-learning fine-tuning of Mixture-of-Experts models where the router is part of the policy.",
            "",
            "commands:",
            *rows,
            "",
            "Run `expertrl <command> --help` to list every setting of a command.",
        ]
    )


def _command_help(name: str, cmd: Command) -> str:
    return "\n".join(
        [
            f"usage: expertrl {name} {_OPTIONS}",
            "",
            cmd.summary,
            "",
            "  -h, --help          show this help and exit",
            "  --config FILE.yaml  YAML file of settings (nested sections, as --print-config writes)",
            "  --print-config      print the resolved config as YAML and exit",
            "  --preset NAME[,NAME] named method presets (expertrl.presets), e.g. dapo, gspo, rspo, grpo,r3",
            "",
            "Settings (defaults <- --config file <- --section.key VALUE overrides; values are parsed as YAML):",
            format_help(cmd.config),
        ]
    )


def _split_args(args: list[str]) -> tuple[str | None, bool, list[str]]:
    """Pull --config FILE, --print-config and --preset NAME[,NAME] out of a command's arguments.

    A preset (``expertrl.presets``) expands into dotted overrides placed before the explicit ones, so explicit
    flags win: defaults <- --config file <- --preset <- --section.key VALUE.
    """
    config_path, print_config, overrides, preset = None, False, [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--print-config":
            print_config = True
        elif arg in ("--preset", "--algo"):
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{arg}: missing preset name (e.g. {arg} dapo, or {arg} grpo,r3)")
            i += 1
            try:
                preset += preset_overrides(args[i])
            except ValueError as e:
                raise ConfigError(f"{arg}: {e}") from None
        elif arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ConfigError("--config given twice; merge the files into one")
            if arg == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError("--config: missing file name (write --config FILE.yaml)")
                i += 1
                config_path = args[i]
            else:
                config_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
        i += 1
    return config_path, print_config, preset + overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point of `expertrl` and `python -m expertrl`; returns 0, or exits with code 2 on a bad setting."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_top_help(), file=sys.stdout if args else sys.stderr)
        if not args:
            raise SystemExit(2)
        return 0
    name, rest = args[0], args[1:]
    if name in TOOLS:
        _plain_warnings(f"expertrl {name}")
        module, function, _ = TOOLS[name]
        return getattr(importlib.import_module(module), function)(rest)
    if name not in COMMANDS:
        print(f"usage: expertrl {{{','.join(COMMANDS)}}} {_OPTIONS}", file=sys.stderr)
        names = [*COMMANDS, *TOOLS]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"expertrl: error: unknown command {name!r}{hint}; choose from {', '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    cmd = COMMANDS[name]
    _plain_warnings(f"expertrl {name}")
    if "-h" in rest or "--help" in rest:
        print(_command_help(name, cmd))
        return 0
    try:
        config_path, print_config, overrides = _split_args(rest)
        cfg = load_config(cmd.config, config_path, overrides)
        if print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        summary = cmd.run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # messages written for the user: no traceback
        if os.environ.get("EXPERTRL_DEBUG"):
            raise
        print(f"expertrl {name}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except (RunFailed, DiskFullError) as e:  # the run stopped itself; what it saved is intact
        if os.environ.get("EXPERTRL_DEBUG"):
            raise
        print(f"expertrl {name}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    if isinstance(summary, dict) and summary.get("interrupted"):
        raise SystemExit(EXIT_INTERRUPTED)
    return 0


_PYTHON_FORMAT = warnings.formatwarning
"""Python's warning format, kept once so that repeated ``main()`` calls in one process do not stack wrappers."""


def _plain_warnings(prog: str) -> None:
    """Our warnings as one line, ``expertrl train: warning: <message>`` (no source line); other libraries' keep
    Python's format."""

    def formatwarning(message, category, filename, lineno, line=None):
        if "/expertrl/" in filename.replace("\\", "/"):
            return f"{prog}: warning: {message}\n"
        return _PYTHON_FORMAT(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def upcycle_main(argv: list[str] | None = None) -> int:
    """``expertrl upcycle SRC DST [...]``: upcycle a local dense checkpoint (``moe.upcycle.upcycle_checkpoint``)
    and print what was done."""
    from expertrl.moe.upcycle import count_params, upcycle_checkpoint_models

    parser = argparse.ArgumentParser(
        prog="expertrl upcycle",
        description="Turn a dense checkpoint (qwen3/qwen2/llama/mistral, or a qwen3_vl vision-language model) into "
        "an MoE one whose experts copy its FFN.",
    )
    parser.add_argument("src", help="local dense save_pretrained directory")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--num-experts", type=int, default=8, help="E experts per layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="K experts per token (default 2)")
    parser.add_argument("--noise-std", type=float, default=0.0, help="relative std of noise on expert copies")
    parser.add_argument("--router-init-std", type=float, default=0.02, help="std of the new router weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of routers and noise")
    parser.add_argument(
        "--no-norm-topk-prob",
        dest="norm_topk_prob",
        action="store_false",
        help="un-renormalised top-K softmax weights (MoE-GRPO Eq. 2; qwen sources only)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = parser.parse_args(argv)
    kwargs = dict(
        num_experts=args.num_experts,
        top_k=args.top_k,
        noise_std=args.noise_std,
        router_init_std=args.router_init_std,
        norm_topk_prob=args.norm_topk_prob,
        seed=args.seed,
    )
    try:
        dst, dense, moe = upcycle_checkpoint_models(args.src, args.dst, overwrite=args.overwrite, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))  # "expertrl upcycle: error: ...", exit code 2
    before = sum(p.numel() for p in dense.parameters())
    total, active = count_params(moe)
    print(
        f"upcycled {args.src} ({dense.config.model_type}, {before:,} params) -> {dst} ({moe.config.model_type}, "
        f"E={args.num_experts}, K={args.top_k}, noise_std={args.noise_std}, norm_topk_prob={args.norm_topk_prob}, "
        f"seed={args.seed}): {total:,} params, {active:,} active per token"
    )
    return 0
