"""support/decode_layout.py: a model's weights laid out for generation. Used by sample.py (load_model, and after
loading, before it generates) and bench.py; what it adds: Baichuan2's NormHead normalised once instead of in every
forward (normalise_head), and on a CPU the fp32 linears multiplied by a C kernel (DecodeLinear), which a one-token decode step
reads at about twice the memory bandwidth of torch's matrix-vector product.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_lib  # model.py is a library; it does not import this file
from support import quant


class DecodeLinear(nn.Module):
    """A frozen fp32 CPU linear for decoding: up to FP32_KERNEL_ROWS rows of x go through support/quant.py's
    fp32_matmul, a C kernel that streams each weight row once at the memory's rate (torch's matrix-vector product
    reads it at about half of that: ~21 against ~45 GB/s for a 1.1B model's layers on 2 Zen 4 cores); more rows (a
    long prompt) take MKL's GEMM, which reuses each weight across the rows. The weight stays as it was (out, in)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def forward(self, x):
        y = quant.fp32_matmul(x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


def decode_layout(model):
    """Swap every bias-free fp32 nn.Linear of a CPU model for a DecodeLinear, in place (the same memory), where the C
    kernels could be built (bf16 and other devices keep theirs: there torch's product is the faster one)."""
    if quant.quant_kernels() is None:
        return model
    for name, mod in list(model.named_modules()):
        if type(mod) in (nn.Linear, model_lib.Linear) and mod.bias is None and mod.weight.dtype == torch.float32 \
                and mod.weight.device.type == "cpu":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, DecodeLinear(mod))
    embedding = model.tok_embeddings.weight if isinstance(model, model_lib.Transformer) else None
    if embedding is not None and model.output is None and embedding.dtype == torch.float32 \
            and embedding.device.type == "cpu":
        # a tied embedding is also the output layer: the same matrix (no copy), multiplied by the kernel
        model.output = DecodeLinear(nn.Linear(embedding.size(1), embedding.size(0), bias=False, device="meta"))
        model.output.weight = embedding
    return model


def normalise_head(model):
    """Baichuan2's NormHead re-normalises the output rows in every forward; for inference do it once, in fp32."""
    head = model.output
    if isinstance(head, model_lib.NormHead):
        plain = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(F.normalize(head.weight.float(), dim=-1).to(head.weight.dtype),
                                    requires_grad=False)
        model.output = plain
    return model
