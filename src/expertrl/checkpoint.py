"""Runs that survive: atomic saves, resumable RL checkpoints, resuming, and stopping cleanly on Ctrl-C / SIGTERM.

Every directory is written into a temporary sibling and then renamed, so a reader (or a resumed run) sees either
the previous complete checkpoint or the new complete one, never a half-written directory. Weights are safetensors
(``save_pretrained``); the optimizer state is the only ``torch.save`` file, and it is read back with
``weights_only=True`` (tensors and plain containers, no code).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expertrl.config import ConfigError, ModelConfig, SFTJobConfig, TrainConfig
from expertrl.configio import from_dict, load_yaml, save_yaml, to_dict
from expertrl.io import atomic_save_dir, atomic_write_text, read_jsonl, weights_problem
from expertrl.models import DTYPES, load_model
from expertrl.moe.lora import load_adapter_weights, save_adapter_weights
from expertrl.moe.lora_moe import adapter_settings
from expertrl.ops import check_finite


def _write_policy(model: nn.Module, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """A model in Hugging Face format, or, for a frozen base with adapters, the adapter weights alone (the base is
    rebuilt from the run's model settings); plus the tokenizer. ``state_dict``: the full weights to write instead of
    ``model``'s own (an FSDP2-sharded model's, from ``parallel.gather_full_state``)."""
    if adapter_settings(model) is not None:
        assert state_dict is None, "adapter weights of a sharded model are not gathered"
        save_adapter_weights(model, directory)
    else:
        model.save_pretrained(
            directory, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict})
        )
    tokenizer.save_pretrained(directory)


def save_model(model: nn.Module, tokenizer, path: str | Path, state_dict: dict | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` in Hugging Face format (loadable with ``AutoModelForCausalLM``); a model
    with adapters saves the adapter only (load it with ``model.adapter.path`` and the run's base settings).
    ``state_dict``: the full weights of an FSDP2-sharded ``model`` (``parallel.gather_full_state``), written instead."""
    check_finite(state_dict if state_dict is not None else model, f"saving {path}")
    needed = state_bytes(state_dict if state_dict is not None else model)
    return atomic_save_dir(path, lambda tmp: _write_policy(model, tokenizer, tmp, state_dict), needed_bytes=needed)


# ---------------------------------------------------------------------------------------------------------------
# resumable checkpoints: RUN_DIR/checkpoints/step-{N:06d}/ after N completed RL steps, and
# RUN_DIR/checkpoints/sft-step-{N:06d}/ after N completed supervised steps (the warm-up, or `expertrl sft`)
#
#   model/                  save_pretrained (safetensors) + tokenizer: the policy after step N
#   reference/              the frozen KL reference model (only when loss.kl_coef > 0)
#   optimizer.pt            optimizer.state_dict(), read back with torch.load(weights_only=True) (parallel=fsdp2:
#                           the full state keyed by parameter name, see parallel.gather_full_state)
#   trainer_state.json      phase (sft | rl), step, scheduler state, summary so far, fault counters, global RNG
#   config.yaml             the run's config; a resumed run must match it (train.check_resume_config)
#
# The directory is written by ``atomic_save_dir``, and ``trainer_state.json`` is what marks it complete: a killed
# writer leaves only a hidden ``.step-....tmp-*`` directory, which resume ignores and deletes.

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"(sft-)?step-(\d+)")
# config.json keys that are bookkeeping, not architecture (dtype is set by model.dtype at load time)
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache"}


def checkpoint_path(run_dir: str | Path, step: int, *, phase: str = "rl") -> Path:
    """Where the checkpoint after ``step`` completed steps of ``phase`` (``rl`` or ``sft``) lives."""
    assert phase in ("rl", "sft"), phase
    return Path(run_dir) / CHECKPOINTS / f"{'sft-' if phase == 'sft' else ''}step-{step:06d}"


