"""One table of model-family quirks: where each Hugging Face MoE family keeps its routers, and how they score.

transformers 5.x gives every sparse block a separate router module (``mlp.gate``, e.g. ``Qwen3MoeTopKRouter``)
whose ``forward(hidden (N, H))`` returns ``(router_logits (N, E), top_k_weights (N, K), top_k_index (N, K))``; the
block passes weights and indices to fused 3-D experts. We find routers by *class name* (never by the substring
"gate": ``shared_expert_gate`` and ``gate_up_proj`` are not routers) and map them to absolute decoder-layer indices
by module path (dense layers have no router, so fire order is not a layer index).

Adding a family = one ``Family`` row + a tiny-model test. An unknown family raises with the supported list.

LoRA-MoE adapters (``expertrl.moe.lora_moe``) make a dense model routable whatever its ``model_type``: each adapted
linear layer holds a ``LoraMoeRouter`` with the same contract as the native routers. ``find_routers`` returns those
(``LORA_MOE``) when a model has them, one site per adapted module, so several sites share a decoder layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Family:
    """How one ``model_type`` routes.

    Attributes:
        router_class: class name of the router module.
        scoring: ``softmax`` (probabilities over all E experts) or ``sigmoid`` (independent scores, DeepSeek-V3).
        renormalize: ``"config"`` = divide the top-K weights by their sum iff ``config.norm_topk_prob``;
            ``"always"`` (Mixtral); ``"never"``.
        weights_float32: the router returns its top-K weights in float32 (Mixtral) rather than the logits dtype.
    """

    router_class: str
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: Literal["config", "always", "never"] = "config"
    weights_float32: bool = False


FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("Qwen3MoeTopKRouter"),
    "qwen2_moe": Family("Qwen2MoeTopKRouter"),  # plus a shared expert, untouched by routing
    "olmoe": Family("OlmoeTopKRouter"),  # OLMoE checkpoints ship norm_topk_prob=False
    "mixtral": Family("MixtralTopKRouter", renormalize="always", weights_float32=True),
    "deepseek_v3": Family("DeepseekV3TopkRouter", scoring="sigmoid"),
    "qwen3_vl_moe": Family("Qwen3VLMoeTextTopKRouter", renormalize="always"),
}

LORA_MOE = Family("LoraMoeRouter")
"""LoRA-MoE routers (``expertrl.moe.lora_moe``): softmax, renormalised iff the router's ``norm_topk_prob``. Not a
``model_type`` row: it applies to any dense base with adapters attached, so it is kept out of ``FAMILIES``."""

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class RouterSite:
    """The uniform view of one MoE layer's router.

    Attributes:
        layer: absolute decoder-layer index.
        name: module path of the router, e.g. ``model.layers.3.mlp.gate``.
        module: the router module (holds ``weight`` of shape (E, H)).
        num_experts: E.
        top_k: K.
        renormalize: whether top-K weights are divided by their sum (the family's ``norm_topk_prob`` semantics).
        family: the family row.
    """

    layer: int
    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    renormalize: bool
    family: Family

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight


def family_of(model: nn.Module) -> Family:
    mt = model.config.model_type
    if mt not in FAMILIES:
        raise ValueError(
            f"model_type {mt!r} is not a supported MoE family; supported: {sorted(FAMILIES)}. "
            "If it is a dense model (no MoE layers), attach LoRA-MoE adapters "
            "(expertrl.moe.lora_moe.attach_lora_moe) or upcycle it into an MoE. If it is an MoE family, add a row "
            "to expertrl.moe.adapters.FAMILIES (router class, scoring, renormalisation) and a tiny-model test."
        )
    return FAMILIES[mt]


def _site(name: str, module: nn.Module, fam: Family) -> RouterSite:
    match = _LAYER_RE.search(name + ".")
    assert match, f"router {name!r} is not under a 'layers.<i>.' path"
    if fam.renormalize == "config":
        renorm = bool(module.norm_topk_prob)
    else:
        renorm = fam.renormalize == "always"
    return RouterSite(
        layer=int(match.group(1)),
        name=name,
        module=module,
        num_experts=int(module.num_experts),
        top_k=int(module.top_k),
        renormalize=renorm,
        family=fam,
    )


def is_routerless(model: nn.Module) -> bool:
    """A model that declares it has no router: a dense base with a plain LoRA (``lora_moe.attach_lora``). Routing
    code treats it as zero MoE layers (top-K routing is then the identity); a bare dense model still raises."""
    settings = getattr(model, "expertrl_adapter", None) or {}
    return settings.get("kind") == "lora"


DENSE_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")
"""Dense decoders expertrl adapts (LoRA-MoE), upcycles, or fine-tunes as the base of both."""


def find_routers(model: nn.Module, *, allow_dense: bool = False) -> list[RouterSite]:
    """Every MoE router of ``model`` in decoder order, as ``RouterSite``s.

    A model with LoRA-MoE adapters gets one site per adapted module (its ``LoraMoeRouter``), in module order within
    a layer (e.g. gate_proj, up_proj, down_proj), whatever its ``model_type``. Otherwise the native routers of the
    model's family.

    ``allow_dense`` returns no site for a bare dense decoder (``DENSE_MODEL_TYPES``) instead of raising: callers
    that only route with top-K (evaluation, SFT) then run it as it is.

    Raises:
        ValueError: unknown family, or a supported family with no router (a dense model).
    """
    if is_routerless(model):
        return []  # a frozen dense base with one plain LoRA (the single-LoRA baseline): nothing routes
    has_lora_moe = any(type(m).__name__ == LORA_MOE.router_class for m in model.modules())
    if allow_dense and not has_lora_moe and getattr(model.config, "model_type", None) in DENSE_MODEL_TYPES:
        return []  # top-K routing of a dense model is the identity (evaluation, supervised fine-tuning)
    lora = [_site(n, m, LORA_MOE) for n, m in model.named_modules() if type(m).__name__ == LORA_MOE.router_class]
    if lora:
        return sorted(lora, key=lambda s: s.layer)  # stable: module order within a layer is kept
    fam = family_of(model)
    sites = [_site(n, m, fam) for n, m in model.named_modules() if type(m).__name__ == fam.router_class]
    if not sites:
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) has no {fam.router_class} module: it has no MoE "
            "layers, so MoE routing methods cannot run on it. Use an MoE checkpoint, upcycle a dense one, or attach "
            "LoRA-MoE adapters (expertrl.moe.lora_moe.attach_lora_moe)."
        )
    sites.sort(key=lambda s: s.layer)
    return sites


def site_labels(sites: list[RouterSite]) -> list[str]:
    """Unique short labels of router sites for metric keys: ``layer3`` for a native router (one per layer),
    ``layer3.gate_proj`` for a LoRA-MoE router (several per layer: the adapted module's name)."""
    labels = []
    for s in sites:
        if s.family is LORA_MOE:
            within = s.name[_LAYER_RE.search(s.name + ".").end() :]  # e.g. "mlp.gate_proj.router"
            within = within.removesuffix(".router").removeprefix("mlp.")
            labels.append(f"layer{s.layer}.{within}")
        else:
            labels.append(f"layer{s.layer}")
    assert len(set(labels)) == len(labels), f"router sites give duplicate labels {labels}"
    return labels
