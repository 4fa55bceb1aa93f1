"""support/quant.py: quantised weights. sample.py (--quantize) uses its linears, model.py (apply_lora's QLoRA base)
its NF4Linear; what it adds: the int8 / int4 linear layers for decoding on a CPU, NF4 (QLoRA's 4-bit NormalFloat base:
quantisation, the autograd op, the linear layer), and the C kernels (support/quant_kernels.c) built for the CPU at
hand on first use and called as torch ops (support/quant_ops.cpp); the GEMMs a prompt's rows take; and the wiring: a
model's linears quantised in place (quantize_model), built straight into its quantised form from the meta device
(quantize_from_meta), saved (save_quantized) and loaded back (load_quantized).

Decoding a token multiplies one row of activations by every weight matrix, so its speed is the rate the weights
stream from memory: int8, int4 and NF4 read 4x and ~7x fewer bytes than fp32, if the product reads the stored bytes
and nothing more (dequantising a matrix for F.linear writes and rereads an fp32 copy: slower than fp32 itself). On an
AVX2 CPU neither torch's packed int8/int4 kernels (written for AVX-512 and AMX) nor a dequantise-and-dot fused by
torch.compile come near that rate (`bench.py --mode=matvec` measures each side by side), so on a CPU the products go
through small C kernels, built with -march=native (AVX-512 or AVX2 paths as the CPU has them, plain C otherwise) and
cached. The same file has an fp32 kernel for a few rows (fp32_matmul): torch's fp32 matrix-vector product streams the
weights at about half the memory's rate. A prompt's many rows reuse each weight instead: fp32 and int8 take oneDNN's
GEMMs (fp32_gemm, int8_gemm), int4 the kernel's tiles. Other devices, and machines without C and C++ compilers,
dequantise a block of rows at a time (dequantised_linear).
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

from kernels import compute_dtype  # kernels.py is a library; it does not import this file
from support.cpu_linear import CHUNK_WEIGHTS, by_weight_rows, row_slices
from support import checks, outputs, weights
from support.tokenizer_files import copy_tokenizer_files

SOURCE = Path(__file__).with_name("quant_kernels.c")
OPS_SOURCE = Path(__file__).with_name("quant_ops.cpp")  # the kernels as torch ops


def _cpu_id() -> str:
    """What -march=native builds for: the CPU's feature flags (Linux) or its name, so that a cache shared between
    machines never hands one CPU a binary built for another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _build_commands(out: Path, extra_flags: tuple[str, ...]) -> list[list[str]]:
    """The compiler runs that make the library out (quant_kernels.c for this CPU, loaded with ctypes) and, but for
    extra_flags builds, out's ".ops.so" twin: quant_ops.cpp against this torch's headers and libraries with the same
    object, the torch ops. A process loads one ops library at most: a second registration of the ops aborts it."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    obj = str(out.with_suffix(".o"))
    commands = [[cc, "-O3", "-march=native", "-fopenmp", "-fPIC", *extra_flags, "-c", str(SOURCE), "-o", obj],
                [cc, "-shared", "-fopenmp", obj, "-o", str(out)]]
    if extra_flags:
        return commands
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    torch_dir = Path(torch.__file__).parent
    return commands + [[cxx, "-O2", "-std=c++20", "-shared", "-fPIC", f"-I{torch_dir / 'include'}",
                        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", str(OPS_SOURCE), obj,
                        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-fopenmp",
                        "-o", str(out.with_suffix(".ops.so"))]]


def _ops_registered() -> bool:
    try:
        return torch.ops.nanollama.int4_matmul is not None
    except AttributeError:
        return False


@functools.cache
def quant_kernels(extra_flags: tuple[str, ...] = ()):
    """quant_kernels.c as a ctypes library, and its products as the torch ops nanollama::* (quant_ops.cpp): built with
    the C and C++ compilers ($CC, $CXX) for this CPU and this torch on first use (~5 s) into ~/.cache/nanollama, then
    loaded from there. None, with one warning, where that fails (no compiler, no OpenMP): the products are then
    dequantised a block at a time (dequantised_linear). extra_flags (tests only) builds a separate C-only library with
    more compiler flags, e.g. ("-mno-avx512f",) for the AVX2 paths."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanollama"
    probe = _build_commands(cache / "x.so", extra_flags)
    sources = [SOURCE.read_text()] + ([] if extra_flags else [OPS_SOURCE.read_text(), torch.__version__])
    key = hashlib.sha256("\n".join([*sources, *map(" ".join, probe), platform.machine(), _cpu_id()]).encode())
    lib = cache / f"quant_kernels_{key.hexdigest()[:16]}.so"
    ops = lib.with_suffix(".ops.so")
    try:
        if not all(path.exists() for path in ([lib] if extra_flags else [lib, ops])):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            t0 = time.perf_counter()
            try:
                for cmd in _build_commands(tmp, extra_flags):
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                if not extra_flags:  # atomic: a process beside this one never loads half a file
                    os.replace(tmp.with_suffix(".ops.so"), ops)
                os.replace(tmp, lib)
            finally:
                for path in (tmp, tmp.with_suffix(".o"), tmp.with_suffix(".ops.so")):
                    path.unlink(missing_ok=True)
            print(f"kernels: built the quantised matmul kernels for this CPU in {time.perf_counter() - t0:.1f}s "
                  f"({lib})", file=sys.stderr)
        c = ctypes.CDLL(str(lib))
        register = not extra_flags and not _ops_registered()
        if register:
            torch.ops.load_library(str(ops))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1:] or [type(e).__name__]
        warnings.warn(f"kernels: cannot build the quantised matmul kernels ({why[0][:200]}); "
                      f"dequantising blocks of weights instead (slower decoding)")
        return None
    ptr, long = ctypes.c_void_p, ctypes.c_long
    c.fp32_matmul.argtypes = [ptr] * 3 + [long] * 3
    c.int8_matmul.argtypes = [ptr] * 4 + [long] * 3
    c.int4_matmul.argtypes = [ptr] * 5 + [long] * 4
    c.nf4_matmul.argtypes = [ptr] * 7 + [long] * 3
    c.nf4_quantize.argtypes = [ptr, long, ptr, ptr, ptr]
    if register:
        for name, rows in (("fp32_matmul", lambda x, w, *_: w.size(0)), ("int8_matmul", lambda x, w, *_: w.size(0)),
                           ("int4_matmul", lambda x, w, *_: w.size(0)),
                           ("nf4_matmul", lambda x, packed, *_: packed.numel() * 2 // x.size(1))):
            torch.library.register_fake(f"nanollama::{name}")(
                lambda x, *args, rows=rows: x.new_empty(x.size(0), rows(x, *args)))  # the shape torch.compile sees
    return c


@torch.compiler.assume_constant_result
def kernels_built() -> bool:
    """Whether quant_kernels() built (a constant to torch.compile, which would otherwise trace the build)."""
    return quant_kernels() is not None


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


# Many rows of x (a prompt): the GEMMs oneDNN has. Its fp32 GEMM uses AVX-512 on AMD CPUs, where MKL's (torch.mm)
# stays on AVX2: 128 rows of a 1.1B model's layers at ~400-480 GFLOP/s against MKL's ~190 on 2 Zen 5 cores (and ~230
# against ~190 with oneDNN held to AVX2). Its int8 GEMM (torch._int_mm) runs ~1,500 GOP/s there, with VNNI; without
# VNNI it saturates (vpmaddubsw's int16 pairs) and is wrong, so it is used only where a check of its sums passes.


def _onednn_fp32() -> bool:
    """Whether this torch has oneDNN's linear for dense fp32 weights (x86 builds)."""
    try:
        x = torch.ones(2, 4)
        return platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available() \
            and torch.equal(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], ""), x @ x.t())
    except (AttributeError, RuntimeError):
        return False


