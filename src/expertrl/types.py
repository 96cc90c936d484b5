"""Typed containers that travel between the rollout, the rewards and the losses, and the shape legend.

Shape letters (STYLE.md): ``B`` sequences (prompts x ``G``), ``G`` samples per prompt, ``P`` prompt width
(left-padded), ``C`` completion width (right-padded), ``S = P + C`` sequence width, ``V`` vocabulary, ``L`` MoE
layers, ``E`` experts, ``K`` experts per token, ``N`` flattened tokens.

Alignment convention (used everywhere): the routing decision at sequence position ``s`` belongs to the token
*predicted* at that position, ``input_ids[:, s + 1]``. It is computed from the state ``(x, y_<t)`` that also
produces the token, which is exactly the conditioning of MoE-GRPO's Eq. 5. Completion token ``c`` (0-based) is
``input_ids[:, P + c]``; it is predicted at position ``P + c - 1``, so completion-aligned routing is
``routing[:, :, P - 1 : S - 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

UNROUTED = -1
"""Expert id stored for a position whose route was not recorded (the last position of a generated sequence)."""


@dataclass
class RoutingTrace:
    """The experts each MoE layer chose for each token, and their log-probabilities under the routing policy.

    Attributes:
        experts: (L, B, S, K) int16 expert ids in draw order (the order matters for the Plackett-Luce set
            probability); ``UNROUTED`` (-1) where nothing was recorded.
        logp: (L, B, S, K) float32 log-probability of each chosen expert under the distribution the routing
            policy sampled from (masked and tempered softmax). 0 where ``experts`` is ``UNROUTED``.
        layers: absolute decoder-layer index of each of the L MoE layers.
        num_experts: E.
    """

    experts: Tensor
    logp: Tensor
    layers: tuple[int, ...]
    num_experts: int

    def __post_init__(self) -> None:
        assert self.experts.shape == self.logp.shape, (self.experts.shape, self.logp.shape)
        assert self.experts.dim() == 4 and self.experts.shape[0] == len(self.layers), self.experts.shape

    @property
    def shape(self) -> torch.Size:
        return self.experts.shape

    @classmethod
    def empty(cls, batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> RoutingTrace:
        """The trace of a model with no router (L = 0): every routing quantity is an empty (0, B, S, 1) tensor."""
        experts = torch.zeros(0, batch_size, seq_len, 1, dtype=torch.int16, device=device)
        return cls(experts=experts, logp=torch.zeros(experts.shape, device=device), layers=(), num_experts=0)

    def index_batch(self, index: Tensor | slice) -> RoutingTrace:
        """The trace of a subset of sequences (dim 1)."""
        return replace(self, experts=self.experts[:, index], logp=self.logp[:, index])

    def positions(self, start: int, stop: int) -> RoutingTrace:
        """The trace of sequence positions ``start:stop`` (dim 2)."""
        return replace(self, experts=self.experts[:, :, start:stop], logp=self.logp[:, :, start:stop])

    def to(self, device: torch.device | str) -> RoutingTrace:
        return replace(self, experts=self.experts.to(device), logp=self.logp.to(device))

    def nbytes(self) -> int:
        return self.experts.numel() * self.experts.element_size() + self.logp.numel() * self.logp.element_size()


@dataclass
class Rollout:
    """One step's batch of G completions for each of B/G prompts, everything the losses need.

    Attributes:
        input_ids: (B, S) prompt (left-padded to P) followed by completion (right-padded to C).
        attention_mask: (B, S) 1 = real token.
        prompt_width: P.
        mask: (B, C) float, 1 = completion token that counts in the loss (up to and including EOS).
        old_logp: (B, C) log-prob of each completion token under the behaviour policy (replayed routes).
        routing: rollout routes, (L, B, S, K); the behaviour policy's choices.
        old_gate_logp: (L, B, S, K) log-prob of the chosen experts recomputed in the old-policy forward.
        rewards: (B,) scalar reward per completion.
        advantages: (B,) group-relative advantage per completion.
        group_size: G.
        completions: B decoded completion strings.
        items: the task item behind each sequence (B dicts; the G samples of a prompt share one).
        reward_parts: named (B,) reward components before weighting, for logging.
        ref_logp: (B, C) log-probs under the frozen reference model, when a KL penalty is on.
        route_probs: (L, B, S, E) routing probabilities of the old forward, kept only while rewards are computed
            (routing rewards); not carried into micro-batches.
        mm_inputs: the prompts' vision kwargs for a vision-language model (``rollout.encode_prompts``):
            ``mm_token_type_ids`` (B, P) (0 text, 1 image, 2 video), and ``pixel_values`` + ``image_grid_thw`` and/or
            ``pixel_values_videos`` + ``video_grid_thw``, flat over images in row order; None for text.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_width: int
    mask: Tensor
    old_logp: Tensor
    routing: RoutingTrace
    old_gate_logp: Tensor
    group_size: int
    completions: list[str]
    items: list[dict]
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    reward_parts: dict[str, Tensor] = field(default_factory=dict)
    ref_logp: Tensor | None = None
    route_probs: Tensor | None = None
    mm_inputs: dict[str, Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_width(self) -> int:
        return self.input_ids.shape[1] - self.prompt_width

    def index_batch(self, index: Tensor) -> Rollout:
        """A micro-batch made of the sequences ``index`` (a 1-D LongTensor)."""
        idx = index.tolist()
        mm = None
        if self.mm_inputs is not None:  # imported here: expertrl.vlm loads the Qwen3-VL modelling code
            from expertrl.vlm import index_mm_batch

            mm = index_mm_batch(self.mm_inputs, index)
        return replace(
            self,
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            mask=self.mask[index],
            old_logp=self.old_logp[index],
            routing=self.routing.index_batch(index),
            old_gate_logp=self.old_gate_logp[:, index],
            completions=[self.completions[i] for i in idx],
            items=[self.items[i] for i in idx],
            rewards=None if self.rewards is None else self.rewards[index],
            advantages=None if self.advantages is None else self.advantages[index],
            reward_parts={k: v[index] for k, v in self.reward_parts.items()},
            ref_logp=None if self.ref_logp is None else self.ref_logp[index],
            route_probs=None,
            mm_inputs=mm,
        )
