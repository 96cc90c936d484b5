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

from expertrl.mm import index_mm_batch

UNROUTED = -1
"""Expert id stored for a position whose route was not recorded (the last position of a generated sequence)."""


def expert_id_dtype(num_experts: int) -> torch.dtype:
    """The smallest signed integer dtype that holds expert ids 0..E-1 and ``UNROUTED``: int8 (1 byte) up to E = 128,
    which covers Mixtral (8), Qwen2-MoE (60), OLMoE (64) and Qwen3-MoE-30B/235B (128); int16 above (DeepSeek-V3's
    256: one byte has no value left for ``UNROUTED``). Signed, so ``UNROUTED`` stays -1 and nothing that reads a trace
    needs to decode it."""
    return torch.int8 if num_experts <= 128 else torch.int16


@dataclass(frozen=True)
class Sampling:
    """The distributions a rollout drew its actions from. The one definition every forward that scores the rollout
    uses: the rollout engine applies it while sampling, and the old-log-prob and training forwards read it from the
    batch (``Rollout.sampling``), so the ratio's numerator and denominator are the policy that acted.

    Attributes:
        do_sample: tokens were sampled; False = greedy decoding (the ratio then uses the untempered softmax, the
            distribution whose mode greedy decoding takes).
        token_temperature: temperature of the token softmax when sampling (TRL and verl divide logits by it too).
        suppress_tokens: token ids that could not be generated (their logit is -inf in every forward that scores
            tokens; a vision-language model's image and video placeholders).
        routing_temperature: temperature of the router softmax that experts were sampled from (Gate-GRPO's g_old
            and g_theta). Expert *weights* and RSPO's router shift always use the untempered router softmax.
        set_logprob: how the probability of a sampled expert set is computed (``expertrl.moe.setprob``).
    """

    do_sample: bool = False
    token_temperature: float = 1.0
    suppress_tokens: tuple[int, ...] = ()
    routing_temperature: float = 1.0
    set_logprob: str = "plackett_luce"

    @property
    def score_temperature(self) -> float:
        """The temperature token scores are divided by: ``token_temperature`` when sampling, 1 for greedy tokens."""
        return self.token_temperature if self.do_sample else 1.0

    def token_scores(self, logits: Tensor) -> Tensor:
        """(..., V) logits -> scores (float32, or float64 for a float64 model) whose softmax is the token
        distribution that was sampled from (``ops.linear_token_logp`` computes the same from hidden states)."""
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.suppress_tokens:
            banned = torch.tensor(self.suppress_tokens, device=scores.device)
            scores = scores.index_fill(-1, banned, float("-inf"))
        if self.score_temperature != 1.0:
            scores = scores / self.score_temperature
        return scores


GREEDY = Sampling()
"""Greedy tokens, routing at temperature 1, Plackett-Luce sets: the default of every decode."""


@dataclass
class ExpertMask:
    """Which experts each position of a batch may use (router guidance, MoE-GRPO §3.5): ``allowed[l, groups[b, s]]``.

    Attributes:
        allowed: (L, G, E) bool allowed experts per MoE layer and token group.
        groups: (B, S) int64 group label of each position; -1 (padding) may use every expert.
    """

    allowed: Tensor
    groups: Tensor

    def index_batch(self, index: Tensor | slice) -> ExpertMask:
        return replace(self, groups=self.groups[index])

    def columns(self, width: int) -> ExpertMask:
        """The mask of the first ``width`` positions."""
        return replace(self, groups=self.groups[:, :width])


