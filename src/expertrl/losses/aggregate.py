"""Turn per-token losses (B, T) into the scalar to back-propagate (METHODS.md §0, "Aggregation modes").

Orthogonal to the choice of loss (STYLE.md §2): every token loss, and the per-token Gate-GRPO term, goes through
the same ``aggregate``. Names follow verl's ``loss_agg_mode`` with underscores.

Gradient accumulation: a step's batch is often split into micro-batches whose losses are back-propagated one at a
time. Pass the *full* batch's denominators (``num_tokens`` for ``token_mean``, ``num_seqs`` for the ``seq_mean_*``
modes) and the micro-batch values sum to the full-batch value exactly (tested).
"""

from __future__ import annotations

from torch import Tensor

from expertrl.ops import masked_mean, masked_sum


def _token_mean(loss: Tensor, mask: Tensor, num_tokens, num_seqs, norm_const) -> Tensor:
    # DAPO / TRL "dapo": Σ_{i,t} loss / Σ_{i,t} mask; every token of the step weighs the same.
    den = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    return masked_sum(loss, mask) / den


def _seq_mean_token_mean(loss: Tensor, mask: Tensor, num_tokens, num_seqs, norm_const) -> Tensor:
    # GRPO Eq. (DeepSeekMath), MoE-GRPO Eq. 4: (1/G) Σ_i (1/|y_i|) Σ_t loss_{i,t}. Empty sequences count as 0.
    per_seq = masked_mean(loss, mask, dim=-1)  # (B,)
    return per_seq.sum() / (loss.shape[0] if num_seqs is None else num_seqs)


def _seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, num_tokens, num_seqs, norm_const) -> Tensor:
    # Dr.GRPO (METHODS.md §4.2): (1/G) Σ_i Σ_t loss_{i,t} / L_const, with L_const a fixed generation budget.
    if norm_const is None:
        raise ValueError(
            "aggregation 'seq_mean_token_sum_norm' (Dr.GRPO) needs norm_const, e.g. the max completion length"
        )
    per_seq = masked_sum(loss, mask, dim=-1) / norm_const  # (B,)
    return per_seq.sum() / (loss.shape[0] if num_seqs is None else num_seqs)


AGGREGATIONS = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate(
    loss: Tensor,
    mask: Tensor,
    how: str,
    *,
    num_tokens: Tensor | float | None = None,
    num_seqs: int | None = None,
    norm_const: float | None = None,
) -> Tensor:
    """Aggregate per-token losses into one scalar.

    Each mode reads only its own denominator, so a caller may pass all three unconditionally.

    Args:
        loss: (B, T) per-token loss.
        mask: (B, T) 1 = token counts.
        how: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum_norm``.
        num_tokens: ``token_mean`` only: denominator instead of ``mask.sum()`` (the whole step's token count,
            divided by the world size under DDP, for gradient accumulation).
        num_seqs: ``seq_mean_*`` only: denominator of the mean over sequences instead of B (the whole step's
            sequence count, for gradient accumulation).
        norm_const: ``seq_mean_token_sum_norm`` only, required: Dr.GRPO's constant per-sequence divisor.
    Returns:
        0-d tensor.
    Raises:
        ValueError: unknown ``how`` (lists the valid ones), or ``seq_mean_token_sum_norm`` without ``norm_const``.
    """
    assert loss.shape == mask.shape and loss.dim() == 2, (loss.shape, mask.shape)
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose from {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[how](loss, mask, num_tokens, num_seqs, norm_const)
