"""A run directory belongs to one run: claimed at start-up, locked for the life of the run, never silently reused.

``claim_run_dir(out, resume=..., overwrite=...)`` runs before anything is written:

* a path that cannot hold a run (a file, a read-only directory, ``/sys``...) is one clear error;
* another live expertrl process holding the directory's lock (``.expertrl.lock``, an advisory ``flock`` released
  when the process ends, even by ``kill -9``) is an error naming its pid;
* a directory that already holds a run (a finished one, or one with checkpoints) is refused unless the run resumes
  it (``--resume``) or ``--overwrite`` asks to replace it; with ``--overwrite`` only expertrl's own files are
  removed, nothing else in the directory, and only by ``RunDir.clear_previous()``, which the run calls after its
  start-up checks passed: a replacement run that cannot start leaves the earlier run as it was.

The returned ``RunDir`` keeps the lock until ``release()`` (or process exit).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from expertrl.config import ConfigError

LOCK = ".expertrl.lock"
RUN_MARKERS = (
    "config.yaml",
    "metrics.jsonl",
    "sft_metrics.jsonl",
    "summary.json",
    "guidance.json",
    "eval.json",
    "final",
    "checkpoints",
    "sft_checkpoints",
)
"""What marks a directory as holding a run."""
RUN_FILES = (*RUN_MARKERS, "runs", "wandb", "wandb_run_id", "engine", "report")
"""What a run writes into its directory (``--overwrite`` removes exactly these): the markers, the trackers' files
(tensorboard's ``runs/``, wandb's ``wandb/`` and ``wandb_run_id``), the vLLM engine's weight folder and the report
``expertrl report`` writes there by default (it would describe the replaced run)."""


class RunDir:
    """A claimed run directory and its lock (``claim_run_dir``)."""

    def __init__(self, path: Path, fd: int | None, previous: tuple[str, ...] = ()) -> None:
        self.path = path
        self._fd = fd
        self.previous = previous  # the earlier run's files that --overwrite replaces (clear_previous)

    def clear_previous(self) -> None:
        """Remove the earlier run's expertrl files (``--overwrite``); called once every start-up check passed, just
        before the new run writes its first file."""
        for name in self.previous:  # explicit consent: expertrl's own files only
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        self.previous = ()

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


def existing_run(path: Path) -> list[str]:
    """The run files ``path`` already holds (none unless it holds a run's marker files)."""
    found = [name for name in RUN_FILES if (path / name).exists()]
    return found if any(name in RUN_MARKERS for name in found) else []


def claim_run_dir(out: str | Path, *, resume: bool, overwrite: bool, lock: bool = True) -> RunDir:
    """Make ``out`` this run's directory (module docstring).

    Args:
        resume: the run continues the run in ``out`` (its files stay).
        overwrite: replace an earlier run in ``out`` (its expertrl files are removed by ``clear_previous``).
        lock: take the directory lock (only the main process of a multi-process run does).
    Raises:
        ConfigError: ``output_dir`` cannot be written, is in use, or holds another run.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".expertrl-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = "it is a file" if out.is_file() or e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror
        raise ConfigError(
            f"output_dir: cannot write a run into {str(out)!r} ({reason}); choose a writable directory"
        ) from None
    fd = None
    if lock:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"output_dir: {str(out)!r} is in use by another running expertrl process (pid {holder}); wait for it "
                "to finish, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    found = existing_run(out)
    if found and not resume:
        if not overwrite:
            if fd is not None:
                os.close(fd)
            hint = f"continue it with --config {out}/config.yaml --resume {out}, " if "checkpoints" in found else ""
            raise ConfigError(
                f"output_dir: {str(out)!r} already holds a run ({', '.join(found)}); {hint}choose another output_dir, "
                "or pass --overwrite true to replace it"
            )
        return RunDir(out, fd, previous=tuple(found))  # removed after the start-up checks (clear_previous)
    return RunDir(out, fd)
