"""Sampling K of E experts inside an inference engine: Gumbel-top-k with counter-based noise.

The hf engine draws experts with ``torch.multinomial`` from one ``torch.Generator`` whose state advances with every
call, so a draw depends on everything drawn before it. An inference engine batches requests as its scheduler likes
(prefills, chunked prefills and decode steps of different requests in one forward, preemption and recompute), so
there the noise must be a pure function of ``(request seed, layer, position, expert)``: ``counter_uniform`` hashes
those four integers with splitmix64, so a request's draws are the same whatever it is batched with, and two requests
with different seeds draw independently.

Gumbel-top-k: with ``G`` iid standard Gumbel noise, ``topk(s / T + G, K)`` is exactly K sequential draws without
replacement from ``softmax(s / T)`` (the Plackett-Luce model), and ``topk``'s descending order is the draw order.
So the engine samples the same distribution as ``policies.Multinomial`` over the same tempered, masked router
softmax, and ``setprob.set_logprob`` of the returned ids (in that order) is their probability.

The hf engine uses the same noise (``RouteSeeds``): a rollout row's routing seed derives from (run seed, step,
global row index), so sampled routes are the same whatever the number of processes the batch is split over, and the
hf and vLLM engines draw the same experts from the same router scores.

Pure functions of tensors (int64 wrap-around arithmetic for the hash, float64 for the noise); ``torch`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= _M64
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)
_LAYER = _signed(0x632BE59BD9B4E019)


def _shift_right(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 tensors (``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrap-around arithmetic): a bijection whose output bits look random."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def counter_uniform(seeds: Tensor, positions: Tensor, num_layers: int, num_experts: int) -> Tensor:
    """Uniform (0, 1) numbers, each a pure function of (seed, layer, position, expert).

    Args:
        seeds: (N,) int64 seed of each row's request.
        positions: (N,) int64 position of each row in its request's sequence.
        num_layers: L; layer l of the result is the l-th MoE layer.
        num_experts: E.
    Returns:
        (N, L, E) float64 in the open interval (0, 1).
    """
    # per layer: a big prefill (N tokens) then holds one layer's (N, E) int64 temporaries at a time, not L of them
    return torch.stack([layer_uniform(seeds, positions, layer, num_experts) for layer in range(num_layers)], dim=1)


def layer_uniform(seeds: Tensor, positions: Tensor, layer: int, num_experts: int) -> Tensor:
    """(N, E) float64 uniforms of MoE layer ``layer`` (``layers_uniform`` of one layer)."""
    return layers_uniform(seeds, positions, [layer], num_experts)[0]


def layers_uniform(seeds: Tensor, positions: Tensor, layers: Sequence[int], num_experts: int) -> Tensor:
    """Uniforms of several MoE layers at once: the one definition of the noise. Every element is the same integer hash
    whatever else is computed with it, so one call over all layers (a decode step's) equals per-layer calls bit for
    bit.

    Args:
        seeds: (N,) int64 seed of each row's request.
        positions: (N,) int64 position of each row in its request's sequence.
        layers: the MoE layers' indices (l = the l-th MoE layer).
        num_experts: E.
    Returns:
        (len(layers), N, E) float64 in the open interval (0, 1).
    """
    keys = torch.tensor([_signed(layer * _LAYER + 1) for layer in layers], dtype=torch.int64, device=seeds.device)
    row = mix64(mix64(seeds[None, :] ^ keys[:, None]) ^ positions[None, :])  # (L, N)
    experts = mix64(torch.arange(num_experts, dtype=torch.int64, device=seeds.device))  # (E,)
    z = mix64(row[:, :, None] ^ experts)  # (L, N, E)
    return (_shift_right(z, 11).double() + 0.5) * (1.0 / (1 << 53))  # 53 random bits, never 0 or 1


def row_seeds(base: int, rows: Tensor) -> Tensor:
    """(B,) int64 routing seeds of rollout rows ``rows`` (global indices) under the step's ``base`` seed."""
    return mix64(mix64(rows.to(torch.int64)) ^ _signed(base))


class RouteSeeds:
    """Counter-based routing noise of one ``generate`` call: row b draws its experts with the uniforms of
    (seed, layer, position, expert), position = the token's index in its own sequence (left padding does not count),
    seed = ``prompt_seeds[b]`` at the prompt's positions but its last, ``seeds[b]`` at the last prompt position (its
    route computes the state that predicts the first generated token: a completion route) and the generated ones.
    ``hooks.route`` asks ``uniform(layer, n)`` at every router call: the first call of a layer is the prefill of
    prompt columns ``start .. P-1`` (n = B * (P - start) tokens; columns before ``start`` were prefilled by another
    call, a shared prefill), each later one a decode step (n = B, the token just generated). One ``RouteSeeds`` serves
    one ``generate`` call. A decode step's uniforms are hashed for every layer at the first layer's call and read by
    the others (layers of different E each recompute them).

    Args:
        seeds: (B,) int64 (``row_seeds``).
        prompt_mask: (B, P) attention mask of the left-padded prompts.
        prompt_seeds: (B,) int64 seeds of the prompt positions but the last; None = ``seeds``. A group's G rows given
            one seed (``routing.prompt_routes=group``) draw the same routes there, since they route the same states.
        start: the first prompt column the prefill call routes.
    """

    def __init__(self, seeds: Tensor, prompt_mask: Tensor, prompt_seeds: Tensor | None = None, start: int = 0) -> None:
        self.seeds = seeds.to(device=prompt_mask.device, dtype=torch.int64)  # where the prompts are (the model's)
        self.prompt_seeds = self.seeds if prompt_seeds is None else prompt_seeds.to(self.seeds)
        self.lengths = prompt_mask.long().sum(-1)  # (B,) prompt tokens per row
        self.prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) pads: 0, never used
        assert 0 <= start < prompt_mask.shape[1], (start, prompt_mask.shape)
        assert self.prompt_seeds.shape == self.seeds.shape, (self.prompt_seeds.shape, self.seeds.shape)
        self.start = start
        self.calls: dict[int, int] = {}  # router calls so far, per layer
        self._step: tuple[int, dict[int, int], Tensor] | None = None  # the decode step's (call, layer -> row, uniforms)

    def uniform(self, layer: int, n_tokens: int, num_experts: int) -> Tensor:
        """(n_tokens, E) float64 uniforms of this router call (see the class docstring)."""
        call = self.calls.get(layer, 0)
        self.calls[layer] = call + 1
        B, P = self.prompt_positions.shape  # seeds, lengths and positions all live on the prompts' device
        if call == 0:  # the prefill
            width = P - self.start
            assert n_tokens == B * width, f"prefill of {n_tokens} tokens for {B} prompts of width {width}"
            shared = torch.arange(self.start, P, device=self.seeds.device) < P - 1  # (width,) prompt columns but last
            seeds = torch.where(shared, self.prompt_seeds[:, None], self.seeds[:, None]).reshape(-1)  # (B * width,)
            return layer_uniform(seeds, self.prompt_positions[:, self.start :].reshape(-1), layer, num_experts)
        # a decode step: every layer's uniforms in one call (the first layer to ask), then read per layer
        assert n_tokens == B, f"decode step of {n_tokens} tokens for {B} rows"
        step = self._step
        if step is None or step[0] != call or layer not in step[1] or step[2].shape[-1] != num_experts:
            layers = sorted(self.calls)  # every layer has routed its prefill by now
            uniforms = layers_uniform(self.seeds, self.lengths + (call - 1), layers, num_experts)  # (L, B, E)
            step = self._step = (call, {x: i for i, x in enumerate(layers)}, uniforms)
        return step[2][step[1][layer]]  # (B, E)


