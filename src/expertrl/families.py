"""Everything expertrl knows about a model family, in one table: ``FAMILIES``, one ``Family`` row per ``model_type``.

Every other family list derives from it (``MOE``, ``DENSE``, ``VISION``, ``TINY``, ``TINY_DENSE``,
``UPCYCLE_SOURCES``): the config's choices for ``model.family``, the routers ``moe.adapters.find_routers`` looks
for, the in-process builders of ``models`` and ``vlm``, what ``moe.upcycle`` turns a dense model into, and what a
``model.path`` checkpoint may be. Adding a family = one row here + its tests (the tiny-model and routing tests are
parametrised over these lists).

Pure data; imports nothing from expertrl (the bottom layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

PRESETS: dict[str, dict] = {
    # Unit tests: builds and runs generate in milliseconds.
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, moe_intermediate=32, experts=4, top_k=2),
    # The default RL job on CPU.
    "small": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, moe_intermediate=128, experts=8, top_k=2),
    # PLATFORM.md §1: 4.40M parameters at vocab 4096 (Qwen3-MoE).
    "5M": dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, moe_intermediate=256, experts=8, top_k=2),
    # PLATFORM.md §1: 48.0M parameters (16.15M active) at vocab 4096 (Qwen3-MoE).
    "50M": dict(hidden=384, layers=6, heads=6, kv_heads=2, head_dim=64, moe_intermediate=768, experts=8, top_k=2),
    # Real routers at reduced width and depth: E, K, renormalisation, shared expert and vocabulary of the checkpoint
    # each is named after (config.json values from the model cards; the expert width keeps the real ratio to hidden).
    # Head size 32 (vLLM's CPU attention has no 8 or 16). Each is one family's shape: model.family must be it (a
    # dense base for LoRA-MoE or upcycling takes only the width).
    "olmoe-shape": dict(hidden=64, layers=2, heads=2, kv_heads=2, head_dim=32, moe_intermediate=32, experts=64,
                        top_k=8, family="olmoe", norm_topk_prob=False),  # OLMoE-1B-7B: 1024/2048, top-8 of 64
    "qwen3moe-30b-shape": dict(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, moe_intermediate=24,
                               experts=128, top_k=8, family="qwen3_moe", norm_topk_prob=True,
                               vocab=151_936),  # Qwen3-30B-A3B: 768/2048, top-8 of 128, renormalised, vocab 151,936
    "qwen2moe-shape": dict(hidden=64, layers=2, heads=2, kv_heads=2, head_dim=32, moe_intermediate=44, experts=60,
                           top_k=4, family="qwen2_moe", norm_topk_prob=False,
                           shared_expert=176),  # Qwen1.5-MoE-A2.7B: 1408/2048, top-4 of 60, shared expert 4x wide
    "mixtral-shape": dict(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, moe_intermediate=224, experts=8,
                          top_k=2, family="mixtral"),  # Mixtral-8x7B: 14336/4096, top-2 of 8, always renormalised
}  # fmt: skip
"""Presets of the in-process models, in family-neutral names (``Family.tiny_fields`` translates them): sizes, and
real router shapes (``*-shape``). Read through ``preset_fields`` (which fills ``PRESET_DEFAULTS``)."""

PRESET_DEFAULTS = dict(family=None, norm_topk_prob=True, shared_expert=None, vocab=None)
"""Fields a size preset leaves out: any MoE family; renormalised top-K weights (as real Qwen3-MoE checkpoints); a
shared expert (Qwen2-MoE) as wide as a routed one; the tokenizer's vocabulary."""
SHAPE_PRESETS = tuple(name for name, p in PRESETS.items() if "family" in p)
"""The real-router-shape presets."""


def preset_fields(name: str) -> dict:
    """The fields of preset ``name``, ``PRESET_DEFAULTS`` filled in (``shared_expert`` None = ``moe_intermediate``)."""
    p = PRESET_DEFAULTS | PRESETS[name]
    return p | {"shared_expert": p["shared_expert"] or p["moe_intermediate"]}


@dataclass(frozen=True)
class UpcycleTarget:
    """How one dense ``model_type`` maps onto its MoE family (``moe.upcycle``).

    Attributes:
        model_type: the MoE ``model_type``.
        experts_field: the target config's name for E.
        width_field: the target config's name for an expert's intermediate size.
        fixed: target fields set by upcycling itself, whatever the source says.
        implied: source fields the target config lacks, with the only value the target can express.
        renormalize_always: the family always renormalises top-K weights (no ``norm_topk_prob`` field).
        vision_language: an image-text-to-text model: the decoder is ``model.language_model``, configured by
            ``text_config`` (mapped like a decoder's config); ``vision_config`` and the top-level fields are copied
            field by field and the vision tower weight by weight.
    """

    model_type: str
    experts_field: str
    width_field: str
    fixed: dict = field(default_factory=dict)
    implied: dict = field(default_factory=dict)
    renormalize_always: bool = False
    vision_language: bool = False


