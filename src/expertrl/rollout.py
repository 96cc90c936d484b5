"""Rollout engine: prompts in, groups of G completions out, with everything the losses need recorded.

Knows nothing about losses or rewards. For each prompt it generates G completions under a routing policy (MoE-GRPO:
multinomial expert sampling and greedy tokens, so all exploration comes from the experts), records the routing
trace, then recomputes the behaviour log-probs with one replayed forward so the old and new log-probs come from the
same code path (the first inner update then has ratio exactly 1).

Vision-language models: the "tokenizer" passed around may be a processor (``expertrl.vlm``). ``encode_prompts`` is
the one place that tells them apart; a multimodal batch carries its vision kwargs (``mm``: pixel values, grids,
``mm_token_type_ids``) into ``generate`` (with the vision special tokens suppressed) and into every replayed forward
(with ``position_ids=None``: M-RoPE positions are 3-D, the model recomputes them as ``generate`` did).
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from expertrl.moe.hooks import AllowedFn, route
from expertrl.moe.policies import Multinomial, NoisyTopK, TopK, replay_policy_for
from expertrl.ops import token_logp
from expertrl.types import UNROUTED, Rollout, RoutingTrace


def is_processor(tokenizer_or_processor) -> bool:
    """True for a multimodal processor (``transformers.ProcessorMixin``, e.g. ``vlm.build_tiny_vlm``'s), False for a
    tokenizer."""
    # Importing transformers.processing_utils costs ~4 s; a processor instance implies it is already imported.
    module = sys.modules.get("transformers.processing_utils")
    return module is not None and isinstance(tokenizer_or_processor, module.ProcessorMixin)


def text_tokenizer(tokenizer_or_processor):
    """The text tokenizer (pad/EOS ids, decoding): the processor's ``tokenizer``, or the tokenizer itself."""
    return tokenizer_or_processor.tokenizer if is_processor(tokenizer_or_processor) else tokenizer_or_processor


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
        from expertrl.vlm import VISION_KWARGS, encode_mm_batch

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


def mm_generate_kwargs(model: nn.Module, mm: dict | None) -> dict:
    """``generate``'s extra keyword arguments for a multimodal prompt batch: every vision kwarg, and the vision
    special tokens suppressed (a generated placeholder makes the replayed forward raise); {} for text."""
    if mm is None:
        return {}
    from expertrl.vlm import vision_special_ids

    return {**mm, "suppress_tokens": vision_special_ids(model)}


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask(completion: Tensor, eos_token_id: int) -> Tensor:
    """(B, C) float mask: 1 up to and including the first EOS, 0 after (generate pads finished rows)."""
    is_eos = completion == eos_token_id  # (B, C)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # (B, C) strictly after the first EOS
    return (~after_eos).float()


class Guide(Protocol):
    """Router guidance as the rollout sees it: a per-token expert mask for generation and for full forwards."""

    def for_generation(self, prompt_ids: Tensor, prompt_mask: Tensor) -> AllowedFn | None:
        """The mask of one ``generate`` call over these (B, P) prompts (prefill, then one call per decode step)."""

    def for_sequences(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> AllowedFn | None:
        """The mask of one forward over (B, S) prompt + completion; None = unmasked (guidance off in the loss)."""


class ForwardOut(NamedTuple):
    """What one policy forward produces.

    Attributes:
        logp: (B, C) float32 log-prob of each completion token.
        gate_logp: (L, B, S, K) live log-prob of the replayed experts, or of the ``score`` trace's experts when the
            forward routes live (differentiable).
        probs: (L, B, S, E) live routing probabilities if ``keep_probs`` else None.
        routing: the routes this forward used (the replayed trace, or the live top-K choice).
        logits: (L, B, S, E) raw router logits if ``keep_logits`` else None.
    """

    logp: Tensor
    gate_logp: Tensor
    probs: Tensor | None
    routing: RoutingTrace
    logits: Tensor | None = None


def policy_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    routing: RoutingTrace | None,
    *,
    keep_probs: bool = False,
    score: RoutingTrace | None = None,
    allowed: AllowedFn | None = None,
    keep_logits: bool = False,
    mm: dict | None = None,
) -> ForwardOut:
    """Forward over prompt + completion; log-probs of the completion tokens and of experts.

    Args:
        routing: the trace to replay (MoE-GRPO / R3 / R2), or None to route live with deterministic top-K.
        score: with live routing, a trace whose experts' live log-probs become ``gate_logp`` (RSPO's router shift
            of the old-activated experts).
        allowed: per-token allowed experts (router guidance); the same mask as the rollout's keeps g_theta, g_old and
            the expert weights on the distribution the routes were sampled from.
        keep_logits: also return the raw router logits (L, B, S, E) (router z-loss).
        mm: the prompts' vision kwargs (``Rollout.mm_inputs``; ``mm_token_type_ids`` (B, P)) for a VLM: passed with
            ``mm_token_type_ids`` extended to S and ``position_ids=None`` (the model recomputes M-RoPE positions,
            exactly as ``generate`` did).
    """
    B, S = input_ids.shape
    C = S - prompt_width
    policy = TopK() if routing is None else replay_policy_for(routing)
    score_experts = None if score is None else score.experts.flatten(1, 2)  # (L, B*S, K)
    if mm is None:
        inputs = {"position_ids": position_ids_from_mask(attention_mask)}
    else:
        from expertrl.vlm import mm_forward_kwargs

        inputs = {"position_ids": None, **mm_forward_kwargs(mm, S)}  # 3-D positions: vision tokens share them
    with route(
        model, policy, keep_probs=keep_probs, keep_logits=keep_logits, score_experts=score_experts, allowed=allowed
    ) as rec:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **inputs,
            logits_to_keep=C + 1,  # positions P-1 .. S-1; position s predicts token s+1
            use_cache=False,
        )
    logp = token_logp(out.logits[:, :-1], input_ids[:, prompt_width:])  # (B, C)
    if not rec.sites:  # a model with no router (plain-LoRA baseline): L = 0 everywhere
        empty = RoutingTrace.empty(B, S, input_ids.device)
        nothing = empty.logp
        return ForwardOut(logp, nothing, nothing if keep_probs else None, empty, nothing if keep_logits else None)
    probs = rec.probs(B) if keep_probs else None
    used = routing if routing is not None else rec.trace(B)
    gate_logp = rec.scored(B) if score is not None else rec.gate_logp(B)
    logits = rec.logits(B) if keep_logits else None
    return ForwardOut(logp, gate_logp, probs, used, logits)