ONEDNN_FP32 = _onednn_fp32()  # asked once, at import (torch.compile cannot trace the question)


def fp32_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for many rows of fp32 x: oneDNN's GEMM where torch has it, else (and in a compiled graph, where
    inductor picks its own) F.linear."""
    if ONEDNN_FP32 and not torch.compiler.is_compiling():
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


@functools.cache
def _exact_int_mm() -> bool:
    g = torch.Generator().manual_seed(0)
    a = (torch.randint(0, 2, (32, 256), generator=g, dtype=torch.int8) * 2 - 1) * 127
    b = (torch.randint(0, 2, (256, 64), generator=g, dtype=torch.int8) * 2 - 1) * 127
    try:
        return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
    except (AttributeError, RuntimeError):
        return False


@torch.compiler.assume_constant_result
def exact_int_mm() -> bool:
    """Whether torch._int_mm sums int8 products exactly here: checked once on the largest products (127 x 127) over
    a prompt-sized shape, the case that overflows vpmaddubsw's int16 pairs on CPUs without VNNI."""
    return _exact_int_mm()


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight (N, K) int8 * scales (N,))^T for many rows of fp32 x, in int8 GEMMs: each row of x is split into
    a high and a low int8 part, x ~ hi * step + lo * step2 (step = max|x| / 127, lo the rest rounded likewise), both
    multiplied in one torch._int_mm call. Each element of x is then within max|x| / 64516 of its value: finer than
    llama.cpp's rounding of a prompt to int8 per block of 32 (max|block| / 254) unless a row's largest element is
    ~250x a block's. Twice the integer work, still ~3x faster than the fp32 GEMM."""
    tiny = torch.finfo(torch.float32).tiny
    step = x.abs().amax(1, keepdim=True).clamp(min=tiny) / 127
    hi = torch.round(x / step)
    rest = x - hi * step
    step2 = rest.abs().amax(1, keepdim=True).clamp(min=tiny) / 127
    parts = torch.cat([hi, torch.round(rest / step2)]).to(torch.int8)  # (2M, K)
    sums = torch._int_mm(parts, weight.t()).float()  # (2M, N)
    m = x.size(0)
    return (sums[:m] * step + sums[m:] * step2) * scales


