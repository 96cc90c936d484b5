"""Every bad input gets one clear error that names the field, file or line and says how to fix it (table-driven)."""

import json
import sys

import pytest
from conftest import tiny_args
from standins import gsm8k_rows, write_dataset
from transformers import Qwen3Config, Qwen3ForCausalLM

from expertrl.checkpoint import save_model
from expertrl.cli import main
from expertrl.config import ConfigError, TrainConfig
from expertrl.configio import load_config
from expertrl.tasks import load_task
from expertrl.tokenizer import build_char_tokenizer
from expertrl.train import train

CONFIG_CASES = [
    # (overrides, fragments the message must contain)
    (["--rollout.group_sise", "8"], ["rollout.group_sise", "group_size"]),  # unknown key + suggestion
    (["--optim.lr", "fast"], ["optim.lr", "float"]),  # wrong type
    (["--routing.policy", "random"], ["routing.policy", "multinomial", "topk"]),  # bad choice lists the valid ones
    (["--rollout.group_size", "1"], ["rollout.group_size", ">= 2"]),  # out of range
    (["--model.num_experts", "4", "--model.top_k", "6"], ["model.top_k", "K=6 > E=4"]),  # K > E
    (["--loss.name", "grpo", "--routing.policy", "topk"], ["loss.gate_coef", "multinomial"]),  # nonsense combination
    (["--rspo.gamma_min", "1.5"], ["rspo.gamma_min", "[0, 1]"]),
    # adapters, upcycling, routing rewards, guidance
    (["--model.family", "qwen3"], ["model.family", "dense", "model.adapter.kind=lora_moe"]),  # RL needs a router
    (["--model.family", "qwen3", "--model.adapter.kind", "lora_moe", "--model.adapter.top_k", "9"],
     ["model.adapter.top_k", "[1, model.adapter.num_experts=4]"]),
    (["--model.family", "qwen3", "--model.upcycle.num_experts", "4", "--model.upcycle.top_k", "6"],
     ["model.upcycle.top_k", "[1, model.upcycle.num_experts=4]"]),
    (["--model.adapter.kind", "lora_moe"], ["model.family", "already MoE"]),  # adapters start from a dense model
    (["--model.family", "qwen3", "--model.adapter.kind", "lora_moe", "--model.upcycle.num_experts", "4"],
     ["model.upcycle.num_experts", "exclude each other"]),
    (["--routing_reward.kind", "greedy"], ["routing_reward.kind", "smooth", "relative"]),
    (["--routing_reward.window", "0"], ["routing_reward.window", ">= 1"]),
    (["--guidance.percent", "100"], ["guidance.percent", "[0, 100)"]),
    (["--guidance.enabled", "true", "--routing.policy", "topk", "--loss.gate_coef", "0", "--routing.replay", "none"],
     ["guidance.enabled", "routing.policy=multinomial"]),
    # rewards, answer formats, datasets, trackers (issue 14)
    (["--reward_funcs", "[task, fromat]"], ["reward_funcs[1]", "'fromat'", "did you mean 'format'"]),
    (["--reward_funcs", "[task, format]", "--reward_weights", "[1.0]"], ["reward_weights", "1 weights for 2"]),
    (["--reward_kwargs", "{format: {style: boxed}}"], ["reward_kwargs", "not in reward_funcs", "add it there"]),
    (["--report_to", "tensorbaord"], ["report_to[0]", "did you mean 'tensorboard'"]),
    (["--report_to", "[none, wandb]"], ["report_to", "'none'", "drop one"]),
    (["--task.answer_extractor", "gsm9k"], ["task.answer_extractor", "'gsm8k'"]),
    (["--task.split", "test"], ["task.split", "hf:<path>", "'addition'"]),
    (["--task.name", "hf:x.parquet", "--task.eval_split", "train"], ["task.eval_split", "must differ"]),
    # precision, checkpointing, router shapes (issue 14)
    (["--model.router_dtype", "bfloat16"], ["model.router_dtype", "'float32', 'float64'"]),
    (["--model.gradient_checkpointing", "sometimes"], ["model.gradient_checkpointing", "expected a bool"]),
    (["--model.preset", "qwen2moe-shape"], ["model.preset", "router shape of qwen2_moe", "model.family=qwen2_moe"]),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "fragments"), CONFIG_CASES)
def test_bad_config_values_are_named(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_size: [8\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainConfig, str(path), [])


@pytest.mark.parametrize(
    ("rows", "fragments"),
    [
        (['{"prompt": "1+1=", "answer": "2"}', "{not json"], [":2:", "not valid JSON"]),
        (['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "2+2="}'], [":2:", "answer"]),
    ],
)
def test_bad_dataset_rows_name_file_and_line(tmp_path, rows, fragments):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as err:
        load_task(f"jsonl:{path}", train_size=1, eval_size=1, seed=0)
    for fragment in [str(path.name), *fragments]:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_adapter_from_another_base_names_file_and_field(tmp_path):
    from expertrl.models import build_tiny_dense
    from expertrl.moe.lora_moe import attach_lora_moe, load_adapter, save_adapter

    save_adapter(attach_lora_moe(build_tiny_dense("qwen3", "tiny")), tmp_path / "adapter")
    with pytest.raises(ValueError) as err:
        load_adapter(build_tiny_dense("qwen3", "small"), tmp_path / "adapter")
    for fragment in ("adapter_config.json", "hidden_size", "32", "64"):
        assert fragment in str(err.value), (fragment, str(err.value))


def test_multimodal_task_on_a_text_model_is_refused(tmp_path):
    args = ["--task.name", "mm:colour", "--sft.steps", "0", "--steps", "1", "--output_dir", str(tmp_path / "r")]
    with pytest.raises(ConfigError, match="task.name"):
        train(load_config(TrainConfig, None, [*args, "--model.preset", "tiny", "--progress", "false"]))


def test_dense_model_for_an_moe_method_is_refused(tmp_path):
    tok = build_char_tokenizer()
    dense = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8,
        )
    )  # fmt: skip
    save_model(dense, tok, tmp_path / "dense")
    cfg = load_config(TrainConfig, None, ["--model.path", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "r")])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert "qwen3" in str(err.value) and "qwen3_moe" in str(err.value)  # names the family and the supported ones


