"""Tiny Mixture-of-Experts causal LMs built in-process from a config (no Hub), and loading local checkpoints.

A size preset is written once in family-neutral names (``PRESETS``); each family's row in ``expertrl.families``
translates it into that family's config field names (``Family.tiny_fields``). Token-id conventions come from
``expertrl.tokenizer`` (pad 0, bos 1, eos 2). Embeddings are untied, the context is 512 positions, and every
layer is an MoE layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)

from expertrl.families import DENSE, FAMILIES, PRESETS, TINY_DENSE, TINY_MOE, preset_fields
from expertrl.io import weights_problem
from expertrl.moe import experts  # registers experts_implementation="expertrl_grouped_mm"
from expertrl.ops import check_finite
from expertrl.tokenizer import BOS_ID, CHAR_VOCAB_SIZE, EOS_ID, PAD_ID

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``model.dtype`` names."""


def _common_fields(p: dict, vocab_size: int) -> dict:
    """Config fields every tiny model shares, in the names all supported families use."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        use_cache=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def seeded_from_config(build, *, seed: int) -> PreTrainedModel:
    """``build()`` (a model built from a config, randomly initialised) run under ``seed`` with the global RNG left as
    it was; routers checked to be non-zero, and the character tokenizer's special ids in its generation config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):  # from_config draws routers from normal(0, initializer_range)
            assert param.abs().sum() > 0, f"router {name} initialised to zeros"
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def build_moe_config(
    family: str,
    preset: str,
    vocab_size: int | None = None,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    experts_implementation: str = experts.NAME,
    **overrides,
) -> PretrainedConfig:
    """A transformers config for ``family`` at size ``preset``.

    Args:
        family: one of ``families.TINY_MOE`` (the transformers ``model_type``).
        preset: a key of ``PRESETS``: a size, or a real router's shape (``families.SHAPE_PRESETS``, of one family).
        vocab_size: V; None = the preset's vocabulary, else the character tokenizer's. A shape preset with a
            vocabulary (``qwen3moe-30b-shape``: 151,936) takes no other.
        num_experts: E, replacing the preset's.
        top_k: K, replacing the preset's.
        experts_implementation: ``"expertrl_grouped_mm"`` (``expertrl.moe.experts``: transformers' ``grouped_mm`` with
            cheaper row moves, the fastest on CPU), ``"grouped_mm"``, ``"eager"`` or ``"batched_mm"`` (transformers').
        **overrides: config fields in the family's own names, applied last. A name the family's config does not
            have raises, because transformers configs silently store unknown keyword arguments.
    """
    if family not in TINY_MOE:
        raise ValueError(f"unknown MoE family {family!r}; choose from {list(TINY_MOE)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = preset_fields(preset)
    if p["family"] not in (None, family):
        raise ValueError(f"preset {preset!r} is the router shape of {p['family']}, not of {family}")
    if p["vocab"] is not None and vocab_size not in (None, p["vocab"]):
        raise ValueError(f"preset {preset!r} has a vocabulary of {p['vocab']}, not {vocab_size}")
    vocab_size = vocab_size or p["vocab"] or CHAR_VOCAB_SIZE
    p["experts"] = p["experts"] if num_experts is None else num_experts
    p["top_k"] = p["top_k"] if top_k is None else top_k
    assert p["hidden"] == p["heads"] * p["head_dim"], p
    assert 1 <= p["top_k"] <= p["experts"], p
    fields = _common_fields(p, vocab_size) | dict(num_experts_per_tok=p["top_k"]) | FAMILIES[family].tiny_fields(p)
    known = AutoConfig.for_model(family)
    unknown = sorted(k for k in overrides if k not in fields and not hasattr(known, k))
    if unknown:
        raise ValueError(f"{family} config has no field(s) {unknown}")
    fields |= overrides
    return AutoConfig.for_model(family, experts_implementation=experts_implementation, **fields)


def build_tiny_moe(
    family: str = "qwen3_moe",
    preset: str = "tiny",
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str = experts.NAME,
    num_experts: int | None = None,
    top_k: int | None = None,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised MoE causal LM (arguments as ``build_moe_config``); the same arguments give bit-identical
    weights.

    ``from_config`` runs each family's ``_init_weights``, which draws router weights from
    normal(0, initializer_range); the router constructors alone would leave them at zero (uniform routing, and
    ties broken by expert index), so this is asserted.
    """
    config = build_moe_config(
        family,
        preset,
        vocab_size,
        num_experts=num_experts,
        top_k=top_k,
        experts_implementation=experts_implementation,
        **overrides,
    )
    return seeded_from_config(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype), seed=seed)


def build_tiny_dense(
    family: str = "qwen3",
    preset: str = "tiny",
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised dense causal LM of the same size preset (FFN width = the preset's expert width).

    Args:
        family: one of ``families.TINY_DENSE`` (the transformers ``model_type``).
        preset: a key of ``PRESETS`` (the MoE fields are ignored: a shape preset gives a base of its width).
        vocab_size: V; None = the preset's vocabulary, else the character tokenizer's.
        **overrides: config fields in the family's own names, applied last.
    """
    if family not in TINY_DENSE:
        raise ValueError(f"unknown dense family {family!r}; choose from {list(TINY_DENSE)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = preset_fields(preset)
    fields = _common_fields(p, vocab_size or p["vocab"] or CHAR_VOCAB_SIZE) | FAMILIES[family].tiny_fields(p)
    known = AutoConfig.for_model(family)
    unknown = sorted(k for k in overrides if k not in fields and not hasattr(known, k))
    if unknown:
        raise ValueError(f"{family} config has no field(s) {unknown}")
    config = AutoConfig.for_model(family, **(fields | overrides))
    return seeded_from_config(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype), seed=seed)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str = experts.NAME,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local ``save_pretrained`` directory; never touches the network."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist (only local directories are loaded)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it a save_pretrained directory?")
    problem = weights_problem(path) if any(path.glob("*.safetensors")) else None  # .bin checkpoints load as they are
    if problem is not None:
        raise ValueError(f"model.path: {problem}; re-save the model, or point model.path at an intact copy")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    kernel = {} if model_type in DENSE else {"experts_implementation": experts_implementation}  # MoE only
    if model_type == "qwen3_vl_moe":  # a vision-language model: not an AutoModelForCausalLM mapping
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True, **kernel
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True, **kernel
    )
    check_finite(model, f"model.path {str(path)!r}")  # NaN/Inf weights are refused with the tensor's name
    return model
