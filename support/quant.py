"""support/quant.py: weights quantised for decoding on a CPU. sample.py (--quantize) uses its linears, kernels.py its C
kernels for NF4; what it adds: the int8 / int4 linear layers, and the C kernels (support/quant_kernels.c) built for
the CPU at hand on first use and called through ctypes.

Decoding a token multiplies one row of activations by every weight matrix, so its speed is the rate the weights
stream from memory: int8, int4 and NF4 read 4x and ~7x fewer bytes than fp32, if the product reads the stored bytes
and nothing more (dequantising a matrix for F.linear writes and rereads an fp32 copy: slower than fp32 itself). On an
AVX2 CPU neither torch's packed int8/int4 kernels (written for AVX-512 and AMX) nor a dequantise-and-dot fused by
torch.compile come near that rate (`bench.py --mode=matvec` measures each side by side), so on a CPU the products go
through small C kernels, built with -march=native (AVX2 paths where the CPU has AVX2, plain C otherwise) and cached;
with 16-64 rows (prefill) the int8/int4 ones still match MKL's fp32 GEMM. Other devices, and machines without a C
compiler, dequantise a block of rows at a time (dequantised_linear).
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Weights converted at a time (bf16 -> fp32 on the CPU, NF4 or int8/int4 -> compute dtype, fp32 -> int8/int4) where a
# whole converted copy would cost memory: 16 MB in fp32, so a 7B model's 1 GB output layer or 180 MB MLP weight is
# never copied whole.
CHUNK_WEIGHTS = 1 << 22
SOURCE = Path(__file__).with_name("quant_kernels.c")


def _cpu_id() -> str:
    """What -march=native builds for: the CPU's feature flags (Linux) or its name, so that a cache shared between
    machines never hands one CPU a binary built for another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


@functools.cache
def quant_kernels():
    """quant_kernels.c as a ctypes library: built with the C compiler ($CC, else cc) for this CPU on first use (about
    a second) into ~/.cache/nanollama, then loaded from there. None, with one warning, where that fails (no compiler,
    no OpenMP): the products are then dequantised a block at a time (dequantised_linear)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    source = SOURCE.read_text()
    key = hashlib.sha256("\n".join([source, *cmd, platform.machine(), _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanollama"
    lib = cache / f"quant_kernels_{key[:16]}.so"
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            t0 = time.perf_counter()
            try:
                subprocess.run([*cmd, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, text=True)
                os.replace(tmp, lib)  # atomic: a process building beside this one never loads half a file
            finally:
                tmp.unlink(missing_ok=True)
            print(f"kernels: built the quantised matmul kernels for this CPU in {time.perf_counter() - t0:.1f}s "
                  f"({lib})", file=sys.stderr)
        c = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1:] or [type(e).__name__]
        warnings.warn(f"kernels: cannot build the quantised matmul kernels with {cc} ({why[0][:200]}); "
                      f"dequantising blocks of weights instead (slower decoding)")
        return None
    ptr, long = ctypes.c_void_p, ctypes.c_long
    c.int8_matmul.argtypes = [ptr] * 4 + [long] * 3
    c.int4_matmul.argtypes = [ptr] * 5 + [long] * 4
    c.nf4_matmul.argtypes = [ptr] * 7 + [long] * 3
    c.nf4_quantize.argtypes = [ptr, long, ptr, ptr, ptr]
    return c


def int8_dequantize(weight, scales, dtype):
    """Int8Linear's weight (rows, in) int8 and scales (rows,) -> the weight in dtype."""
    return weight.to(dtype) * scales[:, None].to(dtype)


def int4_dequantize(weight, scales, zeros, dtype):
    """Int4Linear's packed weight (rows, in/2) and scales, zeros (rows, groups) -> the weight (rows, in) in dtype."""
    q = torch.stack([weight & 0xF, weight >> 4], dim=-1)  # (rows, in/2, 2): low nibble = even column
    q = q.reshape(weight.size(0), scales.size(1), -1).to(dtype)  # (rows, groups, group_size)
    return (q * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).flatten(1)


