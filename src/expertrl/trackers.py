"""Experiment trackers (``report_to``, TRL's name): where a run's config, per-step metrics and figures go besides
``metrics.jsonl``, which is always written.

    tensorboard   event files in ``<output_dir>/runs`` (``tensorboard --logdir <output_dir>/runs``); the config as
                  a YAML text summary                                              extra: expertrl[tensorboard]
    trackio       a local trackio project (``trackio show --project <project>``; ``TRACKIO_DIR`` moves its store)
                                                                                   extra: expertrl[trackio]
    wandb         a Weights & Biases run under ``<output_dir>/wandb`` (``WANDB_MODE=offline`` logs without an
                  account; ``wandb sync`` uploads later)                           extra: expertrl[wandb]

Every tracker gets the resolved config at start, the scalar metrics of every record ``MetricsLogger.log`` writes
(the flat dict ``train.record`` logs: vector metrics such as ``router/load/<router>`` stay in metrics.jsonl and in
the figures), and, at the end, the report's figures that metrics.jsonl alone can draw (``plots.figure_images``).
Only rank 0 makes trackers. Steps are RL steps; the evaluation before RL (step -1 in metrics.jsonl) is logged at
step 0, because trackers count steps from 0. ``check_installed`` runs at start-up, before any model is loaded: a
tracker whose package is missing stops the run with one message naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml

from expertrl.config import ConfigError

TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
"""tracker name -> the package it needs (the optional extra of the same name installs it)"""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalar metrics of one step."""

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """(H, W, 3) uint8 images by name (the report's figures)."""

    def close(self) -> None:
        """Flush and finish the run."""


def check_installed(report_to: list[str]) -> None:
    """Raise ``ConfigError`` naming the extra to install for the first tracker of ``report_to`` that is missing."""
    for name in report_to:
        package = TRACKERS.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to: {name} is not installed; install it with pip install 'expertrl[{name}]' (or pip install "
                f"{package}), or drop {name} from report_to"
            )


def make_trackers(
    report_to: list[str], *, out: Path, run_name: str, project: str, config: dict, resume_step: int | None = None
) -> list[Tracker]:
    """The trackers of ``report_to`` (``jsonl`` and ``none`` make none), each started with ``config``.

    Args:
        out: the run directory (tensorboard and wandb write under it).
        resume_step: the step a resumed run continues from (None for a new run): tensorboard drops what an
            interrupted run logged after it, wandb and trackio continue the same run.
    """
    check_installed(report_to)
    makers = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": WandB}
    return [
        makers[name](out=out, run_name=run_name, project=project, config=config, resume_step=resume_step)
        for name in dict.fromkeys(report_to)
        if name in makers
    ]


def scalars(record: dict) -> dict[str, float]:
    """The finite-or-NaN scalar entries of a metrics record (no ``step``, no lists, no booleans or strings)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isinf(v)
    }


class TensorBoard:
    """Event files in ``out/runs`` through ``torch.utils.tensorboard``."""

    def __init__(self, *, out: Path, run_name: str, project: str, config: dict, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(out) / "runs"), purge_step=resume_step)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for key, image in images.items():
            self.writer.add_image(f"figures/{key}", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _RunTracker:
    """A tracker whose run object logs dicts (``run.log``) and finishes (``run.finish``); images are made with its
    library's ``Image`` class (``self.image``)."""

    run: object
    image: type

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({f"figures/{k}": self.image(v, caption=k) for k, v in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio(_RunTracker):
    """A local trackio run (project ``project``, run ``run_name``); continues the same run on resume."""

    def __init__(self, *, out: Path, run_name: str, project: str, config: dict, resume_step: int | None) -> None:
        import trackio

        self.image = trackio.Image
        self.run = trackio.init(
            project=project, name=run_name, config=config, resume="allow" if resume_step is not None else "never",
            embed=False,
        )  # fmt: skip


class WandB(_RunTracker):
    """A wandb run under ``out/wandb``; its id is kept in ``out/wandb_run_id`` so a resumed run continues it."""

    def __init__(self, *, out: Path, run_name: str, project: str, config: dict, resume_step: int | None) -> None:
        import wandb

        self.image = wandb.Image
        id_file = Path(out) / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.run = wandb.init(
            project=project, name=run_name, config=config, dir=str(out), id=run_id,
            resume="allow" if run_id is not None else None,
        )  # fmt: skip
        id_file.write_text(self.run.id)
