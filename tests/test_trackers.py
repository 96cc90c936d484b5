"""``report_to``: one tiny run logs to tensorboard, trackio and wandb (offline) at once, and each tracker's own store
is read back: the config, the per-step metrics metrics.jsonl holds, and the report's figures. Only metrics.jsonl is
written when no tracker is asked for."""

import json
import struct
from pathlib import Path

import pytest
from conftest import tiny_args

from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.logging import MetricsLogger
from expertrl.plots import METRIC_FIGURES
from expertrl.train import train

PROJECT = "expertrl-tests"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 2-step run with report_to [jsonl, tensorboard, trackio, wandb] (wandb offline, under the run directory)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        args = tiny_args(**{"sft.steps": 0, "eval_every": 1})
        args += ["--report_to", "[jsonl, tensorboard, trackio, wandb]", "--project", PROJECT, "--run_name", "tiny-1"]
        train(load_config(TrainConfig, None, [*args, "--output_dir", str(out)]))
    finally:
        mp.undo()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def _step_scalars(records: list[dict], key: str) -> dict[int, float]:
    """What a tracker should hold for ``key``: each record's value at max(step, 0)."""
    return {max(r["step"], 0): r[key] for r in records if key in r}


def test_tensorboard_event_files_hold_config_metrics_and_figures(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = tracked_run
    events = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    for key in ("reward/mean", "loss/total", "optim/lr", "router/usage_entropy", "eval/accuracy"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(_step_scalars(records, key), rel=1e-6), key
    assert "router/load/layer0" not in events.Tags()["scalars"]  # vectors stay in metrics.jsonl and the figures
    assert {f"figures/{f}" for f in METRIC_FIGURES} <= set(events.Tags()["images"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rollout:" in config and "report_to:" in config


def test_trackio_store_holds_config_metrics_and_figures(tracked_run):
    from trackio.sqlite_storage import SQLiteStorage

    out, records = tracked_run
    logs = SQLiteStorage.get_logs(PROJECT, "tiny-1")
    for key in ("reward/mean", "loss/total", "eval/accuracy"):
        logged = {row["step"]: row[key] for row in logs if key in row}
        assert logged == pytest.approx(_step_scalars(records, key), rel=1e-6), key
    images = {k for row in logs for k, v in row.items() if isinstance(v, dict) and v.get("_type") == "trackio.image"}
    assert images == {f"figures/{f}" for f in METRIC_FIGURES}
    config = SQLiteStorage.get_run_config(PROJECT, "tiny-1")
    assert config["rollout"]["group_size"] == 4 and config["output_dir"] == str(out)


def _wandb_records(path: Path):
    """The protobuf records of a wandb transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log blocks of 32 KiB whose chunks are checksum (4), length (2), type (1: full, 2-4: first, middle,
    last) and data."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: padding to the next block
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_config_and_metrics(tracked_run):
    out, records = tracked_run
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, images = {}, {}, set()
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = row.pop("_step", None)
            history.setdefault(step, {}).update(row)
        elif kind == "run":  # the run record carries the config passed to wandb.init
            config |= {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "files":
            images |= {Path(f.path).name.rsplit("_", 2)[0] for f in record.files.files if "media/images" in f.path}
    for key in ("reward/mean", "loss/total", "eval/accuracy"):
        logged = {s: row[key] for s, row in history.items() if key in row}
        assert logged == pytest.approx(_step_scalars(records, key), rel=1e-6), key
    assert config["rollout"]["group_size"] == 4 and config["report_to"] == ["jsonl", "tensorboard", "trackio", "wandb"]
    assert images == set(METRIC_FIGURES)
    assert (out / "wandb_run_id").read_text() in log.name


def test_no_tracker_writes_only_metrics_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.jsonl", trackers=[])
    logger.log({"reward/mean": 0.5}, step=0)
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_trackers_get_scalars_and_step_zero_for_the_start_evaluation(tmp_path):
    class Recorder:
        def __init__(self):
            self.calls, self.closed = [], 0

        def log(self, metrics, step):
            self.calls.append((step, metrics))

        def log_images(self, images, step):
            self.calls.append((step, sorted(images)))

        def close(self):
            self.closed += 1

    rec = Recorder()
    logger = MetricsLogger(tmp_path / "metrics.jsonl", trackers=[rec])
    logger.log({"eval/accuracy": 0.25}, step=-1)
    logger.log({"reward/mean": 1, "router/load/layer0": [0.5, 0.5], "x": float("inf"), "flag": True}, step=3)
    logger.close()
    logger.close()
    assert rec.calls == [(0, {"eval/accuracy": 0.25}), (3, {"reward/mean": 1.0})] and rec.closed == 1
    off = Recorder()
    MetricsLogger(tmp_path / "other.jsonl", enabled=False, trackers=[off]).log({"reward/mean": 1.0}, step=0)
    assert off.calls == []  # a rank other than 0 hands nothing to trackers
