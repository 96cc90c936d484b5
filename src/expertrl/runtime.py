"""Start-up plumbing shared by the commands: seeds, model + tokenizer from config, optimiser schedule, run dirs."""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer

from expertrl.config import ConfigError, ModelConfig, OptimConfig, TaskConfig
from expertrl.decoding import is_processor
from expertrl.families import DENSE, MOE, TINY_DENSE, VISION, VISION_MOE, preset_fields
from expertrl.models import DTYPES, build_tiny_dense, build_tiny_moe, load_model
from expertrl.moe.adapters import ROUTER_DTYPES, set_router_dtype
from expertrl.moe.lora import attach_lora, load_lora
from expertrl.moe.lora_moe import attach_lora_moe, load_adapter
from expertrl.moe.upcycle import upcycle
from expertrl.prompts import fit_prompts, render_items
from expertrl.tasks import Task, load_task
from expertrl.tokenizer import CHAR_VOCAB_SIZE, build_char_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A seed for a (seed, step, rank, ...) tuple: distinct tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def cpu_has_onednn_bf16() -> bool:
    """Whether torch multiplies bfloat16 matrices on this CPU with oneDNN's kernels (x86 with AVX512, Arm with BF16:
    torch's own test); without them it falls back to a scalar loop, hundreds of times slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


BF16_ON_SLOW_CPU = (
    "model.dtype: bfloat16 on this CPU (no AVX512 or Arm BF16, so no oneDNN bf16 kernels) runs every bf16 matmul in "
    "a fallback loop, hundreds of times slower than float32 (benchmarks/README.md, decode_probe.py matmul); use "
    "model.dtype=float32 here"
)
"""The warning a bfloat16 model gets where it would run on such a CPU (``warn_if_slow_bf16``)."""


def compute_device() -> torch.device:
    """Where a single-process command (``expertrl sft``, ``eval``, ``report``'s evaluation pass) runs its model: the
    current CUDA device where torch sees one, else the CPU (``CUDA_VISIBLE_DEVICES=`` keeps a command on the CPU;
    other accelerators, MPS or XPU, are not used). ``expertrl train`` takes accelerate's device instead, which is
    the same on a CUDA machine in a single process."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def place_model(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``model`` moved to ``device`` (default ``compute_device()``), with ``warn_if_slow_bf16``'s warning where it
    applies there; returned for chaining."""
    model.to(compute_device() if device is None else device)
    warn_if_slow_bf16(model)
    return model


def warn_if_slow_bf16(model: nn.Module) -> None:
    """Warn in one line (``BF16_ON_SLOW_CPU``) if ``model`` holds bfloat16 weights on a CPU without fast bf16
    matmuls: the run is correct, only slow, so it goes on. Call it where the model has reached its device."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu" and not cpu_has_onednn_bf16():
        if any(p.dtype == torch.bfloat16 for p in model.parameters()):
            warnings.warn(BF16_ON_SLOW_CPU, stacklevel=2)


def model_and_tokenizer(cfg: ModelConfig, seed: int, *, allow_dense: bool = False) -> tuple[nn.Module, object]:
    """The policy model and its tokenizer: a local checkpoint (``cfg.path``) or a tiny in-process model, then
    upcycled (``cfg.upcycle``) or given adapters (``cfg.adapter``) if asked. The same settings and seed build the
    same network with the same initial weights (resume and evaluation of adapter runs rely on it).

    A vision-language MoE model (``model.family=qwen3_vl_moe``, or ``model.path`` to a Qwen3-VL-MoE checkpoint such as
    ``expertrl.vlm_models.save_vlm`` writes) comes with its processor in place of the tokenizer
    (``rollout.encode_prompts``).
    """
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        model, tokenizer = _load_local(cfg, dtype, allow_dense)
    elif cfg.family in VISION_MOE:
        model, tokenizer = _tiny_vlm(cfg, seed, dtype)
    else:
        tokenizer = build_char_tokenizer(preset_fields(cfg.preset)["vocab"] or CHAR_VOCAB_SIZE)  # 151,936 rows: unused
        if cfg.family in TINY_DENSE:
            model = build_tiny_dense(cfg.family, cfg.preset, len(tokenizer), seed=seed, dtype=dtype)
        else:
            model = build_tiny_moe(
                cfg.family,
                cfg.preset,
                len(tokenizer),
                seed=seed,
                dtype=dtype,
                experts_implementation=cfg.experts_implementation,
                num_experts=cfg.num_experts,
                top_k=cfg.top_k,
            )
    model = with_adapters(model, cfg, seed)
    set_router_dtype(model, ROUTER_DTYPES[cfg.router_dtype])
    if cfg.gradient_checkpointing:  # non-reentrant (route() checkpoints the layers itself: expertrl.moe.recompute)
        if not model.supports_gradient_checkpointing:
            raise ConfigError(
                f"model.gradient_checkpointing: {type(model).__name__} does not support activation checkpointing "
                "(its modelling code has no GradientCheckpointingLayer); set model.gradient_checkpointing=false"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def with_adapters(model: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
    """``model`` upcycled or with LoRA-MoE / LoRA adapters attached, per ``cfg`` (unchanged if neither is asked)."""
    up, ad = cfg.upcycle, cfg.adapter  # the config sections' field names are the functions' keyword arguments
    if up.num_experts:
        model = upcycle(model, **asdict(up), seed=seed, experts_implementation=cfg.experts_implementation)
    settings = {k: v for k, v in asdict(ad).items() if k not in ("kind", "path")} | {"targets": tuple(ad.targets)}
    if ad.kind == "lora_moe":
        model = load_adapter(model, ad.path) if ad.path is not None else attach_lora_moe(model, **settings, seed=seed)
    elif ad.kind == "lora":
        model = attach_lora(model, rank=ad.rank, alpha=ad.alpha, targets=settings["targets"], seed=seed)
        if ad.path is not None:
            load_lora(model, ad.path)
    return model


def _tiny_vlm(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The in-process Qwen3-VL-MoE of ``expertrl.vlm`` (one size, E=4, K=2; ``model.preset`` does not apply)."""
    from expertrl.vlm_models import build_tiny_vlm  # heavy: transformers' Qwen3-VL processing code (~3 s)

    if cfg.num_experts is not None or cfg.top_k is not None:
        raise ValueError(
            f"model.num_experts / model.top_k: the in-process {cfg.family} model has fixed E=4, K=2; unset them, or "
            "point model.path at a checkpoint with the experts you want"
        )
    return build_tiny_vlm(seed, dtype=dtype)


def is_vlm(model: nn.Module) -> bool:
    """True for a vision-language MoE model (``families.VISION_MOE``)."""
    return model.config.model_type in VISION_MOE


def _load_local(cfg: ModelConfig, dtype: torch.dtype, allow_dense: bool) -> tuple[nn.Module, object]:
    config_file = Path(cfg.path) / "config.json"
    if config_file.is_file():  # refuse a dense or unknown family before loading any weights
        model_type = json.loads(config_file.read_text()).get("model_type")
        dense_ok = allow_dense or cfg.adapter.kind != "none" or cfg.upcycle.num_experts > 0
        dense_vlm = model_type in VISION and model_type not in MOE and (allow_dense or cfg.upcycle.num_experts > 0)
        if model_type not in MOE and not dense_vlm and not (dense_ok and model_type in DENSE):
            hint = f"supported MoE families: {list(MOE)}"
            if model_type in DENSE:
                hint += (
                    "; a dense model can be trained with LoRA-MoE adapters (model.adapter.kind=lora_moe) or "
                    "upcycled first (model.upcycle.num_experts=8, or `expertrl upcycle SRC DST`)"
                )
            raise ValueError(
                f"model.path {cfg.path!r} is a {model_type!r} model, which has no MoE routers expertrl knows; {hint}."
            )
        if model_type in MOE and (cfg.adapter.kind != "none" or cfg.upcycle.num_experts):
            raise ValueError(
                f"model.path {cfg.path!r} is already an MoE model ({model_type}); adapters and upcycling start from a "
                "dense one: set model.adapter.kind=none and model.upcycle.num_experts=0"
            )
        if model_type in VISION:  # not AutoModelForCausalLM models; they need their processor
            from expertrl.vlm_models import load_vlm  # heavy: transformers' Qwen3-VL processing code

            return load_vlm(cfg.path, dtype=dtype, experts_implementation=cfg.experts_implementation)
    model = load_model(
        cfg.path,
        dtype=dtype,
        experts_implementation=cfg.experts_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    has_tok = (Path(cfg.path) / "tokenizer.json").is_file() or (Path(cfg.path) / "tokenizer_config.json").is_file()
    tokenizer = (
        AutoTokenizer.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        if has_tok
        else build_char_tokenizer()
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def optimizer_and_schedule(
    params, cfg: OptimConfig, total_steps: int, *, fused: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` over ``total_steps`` optimiser steps.

    ``fused``: torch's fused kernel (one pass per parameter; on CPU ~3.4x faster than the per-tensor loop at 60M
    parameters, the same update up to float rounding: ``tests/test_experts.py``). FSDP2-sharded parameters keep the
    loop (``fused=False``): fused steps on the shards drift from a one-process run by ~1e-5 within two steps.
    """
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (before clipping); clips only if ``max_norm > 0``."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def task_from_config(
    cfg: TaskConfig,
    tokenizer=None,
    *,
    model=None,
    new_tokens: int = 0,
    new_tokens_field: str = "rollout.max_new_tokens",
    answers: bool = False,
) -> Task:
    """The task a ``TaskConfig`` describes (train and held-out splits, scorer), its prompts rendered for ``tokenizer``
    (``prompts.render_items``: the chat template and system prompt) when one is given; a VLM's processor renders its
    own prompts, so a processor leaves them as they are.

    With ``model``, every prompt must fit its context with ``new_tokens`` generated after it (and, with ``answers``,
    the item's answer: supervised training): longer prompts are cut to ``task.max_prompt_tokens`` if set (counted in
    ``Task.truncated`` and printed), else refused naming the row (``prompts.fit_prompts``)."""
    task = load_task(
        cfg.name, train_size=cfg.train_size, eval_size=cfg.eval_size, seed=cfg.seed, verifier=cfg.verifier,
        completion_extractor=cfg.completion_extractor, files=cfg.file_options, **cfg.kwargs,
    )  # fmt: skip
    if tokenizer is None or is_processor(tokenizer) or task.multimodal:
        return task
    render = dict(chat_template=cfg.chat_template, system_prompt=cfg.system_prompt,
                  template_kwargs=cfg.chat_template_kwargs)  # fmt: skip
    try:
        task = replace(task, train=render_items(task.train, tokenizer, **render),
                       eval=render_items(task.eval, tokenizer, **render))  # fmt: skip
        if model is None:
            return task
        limits = dict(max_positions=context_length(model), new_tokens=new_tokens, new_tokens_field=new_tokens_field,
                      max_prompt_tokens=cfg.max_prompt_tokens, answers=answers)  # fmt: skip
        train, evald = fit_prompts(task.train, tokenizer, **limits), fit_prompts(task.eval, tokenizer, **limits)
    except ValueError as e:  # a tokenizer without a template asked for one, a prompt too long: a bad setting or row
        raise ConfigError(str(e)) from None
    if train.truncated or evald.truncated:
        print(
            f"task.max_prompt_tokens: cut {train.truncated} of {len(task.train)} train and {evald.truncated} of "
            f"{len(task.eval)} held-out prompts to {cfg.max_prompt_tokens} tokens (their end kept)"
        )
    return replace(task, train=train.items, eval=evald.items, truncated=train.truncated + evald.truncated,
                   longest_prompt=max(train.longest, evald.longest))  # fmt: skip


def check_answer_lengths(task: Task, tokenizer, model) -> None:
    """Every training prompt + its answer fits the model's context (the supervised warm-up trains on both)."""
    if tokenizer is None or is_processor(tokenizer) or task.multimodal:
        return
    try:
        fit_prompts(task.train, tokenizer, max_positions=context_length(model), new_tokens=0, answers=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def context_length(model) -> int | None:
    """The model's context (``max_position_embeddings`` of its text config), or None when it declares none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)
