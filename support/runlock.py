"""support/runlock.py: used by train.py (through support/train_checks.prepare_out_dir). One run per out_dir: the lock
a run holds on its out_dir while it runs, so a second process that would write there (any init_from: scratch, resume,
a checkpoint) is refused in one line naming the process that holds it.

The lock is a flock on out_dir/.train.lock, taken by rank 0 of a run (the one process of a multi-node run that
writes the step dirs' shared files) and held until the run ends. The kernel releases it however the process ends
(SIGKILL and the OOM killer included), so a lock left by a killed run never blocks the next one; the file stays and
only says who held it last. Across nodes it holds where the shared file system supports locks (NFS does: Linux turns
flock into its byte-range locks; a dead client's lock lapses with its lease). On a file system without locks the
file's pid is all there is: a live process of this host named there refuses the run.
"""

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".train.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # the file system does not do flock


class Busy(Exception):
    """out_dir is held by another process; the message names it."""


class OutDirLock:
    """A run's hold on its out_dir: `with OutDirLock() as lock:` ... `lock.take(out_dir)` ...; released at the end of
    the block (or by the kernel if the process dies)."""

    def __init__(self):
        self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def take(self, out_dir) -> str | None:
        """Hold out_dir (created before); Busy if another process holds it; OSError if the lock file cannot be
        written. Returns a warning for a file system without locks, else None."""
        path = Path(out_dir) / LOCK_FILE
        f = open(path, "a+")  # never truncated before it is held: the holder's details stay readable
        warning = None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = describe(read_holder(path))
                f.close()
                raise Busy(f"out_dir={out_dir} is in use by another run ({holder}); wait for it to end, stop it, or "
                           "choose another out_dir") from None
            if e.errno not in NO_LOCKS:
                f.close()
                raise
            holder = read_holder(path)
            if alive_here(holder):
                f.close()
                raise Busy(f"out_dir={out_dir} is in use by another run ({describe(holder)}); wait for it to end, "
                           "stop it, or choose another out_dir") from None
            warning = (f"{path}: this file system does not lock files ({e.strerror}): a run started on another "
                       "node in this out_dir would not be refused")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                            "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}) + "\n")
        f.flush()
        self.release()
        self.file = f
        return warning

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the last descriptor releases the flock
            self.file = None


def read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # being written this very moment, or not ours
        return {}


def alive_here(holder: dict) -> bool:
    """The holder is a running process of this host other than this one."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(holder: dict) -> str:
    """'pid 123 on host h since 2026-12-07 13:50:02: python train.py ...' of what the lock file says."""
    if not isinstance(holder.get("pid"), int):
        return "a process that has not written its details yet"
    since = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
             if isinstance(holder.get("started"), (int, float)) else "")
    command = str(holder.get("command", ""))
    command = command if len(command) <= 120 else command[:117] + "..."
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}" + (f": {command}" if command else "")
