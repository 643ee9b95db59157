"""Every cache and export file is written through here: all or nothing.

`atomic_write(path, write)` calls `write(tmp)` on a temporary file in the
same folder (`.<name>.<random>.tmp`, a name no reader opens), fsyncs it,
renames it over `path` with `os.replace` and fsyncs the folder. A process
killed at any point leaves `path` as it was (the old complete file, or
nothing) plus at most one stray temporary file; a write that fails removes
its temporary file and raises `StorageError` naming `path` (disk full:
errno ENOSPC). Two processes writing the same path each rename their own
complete file, so the last rename wins and no reader ever sees a mix.

`atomic_folder(path, write)` does the same for a whole folder (an exported
model: config, weight shards, index): `write(tmp_dir)` fills a temporary
sibling folder, renamed to `path` only when every file in it is complete.

Torn files are also refused on read: a safetensors header states every
tensor's byte range and `safe_open` rejects a file whose length differs
("file not fully covered"); JSON that was cut short does not parse. So a
file truncated by anything outside this module (a copy, a full disk under
another writer) is recomputed, never read.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file

from analysis.errors import StorageError, ValidationError

STALE_TEMP_S = 3600.0   # a temporary file this old belongs to a writer that died (a live one renames in seconds)


def temp_glob(path: Path) -> str:
    """Glob pattern of the temporary files `atomic_write` makes for `path`."""
    return f".{Path(path).name}.*.tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(tmp_path)`, all or nothing (module doc)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    tmp = Path(tmp_name)
    with _undone_on_failure(path, lambda: tmp.unlink(missing_ok=True)):
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextmanager
def _undone_on_failure(path: Path, undo: Callable[[], None]):
    """Any failure inside: `undo()` (remove the temporary), then re-raise, an I/O failure as StorageError."""
    try:
        yield
    except BaseException as exc:
        undo()
        cause = _as_os_error(exc)
        if cause is not None:
            raise _storage_error(path, cause) from exc
        raise


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, all or nothing."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj, **dumps) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dumps))


def atomic_folder(path: str | Path, write: Callable[[Path], None],
                  may_replace: Callable[[Path], bool] = lambda folder: False) -> Path:
    """Write the folder `path` through `write(tmp_dir)`, all or nothing.

    `tmp_dir` is a fresh sibling `.<name>.<random>.tmp` (a name no reader
    opens); once `write` returns, every file in it is fsynced and the folder
    is renamed to `path`. An existing `path` must be empty or accepted by
    `may_replace` (else ValidationError, nothing written): it is renamed
    aside (`.<name>.<random>.old.tmp`) just before and deleted just after. A
    process killed at any point leaves `path` as it was or complete and new;
    only between those two renames (microseconds) is `path` absent, the old
    folder whole under its aside name. A failing `write` removes the
    temporary folder and raises (an I/O failure as StorageError naming the
    file). Temporary folders of writers that died (older than STALE_TEMP_S)
    are removed first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValidationError(f"{path} is a file, not a folder; choose a folder for the export")
    if path.is_dir() and any(path.iterdir()) and not may_replace(path):
        raise ValidationError(f"refusing to replace {path}: it already holds files that are not an earlier export "
                              "of this kind; choose a new or empty folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_folders(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    with _undone_on_failure(path, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        write(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync_file(f)
        if path.is_dir():
            aside = path.parent / f".{path.name}.{secrets.token_hex(6)}.old.tmp"
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)   # put the old folder back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    _fsync_dir(path.parent)
    return path


def _remove_stale_folders(path: Path, older_than: float = STALE_TEMP_S) -> None:
    for stale in path.parent.glob(temp_glob(path)):
        try:
            if stale.is_dir() and time.time() - stale.stat().st_mtime > older_than:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def remove_stale_temps(path: str | Path, older_than: float = STALE_TEMP_S) -> int:
    """Delete temporary files of `path` left by writers that died (older than
    `older_than` seconds: a live writer's file is younger). Returns how many."""
    path = Path(path)
    removed = 0
    if not path.parent.is_dir():
        return 0
    for stale in path.parent.glob(temp_glob(path)):
        try:
            if time.time() - stale.stat().st_mtime > older_than:
                stale.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def _as_os_error(exc: BaseException) -> OSError | None:
    """The I/O failure behind `exc`, if it is one: an OSError, or a library
    error carrying the OS's code (safetensors: "... (os error 28)")."""
    if isinstance(exc, StorageError):
        return None
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc)) if isinstance(exc, Exception) else None
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def _storage_error(path: Path, exc: OSError) -> StorageError:
    code = exc.errno if exc.errno is not None else errno.EIO
    why = "no space left on device" if code in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return StorageError(code, f"could not write {path}: {why}; nothing was left at that path "
                              f"(a previous complete file, if any, is unchanged)", str(path))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some filesystems refuse a directory fsync, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
