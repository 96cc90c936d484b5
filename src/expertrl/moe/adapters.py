"""Where a model's routers are: ``find_routers`` returns one ``RouterSite`` per MoE router, in decoder order.

transformers 5.x gives every sparse block a separate router module (``mlp.gate``, e.g. ``Qwen3MoeTopKRouter``)
whose ``forward(hidden (N, H))`` returns ``(router_logits (N, E), top_k_weights (N, K), top_k_index (N, K))``; the
block passes weights and indices to fused 3-D experts. We find routers by *class name* from the family table
(``expertrl.families``; never by the substring "gate": ``shared_expert_gate`` and ``gate_up_proj`` are not
routers) and map them to absolute decoder-layer indices by module path (dense layers have no router, so fire order
is not a layer index).

LoRA-MoE adapters (``expertrl.moe.lora_moe``) make a dense model routable whatever its ``model_type``: each adapted
linear layer holds a ``LoraMoeRouter`` with the same contract as the native routers. ``find_routers`` returns those
(``families.LORA_MOE``) when a model has them, one site per adapted module, so several sites share a decoder layer.

Router precision (``model.router_dtype``, NeMo-RL's ``moe_router_dtype``): ``set_router_dtype`` marks every router of a
model once, at build time; each ``RouterSite`` carries it (``RouterSite.dtype``, float32 unless marked) and
``moe.hooks.route`` computes that router's logits, softmax, set log-probs and router log-probs in it, or in the
model's dtype if that is wider (a float64 model stays float64). Every ``route`` block on the model (rollout, training
forwards, SFT, evaluation, the frozen reference copy) therefore routes at one precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from expertrl.families import DENSE, FAMILIES, LORA_MOE, Family, family_of

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

ROUTER_DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""``model.router_dtype`` names: the precision routers compute in (at least)."""
_ROUTER_DTYPE_ATTR = "expertrl_router_dtype"


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
        dtype: the router's precision (``set_router_dtype``; float32 unless set): logits, softmax and log-probs are
            computed in ``promote_types(model dtype, dtype)``.
    """

    layer: int
    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    renormalize: bool
    family: Family
    dtype: torch.dtype = torch.float32

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight


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
        dtype=module.__dict__.get(_ROUTER_DTYPE_ATTR, torch.float32),
    )


def set_router_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Route every router of ``model`` in ``dtype`` (float32 or float64) or the model's dtype if wider, from now on.

    The mark is an attribute of each router module, so it survives wrapping (DDP, FSDP2, PEFT) and ``deepcopy`` (the
    frozen KL reference). A model with no router (dense, plain LoRA) has nothing to mark."""
    if dtype not in ROUTER_DTYPES.values():
        raise ValueError(f"router dtype {dtype} is not one of {list(ROUTER_DTYPES)}")
    classes = {f.router_class for f in FAMILIES.values() if f.router_class} | {LORA_MOE.router_class}
    for module in model.modules():
        if type(module).__name__ in classes:
            setattr(module, _ROUTER_DTYPE_ATTR, dtype)


def native_precision(model: nn.Module) -> bool:
    """Whether the model's own routers compute in the precision ``hooks.route`` routes in: every router's weight is
    at least as wide as its ``RouterSite.dtype`` (a float32 model; not a bf16 model whose routers are marked float32,
    whose native logits would pass through bf16 and choose other experts than every training forward)."""
    return all(
        torch.promote_types(site.dtype, site.weight.dtype) == site.weight.dtype
        for site in find_routers(model, allow_dense=True)
    )


def is_routerless(model: nn.Module) -> bool:
    """A model that declares it has no router: a dense base with a plain LoRA (``lora_moe.attach_lora``). Routing
    code treats it as zero MoE layers (top-K routing is then the identity); a bare dense model still raises."""
    settings = getattr(model, "expertrl_adapter", None) or {}
    return settings.get("kind") == "lora"


def find_routers(model: nn.Module, *, allow_dense: bool = False) -> list[RouterSite]:
    """Every MoE router of ``model`` in decoder order, as ``RouterSite``s.

    A model with LoRA-MoE adapters gets one site per adapted module (its ``LoraMoeRouter``), in module order within
    a layer (e.g. gate_proj, up_proj, down_proj), whatever its ``model_type``. Otherwise the native routers of the
    model's family.

    ``allow_dense`` returns no site for a bare dense decoder (``families.DENSE``) instead of raising: callers
    that only route with top-K (evaluation, SFT) then run it as it is.

    Raises:
        ValueError: unknown family, or a supported family with no router (a dense model).
    """
    if is_routerless(model):
        return []  # a frozen dense base with one plain LoRA (the single-LoRA baseline): nothing routes
    has_lora_moe = any(type(m).__name__ == LORA_MOE.router_class for m in model.modules())
    if allow_dense and not has_lora_moe and getattr(model.config, "model_type", None) in DENSE:
        return []  # top-K routing of a dense model is the identity (evaluation, supervised fine-tuning)
    lora = [_site(n, m, LORA_MOE) for n, m in model.named_modules() if type(m).__name__ == LORA_MOE.router_class]
    if lora:
        return sorted(lora, key=lambda s: s.layer)  # stable: module order within a layer is kept
    fam = family_of(model.config.model_type)
    if fam.kind != "moe":
        raise ValueError(
            f"{type(model).__name__} ({fam.model_type}) is a dense model: it has no MoE routers. Attach LoRA-MoE "
            "adapters (model.adapter.kind=lora_moe) or upcycle it into an MoE (model.upcycle.num_experts=8)."
        )
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
