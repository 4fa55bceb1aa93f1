"""support/short_backward.py: autograd Functions for two elementwise ops, with the torch ops' numbers and a shorter
backward that keeps fewer tensors.

Used by kernels.py (rms_norm's and swiglu's path (1): eager training on plain CPU/CUDA tensors). What it adds: when
that path applies (plain_training), and the two Functions: RMSNormFunction keeps only x and 1/rms for backward
instead of the intermediates of six ops; SwiGLUFunction keeps gate and up, not silu(gate) too.
"""

import torch
import torch.nn.functional as F


def plain_training(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether an op on x and other takes its own autograd.Function: training on plain CPU/CUDA tensors in eager mode.
    Inference (a Function call costs more than the op on one token), DTensors (sequence and tensor parallel) and
    compiled graphs (inductor fuses the composite itself) take the plain torch ops."""
    return (torch.is_grad_enabled() and (x.requires_grad or other.requires_grad) and type(x) is torch.Tensor
            and type(other) in (torch.Tensor, torch.nn.Parameter) and x.device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling())


class RMSNormFunction(torch.autograd.Function):
    """F.rms_norm for training (same numbers) with a short backward that keeps only x and 1/rms.

    Forward: torch's _fused_rms_norm, which also returns 1/rms. Autograd through F.rms_norm instead records its
    six ops (pow, mean, add, rsqrt, mul, mul), keeps their intermediates and replays ten in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.size(-1)], weight, eps)  # rstd (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        # y = xhat * w, xhat = x * rstd:  dx = rstd * (g w - xhat * mean(g w xhat)),  dw = sum over rows of g xhat
        x, weight, rstd = ctx.saved_tensors
        g, xhat = grad.float(), x.float() * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gw = g * weight
            dot = (gw * xhat).mean(-1, keepdim=True)  # (..., 1)
            grad_x = torch.addcmul(gw, xhat, dot, value=-1).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward (autograd also keeps silu(gate): one more hidden-sized
    tensor per layer, a quarter of the feed-forward's activations). The same ops, so the same numbers."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up
