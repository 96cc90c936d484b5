"""Modality-aware router guidance (MoE-GRPO §3.3, Eq. 7): deactivate, per token group, the experts that group rarely
uses, so that sampled routes explore only group-relevant experts.

    counts = count_expert_choices(trace.experts, groups, num_groups=2, num_experts=E)   # (L, G, E) top-K choices
    state = GuidanceState.from_counts(counts, percent=25.0, top_k=K, group_names=("prompt", "completion"), layers=..)
    with route(model, Multinomial(), allowed=state.mask(prompt_groups, generated_group=1), generator=g):
        model.generate(...)                                                  # masked experts are never sampled

``expertrl.moe.guide`` builds the rollout's ``Guide`` (labelling + state) and calibrates it from top-K rollouts.

Groups are any labelling of token positions (0..G-1; -1 = padding): vision vs text tokens for a VLM
(``token_id_groups``), prompt vs completion for a text model (``prompt_completion_groups``). The label of position
``s`` is the group of the *input* token at ``s``, because the route at ``s`` is computed from that token's hidden
state (the alignment convention of ``expertrl.types`` only says which predicted token the route is credited to).

Eq. 7 generalised to G groups, per layer (METHODS.md ambiguity 11):
    s_g(e) = N_g(e) / Σ_j N_g(j)          share of group g's top-K choices that went to expert e
    ŝ_g(e) = s_g(e) / Σ_h s_h(e)          group g's share of expert e's (usage-normalised) popularity
and a token of group g may not use the bottom ``percent`` % of experts by ŝ_g (logit -inf before the softmax).

Decisions (the paper is silent):
- 0/0 for a group with no counted token at a layer: ``awareness_scores`` raises; the calibration data must contain
  every group (with top-K routing every token is counted at every layer, so this is a data problem).
- 0/0 for an expert no group ever chose: ŝ_g(e) = 0 for every g, so a dead expert is the first one deactivated
  (it is "infrequently activated" for every group).
- rounding: floor(percent * E / 100) experts are deactivated (at most P %; 25 % of 8 = 2, of 6 = 1).
- ties in ŝ: broken by expert index, the lower index is deactivated first (stable sort, deterministic).
- fewer than K experts left: ``ValueError`` naming ``percent``, E and K (no silent clamp: it would change the method).
- padding positions (label -1) may use every expert (they are unattended and carry no loss).
The same mask must be applied in every forward whose routing distribution enters the loss (rollout, old and new
log-probs of Gate-GRPO, expert weights): METHODS.md ambiguity 10, "same masked softmax everywhere".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from expertrl.moe.adapters import find_routers
from expertrl.types import UNROUTED

PAD_GROUP = -1
"""Group label of padding positions: ignored when counting, every expert allowed when routing."""

FORMAT = "expertrl.guidance/1"


# --- token groups ------------------------------------------------------------------------------------------------


def prompt_completion_groups(attention_mask: Tensor, prompt_width: int) -> Tensor:
    """(B, S) int64 labels: 0 prompt position (s < P), 1 completion position, -1 padding (attention 0)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, S), got shape {tuple(attention_mask.shape)}")
    S = attention_mask.shape[1]
    if not 0 <= prompt_width <= S:
        raise ValueError(f"prompt_width={prompt_width} must be in [0, S={S}] (the width of the left-padded prompt)")
    groups = (torch.arange(S, device=attention_mask.device) >= prompt_width).long().expand_as(attention_mask)  # (B, S)
    return groups.masked_fill(attention_mask == 0, PAD_GROUP)


