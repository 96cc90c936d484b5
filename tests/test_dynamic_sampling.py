"""DAPO's dynamic sampling: zero-signal groups are dropped and the batch is refilled; re-padded batches replay right."""

import json

import torch

from expertrl.batching import concat_rollouts, informative_groups
from expertrl.config import TrainConfig
from expertrl.configio import load_config
from expertrl.models import build_tiny_moe
from expertrl.moe.policies import Multinomial
from expertrl.policy import policy_forward
from expertrl.rollout import generate_rollout
from expertrl.tokenizer import build_char_tokenizer
from expertrl.train import train


def _scored(model, tok, items, seed):
    ro = generate_rollout(
        model, tok, items, group_size=2, max_new_tokens=4, policy=Multinomial(),
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    ro.rewards = torch.tensor([float(i % 3 == 0) for i in range(ro.batch_size)])  # groups 0 and 1 mixed, 2 not
    ro.advantages = ro.rewards - ro.rewards.view(-1, 2).mean(-1).repeat_interleave(2)
    return ro


def test_concat_rollouts_repads_and_replays_to_the_same_logprobs():
    tok, model = build_char_tokenizer(), build_tiny_moe("qwen3_moe", "tiny").eval()
    a = _scored(model, tok, [{"prompt": "1+2="}, {"prompt": "10+20="}, {"prompt": "3+3="}], 0)
    b = _scored(model, tok, [{"prompt": "123+456="}], 1)  # wider prompt: a's rows get more left padding
    both = concat_rollouts([a, b], tok.pad_token_id)
    assert both.batch_size == a.batch_size + b.batch_size
    assert both.prompt_width == max(a.prompt_width, b.prompt_width)
    assert both.routing.experts.shape[:3] == (2, both.batch_size, both.input_ids.shape[1])
    # replaying the re-padded batch gives each completion the log-probs it had in its own batch
    fresh = policy_forward(model, both, both.routing)
    torch.testing.assert_close(fresh.logp * both.mask, both.old_logp * both.mask, atol=1e-4, rtol=0)
    routed = both.routing.experts[0, :, :, 0] >= 0  # (B, S) positions with a recorded route
    torch.testing.assert_close(fresh.set_logp[:, routed], both.old_set_logp[:, routed], atol=1e-4, rtol=0)
    assert both.completions == a.completions + b.completions


def test_informative_groups_drops_equal_reward_groups():
    tok, model = build_char_tokenizer(), build_tiny_moe("qwen3_moe", "tiny").eval()
    ro = _scored(model, tok, [{"prompt": "1+2="}, {"prompt": "2+2="}, {"prompt": "3+2="}], 0)
    # rewards per group: (1,0), (0,1), (0,0) -> the last group carries no signal
    kept = informative_groups(ro)
    assert kept.batch_size == 4 and kept.items == ro.items[:4]


def test_dynamic_sampling_refills_to_the_batch_size(tmp_path):
    from expertrl.presets import preset_overrides

    args = [*preset_overrides("dapo"), "--model.preset", "tiny", "--sft.steps", "0", "--steps", "2"]
    args += ["--rollout.prompts_per_step", "4", "--rollout.group_size", "4", "--rollout.max_new_tokens", "3"]
    args += ["--task.eval_size", "2", "--eval_every", "0", "--progress", "false", "--output_dir", str(tmp_path / "r")]
    args += ["--rollout.max_refill_rounds", "2"]
    cfg = load_config(TrainConfig, None, args)
    import expertrl.collect as T

    calls = []
    real = T.compute_rewards

    def alternate(weights, completions, items, task, **options):  # every other group informative, deterministic
        total, parts = real(weights, completions, items, task, **options)
        total = torch.tensor([float((i // 4) % 2 == 0 and i % 4 == 0) for i in range(len(completions))])
        calls.append(len(completions))
        return total, parts

    T.compute_rewards = alternate
    try:
        train(cfg)
    finally:
        T.compute_rewards = real
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in x]
    # half the groups survive each round: 2 of 4, then +2 -> full after one refill round
    assert [r["rollout/refill_rounds"] for r in rows] == [1.0, 1.0]
    assert [r["rollout/batch_fill"] for r in rows] == [1.0, 1.0]
    assert calls[:2] == [16, 16]
