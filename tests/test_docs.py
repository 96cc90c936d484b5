"""docs/architecture.md stays true: every module, file and ``module.name`` it names exists, and its metric table is
``expertrl.metrics.VOCABULARY``."""

import importlib
import re
from pathlib import Path

from expertrl.config import EvalConfig, SFTJobConfig, TrainConfig
from expertrl.configio import to_dict
from expertrl.metrics import RENAMED, VOCABULARY, new_name

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
SRC = ROOT / "src" / "expertrl"


def _config_keys() -> set[str]:
    def flat(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")

    return {k for cls in (TrainConfig, SFTJobConfig, EvalConfig) for k in flat(to_dict(cls()))}


def _module(path: str):
    """``moe/hooks`` or ``moe.hooks`` or ``rollout`` -> the imported expertrl module, or None."""
    path = path.strip("/.")
    name = "expertrl." + path.replace("/", ".")
    if not (SRC / (path.replace(".", "/") + ".py")).is_file() and not (SRC / path.replace(".", "/")).is_dir():
        return None
    return importlib.import_module(name)


def _references() -> list[str]:
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_/.]*)(?:\(\))?`", DOC)


def test_every_named_module_function_and_file_exists():
    config_keys = _config_keys()
    missing = []
    for ref in sorted(set(_references())):
        if ref.endswith((".py", ".md", ".json", ".jsonl", ".yaml", ".safetensors")):
            if ref.endswith(".py") and not any((d / ref).exists() for d in (SRC, ROOT / "tests", ROOT)):
                missing.append(ref)
            continue
        if "/" not in ref and "." not in ref:
            continue
        if ref in config_keys or ref in RENAMED or new_name(ref) != ref:
            continue  # a setting, or an old metric name
        if ref.startswith(tuple(f"{ns}/" for ns in ("rollout", "reward", "loss", "router", "optim", "time", "eval"))):
            continue  # a metric key
        parts = ref.replace("/", ".").split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
            module = _module(".".join(parts[:cut]))
            if module is not None:
                obj = module
                for attr in parts[cut:]:
                    if not hasattr(obj, attr):
                        missing.append(ref)
                        break
                    obj = getattr(obj, attr)
                break
    assert not missing, f"docs/architecture.md names things that do not exist: {missing}"


def test_the_loop_sketch_names_the_real_functions():
    for name in ("train.train", "run.build_run", "collect.collect", "update.update", "train.record", "train.finish"):
        assert name in DOC, name


def test_the_metric_table_is_the_vocabulary():
    table = DOC.split("## Metric vocabulary", 1)[1]
    keys = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert keys == list(VOCABULARY)


def test_the_layer_table_matches_the_layering_test():
    from test_layers import LAYERS

    for i, names in enumerate(LAYERS):
        row = re.search(rf"^\| {i} \| (.+?) \|", DOC, re.M)
        assert row, f"layer {i} missing from docs/architecture.md"
        listed = {n.strip("`/") for n in row.group(1).split()} - {"__main__"}
        assert listed == names - {"__main__"}, (i, listed ^ (names - {"__main__"}))
