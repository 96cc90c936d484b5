"""Small tensor helpers shared by losses, rewards, rollout and diagnostics. Pure functions, no state.

Masks are float (or bool) tensors with 1 meaning "this element counts" (STYLE.md §5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


LOGIT_CHUNK = 2**23
"""Logits held at once by ``linear_token_logp`` (32 MiB in float32): each chunk is ``LOGIT_CHUNK // V`` rows."""


def _chunk_scores(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, banned: Tensor | None) -> Tensor:
    """(n, H) hidden states -> (n, V) scores of the token distribution, as ``types.Sampling.token_scores`` makes them
    from logits (suppressed tokens at -inf, then divided by the temperature), in the compute dtype of ``weight``."""
    scores = F.linear(h.to(weight.dtype), weight, bias)  # (n, V)
    if banned is not None:
        scores = scores.index_fill(-1, banned, float("-inf"))
    return scores / temperature if temperature != 1.0 else scores


class _LinearTokenLogp(torch.autograd.Function):
    """log softmax(scores(h))[token] over row chunks; the backward recomputes each chunk's scores instead of keeping
    (N, V) of them. Saved: the hidden states, the head's weight, the tokens and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, banned, rows):  # (N, H), (V, H), (V,), (N,)
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 hidden states: float32 maths
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        logp = torch.empty(tokens.shape[0], dtype=dtype, device=hidden.device)  # (N,)
        lse = torch.empty_like(logp)  # (N,)
        for start in range(0, tokens.shape[0], rows):
            stop = start + rows
            scores = _chunk_scores(hidden[start:stop], w, b, temperature, banned)  # (n, V)
            lse[start:stop] = torch.logsumexp(scores, dim=-1)
            logp[start:stop] = scores.gather(1, tokens[start:stop, None]).squeeze(1) - lse[start:stop]
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, banned)
        ctx.temperature, ctx.rows = temperature, rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # (N,)
        hidden, weight, bias, tokens, lse, banned = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, T = lse.dtype, ctx.temperature
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None  # (V, H) accumulated in the compute dtype
        grad_b = torch.zeros_like(b) if need_b else None
        grad_logp = grad_logp.to(dtype)
        for start in range(0, tokens.shape[0], ctx.rows):
            stop = start + ctx.rows
            h = hidden[start:stop].to(dtype)  # (n, H)
            g = grad_logp[start:stop, None]  # (n, 1)
            # d logp / d score_j = 1[j = token] - softmax_j; suppressed columns have softmax 0 and get no gradient
            probs = torch.exp(_chunk_scores(h, w, b, T, banned) - lse[start:stop, None])  # (n, V)
            grad_scores = (-g * probs).scatter_add_(1, tokens[start:stop, None], g)  # (n, V)
            grad_logits = grad_scores / T if T != 1.0 else grad_scores  # scores = logits / T
            if need_h:
                grad_h[start:stop] = (grad_logits @ w).to(hidden.dtype)  # (n, H)
            if need_w:
                grad_w.addmm_(grad_logits.T, h)  # (V, H)
            if need_b:
                grad_b += grad_logits.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_token_logp(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    suppress: tuple[int, ...] = (),
    chunk: int = LOGIT_CHUNK,
) -> Tensor:
    """``token_logp`` of the logits ``hidden @ weightᵀ + bias`` (suppressed tokens at -inf, divided by
    ``temperature``: ``types.Sampling.token_scores``) without ever holding more than ``chunk`` logits: forward and
    backward run over chunks of rows (a fused linear + log-prob, as Liger-Kernel does for cross-entropy). The maths is
    float32 at least, also for bfloat16 hidden states and weights (float64 stays float64).

    Args:
        hidden: (..., H) last hidden states; position t predicts ``tokens[..., t]``.
        weight: (V, H) the LM head's weight; bias: (V,) or None.
        tokens: (...) token ids.
        temperature: the token temperature the scores are divided by.
        suppress: token ids whose score is -inf.
        chunk: logits per chunk; rows per chunk = ``max(1, chunk // V)``.
    Returns:
        (...) float32 log-probabilities (float64 for float64 inputs), differentiable in hidden, weight and bias.
    """
    assert hidden.shape[:-1] == tokens.shape, (hidden.shape, tokens.shape)
    assert weight.dim() == 2 and weight.shape[1] == hidden.shape[-1], (weight.shape, hidden.shape)
    banned = torch.tensor(suppress, dtype=torch.long, device=hidden.device) if suppress else None
    rows = max(1, chunk // weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    logp = _LinearTokenLogp.apply(flat, weight, bias, tokens.reshape(-1), float(temperature), banned, rows)  # (N,)
    return logp.view(tokens.shape)


def pad_along(x: Tensor, dim: int, left: int, right: int, value: float) -> Tensor:
    """``x`` with ``left`` and ``right`` entries of ``value`` added along ``dim`` (``x`` itself when both are 0)."""
    if left == 0 and right == 0:
        return x
    after = x.dim() - 1 - dim % x.dim()  # dims after dim: F.pad lists its pads from the last dim backwards
    return F.pad(x, (0, 0) * after + (left, right), value=value)


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
