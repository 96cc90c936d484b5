"""The `expertrl` command line, called in-process through `main` (nothing here runs training)."""

from __future__ import annotations

import pytest
import yaml

from expertrl.cli import main
from expertrl.config import SFTJobConfig, TrainConfig
from expertrl.configio import from_dict, save_yaml, to_dict


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "sft", "eval"):
        assert f"\n  {name} " in out


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage: expertrl" in capsys.readouterr().err


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    assert "expertrl: error: unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_command_help(capsys, flag):
    assert main(["eval", flag]) == 0
    out = capsys.readouterr().out
    assert "usage: expertrl eval" in out
    assert "accuracy of a checkpoint" in out
    assert "--max_new_tokens INT  (default: 8)" in out
    assert "--model.path STR|null" in out


def test_print_config_applies_file_and_overrides(capsys, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 3\nrollout:\n  group_size: 4\n")
    assert main(["train", "--config", str(path), "--print-config", "--rollout.group_size=6", "--optim.lr", "1e-3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = from_dict(TrainConfig, printed)
    assert (cfg.steps, cfg.rollout.group_size, cfg.optim.lr) == (3, 6, 1e-3)
    assert printed == to_dict(cfg)


def test_print_config_round_trips_a_saved_config(capsys, tmp_path):
    original = from_dict(SFTJobConfig, {"sft": {"steps": 5, "optim": {"lr": 0.02}}, "task": {"kwargs": {"a": 1}}})
    path = tmp_path / "config.yaml"
    save_yaml(original, path)
    assert main(["sft", f"--config={path}", "--print-config"]) == 0
    assert from_dict(SFTJobConfig, yaml.safe_load(capsys.readouterr().out)) == original


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--rollout.group_size", "1"], "expertrl train: error: rollout.group_size: must be >= 2"),
        (["train", "--rollout.group_sise", "4"], "did you mean 'rollout.group_size'?"),
        (["eval", "--model.dtype", "fp16"], "expertrl eval: error: model.dtype: expected one of 'float32', 'bfloat16'"),
        (
            ["sft", "--config", "does-not-exist.yaml"],
            "expertrl sft: error: config file 'does-not-exist.yaml' not found",
        ),
        (["sft", "--config"], "expertrl sft: error: --config: missing file name"),
        (["train", "--steps"], "expertrl train: error: --steps: missing value"),
    ],
)
def test_bad_config_exits_2_with_message(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([args[0], "--print-config", *args[1:]])  # --print-config: a config that passes would not train
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