def decoding_kwargs(tokenizer, *, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0) -> dict:
    """``generate`` keyword arguments of every expertrl decode: greedy or plain temperature sampling, nothing from
    the checkpoint's generation_config (top-p/top-k are switched off), the tokenizer's pad and EOS."""
    tokenizer = text_tokenizer(tokenizer)
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@torch.no_grad()
def generate_rollout(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    *,
    group_size: int,
    max_new_tokens: int,
    policy: TopK | Multinomial | NoisyTopK,
    routing_temperature: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    guide: Guide | None = None,
    old_routing: str = "rollout",
    keep_probs: bool = False,
) -> Rollout:
    """Generate ``group_size`` completions for each item (groups are contiguous) and record the behaviour policy.

    Args:
        tokenizer: a tokenizer, or a VLM's processor (``encode_prompts``).
        items: task items with a ``prompt`` string (and ``images`` or ``video`` for a VLM); each is repeated G times.
        policy: routing policy of the rollout (its randomness draws from ``generator``).
        do_sample, temperature: token decoding (MoE-GRPO: greedy).
        old_routing: ``rollout`` replays the generation routes in the old-log-prob forward and in training (R3,
            MoE-GRPO); ``live`` routes that forward with live top-K and keeps *its* routes as the batch's routing
            (R2 replays them later; without replay they are the old-activated experts of RSPO's router shift).
        guide: router guidance (``Guide``): the per-token expert mask of generation and, if it applies in the loss,
            of the old-log-prob forward.
        keep_probs: keep the old forward's routing probabilities (L, B, S, E) as ``rollout.route_probs`` (routing
            rewards read them).
    """
    assert old_routing in ("rollout", "live"), old_routing
    device = next(model.parameters()).device
    prompt_ids, prompt_mask, mm = encode_prompts(tokenizer, items, group_size)
    prompt_ids, prompt_mask, mm = prompt_ids.to(device), prompt_mask.to(device), mm_to(mm, device)  # (B, P)
    B, P = prompt_ids.shape
    allowed = guide.for_generation(prompt_ids, prompt_mask) if guide is not None else None
    with route(model, policy, temperature=routing_temperature, allowed=allowed, generator=generator) as rec:
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            **decoding_kwargs(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature),
            **mm_generate_kwargs(model, mm),
        )  # (B, S)
    S = sequences.shape[1]
    # (L, B, S-1, K): the last token is generated but never fed back
    trace = rec.trace(B) if rec.sites else RoutingTrace.empty(B, S - 1, sequences.device)
    S_rec = trace.experts.shape[2]
    assert S_rec == S - 1, (S_rec, S)
    trace = RoutingTrace(
        experts=_pad_to(trace.experts, 2, 0, 1, UNROUTED),  # (L, B, S, K)
        logp=_pad_to(trace.logp, 2, 0, 1, 0.0),
        layers=trace.layers,
        num_experts=trace.num_experts,
    )
    completion = sequences[:, P:]  # (B, C)
    tok = text_tokenizer(tokenizer)
    mask = completion_mask(completion, tok.eos_token_id)  # (B, C)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)  # (B, S) pads after EOS are not attended
    old = policy_forward(
        model,
        sequences,
        attention_mask,
        P,
        trace if old_routing == "rollout" else None,
        keep_probs=keep_probs,
        allowed=guide.for_sequences(sequences, attention_mask, P) if guide is not None else None,
        mm=mm,
    )
    texts = [tok.decode(row[: int(m.sum().item())], skip_special_tokens=True) for row, m in zip(completion, mask)]
    return Rollout(
        input_ids=sequences,
        attention_mask=attention_mask,
        prompt_width=P,
        mask=mask,
        old_logp=old.logp,
        routing=old.routing,
        old_gate_logp=old.gate_logp,
        group_size=group_size,
        completions=texts,
        items=[it for it in items for _ in range(group_size)],
        route_probs=old.probs,
        mm_inputs=mm,
    )


