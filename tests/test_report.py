"""`expertrl report`: renders for one and for two tiny runs (every figure id, embedded PNGs), reads routing statistics
from final/eval.json or runs the evaluation pass, and names the file (and line) of a missing or corrupted run file."""

import json
import shutil

import pytest
from transformers.utils import logging as hf_logging

from expertrl.config import EvalConfig, ModelConfig, RolloutConfig, SFTConfig, TaskConfig, TrainConfig
from expertrl.evaluate import run_eval
from expertrl.report import (
    FIGURE_IDS,
    RunError,
    load_run,
    read_metrics,
    report_main,
    routing_statistics_for_run,
    write_report,
)
from expertrl.train import train


def _tiny_run(out, seed):
    cfg = TrainConfig(
        model=ModelConfig(preset="tiny"),
        task=TaskConfig(train_size=40, eval_size=6),
        rollout=RolloutConfig(group_size=2, prompts_per_step=2, max_new_tokens=4),
        sft=SFTConfig(steps=0),
        steps=3,
        micro_batch_size=4,
        eval_every=1,
        seed=seed,
        progress=False,
        output_dir=str(out),
    )
    train(cfg)
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two tiny finished runs; the second also has final/eval.json with routing statistics (from `expertrl eval`)."""
    root = tmp_path_factory.mktemp("runs")
    first, second = _tiny_run(root / "first", 0), _tiny_run(root / "second", 1)
    run_eval(
        EvalConfig(
            model=ModelConfig(path=str(second / "final")),
            task=TaskConfig(train_size=40, eval_size=6),
            max_new_tokens=4,
            batch_size=8,
            seed=0,
            num_samples=2,
            pass_k=[1, 2],
        )
    )
    return first, second


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / run.name)


def test_report_for_one_run(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    paths = write_report([run])  # default output: RUN_DIR/report
    assert paths["html"] == run / "report" / "report.html"
    page = paths["html"].read_text()
    for fid in FIGURE_IDS:
        assert f"id='{fid}'><img" in page, fid  # every figure rendered (this run logs loss diagnostics too)
    assert page.count("data:image/png;base64,") == len(FIGURE_IDS)
    assert "<script" not in page and "src='http" not in page  # self-contained
    md = paths["markdown"].read_text()
    assert "task JSD (log2)" in md and "router entropy (per-token, nats)" in md and "usage entropy" in md
    assert "an evaluation pass run by the report" in md  # no final/eval.json: the report ran the pass
    with pytest.raises(ValueError, match="labels"):
        write_report([run], tmp_path / "x", labels=["a", "b"])


@pytest.mark.parametrize("progress", ["true", "false"])
def test_report_for_two_runs_side_by_side(runs, tmp_path, capsys, progress):
    hf_logging.enable_progress_bar()  # as a fresh process has it: the report's loading bar follows its own switch
    try:
        args = [str(runs[0]), str(runs[1]), "--output", str(tmp_path / "cmp"), "--labels", "base,rl"]
        code = report_main([*args, "--progress", progress])
    finally:
        hf_logging.disable_progress_bar()
    assert code == 0
    out, err = capsys.readouterr()
    assert "report.html" in out
    assert "Loading weights" not in err  # the first run's evaluation pass loads its model quietly off a terminal
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert all(f"id='{fid}'" in page for fid in FIGURE_IDS)
    assert page.count("data:image/png;base64,") == len(FIGURE_IDS)
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| base |" in md and "| rl |" in md
    assert "rl: " in md and "routing statistics from final/eval.json" in md  # the second run's stored statistics
    assert "pass@2" in md  # from the stored eval.json


def test_stored_and_recomputed_routing_statistics_agree(runs):
    stored = load_run(runs[1]).routing
    assert stored == json.loads((runs[1] / "final" / "eval.json").read_text())["routing"]
    fresh = routing_statistics_for_run(runs[1])
    assert fresh["all"]["n_tokens"] == stored["all"]["n_tokens"]
    for a, b in zip(fresh["all"]["usage"], stored["all"]["usage"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_bad_metrics_line_names_the_file_and_line(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a half-written line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"metrics\.jsonl:3: not valid JSON.*repair or delete that line"):
        write_report([run], tmp_path / "rep")
    (run / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(RunError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_metrics(run / "metrics.jsonl")


def test_missing_files_name_the_file_and_the_fix(runs, tmp_path, capsys):
    run = _copy(runs[0], tmp_path)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(RunError, match=r"metrics\.jsonl not found"):
        write_report([run], tmp_path / "rep")
    run = _copy(runs[1], tmp_path / "b")
    shutil.rmtree(run / "final")
    with pytest.raises(RunError, match=r"final not found.*--resume"):
        write_report([run], tmp_path / "rep")
    run = _copy(runs[1], tmp_path / "c")
    (run / "final" / "eval.json").write_text('{"accuracy": 0.5,')
    with pytest.raises(RunError, match=r"eval\.json: not valid JSON.*expertrl eval"):
        write_report([run], tmp_path / "rep")
    run = _copy(runs[0], tmp_path / "d")
    (run / "config.yaml").unlink()
    with pytest.raises(RunError, match=r"config\.yaml"):
        write_report([run], tmp_path / "rep")
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err
