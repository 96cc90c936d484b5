"""The metric vocabulary: every key ``metrics.jsonl`` (and ``sft_metrics.jsonl``) holds, by namespace.

Namespaces: ``rollout/`` (what generation produced), ``reward/`` (rewards and advantages), ``loss/`` (the objective's
terms and ratio statistics), ``router/`` (routing: load, entropies, RO-GRPO statistics, and RSPO's router-shift
diagnostics under ``router/shift/`` with the names METHODS.md §1.5 gives them), ``optim/`` (gradient, learning rate,
skipped steps), ``time/`` (seconds and throughput) and ``eval/`` (held-out evaluation). ``VOCABULARY`` lists each
key pattern with its meaning and, where the concept is the same, TRL's / verl's name for it, so curves can be read
side by side. ``RENAMED`` maps the names of runs written before this vocabulary (expertrl <= issue 11) to the new
ones; ``expertrl report`` reads old runs through it.

Pure data and one function; the bottom layer.
"""

from __future__ import annotations

# key pattern -> (meaning, TRL / verl name or "")
VOCABULARY: dict[str, tuple[str, str]] = {
    "rollout/completion_length": ("mean completion length (tokens up to and including EOS)", "completions/mean_length"),
    "rollout/truncated_frac": (
        "share of completions cut at rollout.max_new_tokens without EOS (DAPO's mask_truncated gives them no loss)",
        "completions/clipped_ratio",
    ),
    "rollout/empty_frac": (
        "share of completions that are only EOS (all of them for max_bad_steps steps: collapse)",
        "",
    ),
    "rollout/loop_rate": ("share of completions ending in >= 3 repeats of one n-gram (RO-GRPO)", ""),
    "rollout/num_tokens": ("completion tokens in the step's batch", "num_tokens"),
    "rollout/trace_bytes": ("bytes of the batch's routing trace (expert ids + set log-probs)", ""),
    "rollout/refill_rounds": ("DAPO dynamic sampling: extra rollout rounds this step", ""),
    "rollout/batch_fill": ("DAPO dynamic sampling: share of the batch filled with informative groups", ""),
    "rollout/engine_logp_diff": (
        "first update: mean absolute difference of log pi_train and log pi_engine over completion tokens",
        "sampling/sampling_logp_difference/mean",
    ),
    "rollout/engine_logp_diff_max": ("the same, max over a micro-batch", "sampling/sampling_logp_difference/max"),
    "rollout/engine_prob_corr": (
        "first update: Pearson correlation of the token probabilities, trainer vs rollout engine",
        "training/rollout_actor_probs_pearson_corr",
    ),
    "reward/mean": ("mean reward of the step's first rollout", "reward"),
    "reward/std": ("std of those rewards over the batch", "reward_std"),
    "reward/group_std": ("mean within-group reward std (MoE-GRPO Fig. 3)", ""),
    "reward/frac_informative_in_loss": (
        "with rollout.mask_truncated: share of groups with a non-zero advantage on a row that keeps loss tokens",
        "",
    ),
    "reward/frac_zero_std": ("share of groups whose rewards are all equal (advantage 0)", "frac_reward_zero_std"),
    "reward/task": ("mean task (verifier) reward, unweighted", "rewards/<fn>/mean"),
    "reward/format": ("share of completions in the answer format (reward_funcs: format)", "rewards/<fn>/mean"),
    "reward/tag_count": ("mean format-tag partial credit (reward_funcs: tag_count), unweighted", "rewards/<fn>/mean"),
    "reward/overlong": ("mean DAPO soft overlong punishment (<= 0)", ""),
    "reward/routing": ("mean RO-GRPO routing reward", "rewards/<fn>/mean"),
    "reward/routing_w_h": ("RO-GRPO Smooth: weight of the entropy term now", ""),
    "reward/routing_w_b": ("RO-GRPO Smooth: weight of the balance term now", ""),
    "reward/routing_hit_rate": ("RO-GRPO Relative: share of completions that beat the history", ""),
    "reward/routing_h_hist": ("RO-GRPO Relative: history of H_norm", ""),
    "reward/routing_m_hist": ("RO-GRPO Relative: history of M_norm", ""),
    "loss/total": ("the optimised scalar, mean over inner updates", "loss"),
    "loss/token": ("token-loss term (micro-batch mean)", "actor/pg_loss"),
    "loss/gate": ("Gate-GRPO term (MoE-GRPO Eq. 5)", ""),
    "loss/lb": ("Switch load-balancing loss on the experts used (1 = uniform)", "aux_loss"),
    "loss/z": ("router z-loss", ""),
    "loss/kl": ("per-token KL to the reference model", "kl / actor/kl_loss"),
    "loss/ce": ("SFT cross-entropy of the answer tokens (sft_metrics.jsonl)", ""),
    "loss/clip_frac": ("share of tokens whose ratio was clipped", "clip_ratio/region_mean / actor/pg_clipfrac"),
    "loss/clip_frac_low": ("share clipped at 1 - eps_low", "clip_ratio/low_mean"),
    "loss/clip_frac_high": ("share clipped at 1 + eps_high", "clip_ratio/high_mean"),
    "loss/ratio_mean": ("mean token ratio", ""),
    "loss/ratio_max": ("max token ratio", ""),
    "loss/approx_kl": ("mean(ρ - 1 - log ρ) of the token ratios", "actor/ppo_kl"),
    "loss/seq_*": ("sequence-level ratio statistics (GSPO, GMPO)", ""),
    "loss/gate_clip_frac": ("Gate-GRPO: share of (layer, token) set ratios clipped", ""),
    "loss/gate_ratio_mean": ("Gate-GRPO: mean set ratio", ""),
    "loss/gate_approx_kl": ("Gate-GRPO: approx KL of the set ratios", ""),
    "loss/mismatch_weight_mean": (
        "TIS / MIS / IcePop: mean correction weight of the token loss",
        "sampling/importance_sampling_ratio/mean",
    ),
    "loss/mismatch_frac": ("TIS: share of tokens truncated at C; MIS / IcePop: share of tokens dropped", ""),
    "loss/*": ("any other statistic a registered token loss returns", ""),
    "router/entropy": ("mean per-token router entropy over completion tokens, nats (METHODS §6.6)", ""),
    "router/usage_entropy": ("entropy of aggregate expert usage, nats, mean over layers (MoE-GRPO 1.05 -> 1.82)", ""),
    "router/load/<router>": ("(E,) share of completion-token slots each expert took", ""),
    "router/entropy_norm": ("RO-GRPO H_norm (mean over completions)", ""),
    "router/load_mse": ("RO-GRPO raw M", ""),
    "router/load_mse_norm": ("RO-GRPO M_norm (mean over completions)", ""),
    "router/load_mse_norm/<router>": ("RO-GRPO M_norm per router", ""),
    "router/utilisation/<router>": ("(E,) RO-GRPO mean routing probability per expert", ""),
    "router/shift/gamma_mean": ("RSPO γ, masked mean (METHODS: router_shift/gamma_mean)", ""),
    "router/shift/gamma_p10": ("RSPO γ, 10th percentile", ""),
    "router/shift/gamma_p50": ("RSPO γ, median", ""),
    "router/shift/frac_below_floor": ("share of tokens with γ < γ_min", "diag/router_shift/clipfrac_gamma_0_8"),
    "router/shift/delta_mean": ("RSPO Δ, masked mean", ""),
    "router/shift/delta_p90": ("RSPO Δ, 90th percentile", ""),
    "router/shift/delta_p99": ("RSPO Δ, 99th percentile", ""),
    "router/shift/delta_per_layer": ("(L,) mean d^l per layer", ""),
    "router/shift/topk_overlap": ("|S_old ∩ S_live| / K, mean over layers and tokens", ""),
    "router/shift/topk_overlap_per_layer": ("(L,) the same per layer", ""),
    "router/shift/rollout_train_overlap": ("first update: rollout routes vs the trainer's top-K", ""),
    "router/shift/rollout_train_overlap_per_layer": ("(L,) the same per layer", ""),
    "router/shift/rollout_train_mismatch": ("first update: share of tokens whose set differs in >= 1 layer", ""),
    "optim/grad_norm": ("global gradient norm before clipping, mean over inner updates", "grad_norm"),
    "optim/lr": ("learning rate after the step", "learning_rate"),
    "optim/skipped_steps": ("NaN/Inf steps skipped so far", ""),
    "optim/applied_updates": ("inner updates applied this step (fewer than inner_updates after a NaN/Inf one)", ""),
    "time/step": ("seconds of the step", "step_time / timing_s/step"),
    "time/rollout": ("seconds of rollout, scoring and refills", "timing_s/gen"),
    "time/update": ("seconds of the inner updates", "timing_s/update_actor"),
    "time/tokens_per_s": ("completion tokens per second of the step", ""),
    "time/engine_sync": ("seconds pushing the policy's weights into the rollout engine (rollout.engine=vllm)", ""),
    "eval/accuracy": ("held-out accuracy, greedy tokens, top-K routing", ""),
}

