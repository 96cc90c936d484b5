"""LoRA-MoE adapters on a frozen dense model (RO-GRPO, METHODS.md §2.2), and the single-LoRA baseline.

Each adapted linear layer (frozen ``W0``) gets E LoRA experts and its own router over them:

    p   = softmax(W_router x)                                    (E,) per token, float32
    y   = W0 x + (α / r) Σ_k w_k B_{e_k} A_{e_k} x               e_1..e_K = the router's choice, w = their weights

RO-GRPO's mixture is dense (METHODS.md §8 row 14): ``top_k = E`` and ``w = p``. ``top_k < E`` gives the top-K
alternative (weights renormalised iff ``norm_topk_prob``, True by default there, as in Qwen3-MoE checkpoints).

The router (``LoraMoeRouter``) keeps the native transformers 5.x router contract (``weight (E, H)``,
``num_experts``, ``top_k``, ``norm_topk_prob``, ``forward(hidden) -> (logits (N, E), weights (N, K),
experts (N, K))``), and ``LoraMoeLinear`` calls it as a module, so ``expertrl.moe.hooks.route`` patches it like any
native router: every routing policy, record/replay, Gate-GRPO and RSPO work unchanged, with one ``RouterSite`` per
adapted module (``expertrl.moe.adapters.find_routers``).

Initialisation (not reported by the paper; PEFT defaults): ``A`` kaiming-uniform(a=√5) per expert, i.e.
U(−1/√d_in, 1/√d_in) as PEFT's LoRA; ``B = 0`` so the adapted model starts exactly at the base; router weights
N(0, router_init_std) so routing starts near uniform; α = 2r. Everything is drawn from one generator seeded by
``seed``, in module order.

Adapter files: ``adapter_model.safetensors`` (only lora_A, lora_B and router weights) + ``adapter_config.json``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from expertrl.families import MOE
from expertrl.io import atomic_save_dir

ADAPTER_FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")
_MLP_LINEAR_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.([A-Za-z0-9_]+)$")
_BASE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")


class LoraMoeRouter(nn.Module):
    """Softmax router over E LoRA experts, with the native HF router contract (see module docstring)."""

    def __init__(self, weight: Tensor, *, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (E, d_in)
        self.num_experts = weight.shape[0]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = hidden_states.reshape(-1, self.weight.shape[1])  # (N, d_in)
        logits = F.linear(h, self.weight)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, K); K = E: the full softmax (dense mixture)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, E={self.num_experts}, K={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


class LoraMoeLinear(nn.Module):
    """A frozen ``nn.Linear`` plus E routed LoRA experts of rank r (see module docstring).

    Attributes:
        base: the original linear layer, frozen (state-dict keys ``<path>.base.weight``).
        lora_A: (E, r, d_in) down-projections.
        lora_B: (E, d_out, r) up-projections, zero at initialisation.
        router: ``LoraMoeRouter`` over the E experts, input = this module's input.
        scaling: α / r.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        top_k: int | None = None,
        norm_topk_prob: bool = False,
        router_init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        k = num_experts if top_k is None else top_k
        assert 1 <= k <= num_experts and rank >= 1, (k, num_experts, rank)
        self.base = base.requires_grad_(False)
        w = base.weight
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5): gain √(1/3) × √(3/d_in), as PEFT's lora_A
        lora_A = (torch.rand(num_experts, rank, d_in, generator=generator) * 2 - 1) * bound  # (E, r, d_in)
        router = torch.randn(num_experts, d_in, generator=generator) * router_init_std  # (E, d_in)
        self.lora_A = nn.Parameter(lora_A.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=w.device, dtype=w.dtype))
        self.router = LoraMoeRouter(router.to(device=w.device, dtype=w.dtype), top_k=k, norm_topk_prob=norm_topk_prob)
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        E, r, d_in = self.lora_A.shape
        d_out = self.lora_B.shape[1]
        h = x.reshape(-1, d_in)  # (N, d_in)
        _, weights, experts = self.router(h)  # (N, K) each; route() may have patched the router's forward
        mix = torch.zeros(h.shape[0], E, device=h.device, dtype=weights.dtype)  # (N, E)
        mix = mix.scatter_add(1, experts, weights)  # (N, E) w_e for chosen experts, 0 elsewhere
        z = F.linear(h, self.lora_A.reshape(E * r, d_in))  # (N, E*r) A_e x for every expert
        z = (z.view(-1, E, r) * mix[:, :, None].to(z.dtype)).reshape(-1, E * r)  # (N, E*r) weighted per expert
        delta = F.linear(z, self.lora_B.permute(1, 0, 2).reshape(d_out, E * r))  # (N, d_out) Σ_e w_e B_e A_e x
        return self.base(x) + self.scaling * delta.view(*x.shape[:-1], d_out)

    def extra_repr(self) -> str:
        E, r, _ = self.lora_A.shape
        return f"E={E}, r={r}, scaling={self.scaling}"


