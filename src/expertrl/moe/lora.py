"""The single-LoRA baseline (PEFT) of RO-GRPO, and saving or loading whichever adapter a model carries.

A plain LoRA has no router: the model declares itself routerless (``adapters.is_routerless``), so routing code sees
L = 0 (empty traces, no routing terms or metrics).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from expertrl.moe.lora_moe import (
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    _check_targets,
    adapter_settings,
    load_lora_moe_weights,
    save_adapter,
)


def attach_lora(
    model: nn.Module,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> nn.Module:
    """Single-LoRA baseline with PEFT on the decoder-MLP linears ``targets`` (RO-GRPO: r = 16 on gate/up/down).

    Returns the ``peft.PeftModel`` (the base is modified in place); only LoRA parameters are trainable, B = 0 so it
    starts at the base, no dropout, and ``expertrl_adapter`` is set on the returned model.
    """
    from peft import LoraConfig, get_peft_model  # imported at the boundary that needs it

    if adapter_settings(model) is not None:
        raise ValueError(
            f"model already has {adapter_settings(model)['kind']} adapters; attach adapters to a fresh base model"
        )
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    _check_targets(model, targets)
    # A regex (full match), not a list of names: only the decoder MLPs, and no PEFT name rewriting on MoE models.
    pattern = r".*\.layers\.\d+\.mlp\.(" + "|".join(re.escape(t) for t in targets) + ")"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=pattern, bias="none")
    with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global RNG
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.expertrl_adapter = dict(kind="lora", rank=rank, alpha=float(alpha), targets=list(targets), seed=seed)
    return peft_model


def save_lora(model: nn.Module, directory: str | Path) -> Path:
    """Write only the single-LoRA (PEFT) adapter, in PEFT's own format (``adapter_model.safetensors`` +
    ``adapter_config.json``), so ``peft.PeftModel.from_pretrained(base, directory)`` reads it too."""
    settings = adapter_settings(model)
    if settings is None or settings["kind"] != "lora":
        raise ValueError("model has no single-LoRA adapter to save; call attach_lora first")
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load the LoRA weights ``save_lora`` wrote into the PEFT ``model`` ``attach_lora`` built (same targets, rank)."""
    from peft import set_peft_model_state_dict

    weights_file = Path(directory) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} does not exist; is {str(directory)!r} a save_lora directory?")
    saved = load_file(weights_file)
    result = set_peft_model_state_dict(model, saved)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{weights_file}: keys {unexpected[:4]} do not fit this model's LoRA (different targets?)")
    return model


def save_adapter_weights(model: nn.Module, directory: str | Path) -> Path:
    """Save whichever adapter ``model`` carries (LoRA-MoE or single LoRA) into ``directory``."""
    kind = (adapter_settings(model) or {}).get("kind")
    if kind == "lora_moe":
        return save_adapter(model, directory)
    if kind == "lora":
        return save_lora(model, directory)
    raise ValueError("model carries no expertrl adapter")


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy saved adapter weights into ``model``, whose adapters are already attached with the same settings."""
    kind = (adapter_settings(model) or {}).get("kind")
    if kind == "lora":
        load_lora(model, directory)
    elif kind == "lora_moe":
        load_lora_moe_weights(model, directory)
    else:
        raise ValueError("model carries no expertrl adapter")