# The kernels, dequantising where none was built. x is fp32 (M, K); the result (M, N).
# Rows of x up to which the C kernels multiply (each weight row streamed once); more go to a GEMM, which reuses each
# weight across rows: oneDNN's fp32 GEMM from ~4-8 rows (MKL's from ~32), the int8 GEMM from ~16.
FP32_KERNEL_ROWS = 4 if ONEDNN_FP32 else 16
INT8_KERNEL_ROWS = 16


def fp32_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight (N, K)^T for fp32 x and weight, as F.linear, for decoding on a CPU: the C kernel streams each row of
    the weight once at the memory's rate (torch's matrix-vector product reads it at ~2/3 of that). More than
    FP32_KERNEL_ROWS rows of x, or no kernel built: fp32_gemm."""
    if x.size(0) > FP32_KERNEL_ROWS or not kernels_built():
        return fp32_gemm(x, weight)
    return torch.ops.nanollama.fp32_matmul(x, weight)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight (N, K) int8 * scales (N,) fp32)^T: the C kernel in exact fp32 products of x, or for more than
    INT8_KERNEL_ROWS rows int8_gemm where torch._int_mm is exact here."""
    if x.size(0) > INT8_KERNEL_ROWS and exact_int_mm():
        return int8_gemm(x, weight, scales)
    if not kernels_built():
        return dequantised_linear(x, int8_dequantize, weight, scales)
    return torch.ops.nanollama.int8_matmul(x, weight, scales)


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x @ W^T for Int4Linear's packed weight (N, K/2) and fp32 scales, zeros (N, groups)."""
    if not kernels_built():
        return dequantised_linear(x, int4_dequantize, weight, scales, zeros)
    return torch.ops.nanollama.int4_matmul(x, weight, scales, zeros)


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
        return y.to(x.dtype).view(x.shape[:-1] + (self.out_features,))

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

    def stored(self):  # (self._buffers, not getattr: nn.Module's lookup costs ~0.6 us a buffer, 121 calls a token)
        b = self._buffers
        return b["weight"], b["scales"]

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
        b = self._buffers
        return b["weight"], b["scales"], b["zeros"]

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


# --------------------------------------------------------------------------------------------------------------------
# NF4: 4-bit NormalFloat weights for QLoRA, in plain torch so it runs on any device (support/cpu_linear.py's matmul helpers)

