"""Rollout engine: prompts in, groups of G completions out, with everything the losses need recorded.

Knows nothing about losses or rewards. For each prompt it generates G completions under a routing policy (MoE-GRPO:
multinomial expert sampling and greedy tokens, so all exploration comes from the experts), records the routing
trace and each picked token's log-prob. The trainer takes the behaviour log-probs from its first update's own
forward (``objective.py``: first ratios exactly 1); evaluation and tests may ask ``generate_rollout`` for a
separate old-log-prob forward (``old_routing``). Joining and filtering batches (DAPO's refill) is ``batching.py``.

"The policy we score is the policy we sampled": the token and routing distributions a rollout draws from are one
``Sampling`` (token temperature and suppressed tokens, routing temperature, set log-probability) and one
``ExpertMask`` (router guidance), stored on the ``Rollout``. Generation applies them (``TokenDistribution`` is
``generate``'s last logits processor; ``route`` samples experts from the tempered, masked router softmax), and
``policy_forward`` reads them from the batch it scores, so the old-log-prob forward and every training forward
compute log-probs of exactly the distributions that acted.

Vision-language models: the "tokenizer" passed around may be a processor (``expertrl.vlm``). ``encode_prompts`` is
the one place that tells them apart; a multimodal batch carries its vision kwargs (``mm``: pixel values, grids,
``mm_token_type_ids``) into ``generate`` (with the vision special tokens suppressed) and into every replayed forward
(with ``position_ids=None``: M-RoPE positions are 3-D, the model recomputes them as ``generate`` did).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from expertrl.decoding import (
    TokenDistribution,
    decoding_kwargs,
    is_processor,
    rollout_cache,
    suppressed_tokens,
    text_tokenizer,
)
from expertrl.mm import VISION_KWARGS
from expertrl.moe.adapters import find_routers, native_precision
from expertrl.moe.capture import ExpertCapture, capture_experts
from expertrl.moe.gumbel import RouteSeeds
from expertrl.moe.hooks import AllowedFn, RoutingRecorder, route
from expertrl.moe.policies import Multinomial, NoisyTopK, TopK
from expertrl.ops import pad_along
from expertrl.policy import distinct_prompts, policy_forward, position_ids_from_mask, with_old_policy
from expertrl.types import GREEDY, UNROUTED, ExpertMask, Rollout, RoutingTrace, Sampling
from expertrl.vlm import encode_mm_batch


def encode_prompts(
    tokenizer_or_processor, items: list[dict], group_size: int = 1
) -> tuple[Tensor, Tensor, dict | None]:
    """Left-padded prompts of ``items``, each repeated ``group_size`` times (groups contiguous).

    Returns:
        input_ids, attention_mask: (B, P) with B = len(items) * G (CPU).
        mm: with a processor, the vision kwargs (``mm_token_type_ids`` (B, P), and ``pixel_values`` +
            ``image_grid_thw`` / ``pixel_values_videos`` + ``video_grid_thw`` as the items have them; see
            ``vlm.encode_mm_batch``); None with a text tokenizer.
    """
    if is_processor(tokenizer_or_processor):
        enc = encode_mm_batch(tokenizer_or_processor, items, group_size=group_size)
        return enc["input_ids"], enc["attention_mask"], {k: enc[k] for k in VISION_KWARGS if k in enc}
    media = [i for i, it in enumerate(items) if "images" in it or "video" in it]
    if media:
        raise ValueError(
            f"items[{media[0]}] has images or a video but the model has a text tokenizer; a multimodal task "
            "(task.name=mm:<name>) needs a vision-language model (model.family=qwen3_vl_moe, or model.path to a "
            "Qwen3-VL-MoE checkpoint)"
        )
    prompts = [it["prompt"] for it in items for _ in range(group_size)]
    enc = tokenizer_or_processor(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    return enc["input_ids"], enc["attention_mask"], None


def mm_to(mm: dict | None, device) -> dict | None:
    """The vision kwargs ``mm`` on ``device`` (None stays None)."""
    return None if mm is None else {k: v.to(device) for k, v in mm.items()}


def completion_mask(completion: Tensor, eos_token_id: int) -> Tensor:
    """(B, C) float mask: 1 up to and including the first EOS, 0 after (generate pads finished rows)."""
    is_eos = completion == eos_token_id  # (B, C)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # (B, C) strictly after the first EOS
    return (~after_eos).float()


class Guide(Protocol):
    """Router guidance as the rollout sees it: token groups, each with its allowed experts per MoE layer.

    Attributes:
        allowed: (L, G, E) bool allowed experts per MoE layer and group.
        in_loss: the training forwards use the same mask (METHODS ambiguity 10; False masks sampling only).
    """

    allowed: Tensor
    in_loss: bool

    def for_generation(self, prompt_ids: Tensor, prompt_mask: Tensor) -> AllowedFn | None:
        """The mask of one ``generate`` call over these (B, P) prompts (prefill, then one call per decode step)."""

    def groups(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        """(B, S) group label of every position of prompt + completion (-1 = padding)."""


@torch.no_grad()
def generate_rollout(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    *,
    group_size: int,
    max_new_tokens: int,
    policy: TopK | Multinomial | NoisyTopK,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    guide: Guide | None = None,
    old_routing: str | None = "rollout",
    keep_probs: bool = False,
    routes: str = "full",
    share_prompts: bool = True,
    route_seeds: Tensor | None = None,
    prompt_route_seeds: Tensor | None = None,
) -> Rollout:
    """Generate ``group_size`` completions for each item (groups are contiguous) and record the behaviour policy.

    Args:
        tokenizer: a tokenizer, or a VLM's processor (``encode_prompts``).
        items: task items with a ``prompt`` string (and ``images`` or ``video`` for a VLM); each is repeated G times.
        policy: routing policy of the rollout (its randomness draws from ``generator``).
        sampling: the token distribution (greedy for MoE-GRPO, or a temperature), the routing temperature experts
            are sampled at and the set log-probability; stored on the rollout (a VLM's vision special tokens are
            added to ``suppress_tokens``) and read by every forward that scores it.
        old_routing: ``rollout`` runs the old-log-prob forward replaying the generation routes (``old_*`` fields set);
            ``live`` routes that forward with live top-K and keeps *its* routes as the batch's routing; None runs no
            old forward (the trainer's path: its first update's forward is the old policy, ``objective.py``).
        guide: router guidance (``Guide``): the per-token expert mask of generation and, if it applies in the loss,
            of every forward that scores the rollout (``Rollout.expert_mask``).
        keep_probs: keep routing probabilities (L, B, S, E) as ``rollout.route_probs``: the old forward's if one runs,
            else those generation sampled with (the last position, never routed, is 0). Routing rewards and
            evaluation's routing statistics read them.
        routes: what the caller reads of generation's routing trace: ``full`` (expert ids and set log-probs),
            ``experts`` (ids only; set log-probs 0, not computed) or ``none`` (nothing: ``rollout.routing`` is then an
            empty L = 0 trace). Top-K routing without an expert mask or kept probabilities then runs the native
            routers, with a capture hook (``experts``) or without any (``none``); other policies always route with
            ``route``.
        share_prompts: on those native paths, and for sampled routes whose prompt seeds are shared
            (``prompt_route_seeds``), prefill each distinct prompt once (``_shared_prefill``). The prefill is one more
            forward where prompts repeat: pass False where the ranks of a sharded model, which must run the same
            forwards, have different prompts (``collect``).
        route_seeds: (B,) int64 routing seeds of the rows (``gumbel.row_seeds``, B = len(items) * G): a stochastic
            policy then draws from counter-based noise per (row seed, layer, position) instead of ``generator``
            (``gumbel.RouteSeeds``), the same noise as the vLLM engine's.
        prompt_route_seeds: (B,) int64 seeds of the prompt positions but the last (None = ``route_seeds``); one seed
            per group gives the group's rows the same prompt routes (``routing.prompt_routes=group``).
    """
    assert old_routing in ("rollout", "live", None), old_routing
    assert routes in ("full", "experts", "none"), routes
    assert routes != "none" or old_routing != "rollout", "replaying generation's routes needs them recorded"
    device = next(model.parameters()).device
    prompt_ids, prompt_mask, mm = encode_prompts(tokenizer, items, group_size)
    prompt_ids, prompt_mask, mm = prompt_ids.to(device), prompt_mask.to(device), mm_to(mm, device)  # (B, P)
    B, P = prompt_ids.shape
    suppress = suppressed_tokens(model, mm)
    if suppress:
        sampling = replace(sampling, suppress_tokens=tuple(sorted({*sampling.suppress_tokens, *suppress})))
    tokens = TokenDistribution(sampling, record=True)
    allowed = guide.for_generation(prompt_ids, prompt_mask) if guide is not None else None
    keep_generation_probs = keep_probs and old_routing is None
    keyed = route_seeds is not None and policy.stochastic
    assert prompt_route_seeds is None or route_seeds is not None, "prompt_route_seeds needs route_seeds"
    if route_seeds is not None:  # (B,) on the model's device, where the noise is hashed and the prompts indexed
        assert route_seeds.shape == (B,), (route_seeds.shape, B)
        assert prompt_route_seeds is None or prompt_route_seeds.shape == (B,), prompt_route_seeds.shape
        route_seeds = route_seeds.to(device)
        prompt_route_seeds = None if prompt_route_seeds is None else prompt_route_seeds.to(device)
    # the native routers suffice: top-K, no mask, nothing but ids kept, and routers computing in route's precision
    native = isinstance(policy, TopK) and allowed is None and not keep_generation_probs and native_precision(model)
    # sampled routes whose prompt draws are shared by rows (one seed per group) route those rows' prompts alike
    shared_draws = keyed and prompt_route_seeds is not None and allowed is None and not keep_generation_probs
    set_kind = sampling.set_logprob if routes == "full" else None  # set log-probs only where the caller reads them
    cache = rollout_cache(model, P + max_new_tokens)
    start, prefix = 0, None  # the first prompt column generate computes; a shared prefill's routes
    if share_prompts and (native and routes != "full" or shared_draws) and mm is None and cache is not None and P > 1:
        record = _prefill_recorder(
            model, policy, prompt_mask, temperature=sampling.routing_temperature, set_kind=set_kind, native=native,
            routes=routes, seeds=prompt_route_seeds,
        )  # fmt: skip
        key = prompt_route_seeds[:, None] if shared_draws else None
        start, prefix = _shared_prefill(model, prompt_ids, prompt_mask, cache, record, key=key)
    if route_seeds is not None:
        generator = RouteSeeds(route_seeds, prompt_mask, prompt_seeds=prompt_route_seeds, start=start)
    if native and routes == "none":
        recorder = contextlib.nullcontext(None)  # nobody reads the trace: plain generate
    elif native and routes == "experts":
        recorder = capture_experts(model, find_routers(model, allow_dense=True))  # ids only, from a hook
    else:
        recorder = route(
            model, policy, temperature=sampling.routing_temperature, allowed=allowed, generator=generator,
            set_logprob=set_kind, keep_probs=keep_generation_probs,
        )  # fmt: skip
    with recorder as rec:
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            past_key_values=cache,
            **decoding_kwargs(tokenizer, max_new_tokens=max_new_tokens, sampling=sampling, processor=tokens),
            **(mm or {}),
        )  # (B, S)
    trace = _generation_trace(rec, prefix, sequences)  # (L, B, S, K)
    rollout = assemble_rollout(
        tokenizer, items, group_size, sequences, prompt_mask, trace, sampling, guide,
        sample_logp=tokens.sample_logp(sequences), mm=mm,
    )  # fmt: skip
    if old_routing is None:
        if not keep_generation_probs or not rec.sites:
            return rollout
        return replace(rollout, route_probs=pad_along(rec.probs(B), 2, 0, 1, 0.0))  # (L, B, S, E)
    old = policy_forward(model, rollout, trace if old_routing == "rollout" else None, keep_probs=keep_probs)
    return replace(with_old_policy(rollout, old), route_probs=old.probs)


def assemble_rollout(
    tokenizer,
    items: list[dict],
    group_size: int,
    sequences: Tensor,
    prompt_mask: Tensor,
    trace: RoutingTrace,
    sampling: Sampling,
    guide: Guide | None,
    *,
    sample_logp: Tensor,
    mm: dict | None = None,
) -> Rollout:
    """A rollout engine's output as a ``Rollout`` (shared by the hf and vLLM engines): completion mask up to and
    including the first EOS, attention mask, the guidance mask when it applies in the loss, decoded completions.

    Args:
        sequences: (B, S) left-padded prompts (width P = ``prompt_mask.shape[1]``) then right-padded completions.
        trace: (L, B, S, K) routes, ``UNROUTED`` where none was used.
        sample_logp: (B, C) the engine's log-prob of each generated token.
    """
    P = prompt_mask.shape[1]
    completion = sequences[:, P:]  # (B, C)
    tok = text_tokenizer(tokenizer)
    mask = completion_mask(completion, tok.eos_token_id)  # (B, C)
    attention_mask = torch.cat([prompt_mask.to(mask.device), mask.long()], dim=1)  # pads after EOS are not attended
    expert_mask = None
    if guide is not None and guide.in_loss:  # METHODS ambiguity 10: the same masked softmax in every forward
        allowed = guide.allowed.to(sequences.device)
        expert_mask = ExpertMask(allowed, guide.groups(sequences, attention_mask, P))
    texts = [tok.decode(row[: int(m.sum().item())], skip_special_tokens=True) for row, m in zip(completion, mask)]
    return Rollout(
        input_ids=sequences,
        attention_mask=attention_mask,
        prompt_width=P,
        mask=mask,
        routing=trace,
        group_size=group_size,
        completions=texts,
        items=[it for it in items for _ in range(group_size)],
        sampling=sampling,
        expert_mask=expert_mask,
        sample_logp=sample_logp,
        mm_inputs=mm,
    )


def _shared_prefill(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cache: DynamicCache,
    record: Callable[[Tensor], AbstractContextManager] | None,
    *,
    key: Tensor | None = None,
) -> tuple[int, tuple[Tensor, Tensor] | None]:
    """Prefill ``cache`` with the first P-1 prompt positions, computing each distinct prompt once and copying its keys
    and values to every row of it; ``generate`` then starts at position P-1 on every row. Rows share a prompt when
    they route it alike: top-K routing is deterministic, and sampled routes drawn from one seed (``key``: (B, X) the
    seeds, part of what makes prompts distinct) on the same states are the same draw.

    Args:
        record: ``record(rows)`` a context manager around the prefill of the distinct ``rows`` whose value has
            ``trace(U)`` (``capture_experts`` or ``route``), or None to record nothing.
    Returns:
        The first prompt column ``generate`` computes (P-1, or 0 if no two rows share a prompt and nothing was
        prefilled), and the prefill's (L, B, P-1, K) expert ids and (L, B, P-1) set log-probs if ``record``. The keys
        and values equal the per-row prefill's up to float rounding.
    """
    B, P = prompt_ids.shape
    rows, inverse = distinct_prompts(prompt_ids, prompt_mask, P - 1, key=key)  # the positions prefilled here
    if len(rows) == B:
        return 0, None
    positions = position_ids_from_mask(prompt_mask)
    with contextlib.nullcontext(None) if record is None else record(rows) as rec:
        model(
            input_ids=prompt_ids[rows, : P - 1], attention_mask=prompt_mask[rows, : P - 1],
            position_ids=positions[rows, : P - 1], past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
    cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...): every row's copy of its prompt
    if rec is None:
        return P - 1, None
    trace = rec.trace(len(rows))
    return P - 1, (trace.experts.index_select(1, inverse), trace.set_logp.index_select(1, inverse))


def _prefill_recorder(
    model: nn.Module,
    policy: TopK | Multinomial | NoisyTopK,
    prompt_mask: Tensor,
    *,
    temperature: float,
    set_kind: str | None,
    native: bool,
    routes: str,
    seeds: Tensor | None,
) -> Callable[[Tensor], AbstractContextManager] | None:
    """``_shared_prefill``'s ``record``: nothing (native routers, no trace read), a capture hook (native routers, ids
    read), or ``route`` drawing the distinct rows' prompt routes with their prompt ``seeds`` ((B,), one per group)."""
    if native:
        sites = find_routers(model, allow_dense=True)
        return (lambda rows: capture_experts(model, sites)) if routes == "experts" and sites else None
    P = prompt_mask.shape[1]

    def record(rows: Tensor) -> AbstractContextManager:
        return route(
            model, policy, temperature=temperature, set_logprob=set_kind,
            generator=RouteSeeds(seeds[rows], prompt_mask[rows, : P - 1], prompt_seeds=seeds[rows]),
        )  # fmt: skip

    return record


