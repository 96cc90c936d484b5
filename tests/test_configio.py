"""configio: dict/YAML/CLI overrides -> validated config dataclasses, with errors that name the dotted key."""

from __future__ import annotations

import dataclasses

import pytest

from expertrl.config import ConfigError, EvalConfig, OptimConfig, SFTConfig, SFTJobConfig, TrainConfig
from expertrl.configio import (
    field_docs,
    format_help,
    from_dict,
    load_config,
    load_yaml,
    parse_overrides,
    save_yaml,
    to_dict,
)


def test_empty_dict_gives_defaults():
    assert from_dict(TrainConfig, {}) == TrainConfig()
    assert from_dict(EvalConfig, {}) == EvalConfig()


def test_field_docs_reads_attribute_docstrings():
    docs = field_docs(OptimConfig)
    assert docs["lr"] == "peak AdamW learning rate"
    assert set(docs) == {f.name for f in dataclasses.fields(OptimConfig)}


def test_unknown_yaml_key_names_dotted_key_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, str(path), [])
    msg = str(e.value)
    assert "'rollout.group_sise'" in msg
    assert "did you mean 'rollout.group_size'" in msg
    assert "prompts_per_step" in msg  # the valid keys of the section are listed


def test_unknown_override_key_at_top_level():
    with pytest.raises(ConfigError, match=r"unknown key 'stpes'; did you mean 'steps'\?"):
        load_config(TrainConfig, None, ["--stpes", "3"])


def test_wrong_type_message():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["--optim.lr", "abc"])
    assert str(e.value) == "optim.lr: expected a float, got 'abc' (str)"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--steps", "2.5"], "steps: expected an int, got 2.5 (float)"),
        (["--steps", "true"], "steps: expected an int, got True (bool)"),
        (["--progress", "1"], "progress: expected a bool, got 1 (int)"),
        (["--model.path", "7"], "model.path: expected a str or None, got 7 (int)"),
        (["--optim.betas", "[0.9]"], "optim.betas: expected a list [float, float], got [0.9] (list)"),
        (["--task.kwargs", "3"], "task.kwargs: expected a mapping, got 3 (int)"),
        (["--rollout", "3"], "rollout: expected a mapping with keys group_size,"),
    ],
)
def test_wrong_types_are_rejected(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, override)
    assert str(e.value).startswith(expected)


def test_coercions():
    cfg = load_config(
        TrainConfig,
        None,
        ["--optim.lr", "1", "--optim.weight_decay", "3e-4", "--optim.betas", "[0.8, 0.95]", "--model.path", "null"],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 3e-4  # YAML 1.1 reads 3e-4 as a string; floats accept it
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.model.path is None


def test_literal_error_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["--model.dtype", "bfloat17"])
    msg = str(e.value)
    assert msg.startswith("model.dtype: expected one of 'float32', 'bfloat16', got 'bfloat17' (str)")
    assert "did you mean 'bfloat16'" in msg


def test_post_init_error_propagates():
    with pytest.raises(ConfigError, match=r"^rollout\.group_size: must be >= 2 for group advantages, got 1$"):
        load_config(TrainConfig, None, ["--rollout.group_size", "1"])


def test_post_init_error_of_deeper_section_gets_full_key():
    with pytest.raises(ConfigError, match=r"^sft\.optim\.lr: must be a finite number > 0, got -1\.0$"):
        load_config(TrainConfig, None, ["--sft.optim.lr", "-1"])


def test_nested_default_factory_values_are_kept():
    cfg = load_config(TrainConfig, None, ["--sft.optim.lr", "0.01"])
    assert cfg.sft.optim == OptimConfig(lr=0.01, warmup_steps=10)  # warmup_steps of SFTConfig.optim's default, not 5
    assert cfg.optim == OptimConfig()
    assert from_dict(SFTConfig, {"optim": {"grad_clip": 0.5}}).optim == OptimConfig(
        lr=3e-3, warmup_steps=10, grad_clip=0.5
    )


def test_overrides_win_over_yaml_and_dict_fields_are_replaced(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 3\nloss:\n  kwargs: {eps_low: 0.2}\n  lb_coef: 0.5\nrollout:\n  group_size: 4\n")
    cfg = load_config(TrainConfig, str(path), ["--steps=7", "--loss.kwargs", '{"eps_high": 0.28}'])
    assert cfg.steps == 7
    assert cfg.loss.kwargs == {"eps_high": 0.28}
    assert cfg.loss.lb_coef == 0.5
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.prompts_per_step == TrainConfig().rollout.prompts_per_step


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        SFTJobConfig, None, ["--sft.optim.betas", "[0.5, 0.6]", "--task.kwargs", "{max_value: 30}", "--seed", "3"]
    )
    assert to_dict(cfg)["sft"]["optim"]["betas"] == [0.5, 0.6]  # plain lists, not tuples
    path = tmp_path / "config.yaml"
    save_yaml(cfg, path)
    assert load_config(SFTJobConfig, str(path), []) == cfg
    full = TrainConfig()
    save_yaml(full, path)
    assert load_config(TrainConfig, str(path), []) == full


def test_parse_overrides():
    assert parse_overrides(
        ["--rollout.group_size", "8", "--rollout.do_sample=true", "--model.path", "null", "--optim.lr", "-1e-3"]
    ) == {"rollout": {"group_size": 8, "do_sample": True}, "model": {"path": None}, "optim": {"lr": "-1e-3"}}
    assert parse_overrides(["--loss.kwargs", '{"eps_high": 0.28}']) == {"loss": {"kwargs": {"eps_high": 0.28}}}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rollout.group_size"], "--rollout.group_size: missing value"),
        (["--steps", "--seed", "1"], "--steps: missing value"),
        (["steps", "3"], "unexpected argument 'steps'"),
        (["--a..b", "3"], "--a..b: malformed key"),
        (["--loss", "1", "--loss.name", "x"], "--loss.name: loss was already set to a value"),
    ],
)
def test_parse_overrides_errors(args, expected):
    with pytest.raises(ConfigError) as e:
        parse_overrides(args)
    assert str(e.value).startswith(expected)


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nrollout:\n  group_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_format_help_lists_every_dotted_field():
    text = format_help(TrainConfig)
    assert "--rollout.group_size INT  (default: 8)" in text
    assert "G completions per prompt" in text
    assert "--sft.optim.lr FLOAT  (default: 0.003)" in text  # the field's default, not the class's
    assert "--model.dtype {float32,bfloat16}  (default: float32)" in text
    assert "--model.path STR|null  (default: null)" in text
    assert "--optim.betas [FLOAT, FLOAT]  (default: [0.9, 0.99])" in text
    for section in ("model", "task", "routing", "rollout", "loss", "optim", "sft"):
        assert f"\n{section}: " in text


@dataclasses.dataclass
class _Required:
    name: str
    """a field without a default"""
    n: int = 1
    """a field with one"""


def test_generic_dataclass_with_required_field():
    assert from_dict(_Required, {"name": "x"}) == _Required("x")
    assert field_docs(_Required) == {"name": "a field without a default", "n": "a field with one"}
    with pytest.raises(ConfigError, match="missing required key"):
        from_dict(_Required, {"n": 2})