@dataclass
class RoutingTrace:
    """The experts each MoE layer chose for each token, and the log-probability of each chosen set.

    Attributes:
        experts: (L, B, S, K) expert ids in draw order (the order matters for the Plackett-Luce set
            probability); ``UNROUTED`` (-1) where nothing was recorded. Stored as ``expert_id_dtype(num_experts)``
            (int8 up to E = 128, else int16); a trace built from wider integers is narrowed on construction.
        set_logp: (L, B, S) float32 log-probability, under the distribution the routes were drawn from (masked,
            tempered router softmax; ``Sampling``), of the expert set chosen at each position, computed inside the
            router call from all E scores (``expertrl.moe.setprob``). 0 where ``experts`` is ``UNROUTED``, where
            no set probability exists (variable-K or sigmoid routers) and in rollouts that keep expert ids only
            (``generate_rollout(routes="experts")``: not computed).
        layers: absolute decoder-layer index of each of the L MoE layers.
        num_experts: E.
    """

    experts: Tensor
    set_logp: Tensor
    layers: tuple[int, ...]
    num_experts: int

    def __post_init__(self) -> None:
        assert self.experts.shape[:3] == self.set_logp.shape, (self.experts.shape, self.set_logp.shape)
        assert self.experts.dim() == 4 and self.experts.shape[0] == len(self.layers), self.experts.shape
        assert not self.experts.is_floating_point(), self.experts.dtype
        compact = expert_id_dtype(self.num_experts)
        if self.experts.dtype != compact:
            self.experts = self.experts.to(compact)  # (L, B, S, K) 1 byte per id up to E = 128

    @property
    def shape(self) -> torch.Size:
        return self.experts.shape

    @classmethod
    def empty(cls, batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> RoutingTrace:
        """The trace of a model with no router (L = 0): every routing quantity is an empty (0, B, S, ·) tensor."""
        experts = torch.zeros(0, batch_size, seq_len, 1, dtype=expert_id_dtype(0), device=device)
        return cls(experts=experts, set_logp=torch.zeros(experts.shape[:3], device=device), layers=(), num_experts=0)

    def index_batch(self, index: Tensor | slice) -> RoutingTrace:
        """The trace of a subset of sequences (dim 1)."""
        return replace(self, experts=self.experts[:, index], set_logp=self.set_logp[:, index])

    def positions(self, start: int, stop: int) -> RoutingTrace:
        """The trace of sequence positions ``start:stop`` (dim 2)."""
        return replace(self, experts=self.experts[:, :, start:stop], set_logp=self.set_logp[:, :, start:stop])

    def to(self, device: torch.device | str) -> RoutingTrace:
        return replace(self, experts=self.experts.to(device), set_logp=self.set_logp.to(device))

    def nbytes(self) -> int:
        """Bytes of the trace: L·K ids (1 byte each up to E = 128) + L float32 set log-probs per position."""
        e, s = self.experts, self.set_logp
        return e.numel() * e.element_size() + s.numel() * s.element_size()


@dataclass
class Rollout:
    """One step's batch of G completions for each of B/G prompts, everything the losses need.

    Attributes:
        input_ids: (B, S) prompt (left-padded to P) followed by completion (right-padded to C).
        attention_mask: (B, S) 1 = real token.
        prompt_width: P.
        mask: (B, C) float, 1 = completion token that counts in the loss (up to and including EOS).
        routing: (L, B, S, K) the old policy's routes in the trainer: the rollout's own (sampled) routes when
            training replays them (MoE-GRPO, R3), else the old-log-prob forward's live top-K (R2 replays them; without
            replay they are the old-activated experts of RSPO's router shift).
        group_size: G.
        completions: B decoded completion strings.
        items: the task item behind each sequence (B dicts; the G samples of a prompt share one).
        sampling: the token and routing distributions the rollout sampled from; every scoring forward reads it here.
        expert_mask: the allowed experts of every position (router guidance applied in the loss), or None.
        sample_logp: (B, C) log-prob of each completion token under the distribution generation sampled it from,
            recorded by the rollout engine (the ratio's denominator is ``old_logp``; the engine/trainer mismatch
            metrics and TIS / MIS / IcePop read k = exp(old_logp - sample_logp), ``losses.mismatch``).
        old_logp: (B, C) log-prob of each completion token under the behaviour policy, recomputed by the trainer
            with the routes replayed.
        old_set_logp: (L, B, S) log-prob of each recorded expert set under the behaviour router (Gate-GRPO's g_old).
        old_router_logp: (L, B, S, K) log-prob of each old-activated expert under the behaviour router's untempered
            softmax (RSPO's router shift).
        rewards: (B,) scalar reward per completion.
        advantages: (B,) group-relative advantage per completion.
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
    routing: RoutingTrace
    group_size: int
    completions: list[str]
    items: list[dict]
    sampling: Sampling = field(default_factory=Sampling)
    expert_mask: ExpertMask | None = None
    sample_logp: Tensor | None = None
    old_logp: Tensor | None = None
    old_set_logp: Tensor | None = None
    old_router_logp: Tensor | None = None
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

    def trimmed(self) -> Rollout:
        """The batch without the completion columns past its longest row's end (padding that no row attends), so a
        forward does not spend time on them. Nothing a loss reads changes: those positions are unattended by every
        row (causal attention never looks ahead) and out of every mask. Widths: C' = the longest completion."""
        P = self.prompt_width
        C = max(int(self.attention_mask[:, P:].sum(-1).max()), 1) if self.batch_size else self.completion_width
        if C == self.completion_width:
            return self
        S = P + C

        def cols(x: Tensor | None, width: int, dim: int = 1) -> Tensor | None:
            return None if x is None else x.narrow(dim, 0, width)

        return replace(
            self,
            input_ids=self.input_ids[:, :S],
            attention_mask=self.attention_mask[:, :S],
            mask=self.mask[:, :C],
            routing=self.routing.positions(0, S),
            expert_mask=None if self.expert_mask is None else self.expert_mask.columns(S),
            sample_logp=cols(self.sample_logp, C),
            old_logp=cols(self.old_logp, C),
            old_set_logp=cols(self.old_set_logp, S, 2),
            old_router_logp=cols(self.old_router_logp, S, 2),
            ref_logp=cols(self.ref_logp, C),
            route_probs=cols(self.route_probs, S, 2),
        )

    def index_batch(self, index: Tensor) -> Rollout:
        """A micro-batch made of the sequences ``index`` (a 1-D LongTensor)."""
        idx = index.tolist()
        mm = None if self.mm_inputs is None else index_mm_batch(self.mm_inputs, index)

        def rows(x: Tensor | None, dim: int = 0) -> Tensor | None:
            return None if x is None else x.index_select(dim, index.to(x.device))

        return replace(
            self,
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            mask=self.mask[index],
            routing=self.routing.index_batch(index),
            completions=[self.completions[i] for i in idx],
            items=[self.items[i] for i in idx],
            expert_mask=None if self.expert_mask is None else self.expert_mask.index_batch(index),
            sample_logp=rows(self.sample_logp),
            old_logp=rows(self.old_logp),
            old_set_logp=rows(self.old_set_logp, 1),
            old_router_logp=rows(self.old_router_logp, 1),
            rewards=rows(self.rewards),
            advantages=rows(self.advantages),
            reward_parts={k: v[index] for k, v in self.reward_parts.items()},
            ref_logp=rows(self.ref_logp),
            route_probs=None,
            mm_inputs=mm,
        )
