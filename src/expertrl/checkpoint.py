"""Saving models atomically: write into a temporary sibling directory, then rename over the target.

A reader (or a resumed run) therefore sees either the previous complete checkpoint or the new complete one, never
a half-written directory. Weights are safetensors (``save_pretrained``); nothing is pickled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn


def atomic_save_dir(path: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then atomically move ``tmp_dir`` to ``path`` (replacing an older one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_model(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Save ``model`` and ``tokenizer`` in Hugging Face format (loadable with ``AutoModelForCausalLM``)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_save_dir(path, write)
