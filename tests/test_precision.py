"""Mixed precision: a bf16 model routes in float32 (or float64, ``model.router_dtype``), and everything that enters a
ratio (token, expert-set and router log-probs) is float32 or better.

Measured here (2026-05, this CPU, tiny models, OMP_NUM_THREADS=1), and asserted with the margins below:
- router precision alone, E 128 / K 8, bf16 router inputs, logits of std 8 (a trained router's scale): the recorded
  Plackett-Luce set log-prob is within 1.6e-5 nats of float64 (the old path, bf16 logits upcast after the matmul,
  was off by up to 0.38 nats, mean 0.05);
- a whole bf16 model against the float32 model it was cast from, on the same sampled routes (E 64 / K 8): set
  log-probs differ by at most 1.1e-2 nats (mean 3.0e-3), token log-probs by at most 4.3e-3; the float32 model is
  within 6e-6 of a float64 copy. The bf16 activations set this gap, not the router.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args

import expertrl.runtime as runtime
from expertrl.cli import main
from expertrl.config import AdapterConfig, ModelConfig, TrainConfig
from expertrl.models import build_tiny_moe
from expertrl.moe.adapters import find_routers, set_router_dtype
from expertrl.moe.hooks import route
from expertrl.moe.policies import Multinomial, TopK
from expertrl.moe.setprob import set_logprob
from expertrl.objective import Denominators
from expertrl.policy import policy_forward, with_old_policy
from expertrl.rollout import generate_rollout
from expertrl.run import objective_for
from expertrl.runtime import model_and_tokenizer
from expertrl.tokenizer import build_char_tokenizer
from expertrl.types import Sampling

ITEMS = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7+70=", "answer": "77"}, {"prompt": "5=", "answer": "5"}]
SAMPLING = Sampling(do_sample=True, token_temperature=0.9, routing_temperature=0.7)
BF16_SET_TOL, BF16_TOKEN_TOL = 0.03, 0.01  # nats: bf16 run vs float32 run (measured 1.1e-2 and 4.3e-3, docstring)


def _model(dtype: torch.dtype, E: int = 64, K: int = 8, preset: str = "small"):
    return build_tiny_moe("qwen3_moe", preset, num_experts=E, top_k=K, experts_implementation="eager").eval().to(dtype)


def _rollout(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return generate_rollout(
        model, build_char_tokenizer(), ITEMS, group_size=4, max_new_tokens=6, policy=Multinomial(),
        sampling=SAMPLING, generator=gen, old_routing=None,
    )  # fmt: skip


@pytest.mark.parametrize("router_dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_a_bf16_model_routes_at_router_precision_whatever_the_logit_scale(router_dtype, tol):
    """Logits of std ~8: bf16 logits would put the set log-probs off by up to 0.38 nats (docstring)."""
    model = _model(torch.bfloat16, E=128, K=8, preset="tiny")
    set_router_dtype(model, router_dtype)
    sites = find_routers(model)
    assert all(s.dtype == router_dtype for s in sites)
    with torch.no_grad():
        for s in sites:
            s.weight.mul_(50.0)
    inputs = {}
    hooks = [s.module.register_forward_pre_hook(lambda m, a, p=p: inputs.__setitem__(p, a[0])) for p, s in
             enumerate(sites)]  # fmt: skip
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), route(model, Multinomial(), temperature=0.7, generator=gen, keep_logits=True) as rec:
        model(ids)
    for h in hooks:
        h.remove()
    trace, logits = rec.trace(3), rec.logits(3)
    assert logits.dtype == router_dtype and rec.set_logp(3).dtype == router_dtype
    for pos, s in enumerate(sites):
        ref_logits = F.linear(inputs[pos].reshape(-1, s.weight.shape[1]).double(), s.weight.double())  # (N, E)
        assert ref_logits.std() > 5  # a trained router's scale, not init's 0.1
        ref = set_logprob("plackett_luce", ref_logits / 0.7, trace.experts[pos].reshape(-1, 8).long())
        got = rec.set_logp(3)[pos].reshape(-1).double()
        assert (got - ref).abs().max() < tol, (got - ref).abs().max()


def test_a_bf16_runs_first_update_ratios_are_exactly_one():
    """The trainer's first update (its own forward is the old policy) and a fresh replayed forward at the same weights
    (bf16 CPU kernels are deterministic) both give token, set and router-shift ratios of exactly 1."""
    model = _model(torch.bfloat16)
    r = _rollout(model)
    micro = dataclasses.replace(r, advantages=torch.linspace(-1.0, 1.0, r.batch_size))
    cfg = TrainConfig()
    cfg.rspo.enabled = True
    objective = objective_for(cfg)
    assert objective.gate_coef > 0 and objective.rspo
    out = objective(model, micro, Denominators(r.batch_size), first_update=True)
    again = objective(model, with_old_policy(micro, out.behaviour), Denominators(r.batch_size), first_update=False)
    for m in (out.metrics, again.metrics):
        assert m["loss/ratio_mean"].item() == m["loss/ratio_max"].item() == 1.0
        assert m["loss/gate_ratio_mean"].item() == 1.0 and m["loss/gate_approx_kl"].item() == 0.0
        assert m["router/shift/gamma_mean"].item() == 1.0 and m["router/shift/delta_mean"].item() == 0.0
    b = out.behaviour
    assert b.logp.dtype == b.set_logp.dtype == b.router_logp.dtype == torch.float32
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    router = find_routers(model)[0].weight
    assert router.grad.dtype == torch.bfloat16 and router.grad.abs().sum() > 0


def test_bf16_gate_grpo_set_logprobs_match_a_float32_run():
    """One float32 model, its bf16 and float64 casts, the same sampled routes: set and token log-probs."""
    m32 = _model(torch.float32)
    m16, m64 = copy.deepcopy(m32).to(torch.bfloat16), copy.deepcopy(m32).to(torch.float64)
    r = _rollout(m32)
    P, mask = r.prompt_width, r.mask.bool()
    with torch.no_grad():
        fwd = {dt: policy_forward(m, r, r.routing) for dt, m in ((16, m16), (32, m32), (64, m64))}
    assert fwd[16].set_logp.dtype == fwd[16].logp.dtype == torch.float32

    def gap(a: int, b: int, what: str):
        x, y = getattr(fwd[a], what).double(), getattr(fwd[b], what).double()
        if what == "set_logp":
            x, y = x[:, :, P - 1 : -1], y[:, :, P - 1 : -1]  # (L, B, C) the Gate-GRPO positions
            return (x - y).abs()[mask[None].expand_as(x)]
        return (x - y).abs()[mask]

    assert gap(32, 64, "set_logp").max() < 2e-5 and gap(32, 64, "logp").max() < 2e-6
    assert gap(16, 32, "set_logp").max() < BF16_SET_TOL and gap(16, 32, "set_logp").mean() < BF16_SET_TOL / 3
    assert gap(16, 32, "logp").max() < BF16_TOKEN_TOL


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3"])  # a native MoE; a dense base with LoRA-MoE routers
def test_model_router_dtype_marks_every_router_and_survives_a_copy(family):
    adapter = {"kind": "lora_moe"} if family == "qwen3" else {}
    cfg = ModelConfig(family=family, preset="tiny", dtype="bfloat16", router_dtype="float64",
                      adapter=AdapterConfig(**adapter))  # fmt: skip
    model, _ = model_and_tokenizer(cfg, seed=0)
    for m in (model, copy.deepcopy(model)):  # the frozen KL reference is a deepcopy
        sites = find_routers(m)
        assert sites and all(s.dtype == torch.float64 for s in sites)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_bf16_models_top_k_rollout_routes_where_training_routes():
    """The fast path (the model's own routers with a capture hook) would compute bf16 router logits; on a bf16 model
    whose routers compute in float32 it is not taken, so the rollout's experts and tokens are those of ``route``."""
    model = _model(torch.bfloat16, E=64, K=8, preset="tiny")
    set_router_dtype(model, torch.float32)
    runs = {}
    for routes in ("full", "experts"):
        torch.manual_seed(0)
        runs[routes] = generate_rollout(
            model, build_char_tokenizer(), ITEMS * 2, group_size=1, max_new_tokens=6, policy=TopK(),
            sampling=Sampling(), generator=torch.Generator().manual_seed(0), old_routing=None, routes=routes,
        )  # fmt: skip
    assert torch.equal(runs["experts"].input_ids, runs["full"].input_ids)
    assert torch.equal(runs["experts"].routing.experts, runs["full"].routing.experts)


@pytest.mark.parametrize(
    "dtype, native_bf16, device, warned",
    [
        ("bfloat16", False, "cpu", True),
        ("bfloat16", True, "cpu", False),
        ("float32", False, "cpu", False),
        ("bfloat16", False, "meta", False),  # not on the CPU (as on a GPU): nothing to say
    ],
)
def test_a_bf16_model_on_a_cpu_without_bf16_kernels_gets_one_line_and_goes_on(
    monkeypatch, dtype, native_bf16, device, warned
):
    """Without oneDNN's bf16 kernels (an AVX2-only x86 CPU) torch's bf16 matmuls are hundreds of times slower than
    float32 (benchmarks/README.md): the model is built as asked, and the one-line warning names the field."""
    monkeypatch.setattr(runtime, "cpu_has_onednn_bf16", lambda: native_bf16)
    model, _ = model_and_tokenizer(ModelConfig(dtype=dtype), seed=0)
    model.to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.warn_if_slow_bf16(model)
    assert [str(w.message) for w in caught] == ([runtime.BF16_ON_SLOW_CPU] if warned else [])
    assert runtime.BF16_ON_SLOW_CPU.startswith("model.dtype: ") and "\n" not in runtime.BF16_ON_SLOW_CPU
    assert next(model.parameters()).dtype == getattr(torch, dtype)


def test_every_command_that_runs_a_bf16_model_on_such_a_cpu_says_so_once(monkeypatch, tmp_path):
    """``sft``, ``train``, ``eval`` and ``report`` each build their model and warn once where it runs; ``sft``,
    ``eval`` and ``report`` run it on ``runtime.compute_device()`` (the GPU where there is one; ``train`` takes
    accelerate's device), asked once each."""
    monkeypatch.setattr(runtime, "cpu_has_onednn_bf16", lambda: False)
    asked = []
    monkeypatch.setattr(runtime, "compute_device", lambda: asked.append(1) or torch.device("cpu"))
    sft, run = tmp_path / "sft", tmp_path / "run"
    bf16 = ["--model.dtype", "bfloat16"]
    sft_args = ["--model.preset", "tiny", "--sft.steps", "1", "--sft.batch_size", "8", "--task.train_size", "16",
                "--task.eval_size", "2", "--progress", "false"]  # fmt: skip
    commands = {
        "sft": ["sft", *sft_args, *bf16, "--output_dir", str(sft)],
        "train": ["train", *tiny_args(**{"sft.steps": 0, "steps": 1}), *bf16, "--output_dir", str(run)],
        "eval": ["eval", "--model.path", str(sft / "final"), "--task.eval_size", "2", "--max_new_tokens", "2", *bf16],
        "report": ["report", str(run)],  # the run's own config.yaml says bfloat16
    }
    for name, args in commands.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(args) == 0, name
        assert [str(w.message) for w in caught].count(runtime.BF16_ON_SLOW_CPU) == 1, (name, caught)
        assert len(asked) == (name != "train"), name
        asked.clear()
