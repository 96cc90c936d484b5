"""DAPO length shaping: golden values of the soft overlong punishment, and truncation detection."""

import torch

from expertrl.rewards.shaping import soft_overlong_punishment, truncated


def test_soft_overlong_punishment_golden():
    # L_max = 20, L_cache = 4: free up to 16; 18 -> (16 - 18)/4 = -0.5; 20 -> -1.0; 21 -> -1 (beyond the budget)
    lengths = torch.tensor([3, 16, 17, 18, 20, 21])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(soft_overlong_punishment(lengths, max_len=20, cache=4), expected)


def test_truncated_means_no_eos_inside_the_mask():
    eos = 2
    completion = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert truncated(mask, completion, eos).tolist() == [False, True, False]