def token_id_groups(
    input_ids: Tensor,
    attention_mask: Tensor,
    group_token_ids: dict[int, set[int]] | list[set[int]],
    default_group: int = 0,
) -> Tensor:
    """(B, S) int64 labels from token ids, e.g. ``{1: {image_token_id, video_token_id}}`` -> vision 1, text 0.

    Args:
        input_ids, attention_mask: (B, S).
        group_token_ids: group -> the token ids of that group (a list means group i = list[i]); a token id may
            belong to one group only. Ids listed nowhere get ``default_group``.
        default_group: label of every other attended token.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, S)"
        )
    mapping = dict(enumerate(group_token_ids)) if isinstance(group_token_ids, list) else dict(group_token_ids)
    seen: dict[int, int] = {}
    for g, ids in mapping.items():
        if g < 0:
            raise ValueError(f"group_token_ids has group {g}; groups are 0..G-1 (-1 is reserved for padding)")
        for i in ids:
            if i in seen and seen[i] != g:
                raise ValueError(
                    f"token id {i} is listed in groups {seen[i]} and {g} of group_token_ids; give each id one group"
                )
            seen[i] = g
    if default_group < 0:
        raise ValueError(f"default_group={default_group} must be >= 0 (-1 is reserved for padding)")
    groups = torch.full_like(input_ids, default_group, dtype=torch.long)  # (B, S)
    for g, ids in mapping.items():
        if ids:
            groups[torch.isin(input_ids, torch.tensor(sorted(ids), device=input_ids.device))] = g
    return groups.masked_fill(attention_mask == 0, PAD_GROUP)


def modality_token_groups(input_ids: Tensor, attention_mask: Tensor, vision_ids: frozenset[int] | set[int]) -> Tensor:
    """(B, S) int64 labels: 1 vision placeholder (``vision_ids``), 0 any other attended token, -1 padding."""
    return token_id_groups(input_ids, attention_mask, {1: set(vision_ids)})


# --- Eq. 7 -------------------------------------------------------------------------------------------------------


def count_expert_choices(experts: Tensor, groups: Tensor, num_groups: int, num_experts: int) -> Tensor:
    """(L, G, E) int64: how often each group's tokens chose each expert, per layer.

    Args:
        experts: (L, B, S, K) expert ids (a trace's ``experts``); ``UNROUTED`` (-1) entries are ignored.
        groups: (B, S) labels in 0..G-1, or -1 (padding, ignored).
    """
    L, B, S, K = experts.shape
    if groups.shape != (B, S):
        raise ValueError(f"groups {tuple(groups.shape)} must match the experts' (B, S) = {(B, S)}")
    groups = groups.to(device=experts.device, dtype=torch.long)
    if groups.numel() and (groups.min() < PAD_GROUP or groups.max() >= num_groups):
        raise ValueError(
            f"groups must be in 0..{num_groups - 1} or -1 (padding); got values "
            f"{sorted(set(groups.unique().tolist()))}: raise num_groups or relabel"
        )
    ids = experts.long()  # (L, B, S, K)
    if ids.numel() and (ids.min() < UNROUTED or ids.max() >= num_experts):
        raise ValueError(
            f"experts must be in 0..{num_experts - 1} or -1 (unrouted); num_experts={num_experts} "
            "does not match the trace"
        )
    valid = (ids >= 0) & (groups >= 0)[None, :, :, None]  # (L, B, S, K)
    flat = (groups[None, :, :, None] * num_experts + ids).clamp(min=0)  # (L, B, S, K) index into G*E
    counts = torch.zeros(L, num_groups * num_experts, dtype=torch.long, device=experts.device)
    counts.scatter_add_(1, flat.reshape(L, -1), valid.reshape(L, -1).long())
    return counts.reshape(L, num_groups, num_experts)  # (L, G, E)


def awareness_scores(counts: Tensor) -> Tensor:
    """(L, G, E) float64 modality-awareness scores ŝ_g(e) of Eq. 7, generalised to G groups (module docstring)."""
    if counts.dim() != 3:
        raise ValueError(f"counts must be (L, G, E), got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    n = counts.double()  # (L, G, E)
    totals = n.sum(-1, keepdim=True)  # (L, G, 1)
    empty = (totals[..., 0] == 0).nonzero().tolist()
    if empty:
        layer, group = empty[0]
        raise ValueError(
            f"group {group} has no counted token at layer position {layer}: Eq. 7 is 0/0. Calibrate on "
            "batches containing tokens of every group, or drop the group from the labelling"
        )
    s = n / totals  # (L, G, E) s_g(e): share of group g's choices going to e
    per_expert = s.sum(1, keepdim=True)  # (L, 1, E) Σ_h s_h(e)
    # An expert no group chose has Σ_h s_h(e) = 0: score 0 for every group, so it is deactivated first.
    return torch.where(per_expert > 0, s / per_expert.clamp(min=1e-300), torch.zeros_like(s))


def num_deactivated(percent: float, num_experts: int) -> int:
    """floor(percent * E / 100): how many experts ``bottom_percent_mask`` switches off per (layer, group)."""
    if not 0.0 <= percent <= 100.0 or math.isnan(percent):
        raise ValueError(f"percent={percent} must be in [0, 100] (the share of experts to deactivate)")
    return int(math.floor(percent * num_experts / 100.0 + 1e-9))  # 1e-9: 12.5 % of 8 is exactly 1


def bottom_percent_mask(scores: Tensor, percent: float = 25.0, *, top_k: int) -> Tensor:
    """(L, G, E) bool allowed experts: the bottom ``percent`` % by score are False in each (layer, group) row.

    floor(percent * E / 100) experts are deactivated; equal scores deactivate the lower expert index first. Raises
    if fewer than ``top_k`` experts would remain.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (L, G, E), got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    E = scores.shape[-1]
    m = num_deactivated(percent, E)
    if E - m < top_k:
        raise ValueError(
            f"percent={percent} deactivates {m} of E={E} experts, leaving {E - m} < top_k K={top_k} to "
            f"choose from; use percent <= {100.0 * (E - top_k) / E:g}"
        )
    order = torch.sort(scores, dim=-1, stable=True).indices  # (L, G, E) ascending; ties keep index order
    allowed = torch.ones_like(scores, dtype=torch.bool)
    allowed.scatter_(-1, order[..., :m], False)
    return allowed


def expand_allowed(allowed: Tensor, groups: Tensor) -> Tensor:
    """(L, B, S, E) per-position allowed experts: ``allowed[l, groups[b, s]]``, all True where the label is -1."""
    table = _with_pad_row(allowed)  # (L, G+1, E)
    idx = _table_index(groups.to(allowed.device), allowed.shape[1])  # (B, S)
    return table[:, idx]  # (L, B, S, E)


def _with_pad_row(allowed: Tensor) -> Tensor:
    L, G, E = allowed.shape
    return torch.cat([allowed, allowed.new_ones(L, 1, E)], dim=1)  # (L, G+1, E): row G is padding, all allowed


def _table_index(groups: Tensor, num_groups: int) -> Tensor:
    return torch.where(groups < 0, num_groups, groups).long()


# --- the callable passed to route(allowed=...) --------------------------------------------------------------------


class GuidanceMask:
    """``allowed(layer_pos, n_tokens) -> (N, E) bool`` for ``route``: per-token rows from the tokens' group labels.

    Keeps one cursor per layer (positions already routed per sequence), so a plain forward over (B, S) (one call of
    N = B*S per layer), ``generate``'s prefill (N = B*P) and its decode steps (N = B) all get the rows of the
    positions they route, in order. Positions past the known labels belong to ``generated_group`` (the group of
    tokens ``generate`` produces, e.g. completion or text). Use one mask per ``route`` block, or ``reset()`` it.

    Args:
        allowed: (L, G, E) bool allowed experts per layer and group (``bottom_percent_mask``).
        groups: (B, S) labels of the positions known before routing (the prompt, or the whole sequence).
        generated_group: group of positions beyond ``groups`` (None: routing past them is an error).
    """

    def __init__(self, allowed: Tensor, groups: Tensor, *, generated_group: int | None = None) -> None:
        if allowed.dim() != 3 or allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a (L, G, E) bool tensor, got {allowed.dtype} {tuple(allowed.shape)}")
        L, G, E = allowed.shape
        if not allowed.any(-1).all():
            raise ValueError("allowed has a (layer, group) row with no expert allowed; every row needs >= K experts")
        if groups.dim() != 2:
            raise ValueError(f"groups must be (B, S) labels, got shape {tuple(groups.shape)}")
        if groups.numel() and (groups.min() < PAD_GROUP or groups.max() >= G):
            raise ValueError(f"groups must be in 0..{G - 1} or -1 (padding) for allowed with G={G} groups")
        if generated_group is not None and not 0 <= generated_group < G:
            raise ValueError(f"generated_group={generated_group} must be in 0..{G - 1}")
        self.num_layers, self.num_groups, self.num_experts = L, G, E
        self.generated_group = generated_group
        self._table = _with_pad_row(allowed)  # (L, G+1, E)
        self._index = _table_index(groups.to(allowed.device), G)  # (B, S)
        self._cursor = [0] * L

    @property
    def batch_size(self) -> int:
        return self._index.shape[0]

    @property
    def positions(self) -> tuple[int, ...]:
        """Per layer, how many positions per sequence have been routed since construction or ``reset()``."""
        return tuple(self._cursor)

    def reset(self) -> None:
        """Start again at position 0 (a new forward or ``generate`` over the same labelled batch)."""
        self._cursor = [0] * self.num_layers

    def _chunk_index(self, start: int, stop: int) -> Tensor:
        known = self._index.shape[1]
        if stop > known and self.generated_group is None:
            raise ValueError(
                f"routing positions {start}..{stop - 1} but only S={known} positions are labelled and "
                "generated_group is None: pass generated_group=<group of generated tokens>, or reset() "
                "the mask (or build a new one) for each route block"
            )
        parts = [self._index[:, start:stop]]  # (B, <=c)
        if stop > max(start, known):
            extra = stop - max(start, known)
            parts.append(self._index.new_full((self.batch_size, extra), self.generated_group))
        return torch.cat(parts, dim=1)  # (B, c)

    def __call__(self, layer_pos: int, n_tokens: int) -> Tensor:
        B = self.batch_size
        if not 0 <= layer_pos < self.num_layers:
            raise ValueError(
                f"router layer position {layer_pos} is outside the mask's L={self.num_layers} layers; "
                "allowed must have one row per routed MoE layer"
            )
        if n_tokens % B:
            raise ValueError(
                f"a router call of N={n_tokens} tokens is not a multiple of the B={B} labelled sequences; "
                "build the GuidanceMask with the labels of exactly the batch being routed"
            )
        chunk = n_tokens // B
        start = self._cursor[layer_pos]
        expected = self._cursor[layer_pos - 1] - chunk if layer_pos > 0 else self._cursor[-1]
        if start != expected:
            raise RuntimeError(
                f"router calls out of step: layer {layer_pos} starts at position {start}, expected "
                f"{expected} (cursors {self._cursor}). Use one GuidanceMask per route block (or reset()) "
                "and an allowed tensor with one row per routed MoE layer"
            )
        rows = self._table[layer_pos][self._chunk_index(start, start + chunk)]  # (B, c, E)
        self._cursor[layer_pos] = start + chunk
        return rows.reshape(n_tokens, self.num_experts)  # (N, E), token index b * c + s as hooks flatten


# --- calibration and the saved state ------------------------------------------------------------------------------


@dataclass
class GuidanceState:
    """Everything modality guidance needs, saved as JSON next to a run.

    Attributes:
        counts: (L, G, E) int64 top-K choices per layer and group (``calibrate``).
        scores: (L, G, E) float64 awareness scores ŝ (``awareness_scores``).
        allowed: (L, G, E) bool allowed experts (``bottom_percent_mask``).
        percent: P, the share of experts deactivated per (layer, group).
        top_k: K of the model (every row keeps at least K experts).
        group_names: G names, e.g. ("text", "vision") or ("prompt", "completion").
        layers: absolute decoder-layer index of each of the L MoE layers.
    """

    counts: Tensor
    scores: Tensor
    allowed: Tensor
    percent: float
    top_k: int
    group_names: tuple[str, ...]
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = (len(self.layers), len(self.group_names), self.counts.shape[-1])
        for name in ("counts", "scores", "allowed"):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"GuidanceState.{name} has shape {got}; expected (L, G, E) = {shape} from "
                    f"layers={self.layers} and group_names={self.group_names}"
                )
        short = (self.allowed.sum(-1) < self.top_k).nonzero().tolist()
        if short:
            raise ValueError(
                f"GuidanceState.allowed leaves fewer than top_k={self.top_k} experts at (layer position, "
                f"group) {short[0]}; lower percent"
            )

    @classmethod
    def from_counts(
        cls, counts: Tensor, *, percent: float, top_k: int, group_names: tuple[str, ...], layers: tuple[int, ...]
    ) -> GuidanceState:
        """Scores (Eq. 7) and the bottom-``percent`` mask of ``counts``."""
        scores = awareness_scores(counts)
        allowed = bottom_percent_mask(scores, percent, top_k=top_k)
        return cls(
            counts.long().cpu(), scores.cpu(), allowed.cpu(), float(percent), top_k, tuple(group_names), tuple(layers)
        )

    def state_dict(self) -> dict:
        """The counts and settings as JSON-safe containers (a training checkpoint's ``trainer_state.json`` keeps
        them); ``from_state_dict`` recomputes the scores and the mask from them."""
        meta = dict(percent=self.percent, top_k=self.top_k, group_names=list(self.group_names))
        return {"counts": self.counts.tolist(), "meta": meta | {"layers": list(self.layers)}}

    @classmethod
    def from_state_dict(cls, state: dict) -> GuidanceState:
        """The state ``state_dict`` returned."""
        return cls.from_counts(torch.tensor(state["counts"]), **state["meta"])

    def group(self, name: str) -> int:
        """Index of the group called ``name``."""
        if name not in self.group_names:
            raise ValueError(f"unknown group {name!r}; the groups are {list(self.group_names)}")
        return self.group_names.index(name)

    def mask(self, groups: Tensor, *, generated_group: int | str | None = None, device=None) -> GuidanceMask:
        """A fresh ``GuidanceMask`` for one route block over sequences labelled ``groups`` (B, S)."""
        gen = self.group(generated_group) if isinstance(generated_group, str) else generated_group
        return GuidanceMask(self.allowed.to(device or groups.device), groups, generated_group=gen)

    def check_model(self, model: nn.Module) -> None:
        """Raise unless ``model``'s MoE layers, E and K match this state."""
        sites = find_routers(model)
        layers, E, K = tuple(s.layer for s in sites), sites[0].num_experts, sites[0].top_k
        if layers != self.layers or E != self.counts.shape[-1] or K != self.top_k:
            raise ValueError(
                f"guidance state is for MoE layers {self.layers}, E={self.counts.shape[-1]}, "
                f"K={self.top_k}, but the model has layers {layers}, E={E}, K={K}: recalibrate on this "
                "model"
            )

    def save(self, path: str | Path) -> None:
        """``guidance.json``: the ``state_dict`` (read back by ``load``), plus the scores and the mask it implies, for
        people reading the file (recomputed, not read, on load)."""
        data = {"format": FORMAT, **self.state_dict(), "scores": self.scores.tolist(), "allowed": self.allowed.tolist()}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path, *, model: nn.Module | None = None) -> GuidanceState:
        """Read a saved state; with ``model``, also check that it was calibrated on this architecture."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a guidance state file (format {data.get('format')!r}, expected {FORMAT!r})"
            )
        state = cls.from_state_dict(data)
        if model is not None:
            state.check_model(model)
        return state
