"""Scoring a rollout batch: one forward under exactly the distributions the batch was sampled from.

``policy_forward(model, batch, routes)`` reads the token distribution (``Sampling``: temperature, suppressed tokens),
the routing temperature and set log-probability, and the expert mask (``ExpertMask``) from the batch itself, so the
old-log-prob forward and every training forward compute log-probs of the policy that acted: token log-probs (B, C),
the log-prob of each replayed expert set (L, B, S) and the untempered router log-probs of the old-activated experts
(L, B, S, K). ``with_old_policy`` makes such a forward the batch's behaviour policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from transformers import DynamicCache

from expertrl.mm import mm_forward_kwargs
from expertrl.moe.guidance import GuidanceMask
from expertrl.moe.hooks import AllowedFn, route
from expertrl.moe.policies import Replay, TopK, replay_policy_for
from expertrl.moe.recompute import checkpointing_layers
from expertrl.ops import linear_token_logp
from expertrl.types import ExpertMask, Rollout, RoutingTrace, Sampling


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ForwardOut(NamedTuple):
    """What one policy forward produces.

    Attributes:
        logp: (B, C) float32 log-prob of each completion token under the batch's token distribution.
        set_logp: (L, B, S) log-prob of each replayed expert set under the batch's routing distribution
            (differentiable; Gate-GRPO's g_θ).
        router_logp: (L, B, S, K) detached log-prob, under the untempered masked router softmax, of the old-activated
            experts: the replayed ones, or the ``score`` trace's when the forward routes live (RSPO's router shift).
        probs: (L, B, S, E) live routing probabilities if ``keep_probs`` else None.
        routing: the routes this forward used (the replayed trace, or the live top-K choice).
        logits: (L, B, S, E) raw router logits if ``keep_logits`` else None.
    """

    logp: Tensor
    set_logp: Tensor
    router_logp: Tensor
    probs: Tensor | None
    routing: RoutingTrace
    logits: Tensor | None = None


def output_head(model: nn.Module) -> nn.Linear:
    """The LM head of ``model`` (through a DDP wrapper and PEFT's); it must be a plain ``nn.Linear``."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    head = inner.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"the LM head of {type(inner).__name__} is a {type(head).__name__}, not an nn.Linear: token log-probs are "
            "computed from its weight in chunks; leave lm_head out of model.adapter.targets"
        )
    return head


@contextmanager
def _patched_head(model: nn.Module, forward) -> Iterator[nn.Linear]:
    """The LM head's ``forward`` replaced on the instance inside the block (as ``route`` patches routers), restored on
    exit, also on error."""
    head = output_head(model)
    previous = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield head
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


@contextmanager
def token_logp_head(model: nn.Module, tokens: Tensor, sampling: Sampling) -> Iterator[None]:
    """Inside the block the LM head returns, in place of logits, the log-prob of ``tokens`` under ``sampling``'s token
    distribution (``ops.linear_token_logp``): no (B, C, V) logits are ever made, forward or backward.

    Computing inside the head's own call keeps DDP, FSDP2 (which gathers the weight for that call) and PEFT wrappers
    working unchanged.

    Args:
        tokens: (B, C) the completion tokens; the model is called with ``logits_to_keep=C + 1``, so the head sees the
            hidden states of positions P-1 .. S-1 and position s predicts token s+1 (the last predicts nothing).
    """
    head = output_head(model)

    def forward(hidden: Tensor) -> Tensor:  # (B, C+1, H) -> (B, C)
        return head_token_logp(head, hidden[:, :-1], tokens, sampling)

    with _patched_head(model, forward):
        yield


def head_token_logp(head: nn.Linear, hidden: Tensor, tokens: Tensor, sampling: Sampling) -> Tensor:
    """(B, T, H) hidden states -> (B, T) log-probs of ``tokens`` under ``sampling``'s token distribution."""
    return linear_token_logp(
        hidden, head.weight, tokens, bias=head.bias, temperature=sampling.score_temperature,
        suppress=sampling.suppress_tokens,
    )  # fmt: skip


def mask_for_sequences(expert_mask: ExpertMask | None) -> AllowedFn | None:
    """The ``route(allowed=...)`` callable of one forward over the batch whose positions ``expert_mask`` labels."""
    if expert_mask is None:
        return None
    return GuidanceMask(expert_mask.allowed.to(expert_mask.groups.device), expert_mask.groups)


def policy_forward(
    model: nn.Module,
    batch: Rollout,
    routes: RoutingTrace | None,
    *,
    keep_probs: bool = False,
    score: RoutingTrace | None = None,
    keep_logits: bool = False,
    share_prompts: bool = False,
) -> ForwardOut:
    """Forward over a rollout batch's prompt + completion under the distributions the batch was sampled from.

    Token log-probs use ``batch.sampling``'s token distribution, expert-set log-probs its routing temperature and
    set definition, and the router sees ``batch.expert_mask``: the caller cannot score another policy than the one
    that acted.

    Args:
        batch: the rollout (or a micro-batch of it).
        routes: the trace to replay (MoE-GRPO / R3 / R2), or None to route live with deterministic top-K.
        keep_probs: also return the routing probabilities (L, B, S, E).
        score: with live routing, a trace whose experts' live router log-probs become ``router_logp`` (RSPO's router
            shift of the old-activated experts).
        keep_logits: also return the raw router logits (L, B, S, E) (router z-loss).
        share_prompts: rows with the same prompt and the same prompt routes (a group's G completions under
            deterministic routing) share one computation of it (``shared_prompt_forward``).
    """
    return forward_sequences(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.prompt_width,
        routes,
        sampling=batch.sampling,
        expert_mask=batch.expert_mask,
        mm=batch.mm_inputs,
        keep_probs=keep_probs,
        score=score,
        keep_logits=keep_logits,
        share_prompts=share_prompts,
    )


