"""Shared test setup: the project root on sys.path, deterministic torch, and the fake torch_npu fixture."""

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def is_timing(*values) -> bool:
    """A measured time or rate is a number (finite, not negative) and nothing more: its size depends on the machine
    and its load, and a short one rounds to 0. Speed is bench.py's output, never an assertion."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
               for v in values)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models gain nothing from threads (on a busy shared CPU their
    spin-waits cost seconds a step), and in-process runs then reduce in the same order as subprocesses started
    with OMP_NUM_THREADS=1, so their losses are bitwise equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_npu(monkeypatch):
    """Install the fake torch_npu and force kernels.py onto its NPU path for the duration of a test."""
    import fake_torch_npu
    import kernels

    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu)
    fake_torch_npu.calls.clear()
    with kernels.force_npu():
        yield fake_torch_npu
