"""The expert path and the optimizer step of issue 16 against the code they replace.

- ``moe.experts`` (``experts_implementation="expertrl_grouped_mm"``, the default) equals transformers' ``grouped_mm``
  kernel to 1e-6, forward and every gradient, on every supported family; bit for bit at K <= 2.
- The fused AdamW of ``runtime.optimizer_and_schedule`` takes the per-tensor loop's steps up to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from expertrl.config import OptimConfig
from expertrl.families import TINY_MOE
from expertrl.models import build_tiny_moe
from expertrl.moe.experts import NAME, grouped_experts_forward
from expertrl.runtime import optimizer_and_schedule


def _experts_call(fn, experts, hidden, index, weights, upstream):
    leaves = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]
    for p in experts.parameters():
        p.grad = None
    out = fn(experts, leaves[0], index, leaves[1])
    (out.float() * upstream).sum().backward()
    return [out.detach()] + [x.grad for x in leaves] + [p.grad.clone() for p in experts.parameters()]


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_transformers_grouped_mm(K, dtype):
    N, H, I, E = 50, 16, 8, 6
    g = torch.Generator().manual_seed(K)
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    experts = Qwen3MoeExperts(config).to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    hidden = torch.randn(N, H, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(N, E, generator=g), -1)
    weights, index = probs.topk(K, dim=-1)  # E = 6 > K: some experts get no token at K = 1
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    upstream = torch.randn(N, H, generator=g)
    ours = _experts_call(grouped_experts_forward, experts, hidden, index, weights, upstream)
    theirs = _experts_call(grouped_mm_experts_forward, experts, hidden, index, weights, upstream)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if K <= 2:
            assert torch.equal(a, b)
        else:
            tol = 1e-6 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.float().abs().max()))


@pytest.mark.parametrize("family", TINY_MOE)
def test_every_family_trains_the_same_with_either_kernel(family):
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    results = []
    for impl in ("grouped_mm", NAME):
        model = build_tiny_moe(family, "tiny", experts_implementation=impl, top_k=3).eval()  # K = 3: not bitwise
        assert model.config._experts_implementation == impl
        logits = model(ids, attention_mask=mask).logits
        (logits.log_softmax(-1)[..., 5] * torch.linspace(-1, 1, 9)).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref_grads) and any("experts" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-6, msg=name)


def test_fused_adamw_takes_the_loops_steps():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 16, 4), (16,), (5, 7)]
    start = [0.02 * torch.randn(s, generator=g) for s in shapes]
    grads = [[1e-3 * torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    cfg = OptimConfig(warmup_steps=2)
    finals = []
    for fused in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        optimizer, schedule = optimizer_and_schedule(params, cfg, total_steps=5, fused=fused)
        assert optimizer.defaults["fused"] is fused
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
            schedule.step()
        finals.append(params)
    for loop, fused in zip(*finals):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-8)
    assert optimizer_and_schedule([torch.zeros(1, requires_grad=True)], cfg, 1)[0].defaults["fused"] is True