def forward_sequences(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    routes: RoutingTrace | None,
    *,
    sampling: Sampling,
    expert_mask: ExpertMask | None = None,
    mm: dict | None = None,
    keep_probs: bool = False,
    score: RoutingTrace | None = None,
    keep_logits: bool = False,
    share_prompts: bool = False,
) -> ForwardOut:
    """``policy_forward`` on loose tensors (evaluation's routing pass, which has no rollout).

    Args:
        mm: the prompts' vision kwargs (``Rollout.mm_inputs``; ``mm_token_type_ids`` (B, P)) for a VLM: passed with
            ``mm_token_type_ids`` extended to S and ``position_ids=None`` (the model recomputes M-RoPE positions,
            exactly as ``generate`` did).
        share_prompts: compute each distinct prompt once (``shared_prompt_forward``); text models, one process. Not
            with grad under activation checkpointing: a checkpointed layer drops the cache the prompt's keys and
            values would be shared through (``moe.recompute``).
    """
    B, S = input_ids.shape
    C = S - prompt_width
    checkpointed = torch.is_grad_enabled() and bool(checkpointing_layers(model))
    if share_prompts and mm is None and expert_mask is None and not checkpointed and prompt_width > 1:
        rows, inverse = distinct_prompts(input_ids, attention_mask, prompt_width - 1, routes, score)
        if len(rows) < B:  # some rows share a prompt
            return shared_prompt_forward(
                model, input_ids, attention_mask, prompt_width, routes, rows, inverse, sampling=sampling,
                keep_probs=keep_probs, score=score, keep_logits=keep_logits,
            )  # fmt: skip
    policy = TopK() if routes is None else replay_policy_for(routes)
    score_experts = None if score is None else score.experts.flatten(1, 2)  # (L, B*S, K)
    if mm is None:
        inputs = {"position_ids": position_ids_from_mask(attention_mask)}
    else:
        inputs = {"position_ids": None, **mm_forward_kwargs(mm, S)}  # 3-D positions: vision tokens share them
    with (
        route(
            model,
            policy,
            temperature=sampling.routing_temperature,
            allowed=mask_for_sequences(expert_mask),
            keep_probs=keep_probs,
            keep_logits=keep_logits,
            score_experts=score_experts,
            set_logprob=sampling.set_logprob,
        ) as rec,
        token_logp_head(model, input_ids[:, prompt_width:], sampling),
    ):
        logp = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **inputs,
            logits_to_keep=C + 1,  # positions P-1 .. S-1; position s predicts token s+1
            use_cache=False,
        ).logits  # (B, C) token log-probs: the head computes them in chunks (token_logp_head)
    if not rec.sites:  # a model with no router (plain-LoRA baseline): L = 0 everywhere
        empty = RoutingTrace.empty(B, S, input_ids.device)
        nothing = torch.zeros(0, B, S, 1, device=input_ids.device)
        return ForwardOut(logp, empty.set_logp, nothing, nothing if keep_probs else None, empty,
                          nothing if keep_logits else None)  # fmt: skip
    probs = rec.probs(B) if keep_probs else None
    used = routes if routes is not None else rec.trace(B)
    router_logp = rec.scored(B) if score is not None else rec.router_logp(B)
    logits = rec.logits(B) if keep_logits else None
    return ForwardOut(logp, rec.set_logp(B), router_logp, probs, used, logits)


