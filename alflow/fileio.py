"""One way to write a file atomically, with the user's umask respected.

Every file alflow writes that a reader may see half-written (state, configs,
datasets, checkpoints, worker results) goes through :func:`atomic_open`: a
temporary file ``.tmp-<name>.<pid>-<random>`` in the same directory, fsync,
``os.replace`` onto the target, fsync of the directory. A reader sees the old
file or the new one, never a part; a killed writer leaves at most a stray
``.tmp-*`` file (``alflow.data`` removes old ones).

Permissions: the temporary file is created with ``os.open(..., mode)``, so the
kernel applies the process umask exactly as for ``open(path, "w")``:
``0o666 & ~umask`` by default (``tempfile.mkstemp`` would force 0600, and a
``chmod(0o644)`` would make files world-readable under ``umask 077``). A file
holding a secret passes ``mode=0o600`` (still narrowed by the umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["TMP_PREFIX", "atomic_open", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]

TMP_PREFIX = ".tmp-"  # readers ignore files starting with this
DEFAULT_MODE = 0o666  # before the umask, as open() does


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` (a full disk is reported on the write, which names no file)."""
    return type(err)(err.errno, err.strerror or str(err), str(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False, *, mode: int = DEFAULT_MODE,
                fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode``: permission bits before the umask (default 0o666, as ``open``; 0o600 for secrets).
    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            raise _naming(err, path) from err
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = DEFAULT_MODE) -> Path:
    """Write ``data`` to ``path`` atomically (module docstring); returns ``path``."""
    with atomic_open(path, binary=True, mode=mode) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = DEFAULT_MODE) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (module docstring); returns ``path``."""
    return atomic_write_bytes(path, text.encode(), mode=mode)


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = None,
                      mode: int = DEFAULT_MODE) -> Path:
    """Write ``data`` as JSON atomically (numpy values as numbers, anything else as ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=_default), mode=mode)