@dataclass(frozen=True)
class Family:
    """One ``model_type``: how it routes (MoE rows), how the in-process tiny model is configured, what it upcycles to.

    Attributes:
        model_type: transformers' ``config.model_type``.
        kind: ``moe`` (has routers) or ``dense``.
        vision: an image-text-to-text model (a processor, not a tokenizer; ``AutoModelForImageTextToText``).
        tiny: ``model.family`` can build it in-process (``models.build_tiny_moe`` / ``build_tiny_dense``, or
            ``vlm.build_tiny_vlm``).
        router_class: class name of the router module (MoE rows).
        scoring: ``softmax`` (probabilities over all E experts) or ``sigmoid`` (independent scores, DeepSeek-V3).
        renormalize: ``config`` = divide the top-K weights by their sum iff ``config.norm_topk_prob``; ``always``
            (Mixtral); ``never``.
        weights_float32: the router returns its top-K weights in float32 (Mixtral) rather than the logits dtype.
        tiny_fields: the family-neutral size preset (``models.PRESETS``) in this family's config field names.
        upcycle: what a dense row upcycles into (``moe.upcycle``).
    """

    model_type: str
    kind: Literal["moe", "dense"]
    vision: bool = False
    tiny: bool = True
    router_class: str | None = None
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: Literal["config", "always", "never"] = "config"
    weights_float32: bool = False
    tiny_fields: Callable[[dict], dict] | None = None
    upcycle: UpcycleTarget | None = None


def _qwen3_moe(p: dict) -> dict:
    # norm_topk_prob defaults to False in the config class, but real Qwen3-MoE checkpoints ship True.
    return dict(head_dim=p["head_dim"], moe_intermediate_size=p["moe_intermediate"],
                intermediate_size=p["moe_intermediate"], num_experts=p["experts"], num_key_value_heads=p["kv_heads"],
                norm_topk_prob=p["norm_topk_prob"])  # fmt: skip


def _qwen2_moe(p: dict) -> dict:
    # One always-on shared expert (gated by shared_expert_gate), as wide as a routed one unless the preset says.
    return dict(head_dim=p["head_dim"], moe_intermediate_size=p["moe_intermediate"],
                shared_expert_intermediate_size=p["shared_expert"], intermediate_size=p["moe_intermediate"],
                num_experts=p["experts"], num_key_value_heads=p["kv_heads"],
                norm_topk_prob=p["norm_topk_prob"])  # fmt: skip


def _olmoe(p: dict) -> dict:
    # OLMoE's experts are sized by intermediate_size (it has no moe_intermediate_size).
    return dict(head_dim=p["head_dim"], intermediate_size=p["moe_intermediate"], num_experts=p["experts"],
                num_key_value_heads=p["kv_heads"], norm_topk_prob=p["norm_topk_prob"])  # fmt: skip


def _mixtral(p: dict) -> dict:
    # Mixtral always renormalises the top-k weights; it has no norm_topk_prob flag.
    return dict(head_dim=p["head_dim"], intermediate_size=p["moe_intermediate"], num_local_experts=p["experts"],
                num_key_value_heads=p["kv_heads"])  # fmt: skip


def _deepseek_v3(p: dict) -> dict:
    # MLA: no low-rank query, latent KV of hidden/2. KV heads must equal query heads, otherwise MLA + SDPA fails as
    # soon as a padding mask is passed (PLATFORM.md §1). Every layer is MoE (first_k_dense_replace=0) and
    # group-limited routing is disabled (one group).
    hd = p["head_dim"]
    return dict(moe_intermediate_size=p["moe_intermediate"], intermediate_size=p["moe_intermediate"],
                n_routed_experts=p["experts"], n_shared_experts=1, num_key_value_heads=p["heads"], q_lora_rank=None,
                kv_lora_rank=p["hidden"] // 2, qk_rope_head_dim=hd // 2, qk_nope_head_dim=hd // 2, v_head_dim=hd,
                n_group=1, topk_group=1, first_k_dense_replace=0)  # fmt: skip


