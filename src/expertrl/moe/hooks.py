"""Scoped routing: install a routing policy on every router of a model, record what it chose, replay it later.

    with route(model, Multinomial(), generator=g) as rec:        # every router samples K experts
        model.generate(...)
    trace = rec.trace(batch_size=B)                              # (L, B, S-1, K) compact routes

    with route(model, Replay.from_trace(trace)) as rec:          # force those experts, live router weights
        logits = model(ids).logits
    set_logp = rec.set_logp(batch_size=B)                        # (L, B, S) differentiable log g_θ(expert set)

The context manager patches each router module's ``forward`` on the instance (the class is untouched, HF's own
output-recording hooks keep firing) and restores the previous ``forward`` on exit, also on error. Inside, each
router call:
1. computes logits (N, E) as the native router does, but in the router's precision (``RouterSite.dtype``,
   ``model.router_dtype``: float32 by default, float64 on request, the model's dtype if wider; a bf16 model's router
   casts its input and weight up, as NeMo-RL / Megatron's ``moe_router_dtype`` does), and the routing distribution
   ``softmax(mask(logits) / T)`` that the policy chooses from (``T``, the mask: ``Sampling``, ``ExpertMask``; the
   same for the rollout that samples and for every forward that scores it);
2. asks the policy (or the replayed trace) for the experts (N, K) in draw order;
3. computes the expert weights from the live, *untempered* masked softmax gathered at those experts (so the router
   gets gradient through the weights, as in R3), renormalised per the family's ``norm_topk_prob`` semantics;
4. records experts (``types.expert_id_dtype``: int8 up to E = 128); the log-probability of the chosen *set* under
   the routing distribution, computed here from all E scores (``setprob.set_logprob``: exact however peaked the
   router; differentiable when grad is on);
   the untempered masked softmax's log-probs of the chosen experts (RSPO's router shift; detached); and, if asked,
   the full probabilities (N, E) for the load-balancing loss and diagnostics, and the raw logits (N, E) for the
   router z-loss (``keep_logits``).
With ``TopK`` and no mask this reproduces the native router bit for bit on a float32 model (tested); on a bf16 model
it is the native router computed in float32.

Variable expert counts (``ExpertChoice``, ``policy.fixed_k = False``): the policy returns (N, K') with ``UNROUTED``
in unused slots. Those slots reach the experts module as the token's top-1 expert with weight exactly 0 (the fused
kernels take any K' but need real indices), are renormalised out (only used slots share the weight sum), and are
recorded as ``UNROUTED`` with log-prob 0 (and set log-prob 0: the set has no closed-form probability); traces pad
every chunk to the widest K' with ``UNROUTED``.

Non-causal policies (``ExpertChoice``, ``Sinkhorn``, ``policy.causal = False``) balance over all tokens of a router
call, later tokens included, which autoregressive decoding cannot do. ``route`` therefore also wraps
``model.generate`` for the block: every router call made inside it (the prefill and each decode step) routes with
``TopK``, the inference setting of both papers, and is recorded as such. Plain forwards route with the policy over
all N tokens of the call. Call ``generate`` on the model given to ``route`` (a PEFT wrapper's ``generate`` reaches
it too); a hand-written decode loop of forwards would get non-causal routing over each step's tokens.

Sigmoid-scored routers (DeepSeek-V3) support ``TopK`` (the native group-limited selection, recorded) and
``Replay`` (native weights at the replayed experts); stochastic policies on them raise until a sampling
distribution for sigmoid scores is decided. Their recorded router log-probs are log of the scores normalised over
E (experimental, not a softmax); their set log-prob is 0 (undefined).

Activation checkpointing (``model.gradient_checkpointing_enable()``, ``model.gradient_checkpointing``): inside the
block every checkpointed layer is recomputed in backward with the experts and expert mask its forward used, with
nothing recorded twice and no route drawn again, in training and eval mode (``expertrl.moe.recompute``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expertrl.moe.adapters import RouterSite, find_routers
from expertrl.moe.gumbel import RouteSeeds
from expertrl.moe.policies import Policy, Replay, TopK
from expertrl.moe.recompute import Recompute, checkpointed_layers
from expertrl.moe.setprob import SET_LOGPROBS, set_logprob
from expertrl.types import UNROUTED, RoutingTrace, expert_id_dtype

AllowedFn = Callable[[int, int], Tensor | None]
"""``allowed(layer_pos, n_tokens) -> (N, E) bool`` experts a token may use at that layer, or None for all."""


@dataclass
class RoutingRecorder:
    """What the routers did inside one ``route`` block: per layer, a list of chunks (one per router call).

    A plain forward makes one chunk of B*S tokens per layer; ``generate`` makes a prefill chunk of B*P tokens and
    one chunk of B tokens per decode step. ``trace``/``set_logp``/``router_logp``/``probs``/``logits`` reassemble
    them as (L, B, S, ·). ``generating`` counts the ``model.generate`` calls in progress (non-causal policies route
    with ``TopK`` while it is > 0).
    """

    sites: list[RouterSite]
    num_experts: int
    keep_probs: bool = False
    keep_logits: bool = False
    score_experts: Tensor | None = None
    experts: list[list[Tensor]] = field(default_factory=list)
    set_lp: list[list[Tensor]] = field(default_factory=list)
    router_lp: list[list[Tensor]] = field(default_factory=list)
    full_probs: list[list[Tensor]] = field(default_factory=list)
    raw_logits: list[list[Tensor]] = field(default_factory=list)
    scored_logp: list[list[Tensor]] = field(default_factory=list)
    generating: int = 0
    recompute: Recompute = field(default_factory=Recompute)

    def __post_init__(self) -> None:
        n = len(self.sites)
        self.experts, self.set_lp, self.router_lp = (
            [[] for _ in range(n)],
            [[] for _ in range(n)],
            [[] for _ in range(n)],
        )
        self.full_probs, self.scored_logp = [[] for _ in range(n)], [[] for _ in range(n)]
        self.raw_logits = [[] for _ in range(n)]

    def _assemble(self, chunks: list[list[Tensor]], batch_size: int, pad: float | None = None) -> Tensor:
        """Per-layer chunks of (n, X) -> (L, B, S, X), time-concatenating chunks per sequence.

        ``pad`` fills chunks narrower than the widest one (``ExpertChoice``'s K' varies between calls)."""
        assert chunks and chunks[0], "nothing was recorded: did a forward pass run inside route(...)?"
        width = max(c.shape[-1] for per_layer in chunks for c in per_layer)
        layers = []
        for per_layer in chunks:
            parts = []
            for c in per_layer:
                if c.shape[-1] < width:
                    assert pad is not None, f"chunks of widths {c.shape[-1]} and {width} cannot be stacked"
                    c = F.pad(c, (0, width - c.shape[-1]), value=pad)  # (n, X) right-padded
                parts.append(c.reshape(batch_size, -1, width))  # (B, n/B, X)
            layers.append(torch.cat(parts, dim=1))  # (B, S, X)
        return torch.stack(layers)  # (L, B, S, X)

    def trace(self, batch_size: int) -> RoutingTrace:
        """The compact routing trace (detached) of everything recorded; unused slots are ``UNROUTED``."""
        return RoutingTrace(
            experts=self._assemble(self.experts, batch_size, pad=UNROUTED),
            set_logp=self.set_logp(batch_size).detach(),
            layers=tuple(s.layer for s in self.sites),
            num_experts=self.num_experts,
        )

    def set_logp(self, batch_size: int) -> Tensor:
        """(L, B, S) log-prob of each chosen expert set under the routing distribution (masked, tempered softmax);
        differentiable if recorded with grad (Gate-GRPO's g_θ)."""
        return self._assemble(self.set_lp, batch_size)[..., 0]

    def router_logp(self, batch_size: int) -> Tensor:
        """(L, B, S, K) detached log-probs of the chosen experts under the untempered masked router softmax (the
        distribution of the expert weights; RSPO's r), 0 in unused slots."""
        return self._assemble(self.router_lp, batch_size, pad=0.0)

    def probs(self, batch_size: int) -> Tensor:
        """(L, B, S, E) full routing probabilities (needs ``keep_probs=True``)."""
        assert self.keep_probs, "route(..., keep_probs=True) is needed to read full router probabilities"
        return self._assemble(self.full_probs, batch_size)

    def logits(self, batch_size: int) -> Tensor:
        """(L, B, S, E) raw router logits ``h Wᵀ`` in the router's dtype (needs ``keep_logits=True``); differentiable
        if recorded with grad, for the router z-loss (``expertrl.losses.routing.router_z_loss`` takes them
        reshaped to (L, B*S, E) with a (B*S,) mask)."""
        assert self.keep_logits, "route(..., keep_logits=True) is needed to read raw router logits"
        return self._assemble(self.raw_logits, batch_size)

    def scored(self, batch_size: int) -> Tensor:
        """(L, B, S, K) detached log-probs of the ``score_experts`` ids under the live untempered router softmax.

        This is how RSPO reads the current router's score of the experts the *old* policy activated when the forward
        itself routes live (no replay)."""
        assert self.score_experts is not None, "route(..., score_experts=...) is needed to score reference experts"
        return self._assemble(self.scored_logp, batch_size)

    def clear(self) -> None:
        for lists in (self.experts, self.set_lp, self.router_lp, self.full_probs, self.raw_logits, self.scored_logp):
            for per_layer in lists:
                per_layer.clear()


def _record(
    rec: RoutingRecorder,
    pos: int,
    experts: Tensor,
    set_logp: Tensor,
    router_logp: Tensor,
    probs: Tensor,
    logits: Tensor,
) -> None:
    if rec.recompute.replaying:  # activation checkpointing's backward recompute: recorded in the forward already
        return
    grad = torch.is_grad_enabled()
    rec.experts[pos].append(experts.to(expert_id_dtype(rec.num_experts)))
    at_least_32 = torch.promote_types(set_logp.dtype, torch.float32)  # a float64 model keeps float64
    rec.set_lp[pos].append((set_logp if grad else set_logp.detach()).to(at_least_32)[:, None])  # (N, 1)
    rec.router_lp[pos].append(router_logp.detach().to(at_least_32))
    if rec.keep_probs:
        rec.full_probs[pos].append(probs)
    if rec.keep_logits:
        rec.raw_logits[pos].append(logits if grad else logits.detach())


def _choose(policy: Policy, logp: Tensor, k: int, pos: int, generator: torch.Generator | RouteSeeds | None) -> Tensor:
    if isinstance(policy, Replay):
        return policy.select_layer(logp, k, pos)
    if isinstance(generator, RouteSeeds) and policy.stochastic:
        if not policy.keyed:
            raise ValueError(f"{type(policy).__name__} routing cannot draw from counter-based seeds (RouteSeeds)")
        return policy.select_keyed(logp, k, generator.uniform(pos, logp.shape[0], logp.shape[1]))
    return policy.select(logp, k, generator)


def _wrap_generate(model: nn.Module, rec: RoutingRecorder) -> None:
    """Make ``model.generate`` count itself in ``rec.generating`` while it runs (instance patch, like routers)."""
    inner = model.generate

    @functools.wraps(inner)
    def generate(*args, **kwargs):
        rec.generating += 1
        try:
            return inner(*args, **kwargs)
        finally:
            rec.generating -= 1

    model.generate = generate


def _softmax_forward(
    site: RouterSite,
    pos: int,
    policy: Policy,
    temperature: float,
    allowed: AllowedFn | None,
    generator: torch.Generator | RouteSeeds | None,
    set_kind: str | None,
    rec: RoutingRecorder,
    hidden_states: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    router = site.module
    dtype = torch.promote_types(hidden_states.dtype, site.dtype)  # float32 or better (model.router_dtype)
    h = hidden_states.reshape(-1, router.weight.shape[1])  # (N, H)
    logits = F.linear(h.to(dtype), router.weight.to(dtype))  # (N, E) the native router's logits, at router precision
    scores = logits  # (N, E) a bf16 model's router still computes in float32 (NeMo-RL's moe_router_dtype)
    replay = rec.recompute.replayed(pos) if rec.recompute.replaying else None  # a recompute: the forward's choice
    if replay is not None:
        mask = replay[1]
    else:
        mask = allowed(pos, scores.shape[0]) if allowed is not None else None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # disallowed experts get probability 0
    route_scores = scores / temperature if temperature != 1.0 else scores  # (N, E) the routing distribution's
    if rec.generating and not policy.causal:
        policy = TopK()  # non-causal routing cannot run token by token: generate routes top-K (module docstring)
    if replay is not None:
        experts = replay[0]  # (N, K) never drawn again in a recompute
    else:
        with torch.no_grad():
            experts = _choose(policy, torch.log_softmax(route_scores, dim=-1), site.top_k, pos, generator)  # (N, K)
        rec.recompute.remember(pos, experts, mask)  # for a checkpointed layer's recompute
    probs = torch.softmax(scores, dim=-1)  # (N, E) untempered: expert weights always use the model's router
    with torch.no_grad():
        router_logp = torch.log_softmax(scores, dim=-1)  # (N, E) RSPO's r (no gradient: γ is a stop-gradient)
    if policy.fixed_k:
        weights = probs.gather(1, experts)  # (N, K) gradient reaches the router through the chosen experts
        if site.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if set_kind is None:  # nobody reads it (route's set_logprob=None)
            set_logp = torch.zeros(experts.shape[0], device=experts.device)  # (N,)
        else:
            set_logp = set_logprob(set_kind, route_scores, experts)  # (N,) exact from all E scores (setprob)
        _record(rec, pos, experts, set_logp, router_logp.gather(1, experts), probs, logits)
    else:  # (N, K') with UNROUTED slots: real index (the token's top-1 expert), weight exactly 0
        used = experts != UNROUTED  # (N, K')
        experts = torch.where(used, experts, router_logp.argmax(-1, keepdim=True))  # (N, K')
        weights = probs.gather(1, experts) * used  # (N, K') unused slots 0, and no gradient through them
        if site.renormalize:
            total = weights.sum(dim=-1, keepdim=True)  # (N, 1) 0 for a token no expert took
            weights = weights / torch.where(total > 0, total, torch.ones_like(total))
        chosen_logp = torch.where(used, router_logp.gather(1, experts), torch.zeros_like(weights))  # (N, K')
        no_set = torch.zeros(experts.shape[0], device=experts.device)  # a variable-K choice has no set probability
        _record(rec, pos, torch.where(used, experts, UNROUTED), no_set, chosen_logp, probs, logits)
    if rec.score_experts is not None and replay is None:
        ref = rec.score_experts[pos].to(device=experts.device, dtype=torch.long)  # (N, K)
        ref_ok = ref >= 0
        rec.scored_logp[pos].append((router_logp.gather(1, ref.clamp(min=0)) * ref_ok).float())  # unrouted: 0
    native = torch.promote_types(hidden_states.dtype, torch.float32) if site.family.weights_float32 else None
    return logits, weights.to(native or hidden_states.dtype), experts  # weights in the dtype the native router gives


def _sigmoid_forward(
    site: RouterSite,
    pos: int,
    policy: Policy,
    native: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    rec: RoutingRecorder,
    hidden_states: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    router = site.module
    dtype = torch.promote_types(site.dtype, torch.float32)  # DeepSeek-V3 scores in float32 natively
    replay = rec.recompute.replayed(pos) if rec.recompute.replaying else None  # a recompute: the forward's choice
    if isinstance(policy, TopK):
        logits, weights, experts = native(hidden_states)  # native group-limited, bias-corrected selection (float32)
        if replay is not None and not torch.equal(experts, replay[0]):
            raise RuntimeError(
                f"activation checkpointing: the recompute of {site.name}'s native top-K chose other experts than its "
                "forward (non-deterministic kernels?); turn model.gradient_checkpointing off for this model"
            )
    else:  # Replay
        h = hidden_states.reshape(-1, router.weight.shape[1])  # (N, H)
        logits = F.linear(h.to(dtype), router.weight.to(dtype))  # (N, E)
        if replay is not None:
            experts = replay[0]
        else:
            with torch.no_grad():  # unrouted rows fall back to the native group-limited, bias-corrected choice
                experts = policy.select_layer(logits, site.top_k, pos, fallback=lambda: native(hidden_states)[2])
        weights = logits.sigmoid().gather(1, experts)  # (N, K)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * router.routed_scaling_factor
    if replay is None:
        rec.recompute.remember(pos, experts, None)  # for a checkpointed layer's recompute
    scores = logits.to(dtype).sigmoid()  # (N, E)
    logp_norm = (scores / scores.sum(-1, keepdim=True)).log()  # experimental "distribution" of a sigmoid router
    no_set = torch.zeros(experts.shape[0], device=experts.device)  # no set probability for sigmoid scores
    _record(rec, pos, experts, no_set, logp_norm.gather(1, experts), scores / scores.sum(-1, keepdim=True), logits)
    return logits, weights, experts


@contextmanager
def route(
    model: nn.Module,
    policy: Policy,
    *,
    temperature: float = 1.0,
    allowed: AllowedFn | None = None,
    generator: torch.Generator | RouteSeeds | None = None,
    keep_probs: bool = False,
    keep_logits: bool = False,
    score_experts: Tensor | None = None,
    sites: list[RouterSite] | None = None,
    set_logprob: str | None = "plackett_luce",
) -> Iterator[RoutingRecorder]:
    """Route every MoE layer of ``model`` with ``policy`` inside the block; yields the recorder.

    Args:
        model: a Hugging Face MoE model of a family in ``expertrl.moe.adapters.FAMILIES``.
        policy: ``TopK``, ``Multinomial``, ``NoisyTopK``, ``ExpertChoice``, ``Sinkhorn`` or ``Replay``. Non-causal
            policies (``ExpertChoice``, ``Sinkhorn``) route with ``TopK`` inside ``model.generate``.
        temperature: temperature of the distribution the policy chooses from and the set log-probs are taken
            under (``Sampling.routing_temperature``); expert weights always use T=1.
        allowed: optional per-layer, per-token mask of allowed experts (modality guidance).
        generator: RNG of stochastic policies (keeps routing randomness off the global RNG, for exact resume), or a
            ``gumbel.RouteSeeds``: counter-based noise per (row seed, layer, position) of one ``generate`` call
            (the trainer's rollouts: routes that do not depend on the number of processes or on batching).
        keep_probs: also record full (N, E) probabilities (load-balancing loss, entropy metrics).
        keep_logits: also record the raw router logits (N, E) (``rec.logits``: router z-loss).
        score_experts: optional (L, N, K) expert ids (e.g. an older trace) whose live log-probs are recorded too
            (``rec.scored``), whatever the policy chooses; softmax routers only.
        sites: routers to patch (default: ``find_routers(model)``).
        set_logprob: the set log-probability recorded for each chosen expert set (``setprob.SET_LOGPROBS``), or
            None where nobody reads it (a rollout that keeps expert ids only): recorded as 0, not computed.
    """
    if set_logprob is not None and set_logprob not in SET_LOGPROBS:
        raise ValueError(f"unknown set_logprob {set_logprob!r}; choose from {sorted(SET_LOGPROBS)}")
    custom = not isinstance(policy, (TopK, Replay))
    if sites is None:  # top-K or replay of a dense model is the identity; anything else needs real routers
        sites = find_routers(model, allow_dense=not custom and allowed is None and score_experts is None)
    if not sites and (custom or allowed is not None):  # a temperature only changes routing, so it is moot here
        raise ValueError(
            f"{type(model).__name__} has no router (a plain-LoRA baseline), so {type(policy).__name__} routing or an "
            "expert mask mean nothing; use TopK routing"
        )  # sigmoid routers run only their native choice or a replay
    if custom or temperature != 1.0 or allowed is not None or score_experts is not None:
        bad = sorted({s.family.router_class for s in sites if s.family.scoring != "softmax"})
        if bad:
            raise ValueError(
                f"{type(policy).__name__} routing (or a temperature/mask) needs softmax routers; {bad} score experts "
                "with a sigmoid. Use TopK or Replay on this family."
            )
    rec = RoutingRecorder(
        sites=sites,
        num_experts=sites[0].num_experts if sites else 0,
        keep_probs=keep_probs,
        keep_logits=keep_logits,
        score_experts=score_experts,
    )
    saved, patches = [], []
    try:
        if not policy.causal:  # generate routes top-K (module docstring); restored like the router forwards
            saved.append((model, "generate", model.__dict__.get("generate")))
            _wrap_generate(model, rec)
        for pos, site in enumerate(sites):
            module = site.module
            saved.append((module, "forward", module.__dict__.get("forward")))
            if site.family.scoring == "softmax":
                fwd = functools.partial(
                    _softmax_forward, site, pos, policy, temperature, allowed, generator, set_logprob, rec
                )
            else:
                fwd = functools.partial(_sigmoid_forward, site, pos, policy, module.forward, rec)
            module.forward = fwd
            patches.append((module, fwd))
        rec.recompute.install = functools.partial(_patched, patches)  # a recompute runs after the block exits
        with checkpointed_layers(model, rec.recompute):
            yield rec
    finally:
        _restore(saved)


def _restore(saved: list[tuple[object, str, object]]) -> None:
    for module, attr, previous in saved:
        if previous is None:
            delattr(module, attr)
        else:
            setattr(module, attr, previous)


@contextmanager
def _patched(patches: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """The block's router forwards on the routers again, for an activation-checkpointing recompute."""
    saved = [(module, "forward", module.__dict__.get("forward")) for module, _ in patches]
    try:
        for module, fwd in patches:
            module.forward = fwd
        yield
    finally:
        _restore(saved)
