"""Writing so that a crash never leaves something half-written that looks complete: the one helper for folders
(checkpoints, adapter versions, a learner group's DCP checkpoint) and files (extracted interactions, reports).

Everything is written beside its final path under a temporary name and renamed into place in one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def commit_folder(tmp: Path, final: Path) -> Path:
    """Replace ``final`` with the fully written ``tmp`` (a sibling). Several processes may have written into
    ``tmp`` (every rank of a DCP checkpoint); exactly one of them commits, after all are done."""
    os.chmod(tmp, 0o755)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final``, on any error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` (UTF-8 text) via a temp file beside ``path`` and rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(chunks)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
