"""The routing layer: family adapters, routing policies, scoped routing hooks with record and replay."""

from expertrl.families import FAMILIES, Family
from expertrl.moe.adapters import RouterSite, find_routers
from expertrl.moe.hooks import RoutingRecorder, route
from expertrl.moe.policies import POLICIES, Multinomial, NoisyTopK, Replay, TopK, make_policy, replay_policy_for

__all__ = [
    "FAMILIES",
    "POLICIES",
    "Family",
    "Multinomial",
    "NoisyTopK",
    "Replay",
    "RouterSite",
    "RoutingRecorder",
    "TopK",
    "find_routers",
    "make_policy",
    "replay_policy_for",
    "route",
]
