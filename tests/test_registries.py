"""Contract tests swept over every registry (the way the loss registry already is): every routing policy, every reward
and set log-probability, and the config's choices equal the registries' keys, so a new entry is tested by adding it.
"""

import typing

import pytest
import torch

from expertrl import config as C
from expertrl.advantages import SCALES
from expertrl.families import FAMILIES, TINY
from expertrl.losses import LOSSES
from expertrl.losses.aggregate import AGGREGATIONS
from expertrl.losses.kl import KL_ESTIMATORS
from expertrl.losses.rspo import LAYER_AGGREGATIONS, PLACEMENTS
from expertrl.moe.guide import GROUPINGS
from expertrl.moe.policies import POLICIES, make_policy
from expertrl.moe.setprob import SET_LOGPROBS, set_logprob
from expertrl.objective import REPLAYS
from expertrl.rewards import REWARDS
from expertrl.rewards.answers import EXTRACTORS
from expertrl.rewards.routing import HISTORIES, KINDS, POOLS
from expertrl.trackers import TRACKERS
from expertrl.types import UNROUTED

N, E, K = 64, 8, 2


def _choices(cls, name):
    return set(typing.get_args(typing.get_type_hints(cls)[name]))


@pytest.mark.parametrize(
    "cls, name, registry",
    [
        (C.RoutingConfig, "set_logprob", SET_LOGPROBS),
        (C.RoutingConfig, "replay", REPLAYS),
        (C.SFTConfig, "routing", POLICIES),
        (C.LossConfig, "agg", AGGREGATIONS),
        (C.LossConfig, "advantage_scale", SCALES),
        (C.LossConfig, "kl_estimator", KL_ESTIMATORS),
        (C.RSPOConfig, "placement", PLACEMENTS),
        (C.RSPOConfig, "layer_agg", LAYER_AGGREGATIONS),
        (C.RoutingRewardConfig, "history", HISTORIES),
        (C.RoutingRewardConfig, "pool", POOLS),
        (C.GuidanceConfig, "groups", GROUPINGS),
        (C.ModelConfig, "family", TINY),
        (C.TaskConfig, "answer_extractor", EXTRACTORS),
        (C.TaskConfig, "completion_extractor", EXTRACTORS),
    ],
)
def test_config_choices_are_the_registry_keys(cls, name, registry):
    assert _choices(cls, name) == set(registry), (cls.__name__, name)


def test_the_configs_policy_sets_are_the_policies_flags():
    assert set(C.SAMPLED_POLICIES) == {n for n, p in POLICIES.items() if p.stochastic}
    assert set(C.SET_PROBABILITY_POLICIES) == {n for n, p in POLICIES.items() if p.has_set_probability}


def test_config_choices_that_are_a_documented_subset():
    # rollouts sample with causal policies only (Expert Choice and Sinkhorn balance over a whole forward)
    rollout = _choices(C.RoutingConfig, "policy")
    assert rollout == {n for n, p in POLICIES.items() if p.causal}
    assert _choices(C.RoutingRewardConfig, "kind") == {"none", *KINDS}
    assert set(TINY) <= set(FAMILIES)
    assert C.LossConfig().name in LOSSES
    assert set(typing.get_args(C.TrackerName)) == {"jsonl", "none", *TRACKERS}  # report_to: list of these
    assert set(C.TrainConfig().reward_funcs) <= set(REWARDS)
    assert set(typing.get_args(C.RewardName)) == set(REWARDS)  # reward_funcs: list of these (config imports no torch)


def _logp(seed: int = 0, masked: bool = False) -> torch.Tensor:
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(seed)) * 2
    if masked:
        logits[:, :2] = float("-inf")  # experts 0 and 1 are not allowed for any token
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("masked", [False, True])
def test_every_policy_returns_distinct_allowed_experts(name, masked):
    policy = make_policy(name)
    experts = policy.select(_logp(masked=masked), K, torch.Generator().manual_seed(1))  # (N, K')
    assert experts.dtype == torch.long and experts.shape[0] == N
    real = experts[experts != UNROUTED]
    assert ((real >= 0) & (real < E)).all()
    if policy.fixed_k:
        assert experts.shape == (N, K) and (experts != UNROUTED).all()
    for row in experts.tolist():
        ids = [e for e in row if e != UNROUTED]
        assert len(ids) == len(set(ids)), row  # K distinct experts per token
    if masked:
        assert not ((experts == 0) | (experts == 1)).any(), "a masked expert was chosen"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_deterministic_for_a_seed_and_declares_its_flags(name):
    policy = make_policy(name)
    a = policy.select(_logp(), K, torch.Generator().manual_seed(3))
    b = policy.select(_logp(), K, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for flag in ("stochastic", "has_set_probability", "causal", "fixed_k"):
        assert isinstance(getattr(policy, flag), bool), flag
    if policy.has_set_probability:  # its draw probability is the Plackett-Luce of the distribution
        assert policy.stochastic and policy.fixed_k and name in ("multinomial",)


@pytest.mark.parametrize("name", sorted(SET_LOGPROBS))
def test_every_set_logprob_is_a_log_probability(name):
    logits = torch.randn(N, E)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    lp = set_logprob(name, logits, experts)
    assert lp.shape == (N,) and torch.isfinite(lp).all()
    if name != "independent":  # the independent product is not a normalised probability of the set
        assert (lp <= 1e-6).all()


class _Task:
    def score(self, completion: str, item: dict) -> float:
        return float(completion == item["answer"])


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_returns_one_float32_per_completion(name):
    completions = ["4", "5", "", "x" * 1000, "4\n4"]
    items = [{"prompt": "2+2=", "answer": "4"}] * len(completions)
    reward = REWARDS[name](completions, items, _Task())
    assert reward.shape == (len(completions),) and reward.dtype == torch.float32
    assert torch.isfinite(reward).all()
    assert REWARDS[name]([], [], _Task()).shape == (0,)  # start-up checks reward_kwargs with an empty batch
