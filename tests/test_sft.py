"""`expertrl sft`: each routing mode of the MoE-GRPO paper's baselines really routes as it says (Det-FT top-K,
Stoch-FT-Multi sampling, Stoch-FT-Noise, Expert Choice under a capacity, Sinkhorn balancing), and the router z-loss
is on when asked. A spy records what the routers chose in the first supervised step (same weights, same batch)."""

from contextlib import contextmanager

import pytest
import torch

import expertrl.sft as sft_module
from expertrl.config import SFTConfig
from expertrl.models import build_tiny_moe
from expertrl.sft import supervised_train
from expertrl.tasks import load_task


@pytest.fixture(scope="module")
def items():
    return load_task("addition", train_size=64, eval_size=4, seed=0).train


def first_step_routes(monkeypatch, tokenizer, items, routing, **kwargs):
    """Experts (L, N, K') and probabilities (L, N, E) of the first SFT step's forward, N = attended tokens."""
    seen = []
    real_route = sft_module.route

    @contextmanager
    def spy(model, policy, **kw):
        with real_route(model, policy, **(kw | {"keep_probs": True})) as rec:
            yield rec
        seen.append(rec)

    monkeypatch.setattr(sft_module, "route", spy)
    model = build_tiny_moe("qwen3_moe", "tiny", num_experts=8, top_k=2)
    cfg = SFTConfig(steps=1, batch_size=16, routing=routing, lb_coef=0.0, **kwargs)
    metrics = supervised_train(model, tokenizer, items, cfg, seed=0, progress=False).metrics
    rec = seen[0]
    experts, probs = rec.trace(16).experts.long(), rec.probs(16)  # (L, B, S, K'), (L, B, S, E)
    return experts.flatten(1, 2), probs.flatten(1, 2), metrics  # (L, N, K'), (L, N, E)


def same_sets(a, b):
    return (a.sort(-1).values == b.sort(-1).values).all(-1)  # (L, N)


def test_det_ft_routes_top_k(monkeypatch, tokenizer, items):
    experts, probs, _ = first_step_routes(monkeypatch, tokenizer, items, "topk")
    assert same_sets(experts, probs.topk(2, dim=-1).indices).all()


def test_stoch_ft_multi_samples_other_sets(monkeypatch, tokenizer, items):
    experts, probs, _ = first_step_routes(monkeypatch, tokenizer, items, "multinomial")
    differ = 1 - same_sets(experts, probs.topk(2, dim=-1).indices).float().mean()
    # a near-uniform tiny router: most sampled sets are not the top-2 set
    assert differ > 0.5, differ
    assert (experts[..., 0] != experts[..., 1]).all()  # without replacement


def test_stoch_ft_noise_perturbs_top_k(monkeypatch, tokenizer, items):
    experts, probs, _ = first_step_routes(
        monkeypatch, tokenizer, items, "noisy_topk", routing_kwargs={"noise_std": 0.5}
    )
    differ = 1 - same_sets(experts, probs.topk(2, dim=-1).indices).float().mean()
    assert 0 < differ < 1, differ


def test_expert_choice_respects_capacity(monkeypatch, tokenizer, items):
    experts, _, _ = first_step_routes(
        monkeypatch, tokenizer, items, "expert_choice", routing_kwargs={"capacity_factor": 2.0}
    )
    L, N, _ = experts.shape
    capacity = -(-N * 2 // 8)  # ceil(N * c / E) over the forward's N tokens (padding included)
    for layer in range(L):
        used = experts[layer][experts[layer] >= 0]
        load = torch.bincount(used, minlength=8)
        assert load.max() <= capacity
        per_token = (experts[layer] >= 0).sum(-1)  # (N,) experts each token got: not fixed at K
        assert per_token.float().mean() == pytest.approx(load.sum().item() / N)
        assert per_token.min() != per_token.max()


def test_sinkhorn_is_more_balanced_than_top_k(monkeypatch, tokenizer, items):
    top, _, _ = first_step_routes(monkeypatch, tokenizer, items, "topk")
    balanced, _, _ = first_step_routes(monkeypatch, tokenizer, items, "sinkhorn")

    def imbalance(experts):  # max load / mean load - 1, worst layer
        loads = torch.stack([torch.bincount(e.flatten(), minlength=8).float() for e in experts])  # (L, E)
        return (loads.max(-1).values / loads.mean(-1) - 1).max()

    assert imbalance(balanced) < imbalance(top)


def test_z_loss_is_logged_and_trained(monkeypatch, tokenizer, items):
    _, _, metrics = first_step_routes(monkeypatch, tokenizer, items, "topk", z_coef=1e-3)
    assert metrics["loss/z"] > 0
