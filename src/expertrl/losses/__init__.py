"""Policy-loss registry: token losses chosen by name from config (STYLE.md §4).

A token loss maps ``(logp, old_logp, advantages, mask)`` plus keyword-only hyper-parameters to a per-token loss
``(B, T)`` and a flat dict of detached 0-d metric tensors. ``aggregate`` (``losses.aggregate``) turns the per-token
terms into the scalar to back-propagate. Bind hyper-parameters once at start-up with ``get_loss`` so that a
misspelled keyword fails there, not at step 500.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

PolicyLoss = Callable[..., tuple]
"""(logp (B,T), old_logp (B,T), advantages (B,) or (B,T), mask (B,T), **kwargs) -> (loss (B,T), metrics)."""

LOSSES: dict[str, PolicyLoss] = {}


def register_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator adding a token loss to ``LOSSES`` under ``name``; registering a name twice is a bug."""

    def add(fn: PolicyLoss) -> PolicyLoss:
        assert name not in LOSSES, f"loss {name!r} registered twice"
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str, **kwargs) -> functools.partial:
    """The loss ``name`` with its keyword-only hyper-parameters bound, checked now.

    Args:
        name: a key of ``LOSSES``.
        **kwargs: keyword-only parameters of that loss, e.g. ``eps_high=0.28``.
    Returns:
        ``functools.partial(LOSSES[name], **kwargs)``.
    Raises:
        ValueError: unknown ``name`` (lists the valid names), or a keyword the loss does not take (names it and
            lists the loss's keyword-only parameters).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    fn = LOSSES[name]
    params = inspect.signature(fn).parameters
    allowed = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"loss {name!r} got unknown keyword argument(s) {unknown}; its keyword-only parameters are {allowed}"
        )
    return functools.partial(fn, **kwargs)


# Import the loss modules so that their @register_loss decorators run.
from expertrl.losses import cispo, gmpo, grpo, gspo, sapo  # noqa: E402, F401
