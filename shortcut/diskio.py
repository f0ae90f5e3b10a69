"""Writing files so that a full disk (or a read-only or over-quota one) gives one line and leaves nothing behind.

Every file the tool writes goes to a temporary name and is renamed into place (readers see the old file or the new
one); this module adds what happens when the write fails: the temporary file or folder is removed and the user reads
"no space left on MOUNT writing WHAT to PATH (N MB free, about M MB needed)" instead of a traceback (issue 19).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shortcut.config import UserError

# The OS errors that say "this place cannot take the write", as opposed to a bug in the caller.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}
MB = 1 << 20


class DiskError(UserError):
    """A write the file system refused; the message names the path, what was written and the space it needed."""

    def __init__(self, message: str, os_error: OSError | None = None):
        super().__init__(message)
        self.os_error = os_error  # what the OS said, for a caller that describes the failure at a larger scale


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def mount_of(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def describe(path: Path, what: str, exc: BaseException | None = None, need: int | None = None) -> str:
    """One line for a failed write of `what` to `path` (need: the bytes the write needed, where known)."""
    path = Path(path)
    free = free_bytes(path)
    short = exc is None or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        need is not None and free < need)
    if short:
        needed = f", about {max(need / MB, 0.1):,.1f} MB needed" if need else ""
        return (f"no space left on {mount_of(path)} writing {what} to {path} ({free / MB:,.1f} MB free{needed}); "
                f"free some space there or write elsewhere")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    return f"could not write {what} to {path}: {reason}"


def remove(path: Path) -> None:
    """Remove a file or a folder if it is there; never raises (it runs while another error is on its way)."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def guard(path: Path, what: str, cleanup: tuple = (), need: int | None = None) -> Iterator[None]:
    """Turn an OS write error inside the block into a DiskError about `path`, after removing `cleanup`."""
    try:
        yield
    except OSError as exc:
        if not is_disk_error(exc):
            raise
        for p in cleanup:
            remove(p)
        raise DiskError(describe(path, what, exc, need), exc) from None


def check_space(path: Path, what: str, need: int) -> None:
    """Refuse before writing `need` bytes where the file system plainly has less free."""
    if free_bytes(path) < need:
        raise DiskError(describe(path, what, need=need))


def atomic_write(path: Path, data: bytes | str, what: str | None = None, durable: bool = False) -> None:
    """Write `data` to a temporary name beside `path` and rename it into place; on failure nothing is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    blob = data.encode() if isinstance(data, str) else data
    with guard(path, what or path.name, cleanup=(tmp,), need=len(blob)):
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            remove(tmp)
            raise
