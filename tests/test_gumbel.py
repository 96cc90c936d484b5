"""In-engine expert sampling (``moe.gumbel``): counter-based noise is a pure function of (seed, layer, position,
expert), Gumbel-top-k draws K of E without replacement from the tempered, masked router softmax in draw order (the
distribution ``policies.Multinomial`` samples), and the expert weights are ``moe.hooks``'."""

import itertools
import math

import pytest
import torch

from expertrl.moe.gumbel import counter_uniform, expert_weights, gumbel_noise, mix64, sample_without_replacement
from expertrl.moe.setprob import plackett_luce_logp, set_statistics


def test_mix64_golden_and_bijective_on_a_range():
    # splitmix64 of 0 (its first output for seed 0 is mix64(0 + golden)); reference value of the published algorithm
    assert mix64(torch.tensor([0], dtype=torch.int64)).item() == -2152535657050944081  # 0xE220A8397B1DCDAF
    x = mix64(torch.arange(10_000, dtype=torch.int64))
    assert x.unique().numel() == 10_000


def test_counter_noise_is_a_pure_function_of_seed_layer_position_expert():
    seeds = torch.tensor([7, 7, 8, -3], dtype=torch.int64)
    positions = torch.tensor([0, 5, 5, 2], dtype=torch.int64)
    u = counter_uniform(seeds, positions, 3, 6)  # (N, L, E)
    assert u.shape == (4, 3, 6) and u.dtype == torch.float64
    assert (u > 0).all() and (u < 1).all()
    # any subset of rows, in any order (another batch), gets the same numbers
    sub = counter_uniform(seeds[[3, 1]], positions[[3, 1]], 3, 6)
    assert torch.equal(sub, u[[3, 1]])
    # a different seed, position, layer or expert gives different numbers
    assert not torch.equal(u[1], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(u[0, 0], u[0, 1])
    assert u[0, 0].unique().numel() == 6


def test_counter_noise_is_uniform():
    seeds = torch.arange(20_000, dtype=torch.int64)
    u = counter_uniform(seeds, torch.zeros_like(seeds), 1, 4).flatten()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    g = gumbel_noise(seeds, torch.zeros_like(seeds), 1, 4).flatten()
    assert abs(g.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni: the Gumbel mean


def test_gumbel_top_k_draws_the_plackett_luce_distribution_in_draw_order():
    """Ordered pairs drawn by Gumbel-top-k at T = 0.5 with one expert masked, against the exact sequential-draw
    probabilities (``setprob.plackett_luce_logp``): every pair within 4 sigma, masked experts never drawn."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    scores = logits.masked_fill(~mask, float("-inf")) / 0.5  # (1, E) the routing distribution's scores
    n = 40_000
    seeds = torch.arange(n, dtype=torch.int64)
    noise = gumbel_noise(seeds, torch.zeros_like(seeds), 1, 5)[:, 0]  # (n, E)
    ids = sample_without_replacement(scores.expand(n, -1), 2, noise)  # (n, 2)
    assert (ids != 4).all()
    for a, b in itertools.permutations(range(4), 2):
        pair = torch.tensor([[a, b]])
        exact = plackett_luce_logp(*set_statistics(scores, pair)).exp().item()
        freq = ((ids[:, 0] == a) & (ids[:, 1] == b)).float().mean().item()
        assert abs(freq - exact) < 4 * math.sqrt(exact * (1 - exact) / n) + 1e-4, (a, b, freq, exact)


def test_expert_weights_are_the_native_routers(tiny_moe):
    """Unmasked and renormalised, the engine's mixing weights equal the native Qwen3-MoE router's; masked and not
    renormalised, they are the masked softmax at the chosen experts (``moe.hooks``)."""
    router = tiny_moe.model.layers[0].mlp.gate
    h = torch.randn(7, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    raw = torch.nn.functional.linear(h, router.weight).float()  # (N, E)
    experts = raw.topk(2, dim=-1).indices
    _, native_weights, native_ids = router(h)
    assert torch.equal(native_ids, experts)
    torch.testing.assert_close(expert_weights(raw, experts, renormalize=True), native_weights.float())
    masked = raw.clone()
    masked[:, 0] = float("-inf")
    chosen = masked.topk(2, dim=-1).indices
    expected = torch.softmax(masked, -1).gather(1, chosen)
    torch.testing.assert_close(expert_weights(masked, chosen, renormalize=False), expected)
    assert (chosen != 0).all()


def test_layer_keys_wrap_like_int64_for_every_layer_of_a_real_model():
    """A 48-layer model: layer l's key l * c + 1 overflows int64 from l = 2 on, so it must wrap exactly as the
    vectorised int64 arithmetic of the engine's first version did (regression: the hf rollout crashed at layer 2)."""
    from expertrl.moe.gumbel import _LAYER, _shift_right, layer_uniform, mix64

    seeds = torch.tensor([0, 1, -5, 2**62 + 3], dtype=torch.int64)
    positions = torch.tensor([0, 7, 3, 1000], dtype=torch.int64)
    L, E = 48, 128
    layers = torch.arange(L, dtype=torch.int64) * _LAYER + 1  # int64 tensor arithmetic wraps
    row = mix64(mix64(seeds[:, None] ^ layers[None, :]) ^ positions[:, None])
    z = mix64(row[..., None] ^ mix64(torch.arange(E, dtype=torch.int64)))
    expected = (_shift_right(z, 11).double() + 0.5) * (1.0 / (1 << 53))  # (N, L, E)
    for layer in range(L):
        assert torch.equal(layer_uniform(seeds, positions, layer, E), expected[:, layer])


@pytest.mark.parametrize("start", [0, 3])  # 3 = P - 1: a shared prefill computed the columns before it
def test_a_decode_steps_uniforms_for_all_layers_at_once_equal_each_layers_own(start):
    """``RouteSeeds`` computes a decode step's uniforms for every layer in one call (one hash over (L, B, E) instead
    of L): bit for bit what each layer's own ``layer_uniform`` gives, at every step, whatever order the layers ask
    in, with the prefill per layer."""
    from expertrl.moe.gumbel import RouteSeeds, layer_uniform

    seeds = torch.tensor([11, -3, 2**61 + 5], dtype=torch.int64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])  # left-padded prompts of 3, 4 and 2 tokens
    L, E = 5, 128
    rs = RouteSeeds(seeds, mask, prompt_seeds=seeds + 1, start=start)
    for layer in range(L):  # the prefill, per layer
        assert rs.uniform(layer, 3 * (4 - start), E).shape == (3 * (4 - start), E)
    order = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        for layer in torch.randperm(L, generator=order).tolist() if step > 1 else range(L):
            expected = layer_uniform(seeds, mask.sum(-1) + step - 1, layer, E)  # (B, E)
            assert torch.equal(rs.uniform(layer, 3, E), expected), (step, layer)