def distinct_prompts(
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    *traces: RoutingTrace | None,
    key: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows whose prompt computation is the same: equal prompt tokens and padding and, for each given trace, equal
    experts at the prompt positions (the routes a replay forces there, or the experts a score reads), and equal
    ``key`` rows ((B, X) int64, e.g. the prompt routing seeds that will draw the routes).

    Returns:
        rows: (U,) the first row of each distinct prompt, in row order.
        inverse: (B,) for each row, the position in ``rows`` of its prompt.
    """
    B, P = input_ids.shape[0], prompt_width
    parts = [input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype)]
    parts += [t.experts[:, :, :P].transpose(0, 1).reshape(B, -1).to(input_ids.dtype) for t in traces if t is not None]
    parts += [] if key is None else [key.to(input_ids.device, input_ids.dtype)]
    _, label = torch.unique(torch.cat(parts, dim=1), dim=0, return_inverse=True)  # (B,) one label per distinct key
    first = torch.full((B,), B, device=label.device).scatter_reduce(
        0, label, torch.arange(B, device=label.device), "amin"
    )
    rows = first[first < B].sort().values  # (U,) first row of each label, in row order
    inverse = torch.searchsorted(rows, first[label])  # (B,)
    return rows, inverse


def shared_prompt_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    routes: RoutingTrace | None,
    rows: Tensor,
    inverse: Tensor,
    *,
    sampling: Sampling,
    keep_probs: bool = False,
    score: RoutingTrace | None = None,
    keep_logits: bool = False,
) -> ForwardOut:
    """``forward_sequences`` computing each distinct prompt once: the G completions of a prompt sampled under
    deterministic routing see identical prompt states, so the prompt's first P-1 positions run once per distinct
    (prompt, prompt routes) (``distinct_prompts`` over those positions) and their keys and values are copied to every
    row that shares them; position P-1, which predicts completion token 0 and whose route is a completion route, and
    the completions then run on all rows against that cache. The copies are an ``index_select``, so every gradient
    reaching a shared prompt is the sum of its rows' gradients, as in the forward over every row; values differ from
    it by float rounding only (``tests/test_shared_prompts.py``). Under sampled routes (MoE-GRPO) the rows share a
    prompt only where they share its routes: a group's rows with ``routing.prompt_routes=group``, none with ``row``.
    """
    B, S = input_ids.shape
    P, C, U = prompt_width, S - prompt_width, len(rows)
    positions = position_ids_from_mask(attention_mask)  # (B, S)
    kwargs = dict(temperature=sampling.routing_temperature, keep_probs=keep_probs, keep_logits=keep_logits,
                  set_logprob=sampling.set_logprob)  # fmt: skip

    def policy(span: slice, sel: Tensor | None):  # the routes of one of the two forwards
        if routes is None:
            return TopK()
        part = routes.experts[:, :, span] if sel is None else routes.experts[:, sel, span]
        return Replay(part.flatten(1, 2))

    def scored(span: slice, sel: Tensor | None) -> Tensor | None:
        if score is None:
            return None
        return (score.experts[:, :, span] if sel is None else score.experts[:, sel, span]).flatten(1, 2)

    cache = DynamicCache(config=model.config)
    prompt = slice(0, P - 1)  # position P-1 predicts completion token 0: its route is a completion route, per row
    with (
        route(model, policy(prompt, rows), score_experts=scored(prompt, rows), **kwargs) as first,
        _patched_head(model, lambda hidden: hidden),  # no logits: nothing is predicted from the shared positions
    ):
        model(
            input_ids=input_ids[rows, : P - 1], attention_mask=attention_mask[rows, : P - 1],
            position_ids=positions[rows, : P - 1], past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
    for layer in cache.layers:  # every row's copy of its prompt's keys and values (gradients add up over copies)
        layer.keys, layer.values = layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse)
    completion = slice(P - 1, S)
    with (
        route(model, policy(completion, None), score_experts=scored(completion, None), **kwargs) as rest,
        token_logp_head(model, input_ids[:, P:], sampling),
    ):
        logp = model(
            input_ids=input_ids[:, P - 1 :], attention_mask=attention_mask, position_ids=positions[:, P - 1 :],
            past_key_values=cache, use_cache=True, logits_to_keep=C + 1,
        ).logits  # fmt: skip  # (B, C): positions P-1 .. S-2 predict tokens P .. S-1; S-1 predicts nothing
    if not first.sites:  # no router (plain-LoRA baseline)
        empty = RoutingTrace.empty(B, S, input_ids.device)
        nothing = torch.zeros(0, B, S, 1, device=input_ids.device)
        return ForwardOut(logp, empty.set_logp, nothing, nothing if keep_probs else None, empty,
                          nothing if keep_logits else None)  # fmt: skip

    def joined(get) -> Tensor:  # (L, U, P-1, ...) and (L, B, C+1, ...) -> (L, B, S, ...)
        return torch.cat([get(first, U).index_select(1, inverse), get(rest, B)], dim=2)

    used = routes
    if routes is None:
        experts = joined(lambda rec, n: rec.trace(n).experts)
        set_logp = joined(lambda rec, n: rec.set_logp(n)).detach()
        used = RoutingTrace(experts, set_logp, tuple(site.layer for site in first.sites), first.num_experts)
    router_logp = joined(lambda rec, n: rec.scored(n) if score is not None else rec.router_logp(n))
    probs = joined(lambda rec, n: rec.probs(n)) if keep_probs else None
    logits = joined(lambda rec, n: rec.logits(n)) if keep_logits else None
    return ForwardOut(logp, joined(lambda rec, n: rec.set_logp(n)), router_logp, probs, used, logits)


def with_old_policy(batch: Rollout, old: ForwardOut) -> Rollout:
    """``batch`` carrying the forward ``old`` as its behaviour policy: token, set and router log-probs (detached), and
    its routes (the replayed ones, or its own live top-K under R2 / no replay)."""
    return replace(
        batch,
        routing=old.routing,
        old_logp=old.logp.detach(),
        old_set_logp=old.set_logp.detach(),
        old_router_logp=old.router_logp.detach(),
    )
