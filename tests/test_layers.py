"""Imports point only down: a module imports modules of its own layer or below, never above, and the module graph has
no cycle. Function-local imports are only for optional or heavy third-party packages (and for the CLI's commands,
so ``expertrl --help`` stays fast). docs/architecture.md draws these layers."""

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "expertrl"

LAYERS = [
    # 0: pure data and tensor helpers
    {"types", "ops", "io", "families", "mm", "metrics", "tokenizer"},
    # 1: the maths and the routing layer
    {"losses", "rewards", "moe", "advantages", "diagnostics"},
    # 2: models, tasks, the rollout engine and the objective
    {
        "models",
        "vlm",
        "vlm_models",
        "tasks",
        "tasks_mm",
        "tasks_hf",
        "prompts",
        "decoding",
        "policy",
        "rollout",
        "batching",
        "engines",
        "objective",
        "plots",
    },
    # 3: configuration
    {"config", "configio", "presets"},
    # 4: building and running pieces of a run
    {
        "runtime",
        "checkpoint",
        "rundir",
        "collect",
        "update",
        "evaluate",
        "routing_stats",
        "sft",
        "parallel",
        "logging",
        "trackers",
        "stops",
        "run",
        "start",
    },
    # 5: the entry points
    {"train", "cli", "report", "__main__"},
]
LOCAL_THIRD_PARTY = (
    "reasoning_gym",
    "math_verify",
    "peft",
    "sklearn",
    "transformers",
    "torch.distributed",
    "accelerate",
    "datasets",
    "trackio",
    "wandb",
    "torch.utils.tensorboard",
    "vllm",
)
"""Optional or slow-to-import packages a function may import where it needs them."""
LOCAL_OURS = {
    "cli": {"train", "sft", "evaluate", "moe"},  # the commands: `expertrl --help` must not import torch's world
    "runtime": {"vlm_models"},  # transformers' Qwen3-VL processing code (~3 s), only for a VLM
}


def _group(module: str) -> str:
    """``expertrl.moe.hooks`` -> ``moe``; ``expertrl.train`` -> ``train``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(group: str) -> int:
    for i, names in enumerate(LAYERS):
        if group in names:
            return i
    raise AssertionError(f"expertrl.{group} is in no layer of tests/test_layers.py; add it where it belongs")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module) -> tuple[list[str], list[str]]:
    """(module-level imports, function-local imports) as module names."""
    top, local = [], []
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    inside = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        (local if id(node) in inside else top).extend(names)
    return top, local


def test_every_module_has_a_layer_and_imports_only_down():
    upward = []
    for name, tree in _modules().items():
        own = _layer(_group(name))
        top, local = _imports(tree)
        for target in top + local:
            if target.startswith("expertrl") and _layer(_group(target)) > own:
                upward.append(f"{name} (layer {own}) imports {target} (layer {_layer(_group(target))})")
    assert not upward, upward


def test_the_module_graph_has_no_cycle():
    modules = _modules()
    graph = {
        name: {t for t in _imports(tree)[0] if t.startswith("expertrl") and t != name and t in modules}
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_function_local_imports_are_only_for_heavy_or_optional_packages():
    bad = []
    for name, tree in _modules().items():
        for target in _imports(tree)[1]:
            if target.startswith("expertrl"):
                if _group(target) not in LOCAL_OURS.get(_group(name), set()):
                    bad.append(f"{name}: import {target} inside a function")
            elif not target.startswith(LOCAL_THIRD_PARTY):
                bad.append(f"{name}: import {target} inside a function (import it at the top)")
    assert not bad, bad


def test_the_cli_and_the_config_import_no_torch():
    """``expertrl <cmd> --help`` and config validation stay fast: they never import torch (~3 s cold)."""
    import subprocess
    import sys

    code = "import sys, expertrl.cli, expertrl.presets; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
