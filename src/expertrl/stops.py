"""What ends a running job early, and how it ends: stop requests, full disks, errors past start-up.

* ``stop_requests``: Ctrl-C / SIGTERM only set a flag; the loop finishes its step, checkpoints and exits 75.
* ``saving_stops``: a full disk (``io.DiskFullError``) or non-finite weights while writing a checkpoint, the metrics
  log or the final model stop the run (``config.RunFailed``: exit 1) naming the space needed, the last complete
  checkpoint and the command that continues from it.
* ``save_final_model``: the final model, retried on a full disk for ``final_save_wait_s`` (it may exist only in
  memory).
* ``failures_stop_the_run``: a ``ValueError`` / ``FileNotFoundError`` past start-up is a failed run (exit 1), not
  bad input (exit 2).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from expertrl.checkpoint import latest_checkpoint, save_model
from expertrl.config import ConfigError, RunFailed
from expertrl.io import DiskFullError
from expertrl.ops import NonFiniteError


@contextlib.contextmanager
def stop_requests(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, Ctrl-C / SIGTERM only set ``stop["signal"]`` so the loop can finish its step and save;
    a second one aborts at once. The previous handlers come back on exit."""
    stop: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread only
        yield stop
        return

    def handler(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        tqdm.write(f"\n{stop['signal']}: stopping after this step and saving a checkpoint (send it again to abort now)")

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(command: str, out: Path) -> str:
    """The command that continues the run in ``out`` (``command``: ``train`` or ``sft``)."""
    return f"expertrl {command} --config {out}/config.yaml --resume {out}"


RETRY_S = 10.0
"""Seconds between attempts to write the final model on a full disk."""


def save_final_model(model: nn.Module, tokenizer, path: Path, *, wait_s: float, state_dict: dict | None = None) -> Path:
    """The final model (``save_model``); on a full disk retried every ``RETRY_S`` seconds for ``wait_s`` seconds (the
    weights of the last steps may exist only in memory), each failure printed with the space needed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return save_model(model, tokenizer, path, state_dict=state_dict)
        except DiskFullError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            print(
                f"could not write the final model: {e}. The trained weights are only in memory: free space; retrying "
                f"every {RETRY_S:g} s for {left:.0f} s more (final_save_wait_s)",
                flush=True,
            )
            time.sleep(min(RETRY_S, left))


def _then(out: Path, command: str, cause: str) -> str:
    last = latest_checkpoint(out)
    if last is None:
        return "no checkpoint had been written yet"
    return f"the last complete checkpoint {last} is intact: {cause}, then continue with {command}"


@contextlib.contextmanager
def saving_stops(out: Path, what: str, command: str):
    """A full disk, or weights gone NaN/Inf, while writing ``what`` stops the run (``RunFailed``: exit 1) with one
    message: the cause (for a full disk the space needed), the last complete checkpoint (untouched) and ``command``,
    which continues from it."""
    try:
        yield
    except (DiskFullError, NonFiniteError) as e:
        raise RunFailed(f"could not write {what}: {e}; {_then(out, command, 'free space')}") from e


@contextlib.contextmanager
def failures_stop_the_run(out: Path, where, command: str):
    """Past start-up, a ``ValueError`` or ``FileNotFoundError`` (a reward function's, a data row's, a bug's) is not a
    bad setting (a ``ConfigError`` still is): it stops the run (``RunFailed``: exit 1, not 2) naming ``where()``
    (e.g. the step), the error and the last complete checkpoint. ``EXPERTRL_DEBUG=1`` shows the traceback."""
    try:
        yield
    except ConfigError:  # a setting checked where it is first used: still a bad setting (exit 2)
        raise
    except (ValueError, FileNotFoundError) as e:
        raise RunFailed(
            f"{where()}: {type(e).__name__}: {e}; {_then(out, command, 'fix the cause')} (EXPERTRL_DEBUG=1 shows the "
            "traceback)"
        ) from e
