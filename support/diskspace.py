"""support/diskspace.py: used by train.py (checkpoints, the export), convert.py (every output dir, through staged and
ShardWriter) and prepare.py (the data dir). A full disk said in one line: the file, the bytes it needs, the bytes
free, and what to do; and the check train.py makes before a save.

Writers do not all say "No space left on device": torch's zip writer reports a short write as "unexpected pos N vs
M", safetensors' Rust writer keeps no errno. So a failed write is a full disk when the error or one it wraps says
ENOSPC (or EDQUOT, a quota) in its errno or its text, or when the file system it wrote to has (almost) no room left
once it failed. Bytes free are counted as they will be once the caller has removed the partial output.
"""

import contextlib
import errno
import os
import shutil
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
SLACK = 1 << 20  # room a write can leave when it fails for want of more (a block, a buffer)


class DiskFull(Exception):
    """A writer that knows what its whole output needs raises this from a full disk (see needing)."""

    def __init__(self, need: int | None, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.need = need


def free_bytes(path) -> int:
    """Bytes an unprivileged writer can still use on the file system of path (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def mount_of(path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def tree_bytes(path) -> int:
    """Bytes of the files under path (a file: its size; absent: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _chain(e: BaseException):
    """e and the errors it carries: causes, contexts, and torch.distributed.checkpoint's per-rank failures."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values() if f is not None]


def is_full(e: BaseException, path, by_room: bool = True) -> bool:
    """e, raised while writing under path, means the disk (or the user's quota) is full: it says so, or (by_room)
    path's file system has no room left."""
    for x in _chain(e):
        if isinstance(x, DiskFull) or isinstance(x, OSError) and x.errno in FULL:
            return True
        if any(text in str(x) for text in FULL_TEXT):
            return True
    return by_room and free_bytes(path) < SLACK


def size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:,.1f} MiB)"


def message(file, need: int | None, free: int, mount, advice: str) -> str:
    """'FILE: the disk is full: it needs N bytes, M are free on MOUNT; ADVICE' (need unknown, or an estimate that
    would have fitted: 'it needs more')."""
    needs = f"it needs {size(need)}" if need and need > free else "it needs more"
    return f"{file}: the disk is full: {needs}, {size(free)} are free on {mount}" + (f"; {advice}" if advice else "")


def _file_named(e: BaseException, partial, target) -> Path:
    """The output file the error names, under the target's final name rather than the temporary one."""
    name = next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
    if name and partial is None:
        return Path(name)
    if name:
        with contextlib.suppress(ValueError):
            return Path(target) / Path(name).absolute().relative_to(Path(partial).absolute())
    return Path(target)


@contextlib.contextmanager
def reported(target, partial=None, need=None, error=RuntimeError, advice="free space there, or write elsewhere",
             by_room=True):
    """A full disk in the block becomes error(one line) naming target (the output as the user knows it).

    partial: the temporary dir or file the block writes and its caller removes on failure (its bytes are counted as
    free). need: the bytes the whole output needs, or a function of the bytes written when the disk filled that
    estimates them, or None (a DiskFull's own need is used first). by_room: an error of a block that left no room
    is taken for a full disk though it does not say so (is_full); off where the block does much besides writing."""
    try:
        yield
    except Exception as e:
        where = partial if partial is not None else target
        if isinstance(error, type) and isinstance(e, error) or not is_full(e, where, by_room):
            raise  # the caller's own one-line errors stand as they are
        written = tree_bytes(partial) if partial is not None else 0
        full = next((x for x in _chain(e) if isinstance(x, DiskFull)), None)
        n = full.need if full is not None and full.need else need(written) if callable(need) else need
        free = free_bytes(where) + written
        file = target if full is not None else _file_named(e, partial, target)  # a DiskFull's need is the whole's
        raise error(message(file, n, free, mount_of(where), advice)) from None


@contextlib.contextmanager
def needing(path, need):
    """Errors of a full disk in the block are raised as DiskFull(need()): for a writer that knows its output's size
    (convert.ShardWriter), so whoever reports it can say how much room it needs."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_full(e, path):
            raise DiskFull(need() if callable(need) else need, e) from e
        raise


def room_problem(path, need: int, advice: str, what: str = "") -> str | None:
    """None when path's file system has room for need bytes and a margin (1%, and 256 KiB for the small files and
    the file system's own), else the one-line problem:
    'PATH: not enough disk space[ for WHAT]: it needs N bytes, M are free on MOUNT; ADVICE'."""
    free = free_bytes(path)
    if free >= need + need // 100 + (256 << 10):
        return None
    return (f"{path}: not enough disk space{f' for {what}' if what else ''}: it needs {size(need)}, {size(free)} are "
            f"free on {mount_of(path)}; {advice}")
