"""Every script in benchmarks/ still imports against the library (a renamed module broke one once): each is loaded
as a module, which runs its imports but not its ``main``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_the_benchmark_imports(path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only: main() runs under `if __name__ == "__main__"`
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def _module(name: str):
    path = next(p for p in SCRIPTS if p.stem == name)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vs_trl_counts_a_shared_prompt_once():
    """``step_flops`` with every prompt copy counted is the per-row count (prefill + decode + 3 x forward over
    prompt + completion); with one copy per group it drops exactly (G - 1) x 4 prompt forwards per group."""
    vs = _module("vs_trl")
    shape, V, P, C, B, groups = vs.WORKLOADS["W1"], 40, 9, 12.0, 64, 8
    H, hd, nq, nkv, L = shape["hidden"], shape["head_dim"], shape["heads"], shape["kv_heads"], shape["layers"]
    per_token = L * (2 * H * hd * (2 * nq + 2 * nkv) + 2 * H * shape["experts"] + 6 * shape["top_k"] * H
                     * shape["moe_intermediate"])  # fmt: skip

    def attention(ctx):
        return 4 * nq * hd * ctx * L

    prefill = P * per_token + sum(attention(t + 1) for t in range(P)) + 2 * H * V
    decode = sum(per_token + attention(P + t + 1) + 2 * H * V for t in range(int(C) - 1))
    forward = (P + C) * per_token + sum(attention(t + 1) for t in range(P + int(C))) + C * 2 * H * V
    per_row = B * (prefill + decode + 3 * forward)
    assert vs.step_flops(shape, V, P, C, B, B) == pytest.approx(per_row, rel=1e-12)
    prompt = P * per_token + sum(attention(t + 1) for t in range(P))
    assert vs.step_flops(shape, V, P, C, B, groups) == pytest.approx(per_row - (B - groups) * 4 * prompt, rel=1e-12)


def test_vllm_vs_hf_measures_a_real_run(tmp_path):
    """The engine benchmark drives the trainer's own objects (build_run, start, collect, update); it broke silently
    once when start() took over creating the optimiser. One timed step of the hf engine on the tiny checkpoint."""
    import argparse

    bench = _module("vllm_vs_hf")
    args = argparse.Namespace(steps=1, prompts=2, group=2, max_new=4)
    flags = ["--model.path", str(bench.tiny_checkpoint(tmp_path))]
    row = bench.measure(flags, "hf", args, tmp_path / "run")
    assert row["tokens"] > 0 and row["step_s"] >= row["rollout_s"] > 0 and row["push_s"] == 0.0


def test_decode_probe_runs_its_probes_on_the_tiny_shape(capsys):
    """The probes behind benchmarks/README.md's W2 account run (tiny shape, one repeat); ``compile`` is left out (a
    torch.compile of its own, ~45 s)."""
    _module("decode_probe").main(
        ["experts", "gemm", "matmul", "spread", "--workload", "tiny", "--repeats", "1", "--matmul-n", "64"]
    )
    out = capsys.readouterr().out
    assert out.count("experts tiny: slots on") == 2 and "matmul bfloat16:" in out and "oneDNN bf16 kernels" in out
    assert out.count("gemm tiny: ") == 3 and "column-grouped" in out
    lines = [line for line in out.splitlines() if "max difference" in line]
    differences = [float(line.rsplit("max difference ", 1)[1].rstrip(")")) for line in lines]
    assert len(differences) == 2 and max(differences) < 1e-5  # both alternatives compute the kernel's output
    assert "spread tiny (sft 0 steps) grpo:" in out and "spread tiny (sft 0 steps) moe_grpo:" in out


def test_vs_trl_times_expertrls_own_loop_on_a_saved_model(tmp_path):
    """The expertrl side of vs_trl.py (``expertrl_child``: the benchmark's settings, ``collect`` + ``update``) runs on
    a model ``build_model`` saved: one warm-up and one timed step of MoE-GRPO with group prompt routes."""
    import argparse

    vs_trl = _module("vs_trl")
    vs_trl.build_model(vs_trl.WORKLOADS["tiny"], tmp_path / "model")
    a = argparse.Namespace(threads=1, variant="moe_grpo_group", model=str(tmp_path / "model"), warmup=1, steps=1,
                           out=str(tmp_path / "run"), seed=0, extra=[])  # fmt: skip
    result = vs_trl.expertrl_child(a)
    assert len(result["seconds"]) == 1 and result["tokens"][0] > 0 and result["prompt_len"] > 1