# --- attaching ---------------------------------------------------------------------------------------------------


def _mlp_linears(model: nn.Module) -> list[tuple[str, int, str, nn.Module]]:
    """(path, layer, leaf name, module) of every linear layer (plain or already adapted) directly in a decoder MLP."""
    found = []
    for path, module in model.named_modules():
        match = _MLP_LINEAR_RE.search(path)
        if match and isinstance(module, nn.Linear | LoraMoeLinear):
            found.append((path, int(match.group(1)), match.group(2), module))
    return found


def _check_targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, int, str, nn.Module]]:
    if isinstance(targets, str) or not targets:
        raise ValueError(
            f"targets must be a non-empty tuple of module names such as {DEFAULT_TARGETS}, got {targets!r}"
        )
    linears = _mlp_linears(model)
    names = sorted({leaf for _, _, leaf, _ in linears})
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"targets {missing} match no linear layer in the decoder MLPs of {type(model).__name__}; the MLP linear "
            f"names are {names}. Pass targets from that list."
        )
    return [entry for entry in linears if entry[2] in targets]


def attach_lora_moe(
    model: nn.Module,
    *,
    num_experts: int = 4,
    rank: int = 8,
    alpha: float = 16.0,
    top_k: int | None = None,
    norm_topk_prob: bool | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    router_init_std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """Freeze ``model`` and replace each targeted decoder-MLP linear by a ``LoraMoeLinear``, in place.

    Args:
        model: a dense causal LM (Qwen3, Qwen2, Llama, ...): MLP linears at ``*.layers.<i>.mlp.<name>``.
        num_experts: E LoRA experts per adapted module (RO-GRPO: 2, 4 or 8).
        rank: r of each expert (RO-GRPO: 8).
        alpha: LoRA α; the update is scaled by α / r.
        top_k: K experts per token; None = E, the dense soft mixture of RO-GRPO.
        norm_topk_prob: renormalise the K weights to sum 1; None = True for top-K, False for the dense mixture.
        targets: MLP linear names to adapt, one router each.
        router_init_std: router weights ~ N(0, std), so routing starts near uniform.
        seed: seeds every adapter initialisation (A and router), independent of the global RNG.
    Returns:
        ``model`` itself, with only adapter parameters trainable and ``model.expertrl_adapter`` set.
    """
    if model.config.model_type in MOE:
        raise ValueError(
            f"model is a {model.config.model_type!r} model with native MoE routers; LoRA-MoE adapters are for dense "
            "bases. Train its native routers instead (expertrl.moe.hooks.route), or pass a dense model."
        )
    if adapter_settings(model) is not None:
        raise ValueError(
            f"model already has {adapter_settings(model)['kind']} adapters; attach adapters to a fresh base model"
        )
    if num_experts < 2:
        raise ValueError(f"num_experts must be >= 2, got {num_experts}; use attach_lora for a single LoRA")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = num_experts if top_k is None else top_k
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k={k} must be in [1, num_experts={num_experts}]; lower top_k or raise num_experts")
    norm = (k < num_experts) if norm_topk_prob is None else norm_topk_prob
    sites = _check_targets(model, targets)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for path, _, leaf, linear in sites:
        parent = model.get_submodule(path.rpartition(".")[0])
        adapted = LoraMoeLinear(
            linear,
            num_experts=num_experts,
            rank=rank,
            alpha=alpha,
            top_k=k,
            norm_topk_prob=norm,
            router_init_std=router_init_std,
            generator=generator,
        )
        setattr(parent, leaf, adapted)
    model.expertrl_adapter = dict(
        kind="lora_moe",
        num_experts=num_experts,
        rank=rank,
        alpha=float(alpha),
        top_k=k,
        norm_topk_prob=norm,
        targets=list(targets),
        router_init_std=router_init_std,
        seed=seed,
    )
    return model


def adapter_settings(model: nn.Module) -> dict | None:
    """The adapter settings ``attach_lora_moe`` / ``attach_lora`` stored on ``model``, or None for a bare model."""
    return getattr(model, "expertrl_adapter", None)


def adapter_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Name -> tensor of every LoRA-MoE adapter parameter (lora_A, lora_B, router weight), in module order."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraMoeLinear):
            out[f"{path}.lora_A"] = module.lora_A
            out[f"{path}.lora_B"] = module.lora_B
            out[f"{path}.router.weight"] = module.router.weight
    return out


# --- adapter files -----------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write only the LoRA-MoE adapter (safetensors + JSON) to ``directory``, atomically."""
    settings = adapter_settings(model)
    if settings is None or settings["kind"] != "lora_moe":
        raise ValueError("model has no LoRA-MoE adapters to save; call attach_lora_moe first")
    config = dict(
        format_version=ADAPTER_FORMAT_VERSION,
        **settings,
        base={f: getattr(model.config, f) for f in _BASE_FIELDS},
    )
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

    return atomic_save_dir(directory, write)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the LoRA-MoE adapter saved in ``directory`` to a fresh base ``model`` (in place) and load it.

    Raises:
        FileNotFoundError: a missing adapter file.
        ValueError: a format version, base-model field, key or shape that does not match; names file and field.
    """
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist; is {str(directory)!r} a save_adapter directory?")
    config = json.loads(config_file.read_text())
    if config.get("format_version") != ADAPTER_FORMAT_VERSION or config.get("kind") != "lora_moe":
        raise ValueError(
            f"{config_file}: kind={config.get('kind')!r}, format_version={config.get('format_version')!r}; this "
            f"expertrl reads kind='lora_moe', format_version={ADAPTER_FORMAT_VERSION}"
        )
    for field in _BASE_FIELDS:
        saved, have = config["base"][field], getattr(model.config, field)
        if saved != have:
            raise ValueError(
                f"{config_file}: base.{field} is {saved!r} but the model's config.{field} is {have!r}; load this "
                "adapter onto the base model it was trained on"
            )
    attach_lora_moe(
        model,
        num_experts=config["num_experts"],
        rank=config["rank"],
        alpha=config["alpha"],
        top_k=config["top_k"],
        norm_topk_prob=config["norm_topk_prob"],
        targets=tuple(config["targets"]),
        router_init_std=config["router_init_std"],
        seed=config["seed"],
    )
    load_lora_moe_weights(model, directory)
    return model


# --- counting and the single-LoRA baseline -----------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_trainable(model: nn.Module) -> str:
    """One console line: trainable / total parameters and what the adapter is."""
    trainable, total = count_parameters(model)
    s = adapter_settings(model)
    if s is None:
        what = "no adapter"
    elif s["kind"] == "lora_moe":
        mode = "dense" if s["top_k"] == s["num_experts"] else f"K={s['top_k']}"
        what = f"LoRA-MoE E={s['num_experts']} r={s['rank']} {mode} on {', '.join(s['targets'])}"
    else:
        what = f"LoRA r={s['rank']} on {', '.join(s['targets'])}"
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.1f}%): {what}"


def _target_dims(model_or_dims: nn.Module | Sequence[tuple[int, int]], targets: Sequence[str]) -> list[tuple[int, int]]:
    if not isinstance(model_or_dims, nn.Module):
        return [(int(d_in), int(d_out)) for d_in, d_out in model_or_dims]
    dims = []
    for _, _, _, module in _check_targets(model_or_dims, targets):
        linear = module.base if isinstance(module, LoraMoeLinear) else module
        dims.append((linear.in_features, linear.out_features))
    return dims


def lora_moe_count(dims: Sequence[tuple[int, int]], *, num_experts: int, rank: int) -> int:
    """Trainable parameters of LoRA-MoE on linears of ``(d_in, d_out)``: E·r·(d_in + d_out) experts + E·d_in router."""
    return sum(num_experts * (rank * (d_in + d_out) + d_in) for d_in, d_out in dims)


def matched_lora_rank(
    model_or_dims: nn.Module | Sequence[tuple[int, int]],
    *,
    num_experts: int,
    rank: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> int:
    """The single-LoRA rank whose trainable count r'·Σ(d_in + d_out) is closest to the LoRA-MoE's (experts + routers).

    Args:
        model_or_dims: a dense model (bare or adapted), or the ``(d_in, d_out)`` of each adapted linear.
    E = 2, r = 8 on Qwen2.5-7B gives 17 (experts alone: 16, RO-GRPO's baseline; the routers add 0.77).
    """
    dims = _target_dims(model_or_dims, targets)
    per_rank = sum(d_in + d_out for d_in, d_out in dims)
    return max(1, round(lora_moe_count(dims, num_experts=num_experts, rank=rank) / per_rank))


def load_lora_moe_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy saved LoRA-MoE adapter weights into ``model``, whose adapters are already attached with the same
    settings."""
    weights_file = Path(directory) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} does not exist; is {str(directory)!r} an adapter directory?")
    saved = load_file(weights_file)
    params = adapter_parameters(model)
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{weights_file}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]} for this model")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise ValueError(f"{weights_file}: {name} has shape {tuple(saved[name].shape)}, expected {param.shape}")
            param.copy_(saved[name])
