"""Shared fixtures and helpers: one intra-op thread (2 shared cores), the character tokenizer, a tiny Qwen3-MoE, the
settings of a tiny training run (``tiny_args``), and the tiny VLM with multimodal items (module-scoped builds); the
datasets cache and trackio's store in a scratch directory. Local stand-ins for user models and data: ``standins.py``."""

import atexit
import os
import shutil
import tempfile

# Stores that packages locate at import time go to a scratch directory, not the home directory: the datasets cache
# (hf: tasks) and trackio's local store (report_to trackio).
_SCRATCH = tempfile.mkdtemp(prefix="expertrl-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ["HF_DATASETS_CACHE"] = os.path.join(_SCRATCH, "datasets")
os.environ["TRACKIO_DIR"] = os.path.join(_SCRATCH, "trackio")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from expertrl.models import build_tiny_moe  # noqa: E402
from expertrl.tasks_mm import load_mm_task  # noqa: E402
from expertrl.tokenizer import build_char_tokenizer  # noqa: E402

TINY_RUN = {
    "model.preset": "tiny", "sft.steps": 3, "sft.batch_size": 8, "steps": 2, "rollout.prompts_per_step": 2,
    "rollout.group_size": 4, "rollout.max_new_tokens": 4, "task.train_size": 50, "task.eval_size": 4,
    "micro_batch_size": 4, "eval_every": 0, "progress": "false",
}  # fmt: skip
"""The settings of a tiny training run (seconds on 2 CPU cores): tiny Qwen3-MoE, 2 prompts x 4 completions."""


def tiny_args(**settings) -> list[str]:
    """CLI overrides of a tiny run: ``TINY_RUN`` updated with ``settings`` (dotted keys via ``**{"sft.steps": 0}``)."""
    merged = TINY_RUN | {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
    return [x for key, value in merged.items() for x in (f"--{key}", str(value))]


def vlm_items() -> dict:
    """An image item, a video item (3 frames -> 2 temporal groups) and a two-image item with a longer prompt."""
    image = load_mm_task("digits_mc", train_size=1, eval_size=0, seed=0).train[0]
    video = load_mm_task("motion_video", train_size=1, eval_size=0, seed=0, num_frames=3).train[0]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    two = dict(prompt="Same or different? (A) same (B) different", images=noise, options=["same", "different"],
               answer="B")  # fmt: skip
    return {"image": image, "video": video, "two": two}


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_session():
    # Tiny matmuls: with 2 OpenMP threads and another busy process on the 2 cores, each op gets ~1000x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def tiny_moe():
    """Qwen3-MoE, 2 MoE layers, E=4, K=2, hidden 32, in eval mode (fresh per test: tests may accumulate grads)."""
    return build_tiny_moe("qwen3_moe", "tiny").eval()


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where CUDA is available (``pytest -m gpu`` on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
