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
    dispatch: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted router losses of one forward, shared by RL (``objective.Objective``) and SFT (``sft``):
    ``lb_coef · switch_load_balancing + z_coef · router_z_loss``.

    Two scopes. Without ``dispatch``, both losses are this forward's own (SFT). With ``dispatch`` (RL), they are the
    micro-batch's share of the *step's* losses over the global batch, all micro-batches of all ranks: the Switch
    loss ``E · Σ_e f_e P_e`` with ``f = dispatch`` (the global dispatch fraction of the routes the step replays,
    computed once per step) and ``P``'s sum over this micro-batch's tokens divided by ``num_tokens`` (the step's
    token count / world size: DDP averages the ranks' gradients), the z-loss likewise summed over tokens / that
    count. Summed over a step's micro-batches (and averaged over ranks) that is the global loss exactly, so it does
    not depend on how the batch is split into micro-batches or processes. The logged ``loss/lb`` and ``loss/z`` are
    each micro-batch's own values (with the global ``f``), as the other loss metrics are.

    Args:
        mask: (B, S) 1 = position counts (the caller decides which: every attended position in SFT; in RL each row's
            last attended position is dropped, its route was never used by a rollout).
        probs: (L, B, S, E) the routing probabilities of the forward; with ``experts`` (L, B, S, K, -1 = unrouted),
            the Switch load balancing is computed and logged (``loss/lb``), whatever ``lb_coef``. None = skip it.
        lb_coef: its weight in the returned loss.
        logits: (L, B, S, E) raw router logits, needed when ``z_coef > 0`` (``loss/z``).
        soft_dispatch: the routers are dense mixtures (K = E), see ``switch_load_balancing`` (this forward's scope).
        dispatch: (L, E) the step's global dispatch fraction (``dispatch_fraction``), or None.
        num_tokens: with ``dispatch``, the step's counted tokens / world size.
    Returns:
        the weighted loss (0-d) and the detached metrics.
    """
    loss = torch.zeros((), device=mask.device)
    metrics: dict[str, Tensor] = {}
    flat_mask = mask.reshape(-1).float()  # (B*S,)
    step_scope = dispatch is not None and not soft_dispatch
    if probs is not None:
        L, B, S, E = probs.shape
        flat_probs, flat_experts = probs.reshape(L, B * S, E), experts.long().reshape(L, B * S, -1)
        if step_scope:
            token_mask = ((flat_experts >= 0).any(-1) & (flat_mask[None] > 0)).to(probs.dtype)  # (L, N)
            p_sum = (flat_probs * token_mask[..., None]).sum(1)  # (L, E) gradient
            f = dispatch.to(probs.dtype)
            lb = (E * (f * p_sum).sum(-1)).mean() / num_tokens  # this micro-batch's share of the step's loss
            with torch.no_grad():
                own = p_sum / token_mask.sum(1, keepdim=True).clamp(min=1)  # (L, E) this micro-batch's P
                metrics["loss/lb"] = (E * (f * own).sum(-1)).mean()
        else:
            lb = switch_load_balancing(flat_probs, flat_experts, flat_mask.to(probs.dtype), soft_dispatch=soft_dispatch)
            metrics["loss/lb"] = lb.detach()
        if lb_coef > 0:
            loss = loss + lb_coef * lb
    if z_coef > 0:
        assert logits is not None, "routing_aux_loss: z_coef > 0 needs the raw router logits"
        L, B, S, E = logits.shape
        z = router_z_loss(logits.reshape(L, B * S, E), flat_mask)
        metrics["loss/z"] = z.detach()
        if step_scope:
            z = torch.logsumexp(logits.reshape(L, B * S, E).float(), dim=-1).square()  # (L, N)
            z = (z * flat_mask[None]).sum(1).mean() / num_tokens
        loss = loss + z_coef * z
    return loss, metrics


def dispatch_counts(experts: Tensor, mask: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Expert slot counts (L, E) of the routes ``experts`` (L, B, S, K; -1 = unrouted) at the positions where
    ``mask`` (B, S) is 1, and the number of those tokens with a routed slot (0-d). Summed over ranks,
    ``counts / counts.sum(-1)`` is the step's global dispatch fraction (``routing_aux_loss``'s ``dispatch``)."""
    L = experts.shape[0]
    routed = (experts >= 0) & (mask[None, :, :, None] > 0)  # (L, B, S, K)
    counts = torch.zeros(L, num_experts, device=experts.device, dtype=torch.float64)
    counts.scatter_add_(1, experts.long().clamp(min=0).flatten(1), routed.flatten(1).double())
    return counts, routed[0].any(-1).sum().double()
