"""Crash-safe file writes: write a temp file beside the target, fsync, then rename over it."""

from __future__ import annotations

import hashlib
import json
import os
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
