"""Files: atomic file and directory writes and JSONL reading, shared by checkpoints, adapters, tasks and reports.

The bottom layer: imports nothing from expertrl.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class DiskFullError(OSError):
    """Writing failed because the file system is full; the message names the directory and the space needed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


_FULL = ("No space left", "unexpected pos", "os error 28")
"""How torch.save ("unexpected pos ...") and safetensors ("os error 28") report a full disk: neither is an OSError."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temporary file and a rename: a kill leaves the old file or the new
    one, never a cut one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_dir(path: str | Path, write: Callable[[Path], None], *, needed_bytes: int = 0) -> Path:
    """Call ``write(tmp_dir)`` then atomically move ``tmp_dir`` to ``path`` (replacing an older one).

    A reader (or a resumed run) sees the previous complete directory or the new complete one, never a half-written
    one; if ``write`` raises, the temporary directory is removed and ``path`` is untouched. A write that fails
    because the disk is full raises ``DiskFullError`` naming the directory, ``needed_bytes`` (an estimate of what
    the write needs) and the space free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        try:
            write(tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(path.parent).free
            full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            if full or any(s in str(e) for s in _FULL) or (needed_bytes and free < needed_bytes):
                raise DiskFullError(
                    f"no space left on {path.parent} writing {path.name}: needed ~{_mb(needed_bytes)} MB, "
                    f"{_mb(free)} MB free ({type(e).__name__}: {str(e)[:120]})"
                ) from e
            raise
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a saved model from the user's group
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def read_jsonl(
    path: str | Path, *, error: type[Exception] = ValueError, skip_bad: bool = False
) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each non-blank line of a JSONL file, ``where`` = ``"path:line"``.

    Every failure names the file and line: bytes that are not UTF-8, a line that is not JSON, a line that is not a
    JSON object. ``skip_bad`` drops such lines silently instead (a killed writer's cut last line).

    Raises:
        FileNotFoundError: no such file.
        ``error``: a bad line (the caller's exception type, e.g. a report's ``RunError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_bad:
                    continue
                raise error(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); save the file "
                            "as UTF-8") from None  # fmt: skip
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad:
                    continue
                raise error(
                    f"{where}: not valid JSON ({e.msg}); repair or delete that line (a process killed while writing "
                    "can leave a partial last line)"
                ) from None
            if not isinstance(row, dict):
                if skip_bad:
                    continue
                raise error(f"{where}: expected a JSON object, got {type(row).__name__}") from None
            yield where, row


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is damaged (a header that is not JSON, data shorter than the header says), or
    None. Reads the header only."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                return "its header length is invalid"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"its header cannot be read ({type(e).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size != 8 + n + end:
        return f"it is {size} bytes, the header says {8 + n + end} (truncated?)"
    return None


def weights_problem(directory: str | Path) -> str | None:
    """Why the weights in ``directory`` (``save_pretrained``, or an adapter) cannot be loaded, or None."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return f"{directory} holds no .safetensors weights"
    for f in files:
        problem = _safetensors_problem(f)
        if problem is not None:
            return f"{f}: {problem}"
    return None
