"""RSPO router shift: a per-token, stop-gradient weight γ̃ for how much routing moved (arXiv:2510.23027; METHODS §1).

For completion token (i, t) and MoE layer l, with e^{l,1..K} the experts the OLD policy activated (METHODS §1.2):

    d^l_{i,t} = (1/K) Σ_k | log r^l_θ(e^{l,k}) − log r^l_old(e^{l,k}) |      r = full-softmax router probability
    Δ_{i,t}   = (1/L) Σ_l d^l_{i,t}            ("mean", default)   or   Σ_l d^l_{i,t}   ("product", §8 row 3)
    γ_{i,t}   = exp(−Δ_{i,t}) ∈ (0, 1]          1 = routing unchanged for this token
    γ̃_{i,t}   = sg[ max(γ_{i,t}, γ_min) ]      γ_min = 0.8 (provisional, §8 row 2)

"product" is the product over layers of the per-layer factors exp(−d^l) (one third-party fork's default); "mean"
is their geometric mean, the paper's reading. γ̃ is a sample weight only: it is returned as a detached log.

Where γ̃ enters (METHODS §1.3, §8 row 1):

* **v2, ``before_clip`` (default):** u = log ρ + log γ̃, then the host loss's own clipping and aggregation on u.
  ``apply_router_shift`` returns ``old_logp − log γ̃``; passed as ``old_logp`` to ANY registered host loss, the
  host computes logp − (old_logp − log γ̃) = log ρ + log γ̃ = u wherever it used log ρ, so it clips and aggregates
  u exactly (GRPO: ρ̃ = γ̃ρ in min/clip; GSPO: s̃_i = exp(mean_t u); GMPO: ℓ = u, hence RSPO = GMPO + RS; SAPO:
  f(γ̃ρ); CISPO: sg[clip(γ̃ρ)]). The host's ratio metrics then describe the rescaled ratio.
* **v1, ``after_clip``:** ``after_clip_weight`` multiplies the host's per-token loss by γ̃. This is our
  generalisation of v1 to non-GMPO hosts (a γ̃-weighted clipped term). For a GMPO host it is NOT the paper's v1:
  v1 puts γ inside GMPO's product, S_i = [Π_t W_{i,t} γ_{i,t}]^{sgn(Â_i)/|y_i|}, so the factor is
  exp(sgn(Â_i) · mean_t log γ̃), which for Â < 0 is >= 1 and *up-weights* shifted negative samples (the sign
  caveat of METHODS §1.3, which v2 removes); ``after_clip_weight`` on ``gmpo``'s broadcast loss instead gives the
  arithmetic mean_t γ̃ <= 1 for either sign.

Inputs come from the replayed forward (``rollout.policy_forward``): ``gate_logp[:, :, P − 1 : −1]`` and the
rollout's ``old_gate_logp`` at the same positions are (L, B, T, K) log-probs of the recorded experts. Slots recorded
as unrouted carry log-prob 0 under both routers, so they add |Δ| = 0 (and still count in the 1/K).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from expertrl.ops import masked_mean

LAYER_AGGREGATIONS = ("mean", "product")
PLACEMENTS = ("before_clip", "after_clip")


def _masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """``torch.quantile(x[mask.bool()], q)`` (linear interpolation) without a host sync; 0 if nothing counts."""
    flat = torch.where(mask.bool(), x, torch.full_like(x, math.inf)).flatten()  # masked entries sort last
    values = flat.sort().values  # (N,)
    n = mask.bool().sum()  # 0-d, stays on the device
    pos = (q * (n - 1).clamp(min=0)).to(x.dtype)  # fractional rank among the n valid values
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo, v_hi = values[lo], values[hi]
    out = v_lo + (pos - lo.to(x.dtype)) * (v_hi - v_lo)
    return torch.where(n > 0, out, torch.zeros_like(out))


def router_shift(
    gate_logp: Tensor,
    old_gate_logp: Tensor,
    mask: Tensor,
    *,
    gamma_min: float = 0.8,
    layer_agg: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Router-shift weight log γ̃ per completion token (RSPO Eq. for d, Δ, γ, γ̃; METHODS §1.2).

    Args:
        gate_logp: (L, B, T, K) log r_θ of the experts the old policy activated, under the current router
            (full softmax, gathered at the old indices by the caller). Its gradient is not used.
        old_gate_logp: (L, B, T, K) the same under the old router.
        mask: (B, T) 1 = completion token (metrics only; γ is computed everywhere).
        gamma_min: floor of γ, in [0, 1]; 0 = no floor.
        layer_agg: ``mean`` (Δ = mean over layers; paper) or ``product`` (Δ = sum over layers).
    Returns:
        log_gamma: (B, T) log γ̃ = max(−Δ, log γ_min), detached.
        metrics: detached tensors (METHODS §1.5, §6.6 names; logged as ``router/shift/<name>``): ``gamma_mean``,
            ``gamma_p10``, ``gamma_p50`` (raw γ: masked mean, 10th percentile, median), ``frac_below_floor``
            (γ < γ_min),
            ``delta_mean``, ``delta_p90``, ``delta_p99`` (Δ: masked mean and upper percentiles, where bursts of
            router shift show first), all 0-d, and ``delta_per_layer`` (L,), the masked mean of d^l per layer.
    Raises:
        ValueError: unknown ``layer_agg`` (lists the valid ones).
    """
    assert gate_logp.shape == old_gate_logp.shape and gate_logp.dim() == 4, (gate_logp.shape, old_gate_logp.shape)
    assert gate_logp.shape[1:3] == mask.shape, (gate_logp.shape, mask.shape)
    assert 0.0 <= gamma_min <= 1.0, f"gamma_min must be in [0, 1], got {gamma_min}"
    if layer_agg not in LAYER_AGGREGATIONS:
        raise ValueError(f"unknown layer_agg {layer_agg!r}; choose from {list(LAYER_AGGREGATIONS)}")
    with torch.no_grad():  # γ̃ is a sample weight: stop-gradient (RSPO; training collapses without it, §1.1)
        d = (gate_logp - old_gate_logp).abs().mean(-1)  # (L, B, T) d^l: mean over the K old experts
        delta = d.mean(0) if layer_agg == "mean" else d.sum(0)  # (B, T) Δ
        log_gamma = -delta  # (B, T) log γ
        if gamma_min > 0:
            log_gamma = log_gamma.clamp(min=math.log(gamma_min))  # log γ̃ = max(log γ, log γ_min)
        gamma = torch.exp(-delta)  # (B, T) raw γ, for the metrics
        m = mask.to(gamma.dtype)
        metrics = {
            "router/shift/gamma_mean": masked_mean(gamma, m),
            "router/shift/gamma_p10": _masked_quantile(gamma, m, 0.1),
            "router/shift/gamma_p50": _masked_quantile(gamma, m, 0.5),
            "router/shift/frac_below_floor": masked_mean((gamma < gamma_min).to(gamma.dtype), m),
            "router/shift/delta_mean": masked_mean(delta, m),
            "router/shift/delta_p90": _masked_quantile(delta, m, 0.9),
            "router/shift/delta_p99": _masked_quantile(delta, m, 0.99),
            "router/shift/delta_per_layer": masked_mean(d, m.expand_as(d), dim=(1, 2)),  # (L,)
        }
    return log_gamma.detach(), metrics


