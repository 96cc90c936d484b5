"""Start-up plumbing shared by the commands: seeds, model + tokenizer from config, optimiser schedule, run dirs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expertrl.config import ModelConfig, OptimConfig, TaskConfig
from expertrl.models import build_tiny_moe, load_model
from expertrl.tasks import Task, load_task
from expertrl.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A seed for a (seed, step, rank, ...) tuple: distinct tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def model_and_tokenizer(cfg: ModelConfig, seed: int) -> tuple[nn.Module, object]:
    """The policy model and its tokenizer: a local checkpoint (``cfg.path``) or a tiny in-process model."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        import json

        from transformers import AutoTokenizer

        from expertrl.moe.adapters import FAMILIES

        config_file = Path(cfg.path) / "config.json"
        if config_file.is_file():  # refuse a dense or unknown family before loading any weights
            model_type = json.loads(config_file.read_text()).get("model_type")
            if model_type not in FAMILIES:
                raise ValueError(
                    f"model.path {cfg.path!r} is a {model_type!r} model, which has no MoE routers expertrl knows; "
                    f"supported MoE families: {sorted(FAMILIES)}. Use an MoE checkpoint of one of them."
                )
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
    tokenizer = build_char_tokenizer()
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
    return model, tokenizer


def optimizer_and_schedule(
    params, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` over ``total_steps`` optimiser steps."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

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


def task_from_config(cfg: TaskConfig) -> Task:
    """The task a ``TaskConfig`` describes (train and held-out splits, scorer)."""
    return load_task(
        cfg.name, train_size=cfg.train_size, eval_size=cfg.eval_size, seed=cfg.seed, verifier=cfg.verifier, **cfg.kwargs
    )