def _dense(p: dict) -> dict:
    # A dense FFN as wide as one expert of the preset.
    return dict(intermediate_size=p["moe_intermediate"], num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"])


_QWEN_SPARSE = dict(decoder_sparse_step=1, mlp_only_layers=[])  # every layer sparse (the Qwen MoE defaults, set anyway)

_ROWS = (
    Family("qwen3_moe", "moe", router_class="Qwen3MoeTopKRouter", tiny_fields=_qwen3_moe),
    # plus a shared expert, untouched by routing
    Family("qwen2_moe", "moe", router_class="Qwen2MoeTopKRouter", tiny_fields=_qwen2_moe),
    # OLMoE checkpoints ship norm_topk_prob=False
    Family("olmoe", "moe", router_class="OlmoeTopKRouter", tiny_fields=_olmoe),
    Family(
        "mixtral",
        "moe",
        router_class="MixtralTopKRouter",
        renormalize="always",
        weights_float32=True,
        tiny_fields=_mixtral,
    ),  # fmt: skip
    Family("deepseek_v3", "moe", router_class="DeepseekV3TopkRouter", scoring="sigmoid", tiny_fields=_deepseek_v3),
    # the tiny one is expertrl.vlm_models.build_tiny_vlm (one size)
    Family("qwen3_vl_moe", "moe", vision=True, router_class="Qwen3VLMoeTextTopKRouter", renormalize="always"),
    # Qwen3's layer_types / max_window_layers are handled by upcycle._sliding_fields.
    Family(
        "qwen3",
        "dense",
        tiny_fields=_dense,
        upcycle=UpcycleTarget("qwen3_moe", "num_experts", "moe_intermediate_size", fixed=_QWEN_SPARSE),
    ),  # fmt: skip
    # Qwen2 always has q/k/v biases; the shared expert is inert (moe.upcycle docstring).
    Family(
        "qwen2",
        "dense",
        tiny_fields=_dense,
        upcycle=UpcycleTarget(
            "qwen2_moe",
            "num_experts",
            "moe_intermediate_size",
            fixed=_QWEN_SPARSE | dict(qkv_bias=True, shared_expert_intermediate_size=1),
        ),
    ),  # fmt: skip
    # pretraining_tp is ignored by transformers 5 modelling code, so any value is fine (None = no constraint).
    Family(
        "llama",
        "dense",
        tiny_fields=_dense,
        upcycle=UpcycleTarget(
            "mixtral",
            "num_local_experts",
            "intermediate_size",
            implied=dict(attention_bias=False, mlp_bias=False, pretraining_tp=None),
            renormalize_always=True,
        ),
    ),  # fmt: skip
    Family(
        "mistral",
        "dense",
        tiny=False,
        upcycle=UpcycleTarget("mixtral", "num_local_experts", "intermediate_size", renormalize_always=True),
    ),
    # Qwen3-VL: only the text decoder becomes sparse; its router always renormalises the top-K weights.
    Family(
        "qwen3_vl",
        "dense",
        vision=True,
        tiny=False,
        upcycle=UpcycleTarget(
            "qwen3_vl_moe",
            "num_experts",
            "moe_intermediate_size",
            fixed=_QWEN_SPARSE,
            renormalize_always=True,
            vision_language=True,
        ),
    ),  # fmt: skip
)

FAMILIES: dict[str, Family] = {row.model_type: row for row in _ROWS}
"""Every model_type expertrl supports, by name."""

MOE = tuple(n for n, f in FAMILIES.items() if f.kind == "moe")
"""MoE families: their routers are found by ``router_class``."""
DENSE = tuple(n for n, f in FAMILIES.items() if f.kind == "dense" and not f.vision)
"""Dense text decoders: bases of LoRA-MoE adapters and of upcycling."""
VISION = tuple(n for n, f in FAMILIES.items() if f.vision)
"""Image-text-to-text families (a processor instead of a tokenizer)."""
VISION_MOE = tuple(n for n in VISION if FAMILIES[n].kind == "moe")
"""Vision-language MoE families."""
TINY = tuple(n for n, f in FAMILIES.items() if f.tiny)
"""``model.family`` choices: families the in-process builders make."""
TINY_MOE = tuple(n for n in TINY if FAMILIES[n].kind == "moe" and not FAMILIES[n].vision)
"""Text MoE families of ``models.build_tiny_moe``."""
TINY_DENSE = tuple(n for n in TINY if FAMILIES[n].kind == "dense")
"""Dense families of ``models.build_tiny_dense``."""
UPCYCLE_SOURCES: dict[str, UpcycleTarget] = {n: f.upcycle for n, f in FAMILIES.items() if f.upcycle is not None}
"""Dense model_type -> the MoE family upcycling makes of it."""

LORA_MOE = Family("lora_moe", "moe", tiny=False, router_class="LoraMoeRouter")
"""LoRA-MoE routers (``expertrl.moe.lora_moe``): softmax, renormalised iff the router's ``norm_topk_prob``. Not a
``model_type`` row: it applies to any dense base with adapters attached, so it is kept out of ``FAMILIES``."""


def family_of(model_type: str) -> Family:
    """The row of ``model_type``; an unknown one raises with the supported list and what to do."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported family; supported MoE families: {list(MOE)}, dense bases: "
            f"{list(DENSE)}. To add a family, add a row to expertrl.families.FAMILIES (router class, scoring, "
            "renormalisation) and its tiny-model tests."
        )
    return FAMILIES[model_type]