def gumbel_noise(seeds: Tensor, positions: Tensor, num_layers: int, num_experts: int) -> Tensor:
    """(N, L, E) float64 standard Gumbel noise, a pure function of (seed, layer, position, expert)."""
    return -torch.log(-torch.log(counter_uniform(seeds, positions, num_layers, num_experts)))


def sample_without_replacement(route_scores: Tensor, k: int, noise: Tensor) -> Tensor:
    """K experts per row drawn without replacement from ``softmax(route_scores)``, in draw order (Gumbel-top-k).

    Args:
        route_scores: (N, E) the routing distribution's scores (masked logits / T; masked experts -inf).
        k: K.
        noise: (N, E) float64 standard Gumbel noise (``gumbel_noise``).
    Returns:
        (N, K) int64 expert ids, column k = the k-th draw.
    """
    return (route_scores.double() + noise).topk(k, dim=-1).indices  # sorted: descending = draw order


def expert_weights(scores: Tensor, experts: Tensor, *, renormalize: bool) -> Tensor:
    """The mixing weights of the chosen experts: the *untempered* masked router softmax gathered at them, renormalised
    over the K chosen when the family does (``norm_topk_prob``), exactly as ``moe.hooks`` computes them.

    Args:
        scores: (N, E) masked router logits (float32), untempered.
        experts: (N, K) chosen expert ids.
    Returns:
        (N, K) float weights.
    """
    weights = torch.softmax(scores, dim=-1).gather(1, experts)  # (N, K)
    return weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights
