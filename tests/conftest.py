"""Shared fixtures: one intra-op thread (2 shared cores), the character tokenizer and a tiny Qwen3-MoE."""

import pytest
import torch

from expertrl.models import build_tiny_moe
from expertrl.tokenizer import build_char_tokenizer


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
