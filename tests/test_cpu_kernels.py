"""The C kernels of support/quant_kernels.c against float64 references, built twice: for this CPU (its AVX-512 paths
where it has them) and with -mno-avx512f (the AVX2 paths; on an AVX2-only machine the same build twice)."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from support import quant

BUILDS = {"native": (), "avx2": ("-mno-avx512f",)}


@pytest.fixture(scope="module", params=list(BUILDS))
def lib(request):
    c = quant.quant_kernels(BUILDS[request.param])
    if c is None:
        pytest.skip("no C compiler: the dequantising fallback has tests of its own (tests/test_sample.py)")
    return c


def both_builds():
    libs = [quant.quant_kernels(flags) for flags in BUILDS.values()]
    if None in libs:
        pytest.skip("no C compiler")
    return libs


def ptrs(*tensors):
    return [t.data_ptr() for t in tensors]


def fp32(c, x, w):
    y = torch.empty(x.size(0), w.size(0))
    c.fp32_matmul(*ptrs(x, w, y), x.size(0), w.size(0), x.size(1))
    return y


def int8(c, x, q, s):
    y = torch.empty(x.size(0), q.size(0))
    c.int8_matmul(*ptrs(x, q, s, y), x.size(0), q.size(0), x.size(1))
    return y


def int4(c, x, q, s, z):
    y = torch.empty(x.size(0), q.size(0))
    c.int4_matmul(*ptrs(x, q, s, z, y), x.size(0), q.size(0), x.size(1), x.size(1) // s.size(1))
    return y


def assert_close(y, want, x_abs_w_abs, rel=1e-5):
    """fp32 sums of K products: off by at most a few K/16 roundings of the sum of their magnitudes."""
    err = (y.double() - want).abs()
    assert (err <= rel * x_abs_w_abs + 1e-30).all(), f"max error {err.max().item():.3g}"


def data(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05


SHAPES = [(37, 1), (37, 100), (29, 577), (64, 2048)]  # K: one column, not a multiple of 16, 32, 64; a whole one


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", SHAPES)
def test_fp32_matmul_is_the_float64_product(lib, M, N, K):
    x, w = data(M, N, K)
    assert_close(fp32(lib, x, w), x.double() @ w.double().t(), x.double().abs() @ w.double().abs().t())


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", SHAPES)
def test_int8_matmul_is_the_float64_product_of_its_weights(lib, M, N, K):
    x, w = data(M, N, K)
    q, s = quant.Int8Linear.quantize_rows(w)
    dq = q.double() * s.double()[:, None]
    assert_close(int8(lib, x, q, s), x.double() @ dq.t(), x.double().abs() @ dq.abs().t())


def int4_reference(x, q, s, z):
    """What int4_matmul computes, in float64 but for x's rounding: the centred codes (q - 8) * s times x rounded to
    int8 per block of 32 columns (step max|x| / 127, in fp32 as the kernel does), plus z + 8 s times x itself.
    Returns it, the sum of its terms' magnitudes, and the plain product x @ (q * s + z)^T."""
    M, K = x.shape
    blocks = F.pad(x, (0, -K % 32)).view(M, -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = (torch.round(blocks * inv) * (amax / 127)).view(M, -1)[:, :K].double()
    centred = quant.int4_dequantize(q, s.double(), -8 * s.double(), torch.float64)  # (q - 8) * s
    offset = (z.double() + 8 * s.double()).repeat_interleave(K // s.size(1), dim=1)
    x64 = x.double()
    return (xq @ centred.t() + x64 @ offset.t(), xq.abs() @ centred.abs().t() + x64.abs() @ offset.abs().t(),
            x64 @ quant.int4_dequantize(q, s.double(), z.double(), torch.float64).t())


INT4_SHAPES = [(37, 100, 10), (37, 160, 32), (29, 576, 96), (64, 2048, 128), (31, 320, 64), (45, 1632, 96)]
# K, group size: for the row loop (steps of 128 columns), no whole blocks (group 10), a last block taken a column pair
# at a time (160), a half step at the end (576, 1632), whole steps (2048, 320); for the tiles (int4_tiled, from 2 or 3
# rows of x), no whole 256 / 512-column step (160, 320), one or more and a partial one after (576, 1632), whole ones
# (2048); N not a multiple of the tile (4 rows, AVX2's 12)


@pytest.mark.parametrize("M", [1, 2, 3, 17, 40])
@pytest.mark.parametrize("N,K,gs", INT4_SHAPES)
def test_int4_matmul_is_the_float64_product_of_its_weights_and_rounded_x(lib, M, N, K, gs):
    x, w = data(M, N, K)
    q, s, z = quant.Int4Linear(K, N, gs).quantize_rows(w)
    want, scale, exact = int4_reference(x, q, s, z)
    y = int4(lib, x, q, s, z)
    assert_close(y, want, scale)
    # and near the product with x unrounded: x's rounding, ~0.5% of the output's size
    assert (y.double() - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("N,K,gs", INT4_SHAPES)
def test_int4_matmul_in_tiles_is_the_row_loops_product(lib, N, K, gs):
    """A prompt's rows (int4_tiled) against each row alone (the row loop): the same integers and scales, the fp32 sums
    in another order"""
    x, w = data(19, N, K)
    q, s, z = quant.Int4Linear(K, N, gs).quantize_rows(w)
    rows = torch.cat([int4(lib, x[m:m + 1], q, s, z) for m in range(x.size(0))])
    dq = quant.int4_dequantize(q, s.double(), z.double(), torch.float64)
    assert_close(int4(lib, x, q, s, z), rows.double(), x.double().abs() @ dq.abs().t())


@pytest.mark.parametrize("N,K,gs", INT4_SHAPES)
def test_the_avx512_paths_give_the_avx2_paths_numbers_or_int4s_within_rounding(N, K, gs):
    native, avx2 = both_builds()
    x, w = data(5, N, K)
    q8, s8 = quant.Int8Linear.quantize_rows(w)
    assert torch.equal(int8(native, x, q8, s8), int8(avx2, x, q8, s8))  # the same sums in the same order
    q, s, z = quant.Int4Linear(K, N, gs).quantize_rows(w)
    # int4: the same integer dot products, their scaled sums added 16 or 8 lanes at a time: the same within fp32's
    # rounding of sums of their size
    _, scale, _ = int4_reference(x, q, s, z)
    assert_close(int4(native, x, q, s, z), int4(avx2, x, q, s, z).double(), scale, rel=1e-6)


def test_fp32_matmul_op_is_f_linear():
    for M in (1, quant.FP32_KERNEL_ROWS, quant.FP32_KERNEL_ROWS + 1, 40):  # the kernel, then the GEMM
        x, w = data(M, 45, 70)
        torch.testing.assert_close(quant.fp32_matmul(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_fp32_matmul_op_without_a_kernel_is_the_gemm(monkeypatch):
    monkeypatch.setattr(quant, "quant_kernels", lambda: None)
    x, w = data(2, 45, 70)
    assert torch.equal(quant.fp32_matmul(x, w), quant.fp32_gemm(x, w))
    torch.testing.assert_close(quant.fp32_matmul(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K", [(17, 45, 70), (128, 96, 576), (40, 33, 2048)])
def test_int8_gemm_is_within_its_bound_of_the_float64_product(M, N, K):
    x, w = data(M, N, K)
    x[:, 3] *= 40  # an outlier column: each row's largest element sets its steps
    q, s = quant.Int8Linear.quantize_rows(w)
    w64 = quant.int8_dequantize(q, s.double(), torch.float64)
    want = x.double() @ w64.t()
    rounding = x.abs().amax(1, keepdim=True).double() / 64516 * w64.abs().sum(1)  # x's, at most
    bound = rounding + 1e-5 * (x.double().abs() @ w64.abs().t())
    assert ((quant.int8_gemm(x, q, s).double() - want).abs() <= bound).all()


def test_int8_matmul_takes_the_gemm_only_for_many_rows_where_int_mm_is_exact(monkeypatch):
    x, w = data(quant.INT8_KERNEL_ROWS + 1, 45, 64)
    q, s = quant.Int8Linear.quantize_rows(w)
    kernel = torch.cat([quant.int8_matmul(x[i:i + 1], q, s) for i in range(x.size(0))])  # one row at a time
    if quant.exact_int_mm():
        assert torch.equal(quant.int8_matmul(x, q, s), quant.int8_gemm(x, q, s))
    monkeypatch.setattr(quant, "exact_int_mm", lambda: False)
    assert torch.equal(quant.int8_matmul(x, q, s), kernel)


def test_exact_int_mm_says_whether_onednn_has_vnni_here():
    """oneDNN's int8 GEMM without VNNI (held to AVX2 here by ONEDNN_MAX_CPU_ISA, or an AVX2-only CPU) overflows its
    int16 pairs; with VNNI it is exact. exact_int_mm must tell them apart on the real library."""
    import os
    import subprocess
    import sys
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if not quant.ONEDNN_FP32 or " avx2" not in flags:
        pytest.skip("needs an x86 CPU and torch's oneDNN")
    code = "from support import quant; print(quant.exact_int_mm())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda **env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                                       env={**os.environ, **env}, check=True).stdout.strip()
    assert run(ONEDNN_MAX_CPU_ISA="AVX2") == "False"
    vnni = " avx512_vnni" in flags or " avx_vnni" in flags
    assert run() == str(vnni)


def test_a_build_with_extra_flags_is_a_library_of_its_own():
    native, avx2 = both_builds()
    assert isinstance(avx2, ctypes.CDLL) and avx2._name != native._name or BUILDS["avx2"] == ()
