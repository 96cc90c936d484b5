"""Auxiliary router losses: Switch load balancing on the experts actually used, and the ST-MoE z-loss.

METHODS.md §6.1-6.2 and §8 rows 13 and 20. Pure functions of tensors; the caller multiplies by its coefficient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.ops import masked_mean


def switch_load_balancing(probs: Tensor, experts: Tensor, mask: Tensor, *, soft_dispatch: bool = False) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. arXiv:2101.03961) on the experts actually chosen.

    Per layer l (METHODS.md §6.1):

        f_e = (slots routed to e) / (routed slots)      fraction dispatched, over the valid tokens' K slots (no grad)
        P_e = mean over valid tokens of p_e              mean router probability (gradient)
        loss_l = E · Σ_e f_e P_e

    and the mean over layers is returned. ``f`` counts the experts the rollout *used* (sampled or replayed routes),
    not a recomputed top-K of ``probs`` (MoE-GRPO samples its routes, §6.1).

    Scale (METHODS.md §8 row 20): uniform routing gives exactly 1, and a router that puts probability 1 on one
    expert gives E/K (that expert fills 1/K of the slots). HF's top-K ``load_balancing_loss_func`` sums the K-hot
    selection instead of averaging it, so its uniform value is K; we divide by K to keep Switch's scale.

    Slots whose expert id is -1 (``types.UNROUTED``) are ignored; a token with no routed slot drops out of P too.

    Dense mixtures (K = E, e.g. RO-GRPO's LoRA-MoE): every token uses every expert, so the hard ``f`` is uniform and
    the loss a constant with no balancing gradient. ``soft_dispatch=True`` (the caller knows its routers are dense)
    makes ``f`` the detached mean probability, ``loss = E · Σ_e sg(P_e) P_e``: still 1 at uniform routing, E at
    collapse, and its gradient pushes towards balance.

    Args:
        probs: (L, N, E) router probabilities (the full softmax the routes were drawn from), or (N, E) for one layer.
        experts: (L, N, K) long expert ids per slot, -1 = unrouted; (N, K) when ``probs`` is (N, E).
        mask: (N,) 1 = token counts.
    Returns:
        0-d tensor, mean over layers.
    """
    if probs.dim() == 2:
        probs, experts = probs[None], experts[None]  # (1, N, E), (1, N, K)
    num_layers, n, num_experts = probs.shape
    assert experts.dim() == 3 and experts.shape[:2] == (num_layers, n), (probs.shape, experts.shape)
    assert mask.shape == (n,), (mask.shape, n)
    routed = (experts >= 0) & (mask[None, :, None] > 0)  # (L, N, K) slots that count
    with torch.no_grad():
        counts = torch.zeros(num_layers, num_experts, device=probs.device, dtype=probs.dtype)  # (L, E)
        counts.scatter_add_(1, experts.clamp(min=0).flatten(1), routed.flatten(1).to(probs.dtype))
        f = counts / counts.sum(-1, keepdim=True).clamp(min=1)  # (L, E)
    token_mask = routed.any(-1).to(probs.dtype)  # (L, N)
    p_mean = masked_mean(probs, token_mask[..., None], dim=1)  # (L, E)
    if soft_dispatch:  # dense mixture: soft dispatch fraction (see docstring)
        f = p_mean.detach()
    return (num_experts * (f * p_mean).sum(-1)).mean()  # per layer E·Σ_e f_e P_e, then mean over L


def router_z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. arXiv:2202.08906; METHODS.md §6.2): mean over tokens of (logsumexp s)².

    Penalises large router logits, keeping the softmax in a numerically tame range. Masked mean over tokens per
    layer, then the mean over layers.

    Args:
        logits: (L, N, E) router logits, or (N, E) for one layer.
        mask: (N,) 1 = token counts.
    Returns:
        0-d tensor.
    """
    if logits.dim() == 2:
        logits = logits[None]  # (1, N, E)
    assert mask.shape == logits.shape[1:2], (logits.shape, mask.shape)
    z = torch.logsumexp(logits.float(), dim=-1)  # (L, N)
    return masked_mean(z.square(), mask[None].expand_as(z), dim=1).mean()  # per layer, then over L


def routing_aux_loss(
    mask: Tensor,
    *,
    probs: Tensor | None = None,
    experts: Tensor | None = None,
    lb_coef: float = 0.0,
    logits: Tensor | None = None,
    z_coef: float = 0.0,
    soft_dispatch: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted router losses of one forward, shared by RL (``objective.Objective``) and SFT (``sft``):
    ``lb_coef · switch_load_balancing + z_coef · router_z_loss``.

    Args:
        mask: (B, S) 1 = position counts (the caller decides which: every attended position in SFT; in RL each row's
            last attended position is dropped, its route was never used by a rollout).
        probs: (L, B, S, E) the routing probabilities of the forward; with ``experts`` (L, B, S, K, -1 = unrouted),
            the Switch load balancing is computed and logged (``loss/lb``), whatever ``lb_coef``. None = skip it.
        lb_coef: its weight in the returned loss.
        logits: (L, B, S, E) raw router logits, needed when ``z_coef > 0`` (``loss/z``).
        soft_dispatch: the routers are dense mixtures (K = E), see ``switch_load_balancing``.
    Returns:
        the weighted loss (0-d) and the detached metrics.
    """
    loss = torch.zeros((), device=mask.device)
    metrics: dict[str, Tensor] = {}
    flat_mask = mask.reshape(-1).float()  # (B*S,)
    if probs is not None:
        L, B, S, E = probs.shape
        lb = switch_load_balancing(
            probs.reshape(L, B * S, E), experts.long().reshape(L, B * S, -1), flat_mask.to(probs.dtype),
            soft_dispatch=soft_dispatch,
        )  # fmt: skip
        metrics["loss/lb"] = lb.detach()
        if lb_coef > 0:
            loss = loss + lb_coef * lb
    if z_coef > 0:
        assert logits is not None, "routing_aux_loss: z_coef > 0 needs the raw router logits"
        L, B, S, E = logits.shape
        z = router_z_loss(logits.reshape(L, B * S, E), flat_mask)
        loss = loss + z_coef * z
        metrics["loss/z"] = z.detach()
    return loss, metrics
