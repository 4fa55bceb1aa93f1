"""A CPU stand-in for the torch_npu ops kernels.py uses, written from torch_npu 2.13's op documentation.

It computes what the Ascend kernels compute and rejects what their documentation rules out: the Ascend parts an op
is listed for (DEVICE_NAME plays torch.npu.get_device_name()), dtypes, head_dim, head counts, mask and bias shapes,
sparse-mode masks, varlen limits, strided inputs where the inference kernels take none, gradients through the
inference kernels, and (like the real autograd node) it keeps atten_mask and pse for backward. So a test that forces
kernels.py onto its NPU path checks our calls, not just our math.
Install with `sys.modules["torch_npu"] = fake_torch_npu` (the conftest fixture `fake_npu` does it).
"""

import types

import torch
import torch.nn.functional as F

NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
calls: dict[str, int] = {}  # op name -> times called, so tests can see the NPU path really ran

# the Ascend parts, as torch_npu's SocVersion names them, by the product series the op documentation lists
ATLAS_A2 = {"Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4", "Ascend910B4-1"}
ATLAS_A3 = {"Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382", "Ascend910_9372",
            "Ascend910_9362", "Ascend910_9363"}
ATLAS_TRAINING = {"Ascend910PremiumA", "Ascend910ProA", "Ascend910A", "Ascend910ProB", "Ascend910B"}
ATLAS_INFERENCE = {"Ascend310P1", "Ascend310P2", "Ascend310P3", "Ascend310P4", "Ascend310P5", "Ascend310P7"}
DEVICE_NAME = "Ascend910B1"
npu = types.SimpleNamespace(get_device_name=lambda device=None: DEVICE_NAME)  # torch_npu.npu, i.e. torch.npu


def _count(name):
    calls[name] = calls.get(name, 0) + 1


def _check_part(op, *parts):
    if not any(DEVICE_NAME in p for p in parts):
        raise RuntimeError(f"{op}: not supported on {DEVICE_NAME}")