def apply_router_shift(old_logp: Tensor, log_gamma: Tensor, *, placement: str = "before_clip") -> Tensor:
    """v2 placement: the ``old_logp`` to hand to any host loss so that it sees u = log ρ + log γ̃.

    The host computes logp − old_logp' = logp − old_logp + log γ̃ = u and then clips and aggregates u exactly as it
    would log ρ (module docstring). ``placement="after_clip"`` (v1) is not done here: weight the host's per-token
    loss with ``after_clip_weight`` and pass the plain ``old_logp``.

    Args:
        old_logp: (B, T) log π_old of the sampled tokens.
        log_gamma: (B, T) log γ̃ from ``router_shift`` (detached, <= 0).
        placement: ``before_clip`` (the only placement this function implements).
    Returns:
        (B, T) detached ``old_logp − log_gamma`` (>= old_logp: the rescaled ratio γ̃ρ <= ρ).
    Raises:
        ValueError: any other ``placement``.
    """
    if placement != "before_clip":
        raise ValueError(
            f"apply_router_shift implements placement 'before_clip' (RSPO v2) only, got {placement!r}; for "
            "'after_clip' (v1) pass the plain old_logp to the host loss and weight its output with after_clip_weight"
        )
    assert old_logp.shape == log_gamma.shape, (old_logp.shape, log_gamma.shape)
    return (old_logp - log_gamma).detach()


def after_clip_weight(loss: Tensor, log_gamma: Tensor) -> Tensor:
    """v1 placement, generalised: the host's per-token (clipped) loss times the constant γ̃.

    Our generalisation of RSPO v1 to any host: each token's clipped term becomes a γ̃-weighted sample. For a GMPO host
    this is not the paper's v1 (which raises the product of γ to sgn(Â)/|y| and so up-weights shifted negative
    samples, METHODS §1.3); see the module docstring.

    Args:
        loss: (B, T) per-token loss of the host (gradient).
        log_gamma: (B, T) log γ̃ from ``router_shift`` (detached).
    Returns:
        (B, T) loss · γ̃.
    """
    assert loss.shape == log_gamma.shape, (loss.shape, log_gamma.shape)
    return loss * torch.exp(log_gamma.detach())
