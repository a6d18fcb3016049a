"""Run storage: ``run_dir`` is a local path or a URI (``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``), read and
written through pyarrow's filesystems (``pyarrow.fs.FileSystem.from_uri``), the layer Ray Train uses for the same job.
Credentials and endpoint come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …), so
any S3-compatible store works.

Every actor writes what it produces itself: a learner rank uploads its own checkpoint shard, an adapter learner its
users' adapters, the driver its records. Nobody reads another node's disk. Two rules keep a crash from leaving
something that looks complete:

- a file is one object, written in one go (a local file: temp file, then rename; an object store: one PUT);
- a folder (checkpoint, adapter version) is complete once its *marker* file exists, and the marker is written last
  (``put_folder(..., last=MARKER)``). Listing (``rayuid.records.checkpoint``) only ever counts marked folders.

Work happens in node-local folders (``scratch()``, a ``RunDir``'s working copy) that are uploaded when done; with a
local ``run_dir`` the working copy *is* the run dir and uploads are no-ops, so single-node runs work as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rayuid.records import atomic
from rayuid.records.atomic import write_atomic

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
STAGING_ENV = "RAYUID_STAGING_DIR"


class StorageError(RuntimeError):
    """run_dir cannot be reached (bad URI, missing credentials, unreachable endpoint)."""


def is_remote(location: str | Path) -> bool:
    """A URI other than ``file://`` (local paths and ``file://`` URIs are read and written in place)."""
    text = str(location)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def join(location: str | Path, *parts: str) -> str:
    """``location/part/…`` for a URI or a local path (absolute: actors may run in another working directory)."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.abspath(os.path.join(str(location).removeprefix("file://"), *parts))


def _fs(location: str | Path):
    """(pyarrow filesystem, path inside it)."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(str(location).removeprefix("file://"))
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
        raise StorageError(f"cannot open run storage {location}: {err}; check the URI and the credentials "
                           "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible "
                           "server)") from err


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listdir(location: str | Path) -> list[str]:
    """Names directly under ``location`` (files and folders); [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def read_bytes(location: str | Path) -> bytes:
    fs, path = _fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_text(location: str | Path, text: str) -> None:
    """One file, whole or not at all: locally via a temp file and a rename, remotely as one PUT."""
    if not is_remote(location):
        write_atomic(join(location), [text])
        return
    fs, path = _fs(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def delete(location: str | Path) -> None:
    """Remove a folder (or file) and everything under it; nothing when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def put_file(src: Path, location: str | Path) -> None:
    fs, path = _fs(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(src, "rb") as f, fs.open_output_stream(path) as out:
        shutil.copyfileobj(f, out, 16 << 20)


def put_folder(src: Path, location: str | Path, last: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Upload the files under ``src`` to ``location``; the file named ``last`` (the marker) after all others, so
    the folder counts as complete only once everything is there. ``skip``: top-level names left out."""
    files = sorted(p for p in Path(src).rglob("*") if p.is_file() and p.relative_to(src).parts[0] not in skip)
    marker = [p for p in files if last is not None and p.relative_to(src).as_posix() == last]
    for p in [p for p in files if p not in marker] + marker:
        put_file(p, join(location, p.relative_to(src).as_posix()))


def get_folder(location: str | Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """Download everything under ``location`` into ``dst`` (which is emptied first); returns ``dst``.
    ``skip``: top-level names left out."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        rel = info.path[len(path):].lstrip("/")
        if info.type != pafs.FileType.File or rel.split("/")[0] in skip:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f, open(target, "wb") as out:
            shutil.copyfileobj(f, out, 16 << 20)
    return dst


def basename(location: str | Path) -> str:
    """The last part of a path or URI (e.g. a run's default name)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


@contextlib.contextmanager
def local_copy(location: str | Path, prefix: str = "work", skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder holding ``location`` for the ``with`` block: the folder itself when local, else a download
    into scratch, removed afterwards (``skip``: top-level names not downloaded)."""
    if not is_remote(location):
        yield Path(join(location))
        return
    with scratch(prefix) as tmp:
        yield get_folder(location, tmp, skip=skip)


@contextlib.contextmanager
def atomic_folder(location: str | Path, marker: str, prefix: str = "work") -> Iterator[Path]:
    """A folder that counts only once complete, filled in the ``with`` block. Local: a temp folder renamed into
    place (``rayuid.records.atomic``). A URI: filled in scratch, then whatever a crashed attempt left at
    ``location`` is removed and the folder uploaded with ``marker`` last."""
    if not is_remote(location):
        with atomic.atomic_folder(Path(join(location))) as tmp:
            yield tmp
        return
    with scratch(prefix) as tmp:
        yield tmp
        delete(location)
        put_folder(tmp, location, last=marker)


def fetch(location: str | Path, dst: Path) -> Path:
    """A local folder holding ``location``: the folder itself when local, else downloaded into ``dst``."""
    return get_folder(location, dst) if is_remote(location) else Path(join(location))


def staging_root() -> Path:
    """Node-local room for work in progress (``RAYUID_STAGING_DIR``, default the system temp dir)."""
    root = Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir()) / "rayuid-staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def scratch(prefix: str = "work") -> Iterator[Path]:
    """A fresh node-local folder for one upload or download, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=staging_root()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class RunDir:
    """The driver's records (config, metrics, samples, ledger, summary, plots, eval files, tracker logs) for one
    ``run_dir``: written into ``local`` and uploaded by ``push``. ``pull`` fetches them first, so a driver started
    on any node resumes the records of the run. ``checkpoints/`` and ``adapters/`` are not the driver's: the
    actors that write them upload them themselves."""

    OTHERS = ("checkpoints", "adapters")

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = is_remote(location)
        if self.remote:
            _fs(location)  # a bad URI or missing credentials fail here, before any work
            digest = hashlib.sha1(self.location.encode()).hexdigest()[:12]
            self.local = staging_root() / f"run-{digest}"
        else:
            self.local = Path(join(location))
        self._pushed: dict[str, tuple[int, int]] = {}

    def uri(self, *parts: str) -> str:
        """Where ``parts`` live in the run's storage (for summaries and messages)."""
        return join(self.location, *parts)

    def located(self, value):
        """``value`` (e.g. a summary) with every path inside the working copy replaced by where it is stored."""
        if isinstance(value, dict):
            return {k: self.located(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.located(v) for v in value]
        if self.remote and isinstance(value, str) and value.startswith(str(self.local) + os.sep):
            return self.uri(Path(value).relative_to(self.local).as_posix())
        return value

    def pull(self) -> None:
        """Remote: replace the working copy with the run's stored records (nothing stored: an empty copy)."""
        if self.remote:
            get_folder(self.location, self.local, skip=self.OTHERS)
            self._pushed = self._stamps()
        self.local.mkdir(parents=True, exist_ok=True)

    def push(self) -> None:
        """Remote: upload every record changed since the last push (each file whole: one PUT)."""
        if not self.remote:
            return
        stamps = self._stamps()
        for rel, stamp in stamps.items():
            if self._pushed.get(rel) != stamp:
                put_file(self.local / rel, self.uri(rel))
        self._pushed = stamps

    def _stamps(self) -> dict[str, tuple[int, int]]:
        found = (p for p in self.local.rglob("*") if p.is_file() and p.relative_to(self.local).parts[0]
                 not in self.OTHERS and not p.name.startswith("."))
        return {p.relative_to(self.local).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in found}
