"""expertrl's routing inside a running vLLM engine: every MoE layer of every forward routes with the rollout's
distribution (top-K for R3, K of E sampled for MoE-GRPO), and the experts and set log-probs are recorded per request.

How it reaches the model (vLLM 0.32, V1 model runner, eager; the engine runs in this process):

* every MoE layer is a ``MoERunner`` (``model.moe_layers[l]``) whose router reads its ``custom_routing_function`` at
  call time (``CPURouter._compute_routing``): assigning a function replaces routing, ``None`` restores vLLM's own;
* the runner's ``_model_forward`` (called once per forward, inside the forward context) is wrapped so that during
  each forward we know which rows belong to which request and position: the batch order ``input_batch.req_ids``, the
  row offsets ``query_start_loc`` and the ``positions`` argument. Each request names its rollout row and seed in
  ``SamplingParams.extra_args["expertrl"]``; internal request ids carry a random suffix and are never parsed.

Sampling draws Gumbel-top-k noise that is a pure function of (request seed, layer, position, expert)
(``moe.gumbel``; the prompt's positions but its last use the request's prompt seed, which a group's requests share
under ``routing.prompt_routes=group``), so a request's routes do not depend on what it is batched with, chunked prefill
and recompute included. A position's route is recorded at the request's absolute position; the last generated token
is never fed through the model, so a request of ``n`` tokens has routes at positions ``0 .. n-2`` (the trainer's
convention).

On CUDA vLLM builds a fused top-K router without that attribute; ``install`` swaps in vLLM's ``CustomRoutingRouter``
around the same routing function (written from vLLM's source, not yet run on a GPU: ``tests/test_vllm_engine.py``'s
``gpu`` test), and refuses kernels that route inside themselves (``is_monolithic``). vLLM is imported only there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from expertrl.moe.gumbel import expert_weights, gumbel_noise, sample_without_replacement
from expertrl.moe.setprob import set_logprob
from expertrl.types import expert_id_dtype

EXTRA_KEY = "expertrl"
"""Key of ``SamplingParams.extra_args`` that carries a request's rollout row and routing seeds (``_Request``)."""


class _Request(NamedTuple):
    """A request's rollout row and routing seeds: positions before ``prompt_seed_until`` draw with ``prompt_seed``
    (under ``routing.prompt_routes=group`` the prompt's positions but its last, else none), the others with
    ``seed``."""

    row: int
    seed: int
    prompt_seed: int
    prompt_seed_until: int


@dataclass
class _Call:
    """The routing settings of one ``generate`` call (every request of a rollout shares them)."""

    sample: bool
    temperature: float
    set_logprob: str
    masks: dict[int, Tensor] | None  # row -> (S_row, L, E) allowed experts by position, or None


@dataclass
class _Step:
    """One forward's row layout and the per-layer routing inputs and outputs of its N rows."""

    rows: np.ndarray  # (R,) rollout row of each request in batch order
    starts: np.ndarray  # (R + 1,) row offsets of the requests
    positions: Tensor  # (N,) int64 absolute position of every row
    noise: Tensor | None  # (N, L, E) Gumbel noise when sampling (engine device)
    mask: Tensor | None  # (N, L, E) allowed experts, or None (engine device)
    experts: Tensor  # (N, L, K) types.expert_id_dtype(E), filled layer by layer (engine device)
    set_logp: Tensor  # (N, L) float32 (engine device)