def _generation_trace(
    rec: RoutingRecorder | ExpertCapture | None, prefix: tuple[Tensor, Tensor] | None, sequences: Tensor
) -> RoutingTrace:
    """The (L, B, S, K) routes of ``generate``'s (B, S) ``sequences``: the shared prefill's (``prefix``) then the
    recorder's own (``rec``: None or no router sites = an empty L = 0 trace); the last position, generated but never
    fed back, is ``UNROUTED``."""
    B, S = sequences.shape
    # (L, B, S-1, K): the last token is generated but never fed back
    trace = rec.trace(B) if rec is not None and rec.sites else RoutingTrace.empty(B, S - 1, sequences.device)
    if prefix is not None and trace.experts.shape[0]:  # the shared prefill's routes, then generate's own
        experts = torch.cat([prefix[0], trace.experts], dim=2)  # (L, B, S-1, K)
        trace = replace(trace, experts=experts, set_logp=torch.cat([prefix[1], trace.set_logp], dim=2))
    assert trace.experts.shape[2] == S - 1, (trace.experts.shape, S)
    return RoutingTrace(
        experts=pad_along(trace.experts, 2, 0, 1, UNROUTED),  # (L, B, S, K)
        set_logp=pad_along(trace.set_logp, 2, 0, 1, 0.0),  # (L, B, S)
        layers=trace.layers,
        num_experts=trace.num_experts,
    )