def dequantised_linear(x, dequantize, weight, *params):
    """x @ W^T for W = dequantize(weight, *params, x.dtype): on a CPU a block of CHUNK_WEIGHTS weights (rows of
    every tensor) at a time, so memory never holds a dequantised matrix; elsewhere all at once."""
    if x.device.type != "cpu":
        return F.linear(x, dequantize(weight, *params, x.dtype))
    out = x.new_empty(*x.shape[:-1], weight.size(0))
    step = max(1, CHUNK_WEIGHTS // x.size(-1))
    for s in range(0, weight.size(0), step):
        rows = slice(s, s + step)
        out[..., rows] = F.linear(x, dequantize(weight[rows], *(p[rows] for p in params), x.dtype))
    return out


def torch_op(name: str, output_shape):
    """fn as the torch op nanollama::{name}, so that a torch.compile'd decode step keeps it in its graph
    (output_shape(*args) tells the compiler its output's shape); outside compilation fn is called directly: the op
    dispatcher costs ~45 us a call, as much as multiplying one token by a 576x576 weight."""
    def register(fn):
        op = torch.library.custom_op(f"nanollama::{name}", fn, mutates_args=())
        op.register_fake(lambda x, *args: x.new_empty(x.size(0), output_shape(x, *args)))

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)
        return call
    return register


# The kernels, dequantising where none was built. x is fp32 (M, K); the result (M, N).
@torch_op("int8_matmul", lambda x, weight, *_: weight.size(0))
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight (N, K) int8 * scales (N,) fp32)^T."""
    c = quant_kernels()
    if c is None:
        return dequantised_linear(x, int8_dequantize, weight, scales)
    x, weight, scales = x.contiguous(), weight.contiguous(), scales.contiguous()
    y = x.new_empty(x.size(0), weight.size(0))
    c.int8_matmul(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), *y.shape, x.size(1))
    return y


@torch_op("int4_matmul", lambda x, weight, *_: weight.size(0))
def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x @ W^T for Int4Linear's packed weight (N, K/2) and fp32 scales, zeros (N, groups)."""
    c = quant_kernels()
    if c is None:
        return dequantised_linear(x, int4_dequantize, weight, scales, zeros)
    x, weight, scales, zeros = x.contiguous(), weight.contiguous(), scales.contiguous(), zeros.contiguous()
    y = x.new_empty(x.size(0), weight.size(0))
    c.int4_matmul(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), y.data_ptr(), *y.shape,
                  x.size(1), x.size(1) // scales.size(1))
    return y


# --------------------------------------------------------------------------------------------------------------------
# the linear layers (sample.py --quantize)


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: on a CPU the product runs in a C kernel (in fp32, whatever the dtype of x),
    reading each stored byte once; elsewhere it is dequantised_linear."""
    quantized = True  # its weight is buffers (model.count_weights)

    def forward(self, x):
        if x.device.type != "cpu":
            return dequantised_linear(x, self.unpack, *self.stored())
        weight, *params = self.stored()
        y = self.matmul(x.reshape(-1, self.in_features).float(), weight, *(p.float() for p in params))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype):
        return self.unpack(*self.stored(), dtype)

    @torch.no_grad()
    def quantize_from(self, w):
        """Quantise w (out, in), any float dtype (a memory-mapped tensor too), a block of CHUNK_WEIGHTS weights at a
        time: tens of MB of fp32 scratch whatever the size of w."""
        step = max(1, CHUNK_WEIGHTS // self.in_features)
        for s in range(0, self.out_features, step):
            for t, part in zip(self.stored(), self.quantize_rows(w[s:s + step].float())):
                t[s:s + step] = part
        return self


class Int8Linear(QuantizedLinear):
    """y = x @ (int8 weight * per-output-channel scale)^T. Symmetric: w ~ q * scale, q in [-127, 127]."""
    matmul, unpack = staticmethod(int8_matmul), staticmethod(int8_dequantize)

    def __init__(self, in_features, out_features, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def stored(self):
        return self.weight, self.scales

    @staticmethod
    def quantize_rows(w):
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (rows,)
        return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric 4-bit weights: w ~ q * scale + zero per group of `group_size` input columns,
    q in [0, 15], two nibbles per byte (even column in the low nibble)."""
    matmul, unpack = staticmethod(int4_matmul), staticmethod(int4_dequantize)

    def __init__(self, in_features, out_features, group_size=128, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=dtype, device=device))

    def stored(self):
        return self.weight, self.scales, self.zeros

    def quantize_rows(self, w):
        g = w.reshape(w.size(0), -1, self.group_size)  # (rows, n_groups, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (rows, n_groups)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
        return q[:, 0::2] | (q[:, 1::2] << 4), scales, lo  # (rows, in/2): even column in the low nibble


def int4_group_size(in_features: list[int], most: int = 128) -> int | None:
    """The int4 group size for layers with these input widths when none is asked for: the largest that divides them
    all, at most `most`, a multiple of 32 where one does (the kernel's integer loop takes whole blocks of 32), else
    even; None where no even size divides them all."""
    width = 0
    for n in in_features:
        width = math.gcd(width, n)
    sizes = [g for g in range(min(most, width), 1, -1) if width % g == 0 and g % 2 == 0]
    return next((g for g in sizes if g % 32 == 0), sizes[0] if sizes else None)
