"""Files: atomic directory writes and JSONL reading, shared by checkpoints, adapters, tasks and reports.

The bottom layer: imports nothing from expertrl.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_save_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then atomically move ``tmp_dir`` to ``path`` (replacing an older one).

    A reader (or a resumed run) sees the previous complete directory or the new complete one, never a half-written
    one; if ``write`` raises, the temporary directory is removed and ``path`` is untouched.
    """
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