RENAMED: dict[str, str] = {
    "reward": "reward/mean",
    "reward_std": "reward/std",
    "reward_group_std": "reward/group_std",
    "frac_reward_zero_std": "reward/frac_zero_std",
    "completions/mean_length": "rollout/completion_length",
    "completions/loop_rate": "rollout/loop_rate",
    "moe/trace_bytes": "rollout/trace_bytes",
    "num_tokens": "rollout/num_tokens",
    "dynamic_sampling/refill_rounds": "rollout/refill_rounds",
    "dynamic_sampling/batch_fill": "rollout/batch_fill",
    "moe/router_entropy": "router/entropy",
    "moe/usage_entropy": "router/usage_entropy",
    "moe/entropy_norm": "router/entropy_norm",
    "moe/load_mse": "router/load_mse",
    "moe/load_mse_norm": "router/load_mse_norm",
    "route/w_h": "reward/routing_w_h",
    "route/w_b": "reward/routing_w_b",
    "route/relative_hit_rate": "reward/routing_hit_rate",
    "route/h_hist": "reward/routing_h_hist",
    "route/m_hist": "reward/routing_m_hist",
    "grad_norm": "optim/grad_norm",
    "lr": "optim/lr",
    "faults/skipped_steps": "optim/skipped_steps",
    "tokens_per_s": "time/tokens_per_s",
    "sft/loss": "loss/ce",
    "sft/lb_loss": "loss/lb",
    "sft/z_loss": "loss/z",
    "sft/grad_norm": "optim/grad_norm",
    "sft/step_time": "time/step",
}
"""Old metric name -> new one (exact keys)."""

RENAMED_PREFIXES: dict[str, str] = {
    "moe/load/": "router/load/",
    "moe/utilisation/": "router/utilisation/",
    "moe/load_mse_norm_per_module/": "router/load_mse_norm/",
    "router_shift/": "router/shift/",
}
"""Old key prefix -> new prefix (per-router and router-shift families)."""


def new_name(key: str) -> str:
    """The current name of a metric key, old or new."""
    if key in RENAMED:
        return RENAMED[key]
    for old, new in RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def documented(key: str) -> bool:
    """Whether ``key`` matches an entry of ``VOCABULARY`` (``<router>`` and ``*`` match any suffix)."""
    for pattern in VOCABULARY:
        if pattern == key:
            return True
        for wild in ("<router>", "*"):
            if wild in pattern and key.startswith(pattern.split(wild)[0]):
                return True
    return False
