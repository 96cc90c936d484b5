"""Small tensor helpers shared by losses, rewards, rollout and diagnostics. Pure functions, no state.

Masks are float (or bool) tensors with 1 meaning "this element counts" (STYLE.md §5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``mask`` broadcasts against ``x``."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the elements where ``mask`` is 1; 0 where nothing counts (no NaN)."""
    mask = mask.to(x.dtype).expand_as(x)
    num = masked_sum(x, mask, dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    return num / den.clamp(min=1.0)


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] per position, in float32 at least, without materialising (B, T, V) log-probs twice.

    Args:
        logits: (B, T, V) scores whose position t predicts ``tokens[:, t]``.
        tokens: (B, T) token ids.
    Returns:
        (B, T) float32 log-probabilities (float64 for float64 logits).
    """
    assert logits.shape[:-1] == tokens.shape, (logits.shape, tokens.shape)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) along the last dim: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of a distribution along the last dim: (..., E) -> (...), with 0 · ln 0 = 0."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(-1)


class NonFiniteError(ValueError):
    """A tensor holds NaN or Inf (a weight file, or weights about to be checkpointed); the message names it."""


def check_finite(tensors: dict[str, Tensor] | nn.Module, where: str) -> None:
    """Raise ``NonFiniteError`` naming the first tensor of ``tensors`` (a state dict or a module's parameters) that
    holds NaN or Inf."""
    items = tensors.named_parameters() if isinstance(tensors, nn.Module) else tensors.items()
    for name, t in items:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{where}: tensor {name!r} holds NaN or Inf values")