def _pad_to(x: Tensor, dim: int, left: int, right: int, value) -> Tensor:
    if left == 0 and right == 0:
        return x
    shape = list(x.shape)
    parts = []
    if left:
        shape[dim] = left
        parts.append(x.new_full(shape, value))
    parts.append(x)
    if right:
        shape[dim] = right
        parts.append(x.new_full(shape, value))
    return torch.cat(parts, dim=dim)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One batch from several rollouts of one policy (DAPO's refill), re-padded to a common (P, C).

    Prompts are left-padded to the widest P and completions right-padded to the widest C. Padded positions are
    unattended, unmasked, and carry ``UNROUTED`` routes (replay routes them by live top-K; they affect nothing).
    Positions ids follow the attention mask, so a sequence's real tokens see the same positions as before.
    Multimodal rollouts: ``mm_token_type_ids`` is left-padded like the prompts (pads are text, 0) and the vision
    tensors, flat over images in row order, are concatenated.
    """
    assert rollouts and len({r.group_size for r in rollouts}) == 1, "rollouts must share the group size"
    P = max(r.prompt_width for r in rollouts)
    C = max(r.completion_width for r in rollouts)
    fields: dict[str, list] = {k: [] for k in ("ids", "attn", "mask", "old", "exp", "lp", "ogl", "ref", "rew", "adv")}
    for r in rollouts:
        left, right = P - r.prompt_width, C - r.completion_width
        fields["ids"].append(_pad_to(r.input_ids, 1, left, right, pad_token_id))
        fields["attn"].append(_pad_to(r.attention_mask, 1, left, right, 0))
        fields["mask"].append(_pad_to(r.mask, 1, 0, right, 0.0))
        fields["old"].append(_pad_to(r.old_logp, 1, 0, right, 0.0))
        fields["exp"].append(_pad_to(r.routing.experts, 2, left, right, UNROUTED))
        fields["lp"].append(_pad_to(r.routing.logp, 2, left, right, 0.0))
        fields["ogl"].append(_pad_to(r.old_gate_logp, 2, left, right, 0.0))
        if r.ref_logp is not None:
            fields["ref"].append(_pad_to(r.ref_logp, 1, 0, right, 0.0))
        fields["rew"].append(r.rewards)
        fields["adv"].append(r.advantages)
    first = rollouts[0]
    return Rollout(
        input_ids=torch.cat(fields["ids"]),
        attention_mask=torch.cat(fields["attn"]),
        prompt_width=P,
        mask=torch.cat(fields["mask"]),
        old_logp=torch.cat(fields["old"]),
        routing=RoutingTrace(
            experts=torch.cat(fields["exp"], dim=1),
            logp=torch.cat(fields["lp"], dim=1),
            layers=first.routing.layers,
            num_experts=first.routing.num_experts,
        ),
        old_gate_logp=torch.cat(fields["ogl"], dim=1),
        group_size=first.group_size,
        completions=[c for r in rollouts for c in r.completions],
        items=[it for r in rollouts for it in r.items],
        rewards=None if first.rewards is None else torch.cat(fields["rew"]),
        advantages=None if first.advantages is None else torch.cat(fields["adv"]),
        reward_parts={k: torch.cat([r.reward_parts[k] for r in rollouts]) for k in first.reward_parts},
        ref_logp=torch.cat(fields["ref"]) if fields["ref"] else None,
        mm_inputs=_concat_mm(rollouts, P),
    )


def _concat_mm(rollouts: list[Rollout], prompt_width: int) -> dict | None:
    """The vision kwargs of ``concat_rollouts``' batch: types left-padded to ``prompt_width``, vision tensors joined."""
    with_mm = [r.mm_inputs is not None for r in rollouts]
    assert all(with_mm) or not any(with_mm), "cannot concatenate multimodal and text-only rollouts"
    if not any(with_mm):
        return None
    from expertrl.vlm import VISION_KWARGS

    types = [_pad_to(r.mm_inputs["mm_token_type_ids"], 1, prompt_width - r.prompt_width, 0, 0) for r in rollouts]
    out = {"mm_token_type_ids": torch.cat(types)}  # (B, P)
    for key in VISION_KWARGS[1:]:
        parts = [r.mm_inputs[key] for r in rollouts if key in r.mm_inputs]
        if parts:
            out[key] = torch.cat(parts)
    return out


def informative_groups(rollout: Rollout) -> Rollout:
    """The groups whose rewards are not all equal (DAPO's dynamic sampling filter); others carry no signal."""
    G = rollout.group_size
    informative = rollout.rewards.view(-1, G).amax(-1) > rollout.rewards.view(-1, G).amin(-1)  # (B/G,)
    return rollout.index_batch(informative.repeat_interleave(G).nonzero().squeeze(-1))
