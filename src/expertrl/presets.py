"""Named methods as data: each preset is a dict of dotted ``TrainConfig`` overrides (STYLE.md §2, §18).

A preset only fills fields; it adds no code path. ``preset_overrides`` turns one into the CLI override list that
``configio.load_config`` accepts, so ``--preset`` and explicit flags go through the same parser (later flags win).

The token-loss presets (grpo, dr_grpo, dapo, gspo, gmpo, sapo, cispo, rspo) use the papers' own MoE setting:
deterministic top-K routing, sampled tokens, live routing in every forward (so the router shift is real), no
Gate-GRPO. ``moe_grpo`` is the default job (sampled experts, greedy tokens, Token- + Gate-GRPO). ``r3``, ``r2``
and ``freeze_router`` are stabilisers to combine with a loss preset (``--preset grpo,r3``); the ablation grid
"GRPO vs GSPO vs GMPO vs RSPO vs replay vs freezing" is then one preset list per run.
"""

from __future__ import annotations

import yaml

TOKEN_METHOD = {
    "routing.policy": "topk",
    "routing.replay": "none",
    "rollout.do_sample": True,
    "loss.advantage_scale": "group",
    "loss.gate_coef": 0.0,
}
"""The papers' MoE setting of every token-loss method: deterministic top-K routing, live routing in every forward (so
the router shift is real), sampled tokens, group-scaled advantages, no Gate-GRPO."""


def _token_method(name: str, agg: str, kwargs: dict, **more) -> dict:
    return TOKEN_METHOD | {"loss.name": name, "loss.agg": agg, "loss.kwargs": kwargs} | more


PRESETS: dict[str, dict] = {
    # GRPO (DeepSeekMath; METHODS §4.1): symmetric clip 0.2, per-sequence token mean.
    "grpo": _token_method("grpo", "seq_mean_token_mean", {"eps_low": 0.2, "eps_high": 0.2}),
    # Dr.GRPO (METHODS §4.2): no std division, Σ_t / constant instead of the per-sequence mean.
    "dr_grpo": _token_method(
        "grpo", "seq_mean_token_sum_norm", {"eps_low": 0.2, "eps_high": 0.2}, **{"loss.advantage_scale": "none"}
    ),
    # DAPO (METHODS §4.3): clip-higher and token-level normalisation, dynamic sampling, overlong filtering.
    "dapo": _token_method(
        "grpo",
        "token_mean",
        {"eps_low": 0.2, "eps_high": 0.28},
        **{"rollout.dynamic_sampling": True, "rollout.mask_truncated": True},
    ),  # fmt: skip
    # GSPO (METHODS §4.4): sequence ratio, clip 3e-4 / 4e-4.
    "gspo": _token_method("gspo", "seq_mean_token_mean", {"eps_low": 3e-4, "eps_high": 4e-4}),
    # GMPO (METHODS §4.5): token clip in log space (0.4 / 0.4), geometric mean; needs a mean over sequences.
    "gmpo": _token_method("gmpo", "seq_mean_token_mean", {"eps_low": 0.4, "eps_high": 0.4}),
    # SAPO (METHODS §4.6): soft gate, τ_pos 1.0, τ_neg 1.05.
    "sapo": _token_method("sapo", "seq_mean_token_mean", {"tau_pos": 1.0, "tau_neg": 1.05}),
    # CISPO (METHODS §4.7): truncated IS weight on REINFORCE, lower bound off, 1/Σ|y| normalisation.
    "cispo": _token_method("cispo", "token_mean", {"eps_low": 1.0, "eps_high": 5.0}),
    # MoE-GRPO (METHODS §3, Eq. 6): Token-GRPO + 1.0 × Gate-GRPO, the default job.
    "moe_grpo": {
        "loss.name": "grpo",
        "loss.agg": "seq_mean_token_mean",
        "loss.kwargs": {"eps_low": 0.2, "eps_high": 0.2},
        "loss.advantage_scale": "group",
        "loss.gate_coef": 1.0,
    },
    # RSPO (METHODS §1): GMPO host + router-shift weighting before the clip (v2), gamma_min 0.8.
    "rspo": _token_method(
        "gmpo",
        "seq_mean_token_mean",
        {"eps_low": 0.4, "eps_high": 0.4},
        **{"rspo.enabled": True, "rspo.gamma_min": 0.8, "rspo.placement": "before_clip"},
    ),  # fmt: skip
    # LoRA-MoE on a frozen dense base (RO-GRPO, METHODS §2): E = 4 rank-8 LoRA experts + a router on each FFN
    # projection, dense soft mixture, GRPO on sampled tokens, no aux loss, no Gate-GRPO (there is no sampled set).
    # Combine with a routing reward: `--preset lora_moe,ro_grpo_smooth`; `lora_moe,aux_loss` is the paper's aux-loss
    # baseline. The in-process base is a tiny Qwen3; set model.family (qwen3/qwen2/llama) or model.path (a dense model).
    "lora_moe": TOKEN_METHOD
    | {
        "model.family": "qwen3",
        "model.adapter.kind": "lora_moe",
        "model.adapter.num_experts": 4,
        "model.adapter.rank": 8,
        "model.adapter.alpha": 16.0,
        "model.adapter.top_k": None,
        "loss.name": "grpo",
        "loss.lb_coef": 0.0,
        "sft.routing": "topk",
    },
    "ro_grpo_smooth": {"routing_reward.kind": "smooth"},  # entropy-then-balance curriculum (w_route 0.2)
    "ro_grpo_relative": {"routing_reward.kind": "relative"},  # bonus 0.2 when both statistics beat the last 1000
    "ro_grpo_shuffled": {"routing_reward.kind": "smooth", "routing_reward.shuffled": True},  # the paper's control
    "aux_loss": {"loss.lb_coef": 0.01},  # Switch load balancing instead of a routing reward
    # The single-LoRA baseline (PEFT), rank 16 like RO-GRPO's (matched budget: expertrl.moe.lora_moe.matched_lora_rank).
    "lora": TOKEN_METHOD
    | {
        "model.family": "qwen3",
        "model.adapter.kind": "lora",
        "model.adapter.rank": 16,
        "model.adapter.alpha": 32.0,
        "loss.name": "grpo",
        "loss.lb_coef": 0.0,
        "sft.routing": "topk",
        "sft.lb_coef": 0.0,
    },
    # MoE stabilisers, to combine with a loss preset: `--preset grpo,r3`. Later presets override earlier ones.
    "r3": {"routing.replay": "rollout"},  # replay the rollout's routes in every training forward (Ma et al.)
    "r2": {"routing.replay": "first_forward"},  # replay the routes of the step's first forward (GSPO paper)
    "freeze_router": {"routing.freeze_router": True},
}


def preset_overrides(name: str) -> list[str]:
    """The preset ``name`` as CLI overrides for ``configio.load_config``: ``["--loss.name", "gspo", ...]``.

    Values are written as flow-style YAML, which the override parser reads back unchanged (JSON would not do: YAML
    1.1 reads JSON's ``1e-05`` as a string).

    Raises:
        ValueError: unknown ``name`` (lists the valid ones).
    """
    out: list[str] = []
    for one in name.split(","):
        if one not in PRESETS:
            raise ValueError(f"unknown preset {one!r}; choose from {sorted(PRESETS)} (combine with commas)")
        out += _one_preset(one)
    return out


def _one_preset(name: str) -> list[str]:
    out: list[str] = []
    for key, value in PRESETS[name].items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")  # scalar end marker
        out += [f"--{key}", text]
    return out
