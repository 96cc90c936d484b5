"""Joining and filtering rollout batches: DAPO's dynamic sampling keeps the groups whose rewards differ
(``informative_groups``) and refills the batch with later rounds, re-padded to one (P, C) (``concat_rollouts``).

Pure functions of ``Rollout``s (``collect.collect`` calls them); nothing here runs a model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertrl.mm import VISION_KWARGS
from expertrl.ops import pad_along
from expertrl.types import UNROUTED, ExpertMask, Rollout, RoutingTrace


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One batch from several rollouts of one policy (DAPO's refill), re-padded to a common (P, C).

    Prompts are left-padded to the widest P and completions right-padded to the widest C. Padded positions are
    unattended, unmasked, and carry ``UNROUTED`` routes (replay routes them by live top-K; they affect nothing) and
    the padding group of the expert mask. Position ids follow the attention mask, so a sequence's real tokens see the
    same positions as before. Multimodal rollouts: ``mm_token_type_ids`` is left-padded like the prompts (pads are
    text, 0) and the vision tensors, flat over images in row order, are concatenated.
    """
    assert rollouts and len({r.group_size for r in rollouts}) == 1, "rollouts must share the group size"
    assert len({r.sampling for r in rollouts}) == 1, "rollouts sampled from different distributions cannot be joined"
    P = max(r.prompt_width for r in rollouts)
    C = max(r.completion_width for r in rollouts)
    first = rollouts[0]

    def joined(get, dim: int, pad_value, *, seq: bool = True, prompt_dim: bool = True) -> Tensor | None:
        """Concatenate ``get(r)`` over the rollouts along the batch dim ``dim``, padding the sequence dim (the next
        one) left by P − P_r (``prompt_dim``: the tensor spans prompt + completion) and right by C − C_r."""
        parts = [get(r) for r in rollouts]
        if parts[0] is None:
            return None
        if seq:
            parts = [
                pad_along(x, dim + 1, P - r.prompt_width if prompt_dim else 0, C - r.completion_width, pad_value)
                for x, r in zip(parts, rollouts)
            ]
        return torch.cat(parts, dim=dim)

    expert_mask = None
    if first.expert_mask is not None:
        groups = joined(lambda r: r.expert_mask.groups, 0, -1)  # (B, S), padding may use every expert
        expert_mask = ExpertMask(first.expert_mask.allowed, groups)
    return Rollout(
        input_ids=joined(lambda r: r.input_ids, 0, pad_token_id),
        attention_mask=joined(lambda r: r.attention_mask, 0, 0),
        prompt_width=P,
        mask=joined(lambda r: r.mask, 0, 0.0, prompt_dim=False),
        routing=RoutingTrace(
            experts=joined(lambda r: r.routing.experts, 1, UNROUTED),
            set_logp=joined(lambda r: r.routing.set_logp, 1, 0.0),
            layers=first.routing.layers,
            num_experts=first.routing.num_experts,
        ),
        group_size=first.group_size,
        completions=[c for r in rollouts for c in r.completions],
        items=[it for r in rollouts for it in r.items],
        sampling=first.sampling,
        expert_mask=expert_mask,
        sample_logp=joined(lambda r: r.sample_logp, 0, 0.0, prompt_dim=False),
        old_logp=joined(lambda r: r.old_logp, 0, 0.0, prompt_dim=False),
        old_set_logp=joined(lambda r: r.old_set_logp, 1, 0.0),
        old_router_logp=joined(lambda r: r.old_router_logp, 1, 0.0),
        rewards=joined(lambda r: r.rewards, 0, None, seq=False),
        advantages=joined(lambda r: r.advantages, 0, None, seq=False),
        reward_parts={k: torch.cat([r.reward_parts[k] for r in rollouts]) for k in first.reward_parts},
        ref_logp=joined(lambda r: r.ref_logp, 0, 0.0, prompt_dim=False),
        mm_inputs=_concat_mm(rollouts, P),
    )


def _concat_mm(rollouts: list[Rollout], prompt_width: int) -> dict | None:
    """The vision kwargs of ``concat_rollouts``' batch: types left-padded to ``prompt_width``, vision tensors joined."""
    with_mm = [r.mm_inputs is not None for r in rollouts]
    assert all(with_mm) or not any(with_mm), "cannot concatenate multimodal and text-only rollouts"
    if not any(with_mm):
        return None
    types = [pad_along(r.mm_inputs["mm_token_type_ids"], 1, prompt_width - r.prompt_width, 0, 0) for r in rollouts]
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
