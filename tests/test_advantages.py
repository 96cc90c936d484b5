"""Group-relative advantages: golden values, zero-std groups and a naive reference loop (STYLE.md §13)."""

import math

import pytest
import torch

from expertrl.advantages import group_advantages


def test_golden_group_of_two():
    # group [1, 0]: mean 0.5, population std 0.5 → [0.5/0.5, −0.5/0.5] = [1, −1] (up to eps)
    adv, m = group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(m["reward/group_std"], torch.tensor(0.5))


def test_zero_std_groups_are_exactly_zero():
    # Eight rewards of 0.1 in float32: R − mean = −7.45e-9 and std = 7.45e-9, so the naive formula gives
    # −7.45e-9 / (7.45e-9 + 1e-6) ≈ −0.0074, not 0. The result must be exactly 0.
    rewards = torch.cat([torch.full((8,), 0.1), torch.tensor([1.0, 0.0] * 4)])
    adv, m = group_advantages(rewards, 8)
    assert (adv[:8] == 0).all()
    assert (adv[8:] != 0).all()
    torch.testing.assert_close(m["reward/frac_zero_std"], torch.tensor(0.5))


def test_scale_none_only_centres():
    adv, _ = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def _naive(rewards, group_size, scale, eps):
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start : start + group_size]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        for r in group:
            if max(group) == min(group):
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std + eps))
            else:
                out.append(r - mean)
    return torch.tensor(out)


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("group_size", [1, 4, 8])
def test_matches_naive_loop(scale, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (24,), generator=g).float()  # discrete, so some groups have zero std
    adv, m = group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(adv, _naive(rewards, group_size, scale, 1e-6))
    zero = [len(set(rewards[i : i + group_size].tolist())) == 1 for i in range(0, 24, group_size)]
    torch.testing.assert_close(m["reward/frac_zero_std"], torch.tensor(sum(zero) / len(zero)))


def test_errors():
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.ones(4), 2, scale="std")
    with pytest.raises(AssertionError):
        group_advantages(torch.ones(5), 2)