def test_unknown_task_lists_the_forms():
    with pytest.raises(ValueError) as err:
        load_task("adition", train_size=1, eval_size=1, seed=0)
    assert "addition" in str(err.value) and "jsonl:" in str(err.value)


def test_resume_from_a_different_model_is_refused(tmp_path):
    tiny = ["--model.preset", "tiny", "--sft.steps", "0", "--steps", "1", "--rollout.prompts_per_step", "1"]
    tiny += ["--rollout.group_size", "2", "--rollout.max_new_tokens", "2", "--task.eval_size", "2", "--save_every", "1"]
    tiny += ["--progress", "false", "--eval_every", "0"]
    run = tmp_path / "run"
    train(load_config(TrainConfig, None, [*tiny, "--output_dir", str(run)]))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("preset: tiny", "preset: small"))
    with pytest.raises(ConfigError) as err:
        train(
            load_config(
                TrainConfig, None, [*tiny, "--model.preset", "small", "--output_dir", str(run), "--resume", str(run)]
            )
        )
    assert "model" in str(err.value)
    assert json.loads((run / "summary.json").read_text())  # the original run's outputs are untouched


def test_router_logprob_methods_refuse_sigmoid_routers(tmp_path):
    from expertrl.presets import preset_overrides

    args = [*preset_overrides("rspo"), "--model.family", "deepseek_v3", "--model.preset", "tiny"]
    with pytest.raises(ConfigError, match=r"sigmoid.*--routing.replay rollout --rspo.enabled false"):
        load_config(TrainConfig, None, [*args, "--output_dir", str(tmp_path / "r"), "--sft.steps", "0"])


def _gsm8k_parquet(d):
    write_dataset(gsm8k_rows(12), d / "gsm8k", "parquet")


def _bad_jsonl(d):
    (d / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer"\n')


STARTUP_CASES = [
    # (what, setup(dir), arguments ({d} = the directory), fragments of the one error line)
    ("missing dataset file", None, ["--task.name", "hf:{d}/gsm8k.parquet"],
     ["task.name", "gsm8k.parquet", "does not exist", "save_to_disk"]),
    ("unknown field", _gsm8k_parquet, ["--task.name", "hf:{d}/gsm8k.parquet"],
     ["task.prompt_field", "has no column 'prompt'", "['question', 'answer', 'level']", "Set task.prompt_field"]),
    ("split that does not exist", _gsm8k_parquet,
     ["--task.name", "hf:{d}/gsm8k.parquet", "--task.prompt_field", "question", "--task.eval_split", "test"],
     ["task.eval_split", "no split 'test'", "['train']", "leave task.eval_split unset"]),
    ("extractor that finds no answer", _gsm8k_parquet,
     ["--task.name", "hf:{d}/gsm8k.parquet", "--task.prompt_field", "question", "--task.answer_extractor", "boxed"],
     ["task.answer_extractor", "'boxed' finds no answer", "split 'train', row", "field 'answer'", "gsm8k reads"]),
    ("dataset smaller than the sizes", _gsm8k_parquet,
     ["--task.name", "hf:{d}/gsm8k.parquet", "--task.prompt_field", "question", "--task.train_size", "20"],
     ["task.train_size", "has 12 rows", "= 22 is more", "Lower it"]),
    ("bad JSONL line", _bad_jsonl, ["--task.name", "hf:{d}/bad.jsonl", "--task.prompt_field", "question"],
     ["bad.jsonl:2", "not valid JSON"]),
    ("reward option value", None, ["--reward_funcs", "[format]", "--reward_kwargs", "{{format: {{style: latex}}}}"],
     ["reward_kwargs.format", "'latex'", "think_answer"]),  # bound and tried at start-up (config imports no torch)
    ("tracker not installed", None, ["--report_to", "wandb"], ["report_to", "pip install 'expertrl[wandb]'"]),
    ("chat template the tokenizer lacks", None, ["--task.chat_template", "true"],
     ["task.chat_template", "no chat template", "task.chat_template=false"]),
]  # fmt: skip


@pytest.mark.parametrize(("what", "setup", "args", "fragments"), STARTUP_CASES, ids=[c[0] for c in STARTUP_CASES])
def test_bad_startup_input_exits_2_with_one_message(tmp_path, monkeypatch, capsys, what, setup, args, fragments):
    if setup is not None:
        setup(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb "not installed": its import fails, find_spec finds none
    sizes = {"sft.steps": 0, "steps": 1, "task.train_size": 6, "task.eval_size": 2}  # the data files have 12 rows
    argv = ["train", *tiny_args(**sizes), *[a.format(d=tmp_path) for a in args]]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--output_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("expertrl train: error:")]
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped at start-up, before any step


def test_checkpointing_a_model_that_cannot_is_refused(tmp_path, monkeypatch, capsys):
    from transformers import Qwen3MoeForCausalLM

    monkeypatch.setattr(Qwen3MoeForCausalLM, "supports_gradient_checkpointing", False)  # e.g. remote modelling code
    argv = ["train", *tiny_args(**{"model.gradient_checkpointing": True}), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("expertrl train: error:")]
    assert "model.gradient_checkpointing: Qwen3MoeForCausalLM does not support" in error
    assert "model.gradient_checkpointing=false" in error
