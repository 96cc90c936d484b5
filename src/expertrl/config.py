"""Nested dataclass configs for every command. Defaults here ARE the embedded default job.

Each field has an attribute docstring: the CLI help and the error messages are generated from it
(``expertrl.configio``). ``__post_init__`` checks values once, at start-up, and says how to fix them.
Derived sizes are computed in exactly one place (properties below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and the fix."""


def _check(ok: bool, field_name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass
class ModelConfig:
    path: str | None = None
    """local Hugging Face checkpoint directory (loaded with from_pretrained); None = build a tiny model in-process"""
    family: Literal["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3"] = "qwen3_moe"
    """model family of the in-process model (ignored when path is set)"""
    preset: Literal["tiny", "small", "5M", "50M"] = "small"
    """size preset of the in-process model (expertrl.models.PRESETS)"""
    num_experts: int | None = None
    """override the preset's number of experts E"""
    top_k: int | None = None
    """override the preset's experts per token K"""
    experts_implementation: Literal["grouped_mm", "eager"] = "grouped_mm"
    """transformers experts kernel; grouped_mm is fastest on CPU, never use batched_mm there"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype"""
    trust_remote_code: bool = False
    """allow custom modelling code from the checkpoint directory (off unless you ask)"""

    def __post_init__(self) -> None:
        if self.num_experts is not None:
            _check(self.num_experts >= 2, "model.num_experts", f"must be >= 2, got {self.num_experts}")
        if self.top_k is not None:
            _check(self.top_k >= 1, "model.top_k", f"must be >= 1, got {self.top_k}")
        if self.num_experts is not None and self.top_k is not None:
            _check(
                self.top_k <= self.num_experts,
                "model.top_k",
                f"K={self.top_k} > E={self.num_experts}; lower model.top_k or raise model.num_experts",
            )


@dataclass
class TaskConfig:
    name: str = "addition"
    """task: 'addition' (built in), 'rg:<reasoning-gym dataset>' (e.g. rg:chain_sum) or 'jsonl:<path>'"""
    train_size: int = 4000
    """number of training prompts drawn from the task"""
    eval_size: int = 128
    """number of held-out prompts for evaluation (disjoint from training)"""
    seed: int = 1234
    """seed of the task generator (held-out split depends on it)"""
    kwargs: dict = field(default_factory=dict)
    """task-specific options, e.g. {'max_value': 30} for addition or reasoning-gym config fields"""
    verifier: Literal["task", "exact_match", "math_verify"] = "task"
    """how a completion is scored: the task's own scorer, exact string match, or math-verify equivalence"""

    def __post_init__(self) -> None:
        _check(self.train_size >= 1, "task.train_size", f"must be >= 1, got {self.train_size}")
        _check(self.eval_size >= 1, "task.eval_size", f"must be >= 1, got {self.eval_size}")


@dataclass
class RoutingConfig:
    policy: Literal["multinomial", "topk", "noisy_topk"] = "multinomial"
    """how rollouts choose experts (expertrl.moe.policies.POLICIES); MoE-GRPO samples (multinomial)"""
    temperature: float = 0.5
    """temperature of the router softmax that rollouts sample from (expert weights always use T=1); the default
    job's 0.5 keeps sampled routes near the top-K routes that inference uses, MoE-GRPO's paper does not say"""
    noise_std: float | None = None
    """std of the Gaussian logit noise for noisy_topk; None = 1/E (V-MoE)"""
    set_logprob: Literal["plackett_luce", "unordered", "independent"] = "plackett_luce"
    """probability of a sampled expert set in Gate-GRPO (METHODS.md §3.4, ambiguity 7)"""
    replay: Literal["rollout", "first_forward", "none"] = "rollout"
    """routes of the training forwards: rollout = replay the rollout's routes (R3; MoE-GRPO's Token-GRPO),
    first_forward = replay the routes of the step's first (old-log-prob) forward under live top-K (R2),
    none = live top-K in every forward (router shift reaches the ratio; what RSPO corrects)"""
    freeze_router: bool = False
    """freeze every router weight during RL (the rigid remedy RSPO compares against)"""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "routing.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G completions per prompt (MoE-GRPO: 8)"""
    prompts_per_step: int = 16
    """prompts per step; the rollout batch is prompts_per_step * group_size sequences"""
    max_new_tokens: int = 8
    """completion length budget"""
    do_sample: bool = False
    """sample tokens; MoE-GRPO decodes greedily so all exploration comes from expert sampling"""
    temperature: float = 1.0
    """token sampling temperature (only with do_sample)"""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill the batch with newly sampled prompts"""
    max_refill_rounds: int = 3
    """with dynamic_sampling: at most this many extra rollout rounds per step to refill the batch"""
    overlong_cache: int = 0
    """DAPO soft overlong punishment: completions longer than max_new_tokens - overlong_cache lose reward
    linearly down to -1 (0 = off)"""
    mask_truncated: bool = False
    """DAPO overlong filtering: completions cut by the length budget (no EOS) get no loss"""

    def __post_init__(self) -> None:
        _check(self.group_size >= 2, "rollout.group_size", f"must be >= 2 for group advantages, got {self.group_size}")
        _check(self.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _check(
            0 <= self.overlong_cache <= self.max_new_tokens,
            "rollout.overlong_cache",
            f"must be in [0, rollout.max_new_tokens={self.max_new_tokens}], got {self.overlong_cache}",
        )

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class LossConfig:
    name: str = "grpo"
    """token policy loss: a key of expertrl.losses.LOSSES"""
    agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    """how per-token losses become one scalar (MoE-GRPO Eq. 4: mean over each completion, then over completions)"""
    kwargs: dict = field(default_factory=dict)
    """keyword arguments of the token loss, e.g. {'eps_high': 0.28}"""
    gate_coef: float = 1.0
    """weight of Gate-GRPO (MoE-GRPO Eq. 6 uses 1); 0 turns it off"""
    gate_tokens: Literal["completion", "all"] = "completion"
    """positions whose routing Gate-GRPO trains: completion tokens (Eq. 5) or prompt tokens too"""
    lb_coef: float = 0.01
    """Switch load-balancing loss on the experts actually used (value 1 at uniform routing); 0 = off"""
    advantage_scale: Literal["group", "none"] = "group"
    """divide advantages by the group std ('group', GRPO) or not ('none', Dr.GRPO)"""
    kl_coef: float = 0.0
    """beta of the per-token KL to a frozen copy of the RL start model (0 = no reference model, MoE-GRPO)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (k3 = DeepSeekMath's unbiased, non-negative one)"""

    def __post_init__(self) -> None:
        _check(self.gate_coef >= 0, "loss.gate_coef", f"must be >= 0, got {self.gate_coef}")
        _check(self.kl_coef >= 0, "loss.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check(self.lb_coef >= 0, "loss.lb_coef", f"must be >= 0, got {self.lb_coef}")


@dataclass
class RSPOConfig:
    enabled: bool = False
    """rescale each token's importance ratio by the router-shift weight (RSPO, arXiv 2510.23027)"""
    gamma_min: float = 0.8
    """floor of the router-shift weight (provisional default of two third-party implementations)"""
    placement: Literal["before_clip", "after_clip"] = "before_clip"
    """before_clip = v2 (ACL): log-ratio + log gamma, then the host clips and aggregates; after_clip = v1 reading"""
    layer_agg: Literal["mean", "product"] = "mean"
    """mean over layers of the per-layer shift (paper), or their sum (product of per-layer weights)"""

    def __post_init__(self) -> None:
        _check(0 <= self.gamma_min <= 1, "rspo.gamma_min", f"must be in [0, 1], got {self.gamma_min}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """peak AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas"""
    warmup_steps: int = 5
    """linear warm-up steps before the cosine decay"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of lr"""
    grad_clip: float = 1.0
    """max global gradient norm; 0 = no clipping"""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class SFTConfig:
    steps: int = 480
    """supervised steps (0 = no warm-up); also the whole job of `expertrl sft`"""
    batch_size: int = 64
    """sequences per supervised step"""
    routing: Literal["topk", "multinomial", "noisy_topk"] = "multinomial"
    """routing during SFT: topk = Det-FT, multinomial = Stoch-FT-Multi, noisy_topk = Stoch-FT-Noise"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=10))
    """optimiser of the supervised stage"""
    lb_coef: float = 0.01
    """Switch load-balancing loss during SFT"""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "sft.steps", f"must be >= 0, got {self.steps}")
        _check(self.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class TrainConfig:
    """`expertrl train`: optional supervised warm-up, then MoE-GRPO."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the policy model"""
    task: TaskConfig = field(default_factory=TaskConfig)
    """prompts and verifier"""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """expert-selection policy of the rollouts"""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """rollout sizes and token decoding"""
    loss: LossConfig = field(default_factory=LossConfig)
    """token and gate losses"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """RL optimiser and schedule"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """supervised warm-up run before RL (sft.steps = 0 to skip)"""
    rspo: RSPOConfig = field(default_factory=RSPOConfig)
    """router-shift weighting (RSPO); plugs into the grpo, gspo and gmpo losses"""
    steps: int = 300
    """RL steps (one rollout batch each)"""
    inner_updates: int = 2
    """mu: optimiser passes over each rollout batch, so ratios really leave 1"""
    micro_batch_size: int = 32
    """sequences per forward/backward; gradients accumulate to one optimiser step per inner update"""
    seed: int = 0
    """seed of everything (torch, python, routing sampler); per-step seeds derive from (seed, step)"""
    output_dir: str = "runs/default"
    """run directory: config.yaml, metrics.jsonl, checkpoints, final model"""
    eval_every: int = 50
    """evaluate on held-out prompts every this many RL steps (and at start and end); 0 = start and end only"""
    save_every: int = 0
    """write a resumable checkpoint every this many steps; 0 = only the final model"""
    progress: bool = True
    """show a progress bar"""
    resume: str | None = None
    """continue the run in this directory from its latest complete checkpoint (checkpoints/step-N); output_dir must
    name the same directory, and every other setting except steps and progress must equal the checkpoint's"""
    keep_checkpoints: int = 2
    """number of most recent checkpoints kept in output_dir/checkpoints (older ones are deleted)"""
    max_bad_steps: int = 3
    """stop after this many steps in a row whose loss or gradient norm is NaN/Inf (each one is skipped)"""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        _check(self.inner_updates >= 1, "inner_updates", f"must be >= 1, got {self.inner_updates}")
        _check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        self.check_combination()

    def check_combination(self) -> None:
        """Reject combinations of methods that make no sense (an error, not a warning)."""
        r, lc = self.routing, self.loss
        if lc.gate_coef > 0:
            _check(
                r.policy == "multinomial",
                "loss.gate_coef",
                f"Gate-GRPO trains the router as a stochastic policy and needs routing.policy=multinomial "
                f"(got {r.policy!r}); set loss.gate_coef=0 for {r.policy} routing",
            )
            _check(
                r.replay == "rollout",
                "loss.gate_coef",
                f"Gate-GRPO's ratio is over the rollout's sampled expert sets, so routing.replay must be 'rollout' "
                f"(got {r.replay!r}); set loss.gate_coef=0 to compare replay modes",
            )
            _check(not r.freeze_router, "routing.freeze_router", "a frozen router cannot be trained by Gate-GRPO")
        if r.policy != "topk":
            _check(
                r.replay == "rollout",
                "routing.replay",
                f"routes sampled by routing.policy={r.policy} exist only in the rollout, so the training forward must "
                f"replay them (routing.replay=rollout); use routing.policy=topk for {r.replay!r}",
            )
        if self.rspo.enabled:
            _check(
                lc.name in ("grpo", "gspo", "gspo_token", "gmpo"),
                "rspo.enabled",
                f"the router-shift weight plugs into grpo, gspo, gspo_token or gmpo, not {lc.name!r}",
            )


@dataclass
class SFTJobConfig:
    """`expertrl sft`: supervised fine-tuning only (Det-FT / Stoch-FT baselines, or a warm-up checkpoint)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the model"""
    task: TaskConfig = field(default_factory=TaskConfig)
    """prompts and reference answers"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """supervised settings"""
    seed: int = 0
    """seed of everything"""
    output_dir: str = "runs/sft"
    """run directory"""
    progress: bool = True
    """show a progress bar"""


@dataclass
class EvalConfig:
    """`expertrl eval`: accuracy of a checkpoint on held-out prompts with deterministic top-K routing."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the model (set model.path to a checkpoint directory)"""
    task: TaskConfig = field(default_factory=TaskConfig)
    """task whose held-out split is scored"""
    max_new_tokens: int = 8
    """completion length budget"""
    batch_size: int = 64
    """prompts per generate call"""
    seed: int = 0
    """seed"""
