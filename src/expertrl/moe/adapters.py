"""One table of model-family quirks: where each Hugging Face MoE family keeps its routers, and how they score.

transformers 5.x gives every sparse block a separate router module (``mlp.gate``, e.g. ``Qwen3MoeTopKRouter``)
whose ``forward(hidden (N, H))`` returns ``(router_logits (N, E), top_k_weights (N, K), top_k_index (N, K))``; the
block passes weights and indices to fused 3-D experts. We find routers by *class name* (never by the substring
"gate": ``shared_expert_gate`` and ``gate_up_proj`` are not routers) and map them to absolute decoder-layer indices
by module path (dense layers have no router, so fire order is not a layer index).

Adding a family = one ``Family`` row + a tiny-model test. An unknown family raises with the supported list.
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
            "Add a row to expertrl.moe.adapters.FAMILIES (router class, scoring, renormalisation) "
            "and a tiny-model test."
        )
    return FAMILIES[mt]


def find_routers(model: nn.Module) -> list[RouterSite]:
    """Every MoE router of ``model`` in decoder order, as ``RouterSite``s.

    Raises:
        ValueError: unknown family, or a supported family with no router (a dense model).
    """
    fam = family_of(model)
    sites = []
    for name, module in model.named_modules():
        if type(module).__name__ != fam.router_class:
            continue
        match = _LAYER_RE.search(name + ".")
        assert match, f"router {name!r} is not under a 'layers.<i>.' path"
        if fam.renormalize == "config":
            renorm = bool(module.norm_topk_prob)
        else:
            renorm = fam.renormalize == "always"
        sites.append(
            RouterSite(
                layer=int(match.group(1)),
                name=name,
                module=module,
                num_experts=int(module.num_experts),
                top_k=int(module.top_k),
                renormalize=renorm,
                family=fam,
            )
        )
    if not sites:
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) has no {fam.router_class} module: it has no MoE "
            "layers, so MoE routing methods cannot run on it. Use an MoE checkpoint or upcycle a dense one."
        )
    sites.sort(key=lambda s: s.layer)
    return sites
