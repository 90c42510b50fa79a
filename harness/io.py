"""Crash-safe file writes: write a temp file beside the target, fsync, then rename over it; cache-entry locks that
a read-only cache does without; a full disk said in one line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; results are read by others, like any file
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(str(path), len(data)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


FULL_CHECKSUM_LIMIT = 1 << 30  # files above 1 GiB are checked by size only (hashing them each run costs seconds)


def file_digest(path: str | Path) -> str:
    """``size:sha256`` of a file (``size:-`` above FULL_CHECKSUM_LIMIT)."""
    path = Path(path)
    size = path.stat().st_size
    if size > FULL_CHECKSUM_LIMIT:
        return f"{size}:-"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"{size}:{h.hexdigest()}"


def corrupt_files(folder: str | Path, digests: dict[str, str]) -> list[str]:
    """Names in ``digests`` whose file under ``folder`` is missing or differs (truncated, overwritten)."""
    folder = Path(folder)
    return [
        name for name, want in digests.items() if not (folder / name).is_file() or file_digest(folder / name) != want
    ]


def move_aside(path: str | Path, why: str) -> Path:
    """Rename a damaged file or folder to ``<name>.corrupt-<timestamp>`` (kept for a look, never read
    again) and say so in one warning naming both paths."""
    import time
    import warnings

    path = Path(path)
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, dest)
    warnings.warn(f"{path} is {why}: moved it to {dest.name} and recomputing it", stacklevel=2)
    return dest


def read_json(path: str | Path, required: tuple[str, ...] = ()) -> dict | None:
    """A cached JSON record, or None when it is missing or damaged (truncated, not JSON, lacking a
    ``required`` key); a damaged one is moved aside with one warning."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        missing = [k for k in required if k not in obj]
        if not missing:
            return obj
        why = f"incomplete (no {', '.join(missing)})"
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        why = f"corrupt ({type(e).__name__})"
    move_aside(path, why)
    return None


def intact_zip(path: str | Path) -> bool:
    """True when a zip file (a torch checkpoint) is whole: central directory readable and, below
    FULL_CHECKSUM_LIMIT, every member's CRC right (a truncated last.ckpt fails here, not mid-restore)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return Path(path).stat().st_size > FULL_CHECKSUM_LIMIT or zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


class DiskFull(OSError):
    """ENOSPC while writing ``path`` (``needed``: the bytes it was writing, when known)."""

    def __init__(self, path: str, needed: int | None = None):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.needed = needed


def disk_full(error: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC, or torch's zip writer's own error for it."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if isinstance(e, RuntimeError) and "file write failed" in str(e):
            return True
    return False


def disk_full_line(error: BaseException, where: Path) -> str:
    """One line: which path could not be written, how much it needed (when known) and how much is free."""
    chain = (error, error.__cause__, error.__context__)
    e = next((x for x in chain if isinstance(x, OSError) and x.errno == errno.ENOSPC), error)
    path = Path(getattr(e, "filename", None) or where)  # a write() that failed names no file: the run folder
    needed = getattr(e, "needed", None)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = f", {needed:,} bytes to write" if needed else ""
    return (
        f"disk full: could not write {path}{need}, {free:,} bytes free on its file system; nothing was recorded "
        "as complete: free some space and run the same command again (it resumes from the last whole checkpoint)"
    )


class ReadOnlyCache(OSError):
    """A cache entry that is missing (or damaged) where the cache cannot be written."""


@contextlib.contextmanager
def entry_lock(folder: Path):
    """The writer lock of a cache entry, yielding True; on a read-only cache (a team's shared one) no lock and
    False: hits are read without one (a read takes no lock anywhere), a miss calls ``read_only_miss``."""
    from filelock import FileLock

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def read_only_miss(folder: Path, what: str) -> ReadOnlyCache:
    cache = os.environ.get("UPCYCLE_CACHE", "paths.cache_dir")
    return ReadOnlyCache(
        f"{what} is not in the cache and the cache is read-only here: {folder} cannot be written "
        f"(UPCYCLE_CACHE={cache}); point UPCYCLE_CACHE at a writable folder, or fill the shared cache from a "
        "machine that can write it"
    )
