"""Activation checkpointing inside ``route``: the backward recompute routes exactly as the forward did, records
nothing, and never draws a sampled route again.

transformers checkpoints each decoder layer (``GradientCheckpointingLayer``) once ``gradient_checkpointing_enable()``
has set its ``gradient_checkpointing`` flag: backward re-runs the layer's forward, routers included. Under ``route``
that recompute would (1) record every router call a second time, (2) draw new experts for a stochastic policy, read
a stateful guidance mask past its end, or (with data-dependent dispatch) save tensors of other shapes than the
forward did (verl's CheckpointError on FSDP2 + Qwen3-MoE), and (3) run after ``route`` has exited and put the native
routers back, so even a replay would route native top-K.

``checkpointed_layers(model, state)``, entered by ``route`` for its block, takes over every flagged layer: the
layer's ``forward`` becomes ``torch.utils.checkpoint.checkpoint(forward, use_reentrant=False, context_fn=...)``
whenever grad is enabled, in training *and* eval mode (the RL trainer's forwards run in eval mode, where transformers
would not checkpoint; non-reentrant, because the reentrant variant runs the forward without grad and the router's
side outputs, the set log-probs of Gate-GRPO and the probabilities of the load-balancing loss, would lose theirs).
HF's flag is cleared for the block, so a layer is never checkpointed twice. A cache passed to a checkpointed layer is
dropped (the recompute would write it twice), as transformers does. Each checkpointed call gets a ``Region``:

- in the forward, every router call inside the layer stores the experts it chose and the expert mask it used
  (``Recompute.remember``);
- in the recompute (backward), the route's router forwards are re-installed for its duration, and each router call
  takes its experts and mask from the region, in call order (``Recompute.replayed``), instead of asking the policy or
  the mask, and records nothing.

So replayed routes (MoE-GRPO's rollout routes, R2/R3, the scored old experts of live top-K) and sampled ones (SFT
with Multinomial or NoisyTopK, live ExpertChoice or Sinkhorn) are recomputed with exactly the experts the forward
used. A sigmoid router's native top-K (DeepSeek-V3 under ``TopK``) cannot be handed experts; it has no randomness,
so it is re-run and checked to choose the same ones (an error otherwise).

Pure ``torch``; ``route`` owns the router patches, this module only the layers and the regions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(eq=False)  # regions are told apart by identity
class Region:
    """What the router calls of one checkpointed layer call chose, per router position, in call order."""

    calls: dict[int, list[tuple[Tensor, Tensor | None]]] = field(default_factory=dict)
    cursor: dict[int, int] = field(default_factory=dict)


class _Enter(AbstractContextManager):
    """A context manager that can be entered again (a graph kept with ``retain_graph`` is recomputed each backward)."""

    def __init__(self, enter: Callable[[], None], leave: Callable[[], None]) -> None:
        self._enter, self._leave = enter, leave

    def __enter__(self):
        self._enter()
        return self

    def __exit__(self, *exc) -> None:
        self._leave()


@dataclass
class Recompute:
    """The checkpointing state of one ``route`` block.

    Attributes:
        install: a context manager factory that puts the block's router forwards on the routers (for a recompute
            that runs after the block has exited).
    """

    install: Callable[[], AbstractContextManager] | None = None
    _open: list[Region] = field(default_factory=list)  # regions whose forward is running (innermost last)
    _replaying: list[Region] = field(default_factory=list)  # regions being recomputed (innermost last)

    @property
    def replaying(self) -> bool:
        """A recompute is running: router calls take their experts and mask from ``replayed``."""
        return bool(self._replaying)

    def remember(self, pos: int, experts: Tensor, mask: Tensor | None) -> None:
        """Store a router call's choice in the innermost region whose forward is running (nothing outside one)."""
        if self._open:
            self._open[-1].calls.setdefault(pos, []).append((experts, mask))

    def replayed(self, pos: int) -> tuple[Tensor, Tensor | None]:
        """(experts, mask) of the forward's next call of router ``pos`` in the region being recomputed."""
        region = self._replaying[-1]
        i = region.cursor.get(pos, 0)
        calls = region.calls.get(pos, [])
        if i >= len(calls):
            raise RuntimeError(
                f"activation checkpointing: the recompute called router {pos} more often ({i + 1}) than the forward "
                f"did ({len(calls)}); the checkpointed layer must run the same router calls in backward"
            )
        region.cursor[pos] = i + 1
        return calls[i]

    def contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """``torch.utils.checkpoint``'s ``context_fn``: the forward and recompute contexts of one new region."""
        region = Region()
        installed: list[AbstractContextManager] = []

        def start_recompute() -> None:
            region.cursor.clear()
            self._replaying.append(region)
            if self.install is not None:
                installed.append(self.install())
                installed[-1].__enter__()

        def end_recompute() -> None:
            self._replaying.remove(region)
            if installed:
                installed.pop().__exit__(None, None, None)

        forward = _Enter(lambda: self._open.append(region), lambda: self._open.remove(region))
        return forward, _Enter(start_recompute, end_recompute)


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose activation checkpointing is on: transformers' ``GradientCheckpointingLayer``s
    (by class name: this layer imports no transformers) whose ``gradient_checkpointing`` flag
    ``model.gradient_checkpointing_enable()`` set. The flag it also sets on the base model is legacy and wraps nothing
    in transformers 5, so the base model is not checkpointed (that would nest every layer's checkpoint in another)."""
    return [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) is True
        and any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)
    ]


def _checkpointed(inner: Callable, state: Recompute) -> Callable:
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # generation, scoring without grad: nothing to recompute
            return inner(*args, **kwargs)
        for key in ("past_key_values", "layer_past"):
            if kwargs.get(key) is not None:
                kwargs[key] = None  # the recompute would write the cache a second time (transformers drops it too)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(inner, *args, use_reentrant=False, context_fn=state.contexts, **kwargs)

    return forward


@contextmanager
def checkpointed_layers(model: nn.Module, state: Recompute) -> Iterator[list[nn.Module]]:
    """Checkpoint every flagged layer of ``model`` with ``state``'s regions inside the block (module docstring);
    HF's own flag is cleared meanwhile. Yields the layers; restores their ``forward`` and flag on exit, also on error.
    """
    layers = checkpointing_layers(model)
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    try:
        for layer in layers:
            layer.forward = _checkpointed(layer.forward, state)
            layer.gradient_checkpointing = False
        yield layers
    finally:
        for layer, previous in saved:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
            layer.gradient_checkpointing = True
