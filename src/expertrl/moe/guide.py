"""The rollout's router guidance (MoE-GRPO §3.5): a labelling of positions into token groups, each group's allowed
experts per layer (``moe.guidance.GuidanceState``), and the calibration that counts top-K routes per group.

    state = calibrate_guide(model, topk_rollouts, groups="prompt_completion", percent=25.0)   # Eq. 7
    guide = Guide.for_groups(state, groups="prompt_completion")
    rollout = generate_rollout(model, tok, items, ..., guide=guide)     # masked experts are never sampled

Groupings (``guidance.groups``): ``prompt_completion`` for text models (prompt 0, completion 1) and ``modality`` for
vision-language models (text 0, vision placeholders 1). A position's group is that of its input token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from expertrl.moe.adapters import find_routers
from expertrl.moe.guidance import (
    GuidanceMask,
    GuidanceState,
    count_expert_choices,
    modality_token_groups,
    prompt_completion_groups,
)

PROMPT_COMPLETION = ("prompt", "completion")
"""Group names of text guidance: 0 prompt positions, 1 completion positions."""
TEXT_VISION = ("text", "vision")
"""Group names of modality guidance: 0 text (prompt text and every generated token), 1 vision placeholders."""
GROUPINGS = {"prompt_completion": PROMPT_COMPLETION, "modality": TEXT_VISION}
"""``guidance.groups`` choices and their group names."""

Labeller = Callable[[Tensor, Tensor, int], Tensor]
"""``(input_ids (B, S), attention_mask (B, S), prompt_width) -> (B, S)`` group labels (-1 = padding)."""


def labeller(groups: str, *, vision_ids: frozenset[int] | set[int] = frozenset()) -> tuple[Labeller, int]:
    """The labelling function of ``guidance.groups`` and the group of generated tokens.

    ``prompt_completion``: position s is 0 if s < P, else 1; generated tokens are completion (1). ``modality``: 1 for
    a vision placeholder (``vision_ids``: ``expertrl.vlm.vision_token_ids``; one per merged patch), else 0; generated
    tokens are text (0; rollouts suppress the vision special tokens). A position's group is that of its input token.
    """
    if groups == "prompt_completion":
        return (lambda ids, attn, width: prompt_completion_groups(attn, width)), 1
    if groups == "modality":
        if not vision_ids:
            raise ValueError("modality guidance needs the vision placeholder token ids (vision_ids)")
        frozen = frozenset(int(i) for i in vision_ids)
        return (lambda ids, attn, width: modality_token_groups(ids, attn, frozen)), 0
    raise ValueError(f"unknown guidance groups {groups!r}; choose from {sorted(GROUPINGS)}")


@dataclass
class Guide:
    """Router guidance as the rollout sees it (``rollout.Guide``): a labelling of positions into token groups and the
    experts each group may use per layer.

    Attributes:
        state: the calibrated scores and mask (``GuidanceState``).
        label: the labelling function (``labeller``).
        generated_group: the group of every token ``generate`` produces.
        in_loss: also mask the training forwards (old and new log-probs, expert weights): the same masked softmax
            everywhere (ambiguity 10, our default). False masks only the rollout's sampling.
    """

    state: GuidanceState
    label: Labeller
    generated_group: int
    in_loss: bool = True

    @classmethod
    def for_groups(
        cls, state: GuidanceState, *, groups: str, vision_ids: frozenset[int] | set[int] = frozenset(), in_loss=True
    ) -> Guide:
        """The guide of ``guidance.groups`` over ``state`` (whose group names must match)."""
        label, generated = labeller(groups, vision_ids=vision_ids)
        if state.group_names != GROUPINGS[groups]:
            raise ValueError(
                f"guidance state has groups {state.group_names}, guidance.groups={groups} needs {GROUPINGS[groups]}; "
                "recalibrate with the same guidance.groups"
            )
        return cls(state, label, generated, in_loss)

    @property
    def allowed(self) -> Tensor:
        return self.state.allowed  # (L, G, E)

    def groups(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        """(B, S) group of every position of prompt + completion (-1 = padding)."""
        return self.label(input_ids, attention_mask, prompt_width)

    def for_generation(self, prompt_ids: Tensor, prompt_mask: Tensor) -> GuidanceMask:
        """The mask of one ``generate`` call over these (B, P) prompts (prefill, then one call per decode step)."""
        groups = self.label(prompt_ids, prompt_mask, prompt_ids.shape[1])  # (B, P)
        return self.state.mask(groups, generated_group=self.generated_group)


def calibrate_guide(
    model: nn.Module,
    rollouts: Iterable,
    *,
    groups: str,
    percent: float,
    vision_ids: frozenset[int] | set[int] = frozenset(),
) -> GuidanceState:
    """The guidance state of ``model`` from rollouts generated with deterministic top-K routing (the paper's counting
    setting, Eq. 7): their traces, labelled by ``groups``, are the counts (every routed, attended position: prompt,
    vision placeholders and completion alike; the last generated token is never routed)."""
    sites = find_routers(model)
    label, _ = labeller(groups, vision_ids=vision_ids)
    E, K = sites[0].num_experts, sites[0].top_k
    names = GROUPINGS[groups]
    counts = torch.zeros(len(sites), len(names), E, dtype=torch.long)
    for r in rollouts:
        labels = label(r.input_ids, r.attention_mask, r.prompt_width)  # (B, S)
        counts += count_expert_choices(r.routing.experts.cpu(), labels.cpu(), len(names), E)
    return GuidanceState.from_counts(
        counts, percent=percent, top_k=K, group_names=names, layers=tuple(s.layer for s in sites)
    )
