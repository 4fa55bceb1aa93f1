"""A CPU stand-in for the torch_npu ops kernels.py uses, written from their documented semantics.

It computes what the Ascend kernels compute and rejects what they reject (dtypes, head_dim, head counts, mask
shapes, sparse-mode masks), so a test that forces kernels.py onto its NPU path checks our calls, not just our math.
Install with `sys.modules["torch_npu"] = fake_torch_npu` (the conftest fixture `fake_npu` does it).
"""

import torch
import torch.nn.functional as F

NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
calls: dict[str, int] = {}  # op name -> times called, so tests can see the NPU path really ran


def _count(name):
    calls[name] = calls.get(name, 0) + 1


def _check_dtype(op, **tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype not in NPU_DTYPES:
            raise RuntimeError(f"{op}: {name} dtype {t.dtype} not supported")


def npu_rms_norm(x, gamma, epsilon=1e-6):
    """(x * rsqrt(mean(x^2) + eps) * gamma, rstd), statistics in fp32; gamma has x's trailing shape."""
    _count("npu_rms_norm")
    _check_dtype("npu_rms_norm", x=x, gamma=gamma)
    if gamma.dtype != x.dtype:
        raise RuntimeError("npu_rms_norm: gamma must have x's dtype")
    if tuple(gamma.shape) != tuple(x.shape[x.dim() - gamma.dim():]):
        raise RuntimeError(f"npu_rms_norm: gamma shape {tuple(gamma.shape)} does not match x {tuple(x.shape)}")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rotary_mul(x, r1, r2):
    """x * r1 + rotate_half(x) * r2 for 4-D x; r1, r2 of x's dtype and head_dim, broadcastable to x."""
    _count("npu_rotary_mul")
    _check_dtype("npu_rotary_mul", x=x, r1=r1, r2=r2)
    if x.dim() != 4 or r1.dim() != 4 or r1.shape != r2.shape:
        raise RuntimeError("npu_rotary_mul: x, r1 and r2 must be 4-D, r1 and r2 of one shape")
    if r1.dtype != x.dtype or r2.dtype != x.dtype:
        raise RuntimeError("npu_rotary_mul: r1/r2 must have x's dtype")
    if r1.size(-1) != x.size(-1) or x.size(-1) % 2:
        raise RuntimeError("npu_rotary_mul: head_dim of r1/r2 must equal x's, and be even")
    torch.broadcast_shapes(x.shape, r1.shape)
    x1, x2 = x.chunk(2, dim=-1)
    return x * r1 + torch.cat([-x2, x1], dim=-1) * r2


def npu_swiglu(x, dim=-1):
    """silu(first half) * second half along dim."""
    _count("npu_swiglu")
    _check_dtype("npu_swiglu", x=x)
    if x.size(dim) % 2:
        raise RuntimeError("npu_swiglu: the split dimension must be even")
    a, b = x.chunk(2, dim=dim)
    return F.silu(a.float()).mul(b.float()).to(x.dtype)


def _causal(sq, skv, mode, device):
    """True = masked. Mode 2: left-up aligned causal; mode 3: right-down aligned causal."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    return j > i if mode == 2 else j > i + (skv - sq)


def _attend(q, k, v, pse, mask, scale):
    """q (B, N, Sq, D), k/v (B, Nkv, Skv, D); softmax(mask(scale * (pse + q k^T))) v, in fp32."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    s = q.float() @ k.transpose(-1, -2)
    if pse is not None:
        s = s + pse.float()
    s = s * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    _count("npu_fusion_attention")
    _check_dtype("npu_fusion_attention", query=query, key=key, value=value, pse=pse)
    if not (query.dtype == key.dtype == value.dtype) or (pse is not None and pse.dtype != query.dtype):
        raise RuntimeError("npu_fusion_attention: query, key, value and pse must share one dtype")
    if keep_prob != 1.0:
        raise RuntimeError("fake npu_fusion_attention: dropout not implemented")
    if atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
        raise RuntimeError("npu_fusion_attention: atten_mask must be bool or uint8 (1 = masked)")
    if sparse_mode not in (0, 2, 3):
        raise RuntimeError(f"fake npu_fusion_attention: sparse_mode {sparse_mode} not implemented")
    if sparse_mode in (2, 3) and (atten_mask is None or tuple(atten_mask.shape) != (2048, 2048)):
        raise RuntimeError("npu_fusion_attention: sparse_mode 2/3 needs the 2048x2048 triangular atten_mask")
    if input_layout == "TND":
        return _tnd(query, key, value, head_num, atten_mask, scale, actual_seq_qlen, actual_seq_kvlen, sparse_mode)
    if input_layout == "BNSD":
        q, k, v = query, key, value
    elif input_layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    elif input_layout == "BSH":
        q, k, v = (t.view(t.size(0), t.size(1), -1, t.size(2) * head_num // query.size(2)).transpose(1, 2)
                   for t in (query, key, value))
    else:
        raise RuntimeError(f"npu_fusion_attention: unsupported input_layout {input_layout!r}")
    B, N, Sq, D = q.shape
    Skv = k.size(2)
    if N != head_num:
        raise RuntimeError(f"npu_fusion_attention: head_num {head_num} != query heads {N}")
    if D % 16:
        raise RuntimeError(f"npu_fusion_attention: head_dim {D} must be a multiple of 16")
    if N % k.size(1) or k.shape != v.shape:
        raise RuntimeError("npu_fusion_attention: kv heads must divide q heads; key and value of one shape")
    if pse is not None and tuple(pse.shape) not in {(B, N, Sq, Skv), (1, N, Sq, Skv), (B, N, 1, Skv), (1, N, 1, Skv)}:
        raise RuntimeError(f"npu_fusion_attention: pse shape {tuple(pse.shape)} not supported")
    mask = None
    if sparse_mode in (2, 3):
        mask = _causal(Sq, Skv, sparse_mode, q.device)
    elif atten_mask is not None:
        if tuple(atten_mask.shape) not in {(B, N, Sq, Skv), (B, 1, Sq, Skv), (1, 1, Sq, Skv), (Sq, Skv)}:
            raise RuntimeError(f"npu_fusion_attention: atten_mask shape {tuple(atten_mask.shape)} not supported")
        mask = atten_mask.bool()
    out = _attend(q, k, v, pse, mask, scale)
    if input_layout == "BSND":
        out = out.transpose(1, 2)
    elif input_layout == "BSH":
        out = out.transpose(1, 2).reshape(B, Sq, N * D)
    return out, None, None, None, 0, 0, 0


def _tnd(query, key, value, head_num, atten_mask, scale, qlen, kvlen, sparse_mode):
    """Variable-length sequences packed along T: (T, N, D) with cumulative end offsets in actual_seq_*len."""
    if qlen is None or kvlen is None or len(qlen) != len(kvlen):
        raise RuntimeError("npu_fusion_attention: TND needs actual_seq_qlen and actual_seq_kvlen of one length")
    if list(qlen) != sorted(qlen) or qlen[-1] != query.size(0) or kvlen[-1] != key.size(0):
        raise RuntimeError("npu_fusion_attention: actual_seq_qlen must be cumulative and end at T")
    if query.size(1) != head_num or query.size(2) % 16:
        raise RuntimeError("npu_fusion_attention: TND query must be (T, head_num, D) with D % 16 == 0")
    out = torch.empty_like(query)
    q0 = k0 = 0
    for q1, k1 in zip(qlen, kvlen):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t, a, b in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        mask = _causal(q1 - q0, k1 - k0, sparse_mode, query.device) if sparse_mode in (2, 3) else None
        out[q0:q1] = _attend(q, k, v, None, mask, scale)[0].transpose(0, 1)
        q0, k0 = q1, k1
    return out, None, None, None, 0, 0, 0