# The 16 NF4 values of the QLoRA paper (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table): quantiles of
# N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def nf4_quantize(w: torch.Tensor, block_size: int = 64, absmax_block_size: int = 256) -> dict[str, torch.Tensor]:
    """Quantise w to NF4 with double quantisation.

    Every block of 64 weights is scaled by its absmax into [-1, 1] and each weight becomes the index of the nearest
    NF4 value (two per byte). The fp32 absmaxes are themselves quantised: centred on their mean and stored as int8
    with one fp32 scale per 256 of them, so a weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits.
    """
    if w.numel() % (2 * block_size):
        raise ValueError(f"nf4_quantize: {w.numel()} weights is not a multiple of the block size {block_size}")
    blocks = w.detach().reshape(-1, block_size)  # (n_blocks, 64)
    midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]).to(w.device) / 2
    absmax = torch.empty(blocks.size(0), device=w.device)
    packed = torch.empty(blocks.size(0), block_size // 2, dtype=torch.uint8, device=w.device)
    step = max(1, CHUNK_WEIGHTS // block_size)  # a few MB of scratch at a time, not 12 bytes per weight at once
    c = quant_kernels() if w.device.type == "cpu" and block_size == 64 else None  # the same codes, ~7x faster
    for s in range(0, blocks.size(0), step):
        chunk = blocks[s:s + step].float().contiguous()
        if c is not None:
            c.nf4_quantize(chunk.data_ptr(), chunk.size(0), midpoints.data_ptr(), absmax[s:].data_ptr(),
                           packed[s:].data_ptr())
            continue
        absmax[s:s + step] = chunk.abs().amax(dim=1)
        idx = torch.bucketize(chunk / absmax[s:s + step].clamp(min=1e-12)[:, None], midpoints, out_int32=True)
        packed[s:s + step] = ((idx[:, 0::2] << 4) | idx[:, 1::2]).to(torch.uint8)  # high nibble first
    offset = absmax.mean()
    centred = F.pad(absmax - offset, (0, -absmax.numel() % absmax_block_size)).view(-1, absmax_block_size)
    scale = centred.abs().amax(dim=1).clamp(min=1e-12) / 127
    absmax_q = (centred / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"packed": packed, "absmax_q": absmax_q, "absmax_scale": scale, "absmax_offset": offset}


def nf4_absmax(q: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 absmax of every block of 64 weights, back from its double quantisation."""
    n_blocks = q["packed"].size(0)
    return (q["absmax_q"].float() * q["absmax_scale"][:, None]).flatten()[:n_blocks] + q["absmax_offset"]


# byte -> (value of its high nibble, value of its low nibble): one lookup decodes two weights
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=-1)  # (256, 2)


def nf4_dequantize(q: dict[str, torch.Tensor], shape, dtype=torch.float32, rows: tuple[int, int] | None = None,
                   absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of nf4_quantize back in `dtype` (code value x absmax, multiplied in `dtype`), or only its rows
    [start, stop) when every row is a whole number of blocks. Decoding the packed bytes through a (256, 2) table
    with int32 indices costs 6 bytes per weight of scratch, not the 8 of an int64 index per weight."""
    packed = q["packed"]
    absmax = nf4_absmax(q) if absmax is None else absmax
    if rows is not None and rows != (0, shape[0]):
        per_row = packed.size(0) // shape[0]
        packed, absmax = packed[rows[0] * per_row: rows[1] * per_row], absmax[rows[0] * per_row: rows[1] * per_row]
        shape = (rows[1] - rows[0], shape[1])
    pairs = _NF4_PAIRS.to(device=packed.device, dtype=dtype)
    w = F.embedding(packed.int(), pairs).view(packed.size(0), -1)  # (blocks, 64)
    return w.mul_(absmax.to(dtype)[:, None]).view(shape)


def nf4_dequantised_matmul(x, q, shape, dtype, transpose: bool = False):
    """x @ W.T (or x @ W) in `dtype` for the NF4 weight W, its rows dequantised a slice at a time on a CPU (the
    dequantised slice stays in cache; memory never holds a whole dequantised matrix)."""
    absmax = nf4_absmax(q)
    block = shape[0] * shape[1] // q["packed"].size(0)
    slices = row_slices(*shape, x.device) if shape[1] % block == 0 else [(0, shape[0])]  # whole blocks per slice
    return by_weight_rows(x.to(dtype), lambda s, e: nf4_dequantize(q, shape, dtype, (s, e), absmax), slices, transpose)


class _NF4Linear(torch.autograd.Function):
    """x @ W.T for a frozen NF4 weight. Saves only the 4-bit weight (no dequantised copy, not x: the weight takes
    no gradient) and dequantises again for the input gradient, as QLoRA does."""

    @staticmethod
    def forward(ctx, x, packed, absmax_q, absmax_scale, absmax_offset, shape, dtype):
        ctx.save_for_backward(packed, absmax_q, absmax_scale, absmax_offset)
        ctx.shape, ctx.dtype, ctx.x_dtype = shape, dtype, x.dtype
        q = dict(packed=packed, absmax_q=absmax_q, absmax_scale=absmax_scale, absmax_offset=absmax_offset)
        return nf4_dequantised_matmul(x, q, shape, dtype, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        q = dict(zip(("packed", "absmax_q", "absmax_scale", "absmax_offset"), ctx.saved_tensors))
        grad_x = nf4_dequantised_matmul(grad, q, ctx.shape, ctx.dtype, transpose=True).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None


# Rows of x up to which nf4_linear takes the C kernel; more go to dequantised blocks and MKL's GEMM (11008x4096 on
# two AVX2 cores, G weights x rows/s: 1 row 17.6 vs 0.4; 64 rows 43 vs 19; 128 rows 42 vs 29; 256 rows 41 vs 42).
NF4_KERNEL_ROWS = 128


def nf4_linear(x: torch.Tensor, q: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """x @ W.T for W = nf4_dequantize(q, shape), computed in x's dtype (or the autocast dtype) without ever holding
    W whole on a CPU. Decoding on a CPU in fp32 (a few rows, autograd off) takes the C kernel nf4_matmul, which
    reads each stored byte once (its products ~5e-5 off, see support/quant_kernels.c); training always dequantises."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and x.numel() <= NF4_KERNEL_ROWS * x.size(-1) and not torch.is_grad_enabled()
            and x.size(-1) % 32 == 0 and q["packed"].size(1) == 32):  # (no kernel built: nf4_matmul dequantises)
        y = nf4_matmul(x.reshape(-1, x.size(-1)), q["packed"], q["absmax_q"], q["absmax_scale"], q["absmax_offset"])
        return y.view(*x.shape[:-1], shape[0])
    with torch.autocast(x.device.type, enabled=False):
        return _NF4Linear.apply(x, q["packed"], q["absmax_q"], q["absmax_scale"], q["absmax_offset"],
                                tuple(shape), compute_dtype(x))


# --------------------------------------------------------------------------------------------------------------------
# NF4 decoding on a CPU: the C kernel (quant_kernels.c), dequantised blocks where none was built

_NF4_CODE_CPU = NF4_CODE.float().contiguous()  # the table the C kernel reads


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
               absmax_offset: torch.Tensor) -> torch.Tensor:
    """x @ W^T for the NF4 weight W (N, K) of nf4_quantize (blocks of 64), K a multiple of 32."""
    if not kernels_built():
        q = dict(packed=packed, absmax_q=absmax_q, absmax_scale=absmax_scale, absmax_offset=absmax_offset)
        return nf4_dequantised_matmul(x, q, (packed.numel() * 2 // x.size(1), x.size(1)), torch.float32)
    return torch.ops.nanollama.nf4_matmul(x.float(), packed, absmax_q, absmax_scale.float(), absmax_offset.float(),
                                          _NF4_CODE_CPU)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (nf4_quantize) and dequantised to the input's dtype per call
    (decoding on a CPU: multiplied in the C kernel nf4_matmul). Built empty, then quantize_from a weight."""
    quantized = True  # its weight is buffers (model.count_weights)

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        blocks = in_features * out_features // 64
        absmax_rows = -(-blocks // 256)
        buffers = {"packed": ((blocks, 32), torch.uint8), "absmax_q": ((absmax_rows, 256), torch.int8),
                   "absmax_scale": ((absmax_rows,), torch.float32), "absmax_offset": ((), torch.float32)}
        for name, (shape, dtype) in buffers.items():  # as nf4_quantize returns them
            self.register_buffer(f"nf4_{name}", torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def of(cls, linear: nn.Linear) -> "NF4Linear":
        return cls(linear.in_features, linear.out_features, linear.weight.device).quantize_from(linear.weight)

    @torch.no_grad()
    def quantize_from(self, w: torch.Tensor) -> "NF4Linear":
        """Quantise w (out, in), any float dtype (a memory-mapped tensor too), a few MB of scratch at a time."""
        for name, t in nf4_quantize(w).items():  # into the buffers: a model's worth of freed buffers
            getattr(self, f"nf4_{name}").copy_(t)  # would stay in the heap, not go back to the system
        return self

    @property
    def weight(self) -> torch.Tensor:  # dequantised fp32, for merging and inspection
        return self.dequantize(torch.float32)

    def dequantize(self, dtype):
        return nf4_dequantize(self.nf4(), (self.out_features, self.in_features), dtype)

    def nf4(self) -> dict[str, torch.Tensor]:
        b = self._buffers  # (not getattr: nn.Module's lookup costs a decode step ~10 us per layer)
        return {"packed": b["nf4_packed"], "absmax_q": b["nf4_absmax_q"], "absmax_scale": b["nf4_absmax_scale"],
                "absmax_offset": b["nf4_absmax_offset"]}

    def forward(self, x):
        return nf4_linear(x, self.nf4(), (self.out_features, self.in_features))


# -----------------------------------------------------------------------------
# a model's linears quantised in place (sample.py --quantize, bench.py --quantize), and saved (--save_quantized)

def quantize_model(model, mode, group_size=None, *, empty=False, tied_head=True):
    """Replace every nn.Linear by Int8Linear / Int4Linear in place, or (nf4) the block linears by NF4Linear as QLoRA
    stores its base (the embedding and output layer stay as they are). A tied embedding also gets an int8 output
    layer of its own (tied_head; the embedding stays for the lookup, which reads one row a token): as llama.cpp keeps
    it at 8 bits, and decoding a small model otherwise reads its fp32 vocabulary matrix as much as all else.
    group_size None: int4's group size is the largest that suits every layer (quant.int4_group_size). empty=True
    builds the modules without quantising (to load a saved quantised state dict). Shapes that do not suit int4 / NF4
    raise a clear ValueError."""
    if mode not in ("int8", "int4", "nf4"):
        raise ValueError(f"--quantize: expected int8, int4 or nf4, got {mode!r}")
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not (mode == "nf4" and name == "output")]
    if mode == "int4" and group_size is None:
        group_size = int4_group_size([m.in_features for _, m in linears])
        if group_size is None:
            raise ValueError("--quantize=int4: no even group size divides the input width of every layer "
                             f"({sorted({m.in_features for _, m in linears})})")
    for name, m in linears:
        if mode == "int4" and (group_size <= 0 or group_size % 2 or m.in_features % group_size):
            raise ValueError(f"--group_size={group_size} does not suit layer {name} (weight "
                             f"{m.out_features}x{m.in_features}): it must be even and divide in_features "
                             f"{m.in_features}")
        if mode == "nf4" and m.in_features * m.out_features % 128:
            raise ValueError(f"--quantize=nf4 does not suit layer {name} (weight {m.out_features}x{m.in_features}): "
                             "NF4 stores blocks of 64 weights, two per byte, so its size must be a multiple of 128")
    for name, m in linears:
        w = m.weight
        if mode == "int8":
            q = Int8Linear(m.in_features, m.out_features, dtype=w.dtype, device=w.device)
        elif mode == "int4":
            q = Int4Linear(m.in_features, m.out_features, group_size, dtype=w.dtype, device=w.device)
        else:
            q = NF4Linear(m.in_features, m.out_features, device=w.device)
        if not empty:
            q.quantize_from(w)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    if mode != "nf4" and tied_head and model.output is None:
        w = model.tok_embeddings.weight
        model.output = Int8Linear(w.size(1), w.size(0), dtype=w.dtype, device=w.device)
        if not empty:
            model.output.quantize_from(w)
    return model


def quantized_head(model) -> bool:
    """Whether a tied model carries quantize_model's int8 output layer (saved with it: quantization.tied_head)."""
    return model.args.tie_embeddings and isinstance(model.output, Int8Linear)


@torch.no_grad()
def quantize_from_meta(model, mode, group_size, weight, device="cpu"):
    """Make a model built on the meta device real, straight into its quantised form: every linear layer's weight comes
    from weight(name) (fp32, or anything .float() turns into it: a memory-mapped tensor, a random one) one at a time and
    is quantised a block of rows at a time; the other tensors (embedding, norms) are weight(name) as they are. So a 7B
    model never exists in fp32: memory holds the quantised model plus one fp32 weight."""
    quantize_model(model, mode, group_size, empty=True)
    layers = {name: mod.to_empty(device=device) for name, mod in model.named_modules()
              if getattr(mod, "quantized", False)}  # all first: quantising's scratch never sits between them
    for name, mod in layers.items():  # a tied model's int8 head is quantised from the embedding
        tied = name == "output" and model.args.tie_embeddings
        mod.quantize_from(weight("tok_embeddings.weight" if tied else f"{name}.weight"))
    rest = {name: weight(name).to(device=device, dtype=p.dtype) for name, p in model.named_parameters()}
    model.load_state_dict(rest, strict=False, assign=True)
    model.materialize_buffers(device)
    return model


QUANTIZATION = {"quantization": dict, "quantization.mode": str, "quantization.group_size": (int, "[1, inf)"),
                "quantization.tied_head": bool}


def load_quantized(model, ckpt, config, tensors, dtype, device):
    """Make a model built on the meta device real from a dir --save_quantized wrote: its linears swapped for those
    config.json's quantization names, then the saved tensors assigned (nothing materialised twice). ValueError, with
    the file, where config.json and the tensors do not fit each other."""
    quant = config["quantization"]
    where = os.path.join(ckpt, "config.json")
    try:
        checks.check_json_fields(config, QUANTIZATION, where, required=("quantization.mode",))
        quantize_model(model.to(dtype), quant["mode"], quant.get("group_size", 128), empty=True,
                       tied_head=quant.get("tied_head", False))  # (dirs saved before it existed have none)
    except ValueError as e:
        raise ValueError(f"{e}" if str(e).startswith(where) else f"{where}: quantization: {e}") from None
    expected = model.state_dict()
    if set(expected) != set(tensors):
        raise ValueError(f"{ckpt}: quantised tensors do not match config.json "
                         f"(e.g. {sorted(set(expected) ^ set(tensors))[:1]})")
    for name, t in tensors.items():  # the C kernels read these bytes as the dtypes the modules declare
        want = expected[name]
        floats = t.is_floating_point() and want.is_floating_point()  # another float dtype is converted
        if t.shape != want.shape or (t.dtype != want.dtype and not floats):
            raise ValueError(f"{ckpt}: tensor {name}: {str(t.dtype)[6:]} {list(t.shape)}, where config.json's "
                             "quantization needs "
                             f"{str(want.dtype)[6:]} {list(want.shape)}")
    state = {k: t.to(device=device, dtype=expected[k].dtype) for k, t in tensors.items()}  # NF4's scales stay fp32
    model.load_state_dict(state, assign=True)
    model.materialize_buffers(device)
    return model


def save_quantized(model, src_ckpt, dst, mode, group_size, family):
    """A checkpoint dir of the quantised weights, written whole or not at all (support.outputs.replace_dir); an existing
    dir is taken only when empty, and never the source (ValueError)."""
    state = {k: v for k, v in model.state_dict().items()}
    empty = os.path.isdir(dst) and not os.listdir(dst)
    with outputs.replace_dir(dst, empty, "--save_quantized", (src_ckpt,)) as tmp:
        int4 = [m.group_size for m in model.modules() if isinstance(m, Int4Linear)]
        quantization = {"mode": mode, "group_size": int4[0] if int4 else group_size or 128} if mode != "nf4" \
            else {"mode": mode}
        if quantized_head(model):
            quantization["tied_head"] = True
        weights.write_checkpoint(tmp, state, model.args, family, extra_config={"quantization": quantization})
        copy_tokenizer_files(src_ckpt, tmp)
