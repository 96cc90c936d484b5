"""RO-GRPO routing-statistics rewards (Ma et al., ICLR 2026; METHODS.md §2.3, §2.4, §2.6; ambiguities 15-16).

RO-GRPO scores the routing of each sampled completion and adds a non-differentiable scalar to the task reward
*before* the group advantage: ``R_total = R_task + R_route``. Everything here runs under ``torch.no_grad``.

Contract: the statistics are pure functions of router probabilities ``probs (M, B, T, E)`` of ``M`` routed modules
(MoE layers, or LoRA-MoE modules) for ``B`` completions and ``T`` token positions, and a float ``mask (B, T)``
(1 = completion token counted). ``RoutingRewarder`` is the one object the training loop holds; its only state is the
Relative variant's history, kept as plain Python floats so ``state_dict()`` is JSON and resume is exact.

Decisions where the paper is silent (documented in the report and tested):
- ``H̄`` pools all (token, module) pairs (ambiguity 16); ``pool="module"`` takes the mean per module, then over
  modules. With one shared ``(B, T)`` mask the two are equal (a mean is linear and every module counts the same
  tokens); they differ only with a per-module ``mask (M, B, T)``, e.g. a module that did not route some tokens.
- A completion with no counted token gets ``h_norm = m_norm = 0`` and ``empty = True`` in the statistics (no NaN).
  ``RoutingRewarder`` gives it the *worst* routing reward of its variant (Smooth: as if ``H_norm = M_norm = 1``;
  Relative: no bonus) so that emitting nothing can never earn routing reward, and leaves it out of the history.
- The Relative history is updated *after* the batch is scored; with no history yet (the first batch) the bonus is 0.
  The EMA history updates per sample, in batch order, and starts at the first sample (no bias towards 0).
- Shuffled control: the final routing rewards are permuted over the whole batch (the paper: "within a batch").
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor

from expertrl.ops import entropy

POOLS = ("pairs", "module")
KINDS = ("smooth", "relative")
HISTORIES = ("window", "ema")


# ---------------------------------------------------------------------------------------------------------------------
# statistics (METHODS.md §2.3)


@torch.no_grad()
def routing_statistics(probs: Tensor, mask: Tensor, *, pool: str = "pairs") -> dict[str, Tensor]:
    """Per-completion routing entropy and load imbalance of RO-GRPO.

    ``H_norm = mean over counted (token, module) pairs of H(p) / ln E`` with ``H(p) = -Σ_e p_e ln p_e`` (nats);
    ``M_norm = (1/M) Σ_m (1/E)‖p̄_m − u‖² / ((E−1)/E²)``, ``p̄_m`` the masked mean of module m's probabilities over
    tokens and ``u`` uniform. Both lie in [0, 1]: uniform routing gives (1, 0), collapse on one expert (0, 1).

    Args:
        probs: (M, B, T, E) router probabilities (each row sums to 1 where counted; values at uncounted positions
            are ignored, even NaN).
        mask: (B, T) float, 1 = completion token counted; or (M, B, T) when modules count different tokens.
        pool: "pairs" (pool all counted (token, module) pairs for H̄; the default) or "module" (mean per module,
            then over the modules that counted a token).
    Returns:
        h_norm: (B,) normalised mean routing entropy.
        m_norm: (B,) normalised load MSE to uniform (mean over modules).
        m_raw: (B,) raw M̄ (what the paper's tables call "MSE").
        m_norm_per_module: (M, B) normalised load MSE of each module (0 where the module counted nothing).
        utilisation: (M, B, E) p̄_m per completion (0 where the module counted nothing).
        module_counted: (M, B) bool, module m counted at least one token of completion b.
        empty: (B,) bool, completions with no counted token (their h_norm and m_norm are 0).
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (M, B, T, E) router probabilities; got shape {tuple(probs.shape)}")
    M, B, T, E = probs.shape
    if E < 2:
        raise ValueError(f"probs has E={E} experts; routing statistics need E >= 2 (they divide by ln E)")
    if mask.shape not in ((B, T), (M, B, T)):
        raise ValueError(f"mask must be (B, T)={(B, T)} or (M, B, T)={(M, B, T)}; got {tuple(mask.shape)}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose from {POOLS}")
    probs = probs.detach().float()
    counted = (mask.detach() > 0).expand(M, B, T)  # (M, B, T) bool
    w = counted.float()  # (M, B, T)

    ent = torch.where(counted, entropy(probs), 0.0)  # (M, B, T); NaN at padding never leaks
    n_mb = w.sum(-1)  # (M, B) counted tokens per module
    valid = n_mb > 0  # (M, B) module counted something for this completion
    n_valid = valid.float().sum(0)  # (B,)
    empty = n_valid == 0  # (B,)
    if pool == "pairs":
        h = ent.sum((0, 2)) / n_mb.sum(0).clamp(min=1.0)  # (B,)
    else:
        h_mb = ent.sum(-1) / n_mb.clamp(min=1.0)  # (M, B)
        h = h_mb.sum(0) / n_valid.clamp(min=1.0)  # (B,)
    h_norm = h / math.log(E)  # (B,)

    p = torch.where(counted[..., None], probs, 0.0)  # (M, B, T, E)
    util = p.sum(2) / n_mb[..., None].clamp(min=1.0)  # (M, B, E) p̄_m
    mse = ((util - 1.0 / E) ** 2).mean(-1)  # (M, B) (1/E)‖p̄_m − u‖²
    mse = torch.where(valid, mse, 0.0)  # (M, B) a module with nothing counted is left out, not "collapsed"
    m_raw = mse.sum(0) / n_valid.clamp(min=1.0)  # (B,)
    collapse = (E - 1) / E**2  # (1/E)‖onehot − u‖², the largest possible value
    return {
        "h_norm": h_norm,
        "m_norm": m_raw / collapse,
        "m_raw": m_raw,
        "m_norm_per_module": mse / collapse,
        "utilisation": util,
        "module_counted": valid,
        "empty": empty,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Smooth (curriculum) variant (METHODS.md §2.4)


def _check_progress(progress: float) -> float:
    progress = float(progress)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be the training progress t in [0, 1] (step / total steps); got {progress}")
    return progress


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow for large |z|


def smooth_weights(
    progress: float,
    *,
    lambda_h_start: float = 0.5,
    lambda_b_end: float = 2.0,
    steepness: float = 10.0,
    center: float = 0.5,
) -> tuple[float, float]:
    """Curriculum weights ``w_H(t) = λ_H_start (1 − s(t))``, ``w_B(t) = λ_B_end s(t)``, ``s(t) = σ(k (t − c))``.

    Confident routing (low entropy) is rewarded early, balanced load late. k and c are not reported by the paper
    (ambiguity 15: k = 10, c = 0.5).

    Args:
        progress: training progress t in [0, 1].
    Returns:
        (w_h, w_b) as Python floats.
    """
    t = _check_progress(progress)
    s = _sigmoid(steepness * (t - center))
    return lambda_h_start * (1.0 - s), lambda_b_end * s


@torch.no_grad()
def smooth_reward(
    h_norm: Tensor,
    m_norm: Tensor,
    progress: float,
    *,
    w_route: float = 0.2,
    lambda_h_start: float = 0.5,
    lambda_b_end: float = 2.0,
    steepness: float = 10.0,
    center: float = 0.5,
) -> Tensor:
    """(B,) ``R_route = −w_route (w_H(t) H_norm + w_B(t) M_norm)``; h_norm, m_norm: (B,)."""
    assert h_norm.shape == m_norm.shape and h_norm.dim() == 1, (h_norm.shape, m_norm.shape)
    w_h, w_b = smooth_weights(
        progress, lambda_h_start=lambda_h_start, lambda_b_end=lambda_b_end, steepness=steepness, center=center
    )
    return -w_route * (w_h * h_norm.float() + w_b * m_norm.float())  # (B,)


# ---------------------------------------------------------------------------------------------------------------------
# Relative (improvement-gate) variant (METHODS.md §2.4)


class RoutingHistory:
    """Reference (h_hist, m_hist) of the Relative variant: mean of the last ``window`` samples, or a per-sample EMA.

    The state is plain Python floats (JSON in checkpoints; resume is exact). Call ``update`` after scoring a batch.
    """

    def __init__(self, mode: str = "window", *, window: int = 1000, decay: float = 0.99):
        if mode not in HISTORIES:
            raise ValueError(f"unknown history mode {mode!r}; choose from {HISTORIES}")
        if mode == "window" and not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be an integer >= 1 (samples kept in the history); got {window!r}")
        if mode == "ema" and not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), e.g. 0.99; got {decay!r}")
        self.mode, self.window, self.decay = mode, window, decay
        self._h: deque[float] = deque(maxlen=window)  # window mode
        self._m: deque[float] = deque(maxlen=window)
        self._ema: tuple[float, float] | None = None  # ema mode

    def reference(self) -> tuple[float, float] | None:
        """(h_hist, m_hist), or None while no sample has been seen."""
        if self.mode == "ema":
            return self._ema
        if not self._h:
            return None
        return math.fsum(self._h) / len(self._h), math.fsum(self._m) / len(self._m)

    def update(self, h_norm: Tensor, m_norm: Tensor) -> None:
        """Add the samples of a scored batch, in batch order. h_norm, m_norm: (B,)."""
        assert h_norm.shape == m_norm.shape and h_norm.dim() == 1, (h_norm.shape, m_norm.shape)
        hs, ms = h_norm.detach().double().cpu().tolist(), m_norm.detach().double().cpu().tolist()  # one sync per step
        if self.mode == "window":
            self._h.extend(hs)
            self._m.extend(ms)
            return
        for h, m in zip(hs, ms, strict=True):
            if self._ema is None:
                self._ema = (h, m)
            else:
                h0, m0 = self._ema
                self._ema = (self.decay * h0 + (1.0 - self.decay) * h, self.decay * m0 + (1.0 - self.decay) * m)

    def __len__(self) -> int:
        return len(self._h) if self.mode == "window" else int(self._ema is not None)

    def state_dict(self) -> dict:
        if self.mode == "window":
            return {"mode": "window", "window": self.window, "h": list(self._h), "m": list(self._m)}
        return {"mode": "ema", "decay": self.decay, "ema": None if self._ema is None else list(self._ema)}

    def load_state_dict(self, state: dict) -> None:
        setting = "window" if self.mode == "window" else "decay"
        mine = self.window if self.mode == "window" else self.decay
        if state.get("mode") != self.mode or state.get(setting) != mine:
            raise ValueError(
                f"history state was saved with mode={state.get('mode')!r}, {setting}={state.get(setting)!r}; "
                f"this history has mode={self.mode!r}, {setting}={mine!r}: configure the same history to resume"
            )
        if self.mode == "window":
            self._h = deque((float(x) for x in state["h"]), maxlen=self.window)
            self._m = deque((float(x) for x in state["m"]), maxlen=self.window)
        else:
            self._ema = None if state["ema"] is None else (float(state["ema"][0]), float(state["ema"][1]))


@torch.no_grad()
def relative_reward(
    h_norm: Tensor, m_norm: Tensor, reference: tuple[float, float] | None, *, bonus: float = 0.2
) -> Tensor:
    """(B,) ``bonus · 1{h_norm < h_hist ∧ m_norm < m_hist}`` (strict); all 0 when ``reference`` is None.

    C ("bonus") is not reported by the paper (ambiguity 15: C = w_route = 0.2). The comparison is in float64 so a
    sample equal to the history (e.g. the only sample of a window) never counts as an improvement.
    """
    assert h_norm.shape == m_norm.shape and h_norm.dim() == 1, (h_norm.shape, m_norm.shape)
    if reference is None:
        return torch.zeros_like(h_norm, dtype=torch.float32)
    h_hist, m_hist = reference
    hit = (h_norm.double() < h_hist) & (m_norm.double() < m_hist)  # (B,) bool
    return bonus * hit.float()


# ---------------------------------------------------------------------------------------------------------------------
# Shuffled control and the rewarder the training loop holds


def shuffle_within_batch(values: Tensor, generator: torch.Generator) -> Tensor:
    """(B,) ``values`` under a uniformly random permutation drawn from ``generator`` (RO-GRPO's Shuffled control)."""
    assert values.dim() == 1, values.shape
    perm = torch.randperm(values.shape[0], generator=generator, device=generator.device)  # (B,)
    return values[perm.to(values.device)]


def _check_nonneg(**kwargs: float) -> None:
    for name, value in kwargs.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


class RoutingRewarder:
    """RO-GRPO's routing reward: statistics -> Smooth or Relative reward -> optional shuffle -> history update.

    Args (keyword-only):
        kind: "smooth" (curriculum penalty, always <= 0) or "relative" (sparse bonus >= 0).
        shuffled: permute the routing rewards within the batch (the paper's control; needs a generator).
        w_route, lambda_h_start, lambda_b_end, steepness, center: Smooth weights (§2.4; k = steepness, c = center).
        bonus: the Relative variant's C.
        history: "window" (mean of the last ``window`` samples) or "ema" (per-sample EMA with ``ema_decay``).
        pool: how H̄ pools (token, module) pairs; see ``routing_statistics``.
    """

    def __init__(
        self,
        *,
        kind: str = "smooth",
        shuffled: bool = False,
        w_route: float = 0.2,
        lambda_h_start: float = 0.5,
        lambda_b_end: float = 2.0,
        steepness: float = 10.0,
        center: float = 0.5,
        bonus: float = 0.2,
        history: str = "window",
        window: int = 1000,
        ema_decay: float = 0.99,
        pool: str = "pairs",
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown routing reward kind {kind!r}; choose from {KINDS}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose from {POOLS}")
        if not isinstance(shuffled, bool):
            raise ValueError(f"shuffled must be True or False; got {shuffled!r}")
        _check_nonneg(w_route=w_route, lambda_h_start=lambda_h_start, lambda_b_end=lambda_b_end, bonus=bonus)
        if not (isinstance(steepness, (int, float)) and math.isfinite(steepness) and steepness > 0):
            raise ValueError(f"steepness (the sigmoid's k) must be a finite number > 0, e.g. 10; got {steepness!r}")
        if not (isinstance(center, (int, float)) and 0.0 <= center <= 1.0):
            raise ValueError(f"center (the sigmoid's c) must lie in [0, 1], e.g. 0.5; got {center!r}")
        self.kind, self.shuffled, self.pool = kind, shuffled, pool
        self.smooth_kwargs = dict(
            w_route=w_route,
            lambda_h_start=lambda_h_start,
            lambda_b_end=lambda_b_end,
            steepness=steepness,
            center=center,
        )
        self.bonus = bonus
        self.history = RoutingHistory(history, window=window, decay=ema_decay) if kind == "relative" else None

    @torch.no_grad()
    def score(
        self, probs: Tensor, mask: Tensor, progress: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Routing rewards of one rollout batch, then the history update.

        Args:
            probs: (M, B, T, E) router probabilities; mask: (B, T) (or (M, B, T)) completion mask.
            progress: training progress t in [0, 1] (used by Smooth; validated for both).
            generator: required when ``shuffled``; derive it from (seed, step) so resume is exact.
        Returns:
            rewards: (B,) float32 routing reward, to add to the task reward before the group advantage.
            metrics: detached tensors: 0-d scalars and "router/utilisation" (M, E),
                "router/load_mse_norm_per_module" (M,).
        """
        progress = _check_progress(progress)
        if self.shuffled and generator is None:
            raise ValueError("shuffled=True needs a torch.Generator (seeded from (seed, step)) passed as generator")
        stats = routing_statistics(probs, mask, pool=self.pool)
        h, m, empty = stats["h_norm"], stats["m_norm"], stats["empty"]  # (B,), (B,), (B,) bool
        keep = (~empty).float()  # (B,)
        n_keep = keep.sum().clamp(min=1.0)
        metrics: dict[str, Tensor] = {}
        if self.kind == "smooth":
            ones = torch.ones_like(h)
            # empty completions: the worst reward (as if H_norm = M_norm = 1), so saying nothing never pays
            rewards = smooth_reward(
                torch.where(empty, ones, h), torch.where(empty, ones, m), progress, **self.smooth_kwargs
            )
            w_h, w_b = smooth_weights(progress, **{k: v for k, v in self.smooth_kwargs.items() if k != "w_route"})
            metrics["reward/routing_w_h"], metrics["reward/routing_w_b"] = h.new_tensor(w_h), h.new_tensor(w_b)
        else:
            reference = self.history.reference()
            hit = relative_reward(h, m, reference, bonus=1.0) * keep  # (B,) 1 = both statistics beat the history
            rewards = self.bonus * hit  # (B,) empty completions never earn the bonus
            metrics["reward/routing_hit_rate"] = hit.sum() / n_keep
            if reference is not None:  # no history value exists before the first batch: the keys are left out
                metrics["reward/routing_h_hist"], metrics["reward/routing_m_hist"] = (
                    h.new_tensor(reference[0]),
                    h.new_tensor(reference[1]),
                )
        if self.shuffled:
            rewards = shuffle_within_batch(rewards, generator)
        if self.history is not None:
            self.history.update(h[~empty], m[~empty])  # after scoring: the batch never compares with itself
        counted = stats["module_counted"].float()  # (M, B)
        n_counted = counted.sum(-1).clamp(min=1.0)  # (M,)
        metrics.update(
            {
                "reward/routing": rewards.mean(),
                "router/entropy_norm": (h * keep).sum() / n_keep,
                "router/load_mse_norm": (m * keep).sum() / n_keep,
                "router/load_mse": (stats["m_raw"] * keep).sum() / n_keep,
                "router/load_mse_norm_per_module": (stats["m_norm_per_module"] * counted).sum(-1) / n_counted,
                "router/utilisation": (stats["utilisation"] * counted[..., None]).sum(1) / n_counted[:, None],
            }
        )
        return rewards.float(), {k: v.detach() for k, v in metrics.items()}

    def state_dict(self) -> dict:
        """JSON-serialisable: the kind and, for Relative, the history (window samples or EMA values)."""
        return {"kind": self.kind, "history": None if self.history is None else self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"routing rewarder state is for kind={state.get('kind')!r}; this rewarder is {self.kind!r}"
            )
        if self.history is not None:
            self.history.load_state_dict(state["history"])