def state_bytes(*objects) -> int:
    """Bytes of the tensors in modules, state dicts (nested) and optimizers: the size a checkpoint will need."""

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, nn.Module):
            return sum(walk(t) for t in x.state_dict().values())
        if isinstance(x, torch.optim.Optimizer):
            return walk(x.state_dict())
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(walk(v) for v in x)
        return 0

    return sum(walk(o) for o in objects if o is not None)


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config,
    reference: nn.Module | None = None,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write a complete, resumable checkpoint directory atomically (see the layout above).

    ``model_state`` / ``optimizer_state``: the full weights and optimizer state of an FSDP2-sharded ``model``
    (``parallel.gather_full_state``), written instead of ``model``'s and ``optimizer.state_dict()``.

    Raises:
        NonFiniteError: the weights hold NaN/Inf (never declared a good checkpoint).
        io.DiskFullError: the disk filled up; the earlier checkpoints are untouched.
    """
    check_finite(model_state if model_state is not None else model, f"checkpoint {path}")

    def write(tmp: Path) -> None:
        _write_policy(model, tokenizer, tmp / "model", model_state)
        if reference is not None:
            _write_policy(reference, tokenizer, tmp / "reference")
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        save_yaml(config, tmp / "config.yaml")
        state = trainer_state | {"rng": rng_state()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))  # last: marks the checkpoint complete

    needed = state_bytes(model_state if model_state is not None else model, optimizer_state or optimizer, reference)
    return atomic_save_dir(path, write, needed_bytes=needed)


def save_sft_checkpoint(
    run_dir: str | Path,
    steps_done: int,
    model: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    schedule,
    config,
    summary: dict,
    *,
    keep: int,
) -> Path:
    """A resumable checkpoint after ``steps_done`` supervised steps (``checkpoints/sft-step-N``), then the oldest
    checkpoints beyond ``keep`` are deleted."""
    trainer_state = {
        "phase": "sft",
        "step": steps_done,
        "scheduler": schedule.state_dict(),
        "summary": summary,
        "skipped_steps": 0,
        "wall_time_s": 0.0,
    }
    path = save_checkpoint(
        checkpoint_path(run_dir, steps_done, phase="sft"), model=model, tokenizer=tokenizer, optimizer=optimizer,
        trainer_state=trainer_state, config=config,
    )  # fmt: skip
    prune_checkpoints(run_dir, keep)
    return path


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete ``sft-step-N`` and ``step-N`` directories (with ``trainer_state.json``), oldest first:
    supervised steps come before RL steps."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        ((m.group(1) is None, int(m.group(2))), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()
    ]
    complete = []
    for _, p in sorted(found):
        if (p / "trainer_state.json").is_file():
            complete.append(p)
        else:  # trainer_state.json is written last, so its absence marks a checkpoint cut short
            warnings.warn(f"ignoring incomplete checkpoint {p} (no trainer_state.json)", stacklevel=2)
    return complete


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-numbered complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def prune_checkpoints(run_dir: str | Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the ``keep`` most recent complete checkpoints, never ``protect`` (the last healthy checkpoint
    a collapse stop points back to)."""
    assert keep >= 1, keep
    for path in complete_checkpoints(run_dir)[:-keep]:
        if protect is None or path.resolve() != Path(protect).resolve():
            shutil.rmtree(path)


def set_aside_newer(run_dir: str | Path, kept: Path) -> list[Path]:
    """Tidy the checkpoints of a run resumed from ``kept`` (the newest one that reads back whole): remove what a
    killed writer left (``remove_partial_checkpoints``), and rename the complete checkpoints newer than ``kept`` (so
    damaged) to ``checkpoints/damaged-<name>``: nothing of those is deleted, and they no longer count as checkpoints
    for resuming or for ``keep_checkpoints``. Returns their new paths."""
    remove_partial_checkpoints(run_dir)
    names = [p.name for p in complete_checkpoints(run_dir)]
    newer = [Path(run_dir) / CHECKPOINTS / n for n in names[names.index(kept.name) + 1 :]] if kept.name in names else []
    moved = []
    for path in newer:
        target = path.with_name(f"damaged-{path.name}")
        if target.exists():
            shutil.rmtree(target)  # the same step damaged twice: keep the newest copy
        path.rename(target)
        moved.append(target)
        warnings.warn(f"set the damaged checkpoint {path.name} aside as {target}", stacklevel=2)
    return moved


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete the temporary directories a killed writer left behind (``.step-N.tmp-*``, ``.step-N.old-*``)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if re.fullmatch(r"\.step-\d+\.(tmp|old)-.+", p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed (naming the damaged file), or None: every file is read or checked
    before anything of the run is touched."""
    path = Path(path)
    try:
        state = load_trainer_state(path)
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or "step" not in state:
        return f"{path / 'trainer_state.json'} is empty or not a trainer state"
    try:
        load_yaml(path / "config.yaml")
    except Exception as e:  # noqa: BLE001 - any unreadable config disqualifies the checkpoint
        return f"{path / 'config.yaml'} cannot be read ({e})"
    for sub in ("model", "reference"):
        if sub == "model" or (path / sub).is_dir():
            problem = weights_problem(path / sub)
            if problem is not None:
                return problem
    try:  # memory-mapped: reads the archive's index and pickle, not the (possibly huge) tensors
        torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a bad pickle...
        return f"{path / 'optimizer.pt'} cannot be read ({type(e).__name__}: {str(e)[:80]})"
    return None


def load_optimizer_state(path: str | Path) -> dict:
    """The optimizer state of a checkpoint; ``weights_only`` so a tampered file cannot run code."""
    return torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)


def architecture_diff(expected: dict, found: dict) -> list[str]:
    """The config.json fields (as dicts) that make two models different networks, as 'key: expected vs found'."""
    keys = sorted((expected.keys() | found.keys()) - _NOT_ARCHITECTURE)
    return [f"{k}: {expected.get(k)!r} vs {found.get(k)!r}" for k in keys if expected.get(k) != found.get(k)]


def rng_state() -> dict:
    """Global RNG states (torch, CUDA, Python, NumPy) as JSON-safe lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------------------
# resuming a run, and stopping one cleanly

# Settings a resumed run may change; everything else must equal the checkpoint's config.yaml. output_dir must be
# the resume directory itself, so a run directory that was moved can still be resumed.
RESUMABLE_CHANGES = (
    "resume", "steps", "progress", "output_dir", "overwrite", "keep_checkpoints", "max_bad_steps", "final_save_wait_s",
)  # fmt: skip
_MAY_CHANGE = [k for k in RESUMABLE_CHANGES if k not in ("resume", "output_dir", "overwrite")]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v}
    return out


