"""support/device.py: the devices this machine has and the memory they have left.

Used by kernels.py (device_type asks npu_available), train.py (the memory check before a run; glibc's heap tuning for
LoRA on a CPU), sample.py and bench.py (--device checked against the devices this machine has) and support/memory.py
(generation's memory budget). What it adds: torch_npu imported only to ask whether an NPU is there, a --device value
refused in words that list the devices there are, the bytes a new allocation can still get (an accelerator's free
memory; on a CPU within the container's own limit), and the mallopt call that returns freed memory to the OS.
"""

import ctypes
import functools
from contextlib import contextmanager

import torch


@functools.cache
def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    return torch.npu.is_available()


def devices() -> list[str]:
    """The devices this process can use, as --device takes them: cpu, cuda:0 ..., npu:0 ..., mps."""
    have = ["cpu"]
    if npu_available():
        have += [f"npu:{i}" for i in range(torch.npu.device_count())]
    if torch.cuda.is_available():
        have += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        have.append("mps")
    return have


def check_device(spec: str) -> torch.device:
    """torch.device(spec) when this machine has that device; else ValueError saying which devices it has."""
    have = devices()
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{spec!r} is not a device name; this machine has {', '.join(have)}") from None
    known = str(device) in have or (device.type == "cpu" and not device.index)
    if not known and not (device.index is None and any(h.split(":")[0] == device.type for h in have)):
        raise ValueError(f"{spec!r}: this machine has no such device; it has {', '.join(have)}")
    return device


def available_memory(device) -> int | None:
    """Bytes a new allocation on device can still get, or None where this process cannot tell: an accelerator's
    free memory; on a CPU what Linux calls available (MemAvailable + SwapFree), within this cgroup's limit."""
    device = torch.device(device)
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        free = (int(info["MemAvailable"].split()[0]) + int(info["SwapFree"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # cgroup v2: a container's own limit
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        return min(free, int(limit) - used) if limit.isdigit() else free
    except (OSError, ValueError):
        return free


@contextmanager
def freed_memory_returned_to_os(enabled: bool):
    """glibc heap tuning, which train.py turns on for LoRA on a CPU: while enabled, every allocation of 1 MB or more
    is served by mmap and returned to the OS when freed; then glibc's warm default (a heap for blocks under 32 MB) is
    back for a caller in the same process. Not glibc: no mallopt, nothing to do.

    Why: a multi-GB frozen base on the CPU, built and then dequantised a slice at a time, mixes long-lived buffers with
    GBs of short-lived scratch, and glibc's heap fragments into GBs of holes (QLoRA baichuan-7b peaked at 8.5 GiB;
    5.5 GiB with this), for page faults that cost ~30% more wall time; so only LoRA on a CPU pays them."""
    def mallopt_mmap_threshold(nbytes: int) -> bool:
        try:
            return bool(ctypes.CDLL(None).mallopt(-3, nbytes))  # M_MMAP_THRESHOLD (malloc.h)
        except (OSError, AttributeError):
            return False

    changed = enabled and mallopt_mmap_threshold(1 << 20)
    try:
        yield
    finally:
        if changed:
            mallopt_mmap_threshold(32 << 20)