def _check_dtype(op, dtypes=NPU_DTYPES, **tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype not in dtypes:
            raise RuntimeError(f"{op}: {name} dtype {t.dtype} not supported")


def _check_no_grad(op, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op}: an inference kernel, it has no backward")


class _KeptForBackward(torch.autograd.Function):
    """Returns out unchanged and saves `kept` for backward, as the real op's autograd node saves its inputs: an
    inference-mode tensor among them fails here as it does there."""

    @staticmethod
    def forward(ctx, out, *kept):
        ctx.save_for_backward(*kept)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * len(ctx.saved_tensors)


def npu_rms_norm(x, gamma, epsilon=1e-6):
    """(x * rsqrt(mean(x^2) + eps) * gamma, rstd), statistics in fp32; gamma has x's trailing shape."""
    _count("npu_rms_norm")
    _check_dtype("npu_rms_norm", x=x, gamma=gamma)
    if not 2 <= x.dim() <= 8:
        raise RuntimeError(f"npu_rms_norm: x must have 2-8 dims, got {x.dim()}")
    if gamma.dtype != x.dtype:
        raise RuntimeError("npu_rms_norm: gamma must have x's dtype")
    if tuple(gamma.shape) != tuple(x.shape[x.dim() - gamma.dim():]):
        raise RuntimeError(f"npu_rms_norm: gamma shape {tuple(gamma.shape)} does not match x {tuple(x.shape)}")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def _rotary_layouts(x):
    """[(B, N, r1 shapes it takes, the first being the one the parts before the 910B take)] for a 4-D x read as
    BNSD, BSND or SBND (half mode)."""
    a, b, c, D = x.shape
    return [(a, b, [(1, 1, c, D), (a, 1, c, D), (a, b, c, D)]),  # BNSD: 11SD, B1SD, BNSD
            (a, c, [(1, b, 1, D), (a, b, 1, D), (a, b, c, D)]),  # BSND: 1S1D, BS1D, BSND
            (b, c, [(a, 1, 1, D), (a, b, 1, D), (a, b, c, D)])]  # SBND: S11D, SB1D, SBND


def npu_rotary_mul(x, r1, r2, rotary_mode="half", rotate=None):
    """x * r1 + rotate_half(x) * r2 for 4-D x in BNSD, BSND or SBND; r1, r2 of one of the shapes that layout takes
    (on the parts before the 910B: head_dim 128, r1 11SD, 1S1D or S11D broadcast over at most 1024 rows). r1, r2 of
    another dtype are cast to x's."""
    _count("npu_rotary_mul")
    _check_part("npu_rotary_mul", ATLAS_A2, ATLAS_A3, ATLAS_TRAINING, ATLAS_INFERENCE)
    _check_dtype("npu_rotary_mul", x=x, r1=r1, r2=r2)
    if rotary_mode != "half" or rotate is not None:
        raise RuntimeError("fake npu_rotary_mul: only rotary_mode='half' without rotate is implemented")
    if x.dim() != 4 or r1.shape != r2.shape:
        raise RuntimeError("npu_rotary_mul: x must be 4-D, r1 and r2 of one shape")
    D = x.size(-1)
    if D >= 896 or D % 2:
        raise RuntimeError(f"npu_rotary_mul: head_dim {D} must be even and < 896")
    old = DEVICE_NAME in ATLAS_TRAINING | ATLAS_INFERENCE
    fits = [(B, N) for B, N, shapes in _rotary_layouts(x) if tuple(r1.shape) in (shapes[:1] if old else shapes)]
    if not fits:
        raise RuntimeError(f"npu_rotary_mul: r1 shape {tuple(r1.shape)} does not go with x {tuple(x.shape)}")
    if all(B >= 1000 or N >= 1000 for B, N in fits):
        raise RuntimeError(f"npu_rotary_mul: B and N must be < 1000, x {tuple(x.shape)}")
    if old and D != 128:
        raise RuntimeError(f"npu_rotary_mul: head_dim must be 128 on {DEVICE_NAME}, got {D}")
    if old and all(B * N > 1024 for B, N in fits):  # its jit_compile=True kernel: broadcast axes of <= 1024 rows
        raise RuntimeError(f"npu_rotary_mul: r1 broadcast over more than 1024 rows on {DEVICE_NAME}, x "
                           f"{tuple(x.shape)}")
    r1, r2 = r1.to(x.dtype), r2.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * r1 + torch.cat([-x2, x1], dim=-1) * r2


def npu_swiglu(x, dim=-1):
    """silu(first half) * second half along dim."""
    _count("npu_swiglu")
    _check_part("npu_swiglu", ATLAS_A2)
    _check_dtype("npu_swiglu", x=x)
    if not 1 <= x.dim() <= 8 or x.size(dim) % 2:
        raise RuntimeError("npu_swiglu: x must have 1-8 dims and an even split dimension")
    a, b = x.chunk(2, dim=dim)
    return F.silu(a.float()).mul(b.float()).to(x.dtype)


def _causal(sq, skv, mode, device):
    """True = masked. Mode 2: left-up aligned causal; mode 3: right-down aligned causal."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    return j > i if mode == 2 else j > i + (skv - sq)


def _attend(q, k, v, mask, scale, pse=None, pse_in_scale=True):
    """q (B, N, Sq, D), k/v (B, Nkv, Skv, D); softmax(mask(scale * (pse + q k^T))) v (npu_fusion_attention) or, with
    pse_in_scale=False, softmax(mask(scale * q k^T + pse)) v (the inference kernels), in fp32. A query that sees no
    key gets zeros."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    s = q.float() @ k.transpose(-1, -2)
    if pse is not None and pse_in_scale:
        s = s + pse.float()
    s = s * scale
    if pse is not None and not pse_in_scale:
        s = s + pse.float()
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    p = s.softmax(-1)
    if mask is not None:
        p = p.nan_to_num(0.0)
    return (p @ v).to(q.dtype)


def _check_2048_mask(op, atten_mask):
    if atten_mask is None or tuple(atten_mask.shape) != (2048, 2048):
        raise RuntimeError(f"{op}: sparse_mode 2/3 needs the 2048x2048 triangular atten_mask")
    if not torch.equal(atten_mask.bool(), torch.ones(2048, 2048, dtype=torch.bool, device=atten_mask.device).triu(1)):
        raise RuntimeError(f"{op}: the sparse_mode 2/3 atten_mask must be upper triangular (1 = masked)")


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    _count("npu_fusion_attention")
    op = "npu_fusion_attention"
    _check_part(op, ATLAS_A2)
    _check_dtype(op, query=query, key=key, value=value, pse=pse)
    if not (query.dtype == key.dtype == value.dtype) or (pse is not None and pse.dtype != query.dtype):
        raise RuntimeError(f"{op}: query, key, value and pse must share one dtype")
    if keep_prob != 1.0 or prefix is not None or sink is not None or padding_mask is not None:
        raise RuntimeError(f"fake {op}: dropout, prefix, sink and padding_mask not implemented")
    if atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
        raise RuntimeError(f"{op}: atten_mask must be bool or uint8 (1 = masked)")
    if sparse_mode not in (0, 2, 3):
        raise RuntimeError(f"fake {op}: sparse_mode {sparse_mode} not implemented")
    if sparse_mode in (2, 3):
        _check_2048_mask(op, atten_mask)
    if key.shape != value.shape:
        raise RuntimeError(f"{op}: key and value must have one shape")
    if input_layout == "TND":
        out = _tnd(query, key, value, head_num, scale, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse)
    else:
        out = _bnsd(query, key, value, head_num, input_layout, pse, atten_mask, scale, sparse_mode)
    kept = [t for t in (atten_mask, pse) if t is not None]
    if torch.is_grad_enabled() and out.requires_grad:
        out = _KeptForBackward.apply(out, *kept)
    return out, None, None, None, 0, 0, 0


def _check_heads(op, N, Nkv, D, Dk, Dv, head_num):
    if N != head_num:
        raise RuntimeError(f"{op}: head_num {head_num} != query heads {N}")
    if not (1 <= D <= 768 and D == Dk and Dk >= Dv):
        raise RuntimeError(f"{op}: head_dim must be 1..768 with Dq = Dk >= Dv, got {D}, {Dk}, {Dv}")
    if not 1 <= N <= 256 or N % Nkv:
        raise RuntimeError(f"{op}: 1..256 query heads, a whole multiple of the kv heads, got {N} and {Nkv}")


def _bnsd(query, key, value, head_num, input_layout, pse, atten_mask, scale, sparse_mode):
    op = "npu_fusion_attention"
    if input_layout == "BNSD":
        q, k, v = query, key, value
    elif input_layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    elif input_layout == "BSH":
        q, k, v = (t.view(t.size(0), t.size(1), -1, t.size(2) * head_num // query.size(2)).transpose(1, 2)
                   for t in (query, key, value))
    else:
        raise RuntimeError(f"{op}: unsupported input_layout {input_layout!r}")
    B, N, Sq, D = q.shape
    Skv = k.size(2)
    _check_heads(op, N, k.size(1), D, k.size(3), v.size(3), head_num)
    mask = None
    if sparse_mode in (2, 3):
        mask = _causal(Sq, Skv, sparse_mode, q.device)
    elif atten_mask is not None:
        if tuple(atten_mask.shape) not in {(B, N, Sq, Skv), (B, 1, Sq, Skv), (1, 1, Sq, Skv), (Sq, Skv)}:
            raise RuntimeError(f"{op}: atten_mask shape {tuple(atten_mask.shape)} not supported")
        mask = atten_mask.bool()
    if pse is not None:
        pse = _full_pse(pse, B, N, Sq, Skv, sparse_mode, mask)
    out = _attend(q, k, v, mask, scale, pse)
    if input_layout == "BSND":
        out = out.transpose(1, 2)
    elif input_layout == "BSH":
        out = out.transpose(1, 2).reshape(B, Sq, N * D)
    return out


def _full_pse(pse, B, N, Sq, Skv, sparse_mode, mask):
    """pse as a (B|1, N, Sq|1, Skv) bias: BNSS, 1NSS, BN1Skv, or the ALiBi compression, the last 1024 rows of an
    ALiBi bias (constant along each diagonal) for Sq > 1024 = Skv under a lower-triangular mask, read along the
    diagonals from its last row."""
    shape = tuple(pse.shape)
    if shape in {(B, N, Sq, Skv), (1, N, Sq, Skv), (B, N, 1, Skv), (1, N, 1, Skv)}:
        return pse
    if shape not in {(B, N, 1024, Skv), (1, N, 1024, Skv)} or Sq <= 1024:
        raise RuntimeError(f"npu_fusion_attention: pse shape {shape} not supported")
    lower = mask is not None and bool(mask[..., _causal(Sq, Skv, 2, mask.device)].all())
    if Sq != Skv or sparse_mode not in (0, 2, 3) or not lower:
        raise RuntimeError("npu_fusion_attention: the compressed ALiBi pse needs Sq = Skv and a lower-triangular mask")
    if not torch.equal(pse[..., 1:, 1:], pse[..., :-1, :-1]):
        raise RuntimeError("npu_fusion_attention: a compressed pse must be an ALiBi bias (constant on each diagonal)")
    i = torch.arange(Sq, device=pse.device)[:, None]
    j = torch.arange(Skv, device=pse.device)[None, :]
    return pse[:, :, -1][:, :, (j - i + Sq - 1).clamp(0, Skv - 1)]  # entries above the diagonal are masked anyway


def _tnd(query, key, value, head_num, scale, qlen, kvlen, sparse_mode, pse):
    """Variable-length sequences packed along T: (T, N, D) with cumulative end offsets in actual_seq_*len."""
    op = "npu_fusion_attention"
    if qlen is None or kvlen is None or len(qlen) != len(kvlen):
        raise RuntimeError(f"{op}: TND needs actual_seq_qlen and actual_seq_kvlen of one length")
    if not 1 <= len(qlen) <= 1024:
        raise RuntimeError(f"{op}: actual_seq_qlen holds 1..1K entries in the varlen case, got {len(qlen)}")
    if query.size(0) > 1 << 20:
        raise RuntimeError(f"{op}: TND takes at most 1M tokens, got {query.size(0)}")
    if list(qlen) != sorted(qlen) or qlen[-1] != query.size(0) or kvlen[-1] != key.size(0):
        raise RuntimeError(f"{op}: actual_seq_qlen must be cumulative and end at T")
    if pse is not None or sparse_mode not in (2, 3):
        raise RuntimeError(f"fake {op}: TND is implemented for causal sparse modes without pse only")
    _check_heads(op, query.size(1), key.size(1), query.size(2), key.size(2), value.size(2), head_num)
    out = torch.empty_like(query)
    q0 = k0 = 0
    for q1, k1 in zip(qlen, kvlen):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t, a, b in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        out[q0:q1] = _attend(q, k, v, _causal(q1 - q0, k1 - k0, sparse_mode, query.device), scale)[0].transpose(0, 1)
        q0, k0 = q1, k1
    return out


# --------------------------------------------------------------------------------------------------------------------
# inference kernels: softmax(scale * q k^T + pse_shift) v, masked


def _infer_inputs(op, query, key, value, num_heads, num_key_value_heads, input_layout, pse_shift, dtypes):
    """Checks shared by the decode and prefill kernels; returns q, k, v in BNSD."""
    _check_no_grad(op, query, key, value, pse_shift)
    _check_dtype(op, dtypes, query=query, key=key, value=value, pse_shift=pse_shift)
    if not (query.dtype == key.dtype == value.dtype) or (pse_shift is not None and pse_shift.dtype != query.dtype):
        raise RuntimeError(f"{op}: query, key, value and pse_shift must share one dtype")
    if input_layout not in ("BNSD", "BSND") or query.dim() != 4 or key.shape != value.shape:
        raise RuntimeError(f"fake {op}: 4-D BNSD / BSND with key and value of one shape only")
    q, k, v = (t if input_layout == "BNSD" else t.transpose(1, 2) for t in (query, key, value))
    B, N, _, D = q.shape
    Nkv = num_key_value_heads or N
    if N != num_heads or k.size(1) != Nkv or N % Nkv or N // Nkv > 64:
        raise RuntimeError(f"{op}: num_heads {num_heads} / num_key_value_heads {num_key_value_heads} do not match "
                           f"query and key heads {N}, {k.size(1)} (a whole ratio of at most 64)")
    if N > 256 or D > 512 or k.size(3) != D:
        raise RuntimeError(f"{op}: at most 256 heads and head_dim 512, got {N}, {D}")
    if pse_shift is not None and D % 16:
        raise RuntimeError(f"{op}: pse_shift needs head_dim a multiple of 16, got {D}")
    return q, k, v


def _infer_mask(op, atten_mask, patterns, B, Sq, Skv, device, kv_lengths, pre_tokens=None, next_tokens=None):
    """True = masked, (B|1, 1, Sq, Skv): atten_mask (its shape one of `patterns`: B batch, 1, S at least the query
    length, K at least the key length) with the pre_tokens / next_tokens band, or'ed with the keys past each row's
    actual length (kv_lengths: one for all rows, or at least B of which the first B count)."""
    masked = torch.zeros(1, 1, Sq, Skv, dtype=torch.bool, device=device)
    if atten_mask is not None:
        if atten_mask.dtype not in MASK_DTYPES:
            raise RuntimeError(f"{op}: atten_mask must be bool, int8 or uint8 (1 = masked)")
        want = {"B": B, "1": 1}
        fits = [p for p in patterns if len(p) == atten_mask.dim() and all(
            a >= {"S": Sq, "K": Skv}[c] if c in "SK" else a == want[c] for a, c in zip(atten_mask.shape, p))]
        if not fits:
            raise RuntimeError(f"{op}: atten_mask shape {tuple(atten_mask.shape)} not supported")
        m = atten_mask.bool()[tuple(slice(None, {"S": Sq, "K": Skv}.get(c)) for c in fits[0])]
        masked = masked | m.reshape(-1, 1, Sq, Skv)
        if pre_tokens is not None:  # the band counts from the top-left corner
            i = torch.arange(Sq, device=device)[:, None]
            j = torch.arange(Skv, device=device)[None, :]
            masked = masked | (j - i > next_tokens) | (i - j > pre_tokens)
    if kv_lengths is not None:
        if (len(kv_lengths) != 1 and len(kv_lengths) < B) or any(not 0 <= n <= Skv for n in kv_lengths):
            raise RuntimeError(f"{op}: actual sequence lengths {kv_lengths} do not fit {B} rows of {Skv} keys")
        lengths = torch.tensor(list(kv_lengths[:B]) * (B if len(kv_lengths) == 1 else 1), device=device)
        masked = masked | (torch.arange(Skv, device=device) >= lengths[:, None])[:, None, None, :]
    return masked


def _infer_pse(op, pse_shift, B, N, Sq, Skv):
    if pse_shift is None:
        return None
    b, n, sq, skv = pse_shift.shape if pse_shift.dim() == 4 else (0,) * 4
    if b not in (1, B) or n != N or sq < Sq or skv < Skv:
        raise RuntimeError(f"{op}: pse_shift shape {tuple(pse_shift.shape)} not supported")
    return pse_shift[:, :, :Sq, :Skv]


def npu_incre_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None,
                              actual_seq_lengths=None, antiquant_scale=None, antiquant_offset=None, block_table=None,
                              dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                              quant_offset2=None, kv_padding_size=None, num_heads=1, scale_value=1.0,
                              input_layout="BSH", num_key_value_heads=0, block_size=0, inner_precise=1):
    """One decode step against a KV cache: query S = 1; actual_seq_lengths (B,) or (1,) keys in use."""
    _count("npu_incre_flash_attention")
    op = "npu_incre_flash_attention"
    _check_part(op, ATLAS_A2, ATLAS_INFERENCE)
    unmodelled = (padding_mask, antiquant_scale, antiquant_offset, block_table, dequant_scale1, quant_scale1,
                  dequant_scale2, quant_scale2, quant_offset2, kv_padding_size)
    if any(t is not None for t in unmodelled):
        raise RuntimeError(f"fake {op}: quantisation, paged and left-padded caches not implemented")
    old = DEVICE_NAME in ATLAS_INFERENCE
    if old and pse_shift is not None:
        raise RuntimeError(f"{op}: no pse_shift on {DEVICE_NAME}")
    q, k, v = _infer_inputs(op, query, key, value, num_heads, num_key_value_heads, input_layout, pse_shift,
                            (torch.float16,) if old else HALF_DTYPES)
    B, N, Sq, D = q.shape
    Skv = k.size(2)
    if Sq != 1 or B > 65535 or Skv > 262144:
        raise RuntimeError(f"{op}: query S must be 1, B <= 65535, key S <= 256K; got {tuple(q.shape)}, S {Skv}")
    mask = _infer_mask(op, atten_mask, ["BK", "B1K", "B11K"], B, 1, Skv, q.device, actual_seq_lengths)
    out = _attend(q, k, v, mask, scale_value, _infer_pse(op, pse_shift, B, N, 1, Skv), pse_in_scale=False)
    return out if input_layout == "BNSD" else out.transpose(1, 2)


def npu_prompt_flash_attention(query, key, value, *, pse_shift=None, padding_mask=None, atten_mask=None,
                               actual_seq_lengths=None, deq_scale1=None, quant_scale1=None, deq_scale2=None,
                               quant_scale2=None, quant_offset2=None, num_heads=1, scale_value=1.0,
                               pre_tokens=2147483647, next_tokens=0, input_layout="BSH", num_key_value_heads=0,
                               actual_seq_lengths_kv=None, sparse_mode=0):
    """Prefill: any query S against key S; a mask in sparse_mode 0 together with the pre_tokens / next_tokens band
    (next_tokens defaults to 0: a query sees no key after its own index); actual_seq_lengths(_kv) rows / keys in use."""
    _count("npu_prompt_flash_attention")
    op = "npu_prompt_flash_attention"
    _check_part(op, ATLAS_A2, ATLAS_A3, ATLAS_INFERENCE)
    if any(t is not None for t in (padding_mask, deq_scale1, quant_scale1, deq_scale2, quant_scale2, quant_offset2)):
        raise RuntimeError(f"fake {op}: quantisation not implemented")
    if sparse_mode != 0:
        raise RuntimeError(f"fake {op}: sparse_mode {sparse_mode} not implemented")
    old = DEVICE_NAME in ATLAS_INFERENCE
    if old and (pse_shift is not None or actual_seq_lengths is not None or actual_seq_lengths_kv is not None):
        raise RuntimeError(f"{op}: no pse_shift or actual sequence lengths on {DEVICE_NAME}")
    if not all(t is None or t.is_contiguous() for t in (query, key, value, pse_shift, atten_mask)):
        raise RuntimeError(f"{op}: query, key, value, pse_shift and atten_mask must be contiguous")
    q, k, v = _infer_inputs(op, query, key, value, num_heads, num_key_value_heads, input_layout, pse_shift,
                            (torch.float16,) if old else HALF_DTYPES)
    B, N, Sq, D = q.shape
    Skv = k.size(2)
    if D % 16 or B > 65536:
        raise RuntimeError(f"{op}: head_dim must be a multiple of 16 and B <= 64K, got {tuple(q.shape)}")
    mask = _infer_mask(op, atten_mask, ["SK", "BSK", "1SK", "B1SK", "11SK"], B, Sq, Skv, q.device,
                       actual_seq_lengths_kv, pre_tokens, next_tokens)
    out = _attend(q, k, v, mask, scale_value, _infer_pse(op, pse_shift, B, N, Sq, Skv), pse_in_scale=False)
    if actual_seq_lengths is not None:  # rows past a batch's query length are not computed
        rows = torch.tensor(list(actual_seq_lengths[:B]) * (B if len(actual_seq_lengths) == 1 else 1))
        out = out.masked_fill((torch.arange(Sq) >= rows[:, None])[:, None, :, None].to(out.device), 0)
    return out if input_layout == "BNSD" else out.transpose(1, 2)