def find_resume_checkpoint(cfg: TrainConfig | SFTJobConfig) -> Path:
    """The checkpoint ``cfg.resume`` continues from, after checking that ``cfg`` describes the same run.

    The newest complete checkpoint that reads back whole is used; a damaged one (a truncated weight file, an
    unreadable optimizer state, an empty trainer state) is skipped with a warning naming the damaged file. Nothing
    in the run directory is touched here."""
    run_dir = Path(cfg.resume)
    if not run_dir.is_dir():  # a typo: say so before suggesting anything built from it
        raise ConfigError(f"resume: {str(run_dir)!r} is not a directory; pass the run directory to continue")
    if run_dir.resolve() != Path(cfg.output_dir).resolve():
        raise ConfigError(
            f"resume: a resumed run continues in its own directory, but output_dir is {cfg.output_dir!r}; "
            f"pass --output_dir {run_dir} as well (a run directory that was moved keeps its old one in config.yaml)"
        )
    candidates = complete_checkpoints(run_dir)
    if not candidates:
        raise ConfigError(
            f"resume: {str(run_dir)!r} has no complete checkpoint ({CHECKPOINTS}/step-N with trainer_state.json); "
            "checkpoints are written every save_every steps, at the end of a run with save_every > 0, and on Ctrl-C "
            "or SIGTERM"
        )
    ckpt, problems = None, []
    for candidate in reversed(candidates):
        problem = checkpoint_problem(candidate)
        if problem is None:
            ckpt = candidate
            break
        problems.append(problem)
        warnings.warn(f"skipping damaged checkpoint {candidate.name}: {problem}", stacklevel=2)
    if ckpt is None:
        raise ConfigError(f"resume: no checkpoint of {str(run_dir)!r} reads back whole: {'; '.join(problems)}")
    saved = _flatten(to_dict(from_dict(type(cfg), load_yaml(ckpt / "config.yaml"))))
    now = _flatten(to_dict(cfg))
    diff = [k for k in sorted(saved.keys() | now.keys()) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if diff:
        detail = "; ".join(f"{k} is {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
        raise ConfigError(
            f"{', '.join(diff)}: not what the run being resumed used ({detail}; see {ckpt / 'config.yaml'}). Only "
            f"{', '.join(_MAY_CHANGE)} may change on resume; start a new run (another output_dir) to change the rest"
        )
    state = load_trainer_state(ckpt)
    done = state["step"] if state.get("phase", "rl") == "rl" and hasattr(cfg, "steps") else 0
    if done and cfg.steps < done:
        raise ConfigError(f"steps: the checkpoint {ckpt} has already done {done} steps; set steps >= {done}")
    return ckpt


def load_weights(model: nn.Module, path: Path, cfg: ModelConfig) -> None:
    """Copy the weights of the ``save_pretrained`` directory ``path`` into ``model``, which must be the same network
    (for a model with adapters: the adapter weights, into adapters attached with the same settings)."""
    if adapter_settings(model) is not None:
        load_adapter_weights(model, path)
        return
    saved = load_model(
        path,
        dtype=DTYPES[cfg.dtype],
        experts_implementation=cfg.experts_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    diff = architecture_diff(model.config.to_dict(), saved.config.to_dict())
    if diff:
        raise ConfigError(
            f"model: the checkpoint {path} holds a different network than the model settings build "
            f"({'; '.join(diff)}; settings vs checkpoint config.json); resume with the run's own model settings"
        )
    model.load_state_dict(saved.state_dict())


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps >= ``step`` (logged after the checkpoint a run resumes from) and any line a kill
    cut short, so the resumed run appends to a log without duplicates."""
    if not path.is_file():
        return
    keep = [json.dumps(r) + "\n" for _, r in read_jsonl(path, skip_bad=True) if r.get("step", step) < step]
    atomic_write_text(path, "".join(keep))  # a kill now leaves the old log or the new one, never a cut one
