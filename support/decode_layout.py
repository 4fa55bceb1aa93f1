"""support/decode_layout.py: a model's weights laid out for generation. Used by sample.py (load_model, and after
loading, before it generates) and bench.py; what it adds: Baichuan2's NormHead normalised once instead of in every
forward (normalise_head), and on a CPU the fp32 linears multiplied by a C kernel (DecodeLinear), which a one-token
decode step reads at about twice the memory bandwidth of torch's matrix-vector product, and q/k/v and gate/up as one
product each (RowsOf): fewer, larger kernel calls per token.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_lib  # model.py is a library; it does not import this file
from support import quant


class DecodeLinear(nn.Module):
    """A frozen fp32 CPU linear for decoding: up to FP32_KERNEL_ROWS rows of x go through support/quant.py's
    fp32_matmul, a C kernel that streams each weight row once at the memory's rate (torch's matrix-vector product
    reads it at about half of that: ~21 against ~45 GB/s for a 1.1B model's layers on 2 Zen 5 cores); more rows (a
    long prompt) take a GEMM (quant.fp32_gemm), which reuses each weight across the rows. The weight stays as it was
    (out, in)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight

    def forward(self, x):
        y = quant.fp32_matmul(x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


class RowsOf(nn.Module):
    """One linear's rows of a product that linears reading the same input share (q/k/v; gate/up): decoding makes one
    kernel call for all of them instead of one each (a 135M model's 7 calls a layer become 4: ~15% more tokens/s; a
    1.1B model's ~6%). The first part called with an input multiplies it by every part's rows, the others take theirs
    from that product; the product is held until the last part has taken its rows."""

    def __init__(self, product: nn.Module, sizes: list[int], index: int, shared: dict):
        super().__init__()
        self.in_features, self.out_features = product.in_features, sizes[index]
        if index == 0:
            self.product = product  # registered once, so its weights are counted once
        self._product, self._sizes, self._index, self._shared = [product], sizes, index, shared

    def forward(self, x):
        shared = self._shared
        if shared.get("x") is not x:
            shared["x"], shared["parts"] = x, self._product[0](x).split(self._sizes, dim=-1)
        y = shared["parts"][self._index]
        if self._index == len(self._sizes) - 1:
            shared.clear()
        return y


def stacked(linears: list[nn.Module]) -> nn.Module | None:
    """One linear of the same kind holding the rows of all of linears (same input width; int4 the same groups), or
    None where they are of kinds that do not stack so."""
    first = linears[0]
    if type(first) not in (DecodeLinear, quant.Int8Linear, quant.Int4Linear) or first.weight.device.type != "cpu" \
            or any(type(m) is not type(first) or m.in_features != first.in_features for m in linears) \
            or any(getattr(m, "group_size", None) != getattr(first, "group_size", None) for m in linears):
        return None
    out = sum(m.out_features for m in linears)
    if isinstance(first, DecodeLinear):
        return DecodeLinear(nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False))
    settings = {"group_size": first.group_size} if isinstance(first, quant.Int4Linear) else {}
    product = type(first)(first.in_features, out, device="meta", **settings)
    for name in first._buffers:  # every linear's rows, stacked
        setattr(product, name, torch.cat([m._buffers[name] for m in linears]))
    return product


def share_products(model):
    """q/k/v and gate/up of every layer as one product each (RowsOf), where they stack."""
    for layer in getattr(model, "layers", []):
        for parent, names in ((layer.attention, ("wq", "wk", "wv")), (layer.feed_forward, ("w1", "w3"))):
            linears = [getattr(parent, name) for name in names]
            product = stacked(linears)
            if product is not None:
                sizes, shared = [m.out_features for m in linears], {}
                for i, name in enumerate(names):
                    setattr(parent, name, RowsOf(product, sizes, i, shared))
    return model


def decode_layout(model):
    """Swap every bias-free fp32 nn.Linear of a CPU model for a DecodeLinear, in place (the same memory), and q/k/v
    and gate/up for one product each (share_products), where the C kernels could be built (bf16 and other devices keep
    theirs: there torch's product is the faster one)."""
    if quant.quant_kernels() is None:
        return model
    for name, mod in list(model.named_modules()):
        if type(mod) in (nn.Linear, model_lib.Linear) and mod.bias is None and mod.weight.dtype == torch.float32 \
                and mod.weight.device.type == "cpu":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, DecodeLinear(mod.weight))
    embedding = model.tok_embeddings.weight if isinstance(model, model_lib.Transformer) else None
    if embedding is not None and model.output is None and embedding.dtype == torch.float32 \
            and embedding.device.type == "cpu":
        # a tied embedding is also the output layer: the same matrix (no copy), multiplied by the kernel
        model.output = DecodeLinear(embedding)
    return share_products(model)


def normalise_head(model):
    """Baichuan2's NormHead re-normalises the output rows in every forward; for inference do it once, in fp32."""
    head = model.output
    if isinstance(head, model_lib.NormHead):
        plain = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(F.normalize(head.weight.float(), dim=-1).to(head.weight.dtype),
                                    requires_grad=False)
        model.output = plain
    return model
