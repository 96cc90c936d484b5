"""Token log-probs without (B, C, V) logits: ``ops.linear_token_logp`` (chunked fused linear + log-prob, chunked
backward) and the LM-head patch of ``policy.token_logp_head`` agree with the plain path (full logits ->
``Sampling.token_scores`` -> ``token_logp``), re-derived in float64, at token temperature 0.7 with suppressed tokens,
and never hold more than one chunk of logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from expertrl.models import build_tiny_moe
from expertrl.moe.hooks import route
from expertrl.moe.policies import TopK, replay_policy_for
from expertrl.ops import linear_token_logp, token_logp
from expertrl.policy import forward_sequences, policy_forward, position_ids_from_mask, token_logp_head
from expertrl.rollout import generate_rollout
from expertrl.types import Sampling

SAMPLED = Sampling(do_sample=True, token_temperature=0.7, suppress_tokens=(3, 7))


def _inputs(dtype, N=37, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, N, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    tokens = torch.randint(0, V, (3, N), generator=g)
    tokens[(tokens == 3) | (tokens == 7)] = 4  # a suppressed token is never sampled
    return hidden, weight, bias, tokens


def _plain(hidden, weight, bias, tokens, sampling):
    """The path being replaced: full logits, then the sampled distribution's scores, then the token's log-prob."""
    return token_logp(sampling.token_scores(F.linear(hidden, weight, bias)), tokens)


def _value_and_grads(fn, hidden, weight, bias, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    out = fn(*leaves)
    (out.double() * upstream).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("chunk", [1, 3 * 50, 10**9])  # one row per chunk, 3 rows, everything in one chunk
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_token_logp_matches_a_float64_rederivation(dtype, chunk):
    hidden, weight, bias, tokens = _inputs(dtype)
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = _value_and_grads(
        lambda h, w, b: linear_token_logp(h, w, tokens, bias=b, temperature=0.7, suppress=(3, 7), chunk=chunk),
        hidden, weight, bias, upstream,
    )  # fmt: skip
    # float64 re-derivation from the same (rounded) inputs: bf16 hidden states and weights get float32 maths here
    ref, ref_grads = _value_and_grads(
        lambda h, w, b: _plain(h.double(), w.double(), b.double(), tokens, SAMPLED), hidden, weight, bias, upstream
    )
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype  # gradients come back in the parameters' dtype
        scale = want.abs().max().item()
        grad_tol = tol if dtype != torch.bfloat16 else 2**-7  # the bf16 gradient itself is rounded to 8 bits
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=grad_tol * max(scale, 1.0))


def test_linear_token_logp_equals_the_plain_float32_path():
    hidden, weight, bias, tokens = _inputs(torch.float32)
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grads = _value_and_grads(
        lambda h, w, b: linear_token_logp(h, w, tokens, bias=b, temperature=0.7, suppress=(3, 7), chunk=200),
        hidden, weight, bias, upstream,
    )  # fmt: skip
    ref, ref_grads = _value_and_grads(lambda h, w, b: _plain(h, w, b, tokens, SAMPLED), hidden, weight, bias, upstream)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_suppressed_tokens_get_no_gradient_and_greedy_ignores_the_temperature():
    hidden, weight, bias, tokens = _inputs(torch.float64)
    w = weight.clone().requires_grad_()
    linear_token_logp(hidden, w, tokens, bias=bias, temperature=0.7, suppress=(3, 7)).sum().backward()
    assert w.grad[[3, 7]].abs().max() == 0 and w.grad.abs().sum() > 0
    greedy = dataclasses.replace(SAMPLED, do_sample=False)  # greedy rollouts score the untempered softmax
    assert greedy.score_temperature == 1.0 and SAMPLED.score_temperature == 0.7


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_op_makes_more_than_one_chunk_of_logits_forward_or_backward():
    N, H, V, chunk = 256, 4, 1000, 8 * 1000  # (N, V) = 256k logits; one chunk = 8 rows = 8k
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    tokens = torch.randint(0, V, (N,))
    with _LargestTensor() as seen:
        linear_token_logp(hidden, weight, tokens, temperature=0.7, suppress=(3,), chunk=chunk).sum().backward()
    assert seen.largest <= chunk, seen.largest
    with _LargestTensor() as plain:
        _plain(hidden, weight, None, tokens, SAMPLED).sum().backward()
    assert plain.largest == N * V


def _rollout(model, tokenizer, sampling):
    items = [{"prompt": p, "answer": "0"} for p in ("12+3=", "7+70=", "5=")]
    torch.manual_seed(0)
    return generate_rollout(
        model, tokenizer, items, group_size=2, max_new_tokens=5, policy=TopK(), sampling=sampling, old_routing=None
    )


def test_policy_forward_scores_tokens_exactly_as_the_full_logits_do(tiny_moe, tokenizer):
    """The whole model: the patched head's log-probs and every parameter's gradient equal those of the full logits."""
    batch = _rollout(tiny_moe, tokenizer, SAMPLED)
    P = batch.prompt_width
    upstream = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(3))
    fwd = policy_forward(tiny_moe, batch, batch.routing)
    (fwd.logp * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in tiny_moe.named_parameters() if p.grad is not None}
    tiny_moe.zero_grad(set_to_none=True)
    with route(tiny_moe, replay_policy_for(batch.routing)):
        logits = tiny_moe(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False,
        ).logits  # fmt: skip  # (B, S, V) the plain path
    ref = token_logp(SAMPLED.token_scores(logits[:, P - 1 : -1]), batch.input_ids[:, P:])  # (B, C)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(fwd.logp, ref, rtol=0, atol=2e-6)
    assert set(grads) == {n for n, p in tiny_moe.named_parameters() if p.grad is not None}
    for name, p in tiny_moe.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert "forward" not in tiny_moe.lm_head.__dict__  # the patch is gone


def test_the_head_patch_is_removed_on_error(tiny_moe):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="boom"), token_logp_head(tiny_moe, ids, SAMPLED):
        raise RuntimeError("boom")
    assert "forward" not in tiny_moe.lm_head.__dict__
    assert tiny_moe(input_ids=ids).logits.shape[-1] == tiny_moe.config.vocab_size


def test_a_bf16_model_scores_tokens_in_float32(tokenizer):
    model = build_tiny_moe("qwen3_moe", "tiny", dtype=torch.bfloat16).eval()
    batch = _rollout(model, tokenizer, SAMPLED)
    P = batch.prompt_width
    out = forward_sequences(model, batch.input_ids, batch.attention_mask, P, batch.routing, sampling=SAMPLED)
    assert out.logp.dtype == torch.float32
    # the hidden states the head sees, re-scored in float64: only float32 rounding separates the two
    seen = {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0].detach()))
    forward_sequences(model, batch.input_ids, batch.attention_mask, P, batch.routing, sampling=SAMPLED)
    handle.remove()
    h = seen["h"][:, :-1].double()
    ref = token_logp(SAMPLED.token_scores(F.linear(h, model.lm_head.weight.double())), batch.input_ids[:, P:])
    torch.testing.assert_close(out.logp.double(), ref, rtol=0, atol=1e-5)
