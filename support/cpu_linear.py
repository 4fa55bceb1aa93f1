"""support/cpu_linear.py: bf16 matmuls on a CPU without bf16 units, at the fp32 units' speed with a bf16 GEMM's numbers.

Used by kernels.py (linear's path (2), and the bf16 question attention and the fused loss ask) and support/quant.py
(NF4's dequantised matmul, a slice of weight rows at a time). What it adds: whether this CPU has bf16 units (asked
once), the weight rows converted at a time (CHUNK_WEIGHTS: never a whole fp32 copy of a large weight), the product
of a slice of weight rows at a time, and the autograd op behind kernels.linear in that case.
"""

import torch
import torch.nn.functional as F


def _cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX, ARM BF16), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Asked once at import: the query is an op torch.compile cannot trace, so asking per matmul broke every graph.
CPU_HAS_BF16_UNITS = _cpu_has_bf16_units()


def bf16_on_fp32_units(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matmuls in `dtype` (the compute dtype) on `device` run on the fp32 units: bf16 on a CPU without bf16
    units, where torch's bf16 GEMM (and SDPA's) falls back to a scalar loop, 15-30x slower than the fp32 GEMM.

    The fp32 GEMM on bf16-rounded operands gives a bf16 GEMM's result: products of bf16 values are exact in fp32,
    bf16 GEMMs accumulate in fp32, and the result is rounded to bf16. The matmuls of linear (and nf4_linear, and the
    fused loss's backward, through by_weight_rows), the fused loss's logits and attention's SDPA ask this.
    """
    return dtype == torch.bfloat16 and device.type == "cpu" and not CPU_HAS_BF16_UNITS


# Weights converted at a time (bf16 -> fp32 on the CPU, NF4 or int8/int4 -> compute dtype, fp32 -> int8/int4) where a
# whole converted copy would cost memory: 16 MB in fp32, so a 7B model's 1 GB output layer or 180 MB MLP weight is
# never copied whole. (support/quant.py converts by the same measure.)
CHUNK_WEIGHTS = 1 << 22


def row_slices(n_rows: int, row_len: int, device: torch.device) -> list[tuple[int, int]]:
    """Weight rows to convert at a time: CHUNK_WEIGHTS on a CPU, all of them elsewhere."""
    step = n_rows if device.type != "cpu" else max(1, CHUNK_WEIGHTS // row_len)
    return [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def by_weight_rows(x, rows, slices, transpose=False):
    """x @ W.T, or x @ W with transpose, in x's dtype, where rows(s, e) gives W[s:e] in x's dtype, one slice at a
    time: each slice's product fills its columns of the output, or (transpose) is summed in fp32; one rounding at the
    end. bf16 on a CPU without bf16 units multiplies fp32 copies of x and of each slice (bf16_on_fp32_units)."""
    out_dtype = x.dtype
    gemm = torch.float32 if bf16_on_fp32_units(out_dtype, x.device) else out_dtype
    x = x.to(gemm)
    if len(slices) == 1:
        w = rows(*slices[0]).to(gemm)
        return (x @ w if transpose else F.linear(x, w)).to(out_dtype)
    if transpose:
        out = None
        for s, e in slices:
            part = (x[..., s:e] @ rows(s, e).to(gemm)).float()
            out = part if out is None else out.add_(part)
        return out.to(out_dtype)
    out = x.new_empty(*x.shape[:-1], slices[-1][1], dtype=out_dtype)
    for s, e in slices:
        out[..., s:e] = F.linear(x, rows(s, e).to(gemm))
    return out


class LinearBf16ViaFp32(torch.autograd.Function):
    """The bf16 linear of autocast on the fp32 units (bf16_on_fp32_units), gradients included.

    Saves the bf16 operands (as autocast would) and rounds every result to bf16, so the numbers are a bf16 GEMM's.
    The weight is converted to fp32 a slice of rows at a time, never whole (a 7B output layer is 1 GB in fp32).
    """

    @staticmethod
    def forward(ctx, x, weight):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = x.dtype, weight.dtype
        return by_weight_rows(xb, lambda s, e: wb[s:e], row_slices(*wb.shape, wb.device))

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        slices = row_slices(*wb.shape, wb.device)
        grad_x = grad_w = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:  # (..., in)
                grad_x = by_weight_rows(grad.to(torch.bfloat16), lambda s, e: wb[s:e], slices, transpose=True)
                grad_x = grad_x.to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:  # (out, in), a slice of rows at a time
                g, xf = grad.to(torch.bfloat16).float().flatten(0, -2), xb.float().flatten(0, -2)
                grad_w = torch.empty(wb.shape, dtype=ctx.dtypes[1], device=wb.device)
                for s, e in slices:
                    grad_w[s:e] = (g[:, s:e].T @ xf).to(torch.bfloat16)
        return grad_x, grad_w