class EngineRouter:
    """Routes and records every MoE layer of a vLLM model runner (module docstring).

    Usage: ``install()`` once; ``begin(...)`` before each ``generate``; ``take(row, length)`` for each request after
    it; ``uninstall()`` restores vLLM's routing.
    """

    def __init__(self, runner) -> None:
        self.runner = runner
        self.layers = list(runner.model.moe_layers)
        self.num_layers = len(self.layers)
        self.top_k = int(self.layers[0].router.top_k)
        self.num_experts = int(self.layers[0].router.global_num_experts)
        self.call: _Call | None = None
        self.step: _Step | None = None
        self.forwards = 0  # forwards seen while a call was open (tests check that routing ran)
        self._requests: dict[str, _Request] = {}  # internal request id -> its row and seeds
        self._experts: dict[int, np.ndarray] = {}  # row -> (capacity, L, K) int8 (int16 above E = 128)
        self._set_logp: dict[int, np.ndarray] = {}  # row -> (capacity, L) float32
        self._inner_forward = None
        self._swapped: dict[int, object] = {}  # layer position -> vLLM's own router, while a CUDA swap is in place

    def install(self) -> EngineRouter:
        for pos, layer in enumerate(self.layers):
            if getattr(layer, "is_monolithic", False):
                raise ValueError(
                    f"vLLM's MoE kernel {type(layer.routed_experts.quant_method).__name__} routes inside the kernel, "
                    "so expertrl cannot route it; use rollout.engine=hf (or an unquantized model)"
                )
            router = layer.router
            if hasattr(router, "custom_routing_function"):  # CPURouter reads it at call time
                router.custom_routing_function = partial(self._route, pos)
            else:  # CUDA builds a fused top-K router: swap in vLLM's custom-function router (needs a GPU run to test)
                from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter

                self._swapped[pos] = router
                layer.router = CustomRoutingRouter(
                    top_k=router.top_k,
                    global_num_experts=router.global_num_experts,
                    custom_routing_function=partial(self._route, pos),
                    eplb_state=router.eplb_state,
                    renormalize=getattr(router, "renormalize", True),
                )
        self._inner_forward = self.runner._model_forward
        self.runner._model_forward = self._model_forward  # an instance attribute shadows the method
        return self

    def uninstall(self) -> None:
        for pos, layer in enumerate(self.layers):
            if pos in self._swapped:
                layer.router = self._swapped.pop(pos)
            else:
                layer.router.custom_routing_function = None
        if self._inner_forward is not None:
            self.runner._model_forward = self._inner_forward
            self._inner_forward = None

    def begin(
        self, *, sample: bool, temperature: float, set_logprob: str, masks: dict[int, Tensor] | None = None
    ) -> None:
        """Open a ``generate`` call: every request routes with these settings until the next ``begin``."""
        self.call = _Call(sample=sample, temperature=temperature, set_logprob=set_logprob, masks=masks)
        self._requests.clear()
        self._experts.clear()
        self._set_logp.clear()

    def take(self, row: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The recorded routes of rollout row ``row`` over a sequence of ``length`` tokens (prompt + completion).

        Returns:
            experts: (length - 1, L, K) int8 (int16 above E = 128) in draw order; set_logp: (length - 1, L) float32.
        """
        experts, set_logp = self._experts.pop(row), self._set_logp.pop(row)
        assert experts.shape[0] >= length - 1 and (experts[: length - 1] >= 0).all(), (row, length, experts.shape)
        return experts[: length - 1].copy(), set_logp[: length - 1].copy()

    # ------------------------------------------------------------------ per forward
    def _request(self, req_id: str) -> _Request:
        """A request's rollout row and routing seeds, read once from its SamplingParams."""
        found = self._requests.get(req_id)
        if found is None:
            params = self.runner.requests[req_id].sampling_params
            extra = (params.extra_args or {}).get(EXTRA_KEY)
            if extra is None:
                raise RuntimeError(f"request {req_id} has no extra_args[{EXTRA_KEY!r}]: submit it through VllmEngine")
            found = _Request(*(int(extra[k]) for k in _Request._fields))
            self._requests[req_id] = found
        return found

    def _model_forward(self, *args, **kwargs):
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if self.call is None or num_reqs == 0 or positions is None:  # vLLM's own dummy and warm-up forwards
            return self._inner_forward(*args, **kwargs)
        self.forwards += 1
        info = [self._request(rid) for rid in batch.req_ids[:num_reqs]]
        starts = self.runner.query_start_loc.np[: num_reqs + 1].astype(np.int64).copy()
        n = int(starts[-1])
        lengths = np.diff(starts)
        rows = np.array([r.row for r in info], dtype=np.int64)
        positions = positions[:n].to(torch.int64)  # (N,) on the engine's device
        device = positions.device
        noise = mask = None
        if self.call.sample:

            def per_token(field: str) -> Tensor:  # (N,) a request field repeated over the request's tokens
                values = np.repeat(np.array([getattr(r, field) for r in info], dtype=np.int64), lengths)
                return torch.from_numpy(values).to(device)

            shared = positions < per_token("prompt_seed_until")  # (N,) the prompt's positions but its last
            seeds = torch.where(shared, per_token("prompt_seed"), per_token("seed"))  # (N,)
            noise = gumbel_noise(seeds, positions, self.num_layers, self.num_experts)
        if self.call.masks is not None:
            cpu_positions = positions.cpu()
            parts = []
            for i, row in enumerate(rows):
                allowed = self.call.masks[int(row)]  # (S_row, L, E)
                parts.append(allowed[cpu_positions[starts[i] : starts[i + 1]]])
            mask = torch.cat(parts).to(device)  # (N, L, E)
        L, K = self.num_layers, self.top_k
        step = _Step(
            rows=rows,
            starts=starts,
            positions=positions.cpu(),
            noise=noise,
            mask=mask,
            experts=torch.full((n, L, K), -1, dtype=expert_id_dtype(self.num_experts), device=device),
            set_logp=torch.zeros(n, L, device=device),
        )
        self.step = step
        try:
            return self._inner_forward(*args, **kwargs)
        finally:
            self.step = None
            self._commit(step)

    def _commit(self, step: _Step) -> None:
        """Scatter one forward's rows into each request's buffers at their absolute positions."""
        experts, set_logp = step.experts.cpu().numpy(), step.set_logp.cpu().numpy()
        for i, row in enumerate(step.rows):
            a, b = int(step.starts[i]), int(step.starts[i + 1])
            if b <= a:
                continue
            first, last = int(step.positions[a]), int(step.positions[b - 1]) + 1
            buf = self._experts.get(int(row))
            if buf is None or buf.shape[0] < last:
                capacity = max(last, 2 * (0 if buf is None else buf.shape[0]), 64)
                grown = np.full((capacity, self.num_layers, self.top_k), -1, dtype=experts.dtype)
                grown_lp = np.zeros((capacity, self.num_layers), dtype=np.float32)
                if buf is not None:
                    grown[: buf.shape[0]] = buf
                    grown_lp[: buf.shape[0]] = self._set_logp[int(row)]
                self._experts[int(row)], self._set_logp[int(row)] = grown, grown_lp
            self._experts[int(row)][first:last] = experts[a:b]
            self._set_logp[int(row)][first:last] = set_logp[a:b]

    # ------------------------------------------------------------------ per MoE layer
    def _route(
        self, pos: int, hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool
    ) -> tuple[Tensor, Tensor]:
        """vLLM's routing-function contract: (N, E) router logits -> weights (N, K) and expert ids (N, K)."""
        step, call = self.step, self.call
        scores = gating_output.float()  # (N, E) float32 like moe.hooks
        if step is None or call is None:  # outside a generate call: plain top-K, vLLM's own routing
            experts = scores.topk(topk, dim=-1).indices
            return expert_weights(scores, experts, renormalize=renormalize), experts.to(torch.int32)
        n = step.experts.shape[0]
        if scores.shape[0] != n:  # a padded batch (CPU eager never pads): route the real rows, top-K the padding
            assert scores.shape[0] > n, (scores.shape, n)
            w, ids = self._route(pos, hidden_states[:n], gating_output[:n], topk, renormalize)
            pad = scores[n:].topk(topk, dim=-1).indices
            pad_w = expert_weights(scores[n:], pad, renormalize=renormalize)
            return torch.cat([w, pad_w]), torch.cat([ids, pad.to(torch.int32)])
        if step.mask is not None:
            scores = scores.masked_fill(~step.mask[:, pos], float("-inf"))  # disallowed experts: probability 0
        route_scores = scores / call.temperature if call.temperature != 1.0 else scores  # the routing distribution
        if call.sample:
            experts = sample_without_replacement(route_scores, topk, step.noise[:, pos])  # (N, K) draw order
        else:
            experts = route_scores.topk(topk, dim=-1).indices  # (N, K) descending, as policies.TopK
        step.experts[:, pos] = experts.to(step.experts.dtype)
        step.set_logp[:, pos] = set_logprob(call.set_logprob, route_scores, experts).float()
        return expert_weights(scores, experts, renormalize=renormalize), experts.to(torch.int32)
