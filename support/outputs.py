"""Output dirs (checkpoint dirs, data dirs, exports): never an input, and replaced whole or not at all.

Used by prepare.py (data dirs), convert.py (checkpoint dirs) and train.py (the export). What it adds: a kill at any
point leaves the old dir or the new one, whole (an atomic swap through renameat2 where Linux has it), and leftovers
of killed runs are cleaned up by the next.
"""

import contextlib
import ctypes
import os
import shutil
from pathlib import Path



def check_output(dst, inputs=(), flag="--out", error=ValueError) -> Path:
    """dst as an output dir, or error naming the flag: refused when it is the current dir or holds it, an existing
    file, one of inputs, or holds one of them or lies inside one (whatever --overwrite says)."""
    dst = Path(dst)
    target, here = dst.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise error(f"{flag} {dst}: the current directory or one holding it; name a directory of its own")
    if dst.exists() and not dst.is_dir():
        raise error(f"{flag} {dst}: an existing file, not a directory: nothing is replaced")
    for source in inputs:
        resolved = Path(source).resolve()
        if target == resolved or target in resolved.parents or resolved in target.parents:
            how = "is" if target == resolved else "holds" if target in resolved.parents else "lies inside"
            raise error(f"{flag} {dst} {how} the input {source}: the output would replace or mix with it")
    return dst


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        pass
    return True


def remove_stale(dst: Path):
    """What a killed run left beside dst: its temporary dir (removed), and the old dst it had renamed aside (put back
    where dst is missing, else removed). Dirs of processes still running are theirs."""
    prefixes = (f".{dst.name}.tmp-", f".{dst.name}.old-", f"{dst.name}.tmp-")  # the last: older versions' name
    for p in sorted(dst.parent.iterdir()) if dst.parent.is_dir() else []:
        pid = next((p.name[len(x):] for x in prefixes if p.name.startswith(x)), "")
        if not pid.isdigit() or _running(int(pid)):
            continue
        if ".old-" in p.name and not dst.exists():
            p.rename(dst)
        else:
            shutil.rmtree(p, ignore_errors=True)


def swap_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def replace_dir(dst, overwrite: bool, flag="--out", inputs=(), error=ValueError):
    """Yield a new temporary dir beside dst to write the output into; when the block completes it becomes dst.
    A kill at any point leaves dst old or new, whole: the new dir is complete before it is swapped in atomically
    (renameat2), or, where the system cannot swap, the old dst is renamed aside, the new renamed in, the old removed,
    and the next run puts an old dst left aside back. check_output's refusals come first; leftovers of killed runs
    (remove_stale) go at the start."""
    dst = check_output(dst, inputs, flag, error)
    remove_stale(dst)
    if dst.exists() and not overwrite:
        raise error(f"{flag} {dst}: exists; pass --overwrite to replace it")
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:  # under a regular file, or in a read-only place: this fails before any work
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise error(f"{flag} {dst}: cannot create it ({e.strerror}: {e.filename})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives a failure or Ctrl-C
        raise
    if not dst.exists():
        tmp.rename(dst)
    elif swap_paths(tmp, dst):
        shutil.rmtree(tmp)  # now the old one
    else:
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
