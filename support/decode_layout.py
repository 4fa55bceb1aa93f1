"""support/decode_layout.py: a model's weights laid out for generation. Used by sample.py (load_model, and after
loading, before it generates) and bench.py; what it adds: Baichuan2's NormHead normalised once instead of in every
forward (normalise_head), and on a CPU the fp32 linears stored transposed (InputMajorLinear), which a one-token decode
step reads at about twice the memory bandwidth of the usual layout.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_lib  # model.py is a library; it does not import this file


class InputMajorLinear(nn.Module):
    """A frozen fp32 CPU linear stored transposed, (in, out): decoding one token reads it at about twice the memory
    bandwidth MKL's matrix-vector product gets from the usual (out, in) rows (bench-llama's 65 MB output layer:
    5.4 ms instead of 9.6; the whole decode ~15% faster). More rows take the same GEMM as before."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())  # (in, out)

    def forward(self, x):
        return x @ self.weight_t if x.numel() == self.in_features else F.linear(x, self.weight_t.t())


def decode_layout(model):
    """Swap every bias-free fp32 nn.Linear of a CPU model for an InputMajorLinear, in place (the same memory; bf16
    and other devices keep (out, in): there torch's bf16 matrix-vector product is the faster one)."""
    for name, mod in list(model.named_modules()):
        if type(mod) in (nn.Linear, model_lib.Linear) and mod.bias is None and mod.weight.dtype == torch.float32 \
                and mod.weight.device.type == "cpu":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, InputMajorLinear(mod))
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
