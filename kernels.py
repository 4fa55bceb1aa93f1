"""kernels.py: the device, and the few ops that decide a transformer's speed.

Every op picks its path from its inputs: the Ascend path (torch_npu's fused kernels) for inputs on an NPU, the
portable torch path (CPU, CUDA, MPS) otherwise, and two variants of the portable path, marked (1) and (2). torch_npu
is imported lazily and only when an NPU is in play, so nothing here needs it.

    op                                     portable torch path                        Ascend path (torch_npu)
    rms_norm(x, weight, eps)               F.rms_norm; (1) RMSNormFunction            npu_rms_norm
    apply_rotary(x, cos, sin)              x * cos + rotate_half(x) * sin             npu_rotary_mul
    attention(q, k, v, causal, alibi,      F.scaled_dot_product_attention;            training: npu_fusion_attention
              masks, kv cache)             (2) the same in fp32                       (BNSD; TND for packed docs);
                                                                                      inference: npu_incre_flash_
                                                                                      attention (decode steps),
                                                                                      npu_prompt_flash_attention
    swiglu(gate, up)                       F.silu(gate) * up; (1) SwiGLUFunction      npu_swiglu
    cross_entropy(logits, targets, mask)   F.cross_entropy in fp32; vocabulary-       portable
                                           sharded logits (tensor parallel): per shard
    linear_cross_entropy(h, weight, ...)   _LinearCrossEntropy, no logits kept;       portable
                                           (2) its GEMMs in fp32
    linear(x, weight)                      F.linear; (2) LinearBf16ViaFp32            portable
    nf4_linear(x, q, shape)                in support/quant.py (QLoRA's NF4 base):    portable
      and int8 / int4 linears              _NF4Linear, its GEMMs through (2); decoding
                                           on a CPU: C kernels (quant_kernels.c)

(1) Eager training on plain CPU/CUDA tensors (plain_training): an autograd.Function with the torch ops' numbers and a
    shorter backward that keeps fewer tensors (support/short_backward.py).
(2) bf16 on a CPU without bf16 units (bf16_on_fp32_units): torch's bf16 GEMMs are scalar loops there; the fp32
    GEMM on the bf16 values, its result rounded to bf16, gives a bf16 GEMM's numbers at fp32 speed
    (support/cpu_linear.py).

An Ascend op is used only on the parts torch_npu 2.13's documentation lists for it (NPU_OPS, by
torch.npu.get_device_name()) and within the shapes it documents; otherwise the op takes the portable path and says
so once on stderr. Tests run the NPU path on CPU against a fake torch_npu that implements the documented semantics
and limits (force_npu()); bench.py --mode=npu-check compares every fused op with the portable path on a real NPU.
The devices a machine has and their free memory are in support/device.py.
"""

import functools
import math
import re
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from support.cpu_linear import LinearBf16ViaFp32, bf16_on_fp32_units, by_weight_rows, row_slices
from support import short_backward
from support.device import npu_available


# --------------------------------------------------------------------------------------------------------------------
# device and distributed backend


def device_type() -> str:
    """'npu' | 'cuda' | 'mps' | 'cpu': the best accelerator this process can use."""
    if npu_available():
        npu_chip()  # says once which fused ops this part lacks
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dist_backend(device: str | None = None) -> str:
    """The torch.distributed backend that goes with a device type: hccl on NPU, nccl on CUDA, gloo otherwise."""
    return {"npu": "hccl", "cuda": "nccl"}.get(device or device_type(), "gloo")


_force_npu = None  # True: every op takes the torch_npu path; False: every op the portable path; None: by device


@contextmanager
def force_npu(enabled: bool = True):
    """Route every op through the torch_npu path whatever the device (tests do this with a fake torch_npu), or with
    enabled=False through the portable path even on an NPU (bench.py --mode=npu-check's reference)."""
    global _force_npu
    previous, _force_npu = _force_npu, enabled
    npu_chip.cache_clear()
    try:
        yield
    finally:
        _force_npu = previous
        npu_chip.cache_clear()


def _on_npu(x: torch.Tensor) -> bool:
    return _force_npu if _force_npu is not None else x.device.type == "npu"


# The fused ops and the Ascend parts torch_npu 2.13's documentation lists for each (its "supported models"): Atlas A2
# is the 910B (Ascend910B1..B4, also in the Atlas 800I A2), Atlas A3 the Ascend910_93xx, the Atlas training series
# the first 910s (Ascend910A, ProA, PremiumA, ProB and the bare Ascend910B), the Atlas inference series the 310P.
# npu_rms_norm lists no parts. The 310P's decode and prefill kernels take fp16 only and no bias: not used here.
NPU_OPS = {
    "Atlas A2": {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention", "npu_incre_flash_attention",
                 "npu_prompt_flash_attention"},
    "Atlas A3": {"npu_rms_norm", "npu_rotary_mul", "npu_prompt_flash_attention"},
    "Atlas training": {"npu_rms_norm", "npu_rotary_mul"},  # npu_rotary_mul with head_dim 128 only
    "Atlas inference": {"npu_rms_norm", "npu_rotary_mul"},  # npu_rotary_mul with head_dim 128 only
    "unknown": {"npu_rms_norm"},
}


def npu_family(name: str) -> str:
    """The NPU_OPS family of an Ascend part as torch.npu.get_device_name() names it: 'Ascend910B3' -> 'Atlas A2'."""
    for pattern, family in ((r"Ascend910B\d", "Atlas A2"), (r"Ascend910_93", "Atlas A3"),
                            (r"Ascend910", "Atlas training"), (r"Ascend310P", "Atlas inference")):
        if re.match(pattern, name):
            return family
    return "unknown"


@functools.cache
def npu_chip() -> tuple[str, str]:
    """(name, family) of this process's NPU, read once; the fused ops it lacks are said once, here."""
    import torch_npu

    name = torch_npu.npu.get_device_name()
    family = npu_family(name)
    lacking = sorted(set().union(*NPU_OPS.values()) - NPU_OPS[family])
    if lacking:
        _say_once(f"kernels: {name} ({family}): torch_npu 2.13 documents {', '.join(lacking)} for other Ascend "
                  "parts; the ops that would use them take the portable torch path")
    return name, family


_said: set[str] = set()


def _say_once(message: str):
    """Print a routing decision to stderr the first time it is made (an op falling back must not go unnoticed)."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


def _npu_op(x: torch.Tensor, op: str):
    """The torch_npu module when x is on an NPU (or the NPU path is forced) whose part has op, else None."""
    if not _on_npu(x):
        return None
    import torch_npu

    return torch_npu if op in NPU_OPS[npu_chip()[1]] else None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype where autocast is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and x.is_floating_point() else x.dtype


# --------------------------------------------------------------------------------------------------------------------
# elementwise ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, the statistics in fp32 whatever x's dtype (as LLaMA and Baichuan compute it).

    Under autocast the result comes in the autocast dtype: the projections reading it (wq, wk, wv; w1, w3) would
    each cast the fp32 result and keep their own 16-bit copy for backward; the copies are the same numbers.
    """
    weight = weight.to(x.dtype)  # under autocast the gain is fp32; both fused kernels want one dtype
    npu = _npu_op(x, "npu_rms_norm") if 2 <= x.dim() <= 8 else None
    if npu is not None:
        y = npu.npu_rms_norm(x, weight, eps)[0]
    elif short_backward.plain_training(x, weight):
        y = short_backward.RMSNormFunction.apply(x, weight, eps)
    else:
        y = F.rms_norm(x, (x.size(-1),), weight, eps)
    return y.to(compute_dtype(x)) if y.dtype == torch.float32 else y


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotate-half RoPE: (*positions.shape, head_dim) in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout: the two halves share frequencies
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin. x (B, T, H, D); cos, sin broadcastable, e.g. (B|1, T, 1, D)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    npu = _npu_op(x, "npu_rotary_mul")
    if npu is not None and _rotary_fits(x, cos):
        return npu.npu_rotary_mul(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([-x2, x1], dim=-1), sin)  # one pass fewer than a * b + c * d


def _rotary_fits(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether npu_rotary_mul takes x (B, T, H, D) (its BSND layout) with cos, sin (1|B, T, 1, D), as torch_npu 2.13
    documents it: D < 896 and even, B and H under 1000; on the parts before the 910B (its jit_compile=True kernel)
    only D = 128, cos (1, T, 1, D), and at most 1024 rows (B * H) over which cos is broadcast."""
    B, _, H, D = x.shape
    if D >= 896 or D % 2 or B >= 1000 or H >= 1000:
        _say_once(f"kernels: npu_rotary_mul takes head_dim < 896 (even), batch and heads < 1000; got x "
                  f"{tuple(x.shape)}: apply_rotary takes the portable path")
        return False
    name, family = npu_chip()
    if family in ("Atlas training", "Atlas inference") and (D != 128 or cos.size(0) != 1 or B * H > 1024):
        _say_once(f"kernels: npu_rotary_mul on {name} takes head_dim 128, one position table for the batch and "
                  f"batch * heads <= 1024; got x {tuple(x.shape)}, cos {tuple(cos.shape)}: apply_rotary takes the "
                  "portable path")
        return False
    return True


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the LLaMA feed-forward nonlinearity."""
    npu = _npu_op(gate, "npu_swiglu")
    if npu is not None:
        return npu.npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)
    if short_backward.plain_training(gate, up):
        return short_backward.SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------------------------
# matmul: bf16 on a CPU without bf16 units goes through support/cpu_linear.py


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (no bias), the op behind every projection of the model: F.linear, except bf16 (weights or CPU
    autocast) on a CPU without bf16 units, which takes LinearBf16ViaFp32 (see bf16_on_fp32_units).

    A few rows (decoding) stay on torch's bf16 matrix-vector loop there: the weight's fp32 copy costs more (output
    layer of bench-llama, one row: 4 ms native, 60 ms via fp32; the two break even near 4 rows for the small layers,
    16 for the output layer).
    """
    few_rows = x.numel() <= 4 * x.size(-1) and x.dtype == weight.dtype
    if few_rows or not bf16_on_fp32_units(compute_dtype(x), x.device):
        return F.linear(x, weight)
    with torch.autocast("cpu", enabled=False):
        return LinearBf16ViaFp32.apply(x, weight)


# --------------------------------------------------------------------------------------------------------------------
# attention


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes as Bloom and Baichuan compute them, for any head count.

    With p the largest power of two <= n_heads, the first p heads get 2^(-8i/p), i = 1..p; the remaining heads take
    the odd-indexed slopes of the 2p series, 2^(-8i/2p) for i = 1, 3, 5, ...
    """
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)]
    slopes += [2 ** (-8 * i / (2 * p)) for i in range(1, 2 * (n_heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def _allowed(T, S, q_start, causal, key_padding_mask, doc_ids, device):
    """(B|1, 1, T, S) bool, True where query i (at position q_start + i) may attend key j; None if all may."""
    needs_causal = causal and (T > 1 or q_start + T < S)
    if not needs_causal and key_padding_mask is None and doc_ids is None:
        return None  # e.g. one decoded token attending its whole cache: no tensors to build
    qpos = torch.arange(q_start, q_start + T, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    allowed = (kpos <= qpos)[None, None] if needs_causal else None
    if doc_ids is not None:  # packed sequences: attention stays inside each document
        same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        allowed = same_doc if allowed is None else allowed & same_doc
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, None, :S].bool()
        allowed = real if allowed is None else allowed & real
        # a padding query would see no key at all and softmax would give NaN: let it see itself
        allowed = allowed | (kpos == qpos)
    return allowed


def _alibi_bias(slopes, T, S, q_start, device):
    """(1, H, T, S) fp32 bias slope_h * (j - i): 0 on the diagonal, more negative with distance."""
    qpos = torch.arange(q_start, q_start + T, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    return (slopes.float()[:, None, None] * (kpos - qpos)).unsqueeze(0)


def alibi_attention_bias(slopes, dtype, head_dim, T, S, q_start=0, *, causal=True, key_padding_mask=None,
                         doc_ids=None, device=None):
    """The ALiBi bias of attention on queries of this dtype, as an additive mask: slope * (j - i), -inf where query i
    (at position q_start + i) may not look at key j. (B|1, H, T, S); S = q_start + T with a KV cache.

    Built once per forward and passed to every layer's attention (alibi_bias=): all layers add and save the same
    tensor instead of building their own ((B|1, H, T, S) is 1.3 GB in bf16 for Baichuan-13B at 4096 tokens, and
    autograd kept one per layer). The NPU path adapts it to its kernels' forms (_npu_pse); where npu_fusion_attention
    takes the compressed bias, only its last ALIBI_ROWS rows are built, (1, H, ALIBI_ROWS, S). head_dim: the query's.
    """
    device = device or slopes.device
    if _on_npu(slopes) and _alibi_compressed(slopes, dtype, head_dim, T, S, q_start, causal, key_padding_mask, doc_ids,
                                             device):
        T, q_start = ALIBI_ROWS, q_start + T - ALIBI_ROWS  # the rows of the last ALIBI_ROWS queries, and no others
    bias = _alibi_bias(slopes, T, S, q_start, device)
    allowed = _allowed(T, S, q_start, causal, key_padding_mask, doc_ids, device)
    # fp32 where SDPA runs in fp32 (2): slope * distance in bf16 rounds to steps of up to 16 at 4096 tokens; in the
    # query's dtype elsewhere (CUDA's fused kernels take no other). Converted here, not in each layer's attention, so
    # that every layer shares (and autograd saves) this one tensor
    mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
    return mask if bf16_on_fp32_units(dtype, device) else mask.to(dtype)


# npu_fusion_attention's ALiBi compression: for Sq > 1024 (Sq = Skv, a causal mask) it takes the last 1024 rows of the
# bias (it repeats along the diagonals) instead of all Sq
ALIBI_ROWS = 1024


def _alibi_compressible(T, kv_len, q_start, causal, key_padding_mask, doc_ids) -> bool:
    return T > ALIBI_ROWS and q_start == 0 and T == kv_len and causal and key_padding_mask is None and doc_ids is None


def _alibi_compressed(slopes, dtype, head_dim, T, S, q_start, causal, key_padding_mask, doc_ids, device) -> bool:
    """Whether attention on these inputs runs npu_fusion_attention with the compressed bias (kv heads taken as many
    as the query heads: with fewer, the kernel it picks is the same one or takes the whole bias)."""
    if not _alibi_compressible(T, S, q_start, causal, key_padding_mask, doc_ids):
        return False
    H = slopes.size(0)
    return _npu_attention_kernel(torch.empty(0, device=device), dtype, H, H, head_dim, T, S, doc_ids) == "fa"


def attention(q, k, v, *, causal=True, alibi_slopes=None, key_padding_mask=None, doc_ids=None, q_start=0,
              alibi_bias=None, kv_len=None):
    """Scaled dot-product attention with causal, ALiBi, padding and packed-document masks.

    q (B, H, T, D); k, v (B, H_kv, S, D) with H_kv dividing H (grouped-query attention), of which the first kv_len
    positions (default S) are keys. Query i sits at position q_start + i and key j at position j, so with a KV cache
    (k, v: the cache's first q_start + T positions) q_start is the cache position. key_padding_mask (B, >=kv_len)
    bool, True for real tokens; doc_ids (B, T) document index of every token of a packed sequence (needs kv_len == T).
    alibi_bias: alibi_attention_bias(alibi_slopes, ...) for these arguments, built once and shared by the layers.
    Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    kv_len = k.size(2) if kv_len is None else kv_len
    if alibi_slopes is not None and alibi_bias is None:
        alibi_bias = alibi_attention_bias(alibi_slopes, q.dtype, D, T, kv_len, q_start, causal=causal,
                                          key_padding_mask=key_padding_mask, doc_ids=doc_ids, device=q.device)
    kernel = _npu_attention_kernel(q, q.dtype, H, k.size(1), D, T, k.size(2), doc_ids) if _on_npu(q) else None
    if kernel is not None:
        return _npu_dispatch(kernel, q, k, v, causal, alibi_bias, key_padding_mask, doc_ids, q_start, kv_len)
    k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    plain_causal = causal and alibi_bias is None and key_padding_mask is None and doc_ids is None and T == kv_len
    mask, is_causal = None, False
    if alibi_bias is not None:
        mask = alibi_bias  # the mask folded in
    elif plain_causal:
        is_causal = True  # let SDPA pick its fused causal kernel; no (T, S) mask built
    else:
        mask = _allowed(T, kv_len, q_start, causal, key_padding_mask, doc_ids, q.device)
    if bf16_on_fp32_units(compute_dtype(q), q.device):  # fp32 SDPA on the bf16 values, the bf16 result
        with torch.autocast("cpu", enabled=False):
            q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
            mask = mask.float() if mask is not None and mask.is_floating_point() else mask  # fp32 already if shared
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=H != k.size(1))
            return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=H != k.size(1))


def _npu_attention_kernel(x, dtype, H, H_kv, D, T, S, doc_ids) -> str | None:
    """The torch_npu kernel attention runs on for these inputs (x: any tensor on their device), by the limits
    torch_npu 2.13 documents, or None for the portable path.

    'ifa' npu_incre_flash_attention (one-token decode steps) and 'pfa' npu_prompt_flash_attention (prefill), the
    inference kernels, where no gradient is wanted: fp16 / bf16, head_dim a multiple of 16 up to 512, at most 256
    query heads and 64 per kv head, keys up to 256K for a decode step. 'fa' npu_fusion_attention, the training
    kernel (also inference where the others do not fit, e.g. fp32, packed documents): head_dim 1..768, at most 256
    query heads, whole multiples of the kv heads.
    """
    if not _on_npu(x):
        return None
    if (not torch.is_grad_enabled() and doc_ids is None and dtype in (torch.float16, torch.bfloat16) and D % 16 == 0
            and D <= 512 and H <= 256 and H % H_kv == 0 and H // H_kv <= 64):
        if T == 1 and S <= 262144 and _npu_op(x, "npu_incre_flash_attention"):
            return "ifa"
        if _npu_op(x, "npu_prompt_flash_attention"):
            return "pfa"
    if not _npu_op(x, "npu_fusion_attention"):
        return None
    if D > 768 or H > 256 or H % H_kv:
        _say_once(f"kernels: npu_fusion_attention takes head_dim 1..768 and 1..256 query heads, a whole multiple of "
                  f"the kv heads; got head_dim {D}, {H} query and {H_kv} kv heads: attention takes the portable path")
        return None
    return "fa"


def _npu_dispatch(kernel, q, k, v, causal, alibi_bias, key_padding_mask, doc_ids, q_start, kv_len):
    """attention on the torch_npu kernel picked for it, given what attention takes; what the kernels want besides
    (the ALiBi bias in their form, the documents' ends, the whole KV cache) is built here."""
    T, D = q.size(2), q.size(3)
    if kernel in ("ifa", "pfa"):  # the inference kernels read the KV cache in place, whole
        k, v = _whole_cache(k, kv_len), _whole_cache(v, kv_len)
    S = k.size(2)
    pse = None
    if alibi_bias is not None:
        pse = _per_forward(alibi_bias, (kernel, q.dtype, D, S, kv_len), lambda bias: _npu_pse(
            kernel, bias, q.dtype, D, S, _alibi_compressible(T, kv_len, q_start, causal, key_padding_mask, doc_ids)))
    if kernel in ("ifa", "pfa"):
        return _npu_infer_attention(kernel, q, k, v, causal, pse, key_padding_mask, q_start, kv_len)
    k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    if doc_ids is not None and pse is None and key_padding_mask is None and causal:
        doc_ends = _per_forward(doc_ids, (), lambda d: packed_doc_ends(d))  # read off the device once per batch
        return _npu_packed_attention(q, k, v, doc_ends, 1.0 / math.sqrt(D))
    return _npu_attention(q, k, v, causal, pse, key_padding_mask, doc_ids, q_start)


# What the NPU kernels want, derived from a tensor every layer of one forward shares (the ALiBi bias, doc_ids):
# made for the first layer, reused by the others, dropped with the tensor (keyed by its identity and version)
_PER_FORWARD: dict = {}


def _per_forward(source: torch.Tensor, key: tuple, make):
    slot = (id(source), None if source.is_inference() else source._version, key)  # (inference: no version)
    hit = _PER_FORWARD.get(slot)
    if hit is not None and hit[0]() is source:
        return hit[1]
    value = make(source)
    _PER_FORWARD[slot] = (weakref.ref(source, lambda ref: _PER_FORWARD.pop(slot, None)), value)
    return value


def _npu_pse(kernel, bias, dtype, head_dim, S, compressible) -> torch.Tensor:
    """alibi_attention_bias's additive mask in the form the kernel takes: npu_fusion_attention's pse, bias / scale
    (it computes scale * (pse + q k^T)), only its last 1024 rows for a long causal sequence (the documented ALiBi
    compression: the kernel keeps a pse gradient the size of the pse; alibi_attention_bias built only those rows);
    the inference kernels' pse_shift, the bias itself over the whole cache, width S (they add it to scale * q k^T).
    The masked entries become 0: the kernels take the mask apart (atten_mask, sparse_mode)."""
    if kernel == "fa" and compressible:
        bias = bias[:, :, -ALIBI_ROWS:]
    bias = bias.masked_fill(bias == float("-inf"), 0)
    if kernel == "fa":
        return (bias.float() * math.sqrt(head_dim)).to(dtype)
    return F.pad(bias, (0, S - bias.size(-1))).to(dtype)


def _whole_cache(k: torch.Tensor, kv_len: int) -> torch.Tensor:
    """k (B, H, kv_len, D), the first positions of a preallocated KV cache (B', H, S, D), as the whole cache (B, H, S,
    D) in place; a tensor that is not such a view, contiguous (S = kv_len)."""
    B, H, _, D = k.shape
    st = k.stride()
    if st[3] == 1 and st[2] == D and st[1] % D == 0 and st[0] == H * st[1] and st[1] // D >= kv_len:
        S = st[1] // D
        if k.storage_offset() + B * st[0] <= k.untyped_storage().nbytes() // k.element_size():
            return k.as_strided((B, H, S, D), st)
    return k.contiguous()


@functools.cache
def npu_causal_mask(device) -> torch.Tensor:
    """The fixed 2048 x 2048 upper-triangular mask sparse modes 2 and 3 take whatever the sequence length. Built
    outside inference mode: the training kernel saves it for backward, which an inference tensor cannot be."""
    with torch.inference_mode(False):
        return torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1)


def _npu_attention(q, k, v, causal, pse, key_padding_mask, doc_ids, q_start):
    """npu_fusion_attention in BNSD; pse as _npu_pse makes it for 'fa'."""
    import torch_npu as npu

    B, H, T, D = q.shape
    S = k.size(2)
    scale = 1.0 / math.sqrt(D)
    if causal and key_padding_mask is None and doc_ids is None and q_start + T == S:
        atten_mask, sparse_mode = npu_causal_mask(q.device), 3  # right-down causal, no (T, S) mask built
    else:
        allowed = _allowed(T, S, q_start, causal, key_padding_mask, doc_ids, q.device)
        atten_mask, sparse_mode = (None if allowed is None else ~allowed), 0  # True = masked out
    return npu.npu_fusion_attention(
        q, k, v, H, "BNSD", pse=pse, atten_mask=atten_mask, scale=scale, sparse_mode=sparse_mode
    )[0]


# npu_fusion_attention's varlen (TND) limits: at most 1K sequences per call, at most 1M tokens
TND_MAX_SEQS, TND_MAX_TOKENS = 1024, 1 << 20


def packed_doc_ends(doc_ids: torch.Tensor) -> list[tuple[int, list[int]]]:
    """The TND calls of packed rows: doc_ids (B, T) -> [(first token, cumulative end of each document from there)],
    over the flattened batch, each call within npu_fusion_attention's varlen limits (TND_MAX_SEQS documents,
    TND_MAX_TOKENS tokens). It reads the ends off the device: _npu_dispatch calls it once per batch (_per_forward)."""
    new_doc = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (0, 1), value=True)  # (B, T): a document ends at t
    ends = (new_doc.flatten().nonzero().flatten() + 1).tolist()
    calls = []
    for end in ends:
        if not calls or len(calls[-1][1]) == TND_MAX_SEQS or end - calls[-1][0] > TND_MAX_TOKENS:
            calls.append((calls[-1][0] + calls[-1][1][-1] if calls else 0, []))
        calls[-1][1].append(end - calls[-1][0])
    return calls


def _npu_packed_attention(q, k, v, calls, scale):
    """Packed documents in the TND layout: every document is its own causal sequence, none is padded."""
    import torch_npu as npu

    B, H, T, D = q.shape

    def tnd(x):  # (B, N, T, D) -> (B*T, N, D)
        return x.transpose(1, 2).reshape(B * T, x.size(1), D)

    q, k, v = tnd(q), tnd(k), tnd(v)
    outs = []
    for start, ends in calls:
        stop = start + ends[-1]
        outs.append(npu.npu_fusion_attention(
            q[start:stop], k[start:stop], v[start:stop], H, "TND", atten_mask=npu_causal_mask(q.device), scale=scale,
            sparse_mode=3, actual_seq_qlen=ends, actual_seq_kvlen=ends,
        )[0])
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(B, T, H, D).transpose(1, 2)


INT32_MAX = 2147483647  # the inference kernels' "no limit" for pre_tokens / next_tokens


def _npu_infer_attention(kernel, q, k, v, causal, pse, key_padding_mask, q_start, kv_len):
    """A decode step (npu_incre_flash_attention) or a prefill (npu_prompt_flash_attention) under inference, on the
    KV cache in place: k, v (B, H_kv, S, D) whole, the first kv_len positions in use (actual_seq_lengths); they
    compute softmax(scale * q k^T + pse_shift) with atten_mask True = masked out, both of width S."""
    import torch_npu as npu

    B, H, T, D = q.shape
    H_kv, S = k.size(1), k.size(2)
    allowed = _allowed(T, kv_len, q_start, causal, key_padding_mask, None, q.device)  # (B|1, 1, T, kv_len)
    atten_mask = None if allowed is None else F.pad(~allowed, (0, S - kv_len), value=True)
    kwargs = dict(pse_shift=pse, atten_mask=atten_mask, num_heads=H, scale_value=1.0 / math.sqrt(D),
                  input_layout="BNSD", num_key_value_heads=H_kv)
    k, v = k.contiguous(), v.contiguous()  # no copy for a cache; the kernels take no strided tensors
    if kernel == "ifa":
        return npu.npu_incre_flash_attention(q.contiguous(), k, v, actual_seq_lengths=[kv_len], **kwargs)
    # the mask says what is causal: no band (pre_tokens / next_tokens, whose default next_tokens=0 cuts at i)
    return npu.npu_prompt_flash_attention(q.contiguous(), k, v, actual_seq_lengths_kv=[kv_len], pre_tokens=INT32_MAX,
                                          next_tokens=INT32_MAX, **kwargs)



# --------------------------------------------------------------------------------------------------------------------
# loss


def cross_entropy(logits, targets, loss_mask=None, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the counted tokens, in fp32.

    A token counts unless its target is -100 or its loss_mask is 0. z_loss adds Baichuan2's max-z term,
    z_loss * mean(max(logits)^2), which keeps the logits from drifting upwards. Logits sharded on the vocabulary by
    tensor parallelism (a DTensor (B, T, V/tp)) are never gathered: the cross-entropy is F.cross_entropy under torch's
    loss_parallel (the caller runs forward and backward inside that context, see train.py), and the max-z term takes
    each rank's row maxima.
    """
    sharded = type(logits).__name__ == "DTensor"
    flat = logits.float().flatten(0, -2)  # (N, V)
    targets = targets.flatten()
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask.flatten() == 0, -100)
    counted = targets != -100
    n = counted.sum().clamp(min=1)
    loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / n
    if sharded:
        loss = loss.full_tensor()  # the same value on every tp rank
    if z_loss:
        row_max = _vocab_max(logits) if sharded else flat.max(dim=-1).values  # (N,)
        loss = loss + z_loss * (row_max.pow(2) * counted).sum() / n
    return loss


def _vocab_max(logits) -> torch.Tensor:
    """(N,) row maxima of logits sharded on the vocabulary (a DTensor (B, T, V/tp)): each rank's, then the max."""
    from torch.distributed.tensor import DTensor, Shard

    local_max = logits.to_local().float().flatten(0, -2).max(dim=-1, keepdim=True).values  # (N, 1)
    return DTensor.from_local(local_max, logits.device_mesh, [Shard(1)]).full_tensor().max(dim=-1).values


def linear_cross_entropy(h, weight, targets, loss_mask=None, z_loss: float = 0.0) -> torch.Tensor:
    """cross_entropy(linear(h, weight), targets, loss_mask, z_loss), same numbers, without keeping the logits.

    The training loss path: the logits become their own gradient in place (softmax - onehot; the 1/n and the mask
    are applied to the (N, dim) operands in backward), so one (N, vocab) buffer replaces the four that logits,
    log-softmax and their gradients take, with fewer passes over them. Without gradients (or in bf16 on GPUs) the
    logits are made a slice of rows at a time. h (..., dim), weight (vocab, dim), targets (...).
    Under autocast the matmuls run in the autocast dtype, the softmax in fp32, as linear + cross_entropy do.
    """
    device, dtype = h.device.type, compute_dtype(h)
    round_bf16 = bf16_on_fp32_units(dtype, h.device)
    targets = targets.flatten()
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask.flatten() == 0, -100)
    with torch.autocast(device, enabled=False):
        h, weight = h.flatten(0, -2).to(dtype), weight.to(dtype)  # (N, dim), (vocab, dim)
        if round_bf16:  # bf16 values on the fp32 units, rounded as a bf16 GEMM's results; the weight stays bf16
            h = h.float()  # and is converted a slice of rows at a time (_logits_into): a 7B head is 1 GB in fp32
        return _LinearCrossEntropy.apply(h, weight, targets, float(z_loss), round_bf16)


def _vocab_slices(weight, h):
    """Weight rows to convert at a time where the weight is stored in another dtype than h: all of them otherwise."""
    return [(0, weight.size(0))] if weight.dtype == h.dtype else row_slices(*weight.shape, h.device)


def _logits_into(out, h, weight):
    """out (N, V) = h @ weight.T in h's dtype, weight converted a slice of rows at a time."""
    if weight.dtype == h.dtype:
        return torch.mm(h, weight.T, out=out)
    for s, e in _vocab_slices(weight, h):
        out[:, s:e] = h @ weight[s:e].to(h.dtype).T
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, z_loss, round_bf16):
        N, V = h.size(0), weight.size(0)
        counted = targets != -100
        n = counted.sum().clamp(min=1)
        rows = max(16, (1 << 24) // V)  # fp32 logits made at a time where they are not the gradient buffer: ~64 MB
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad = torch.empty(N, V, dtype=h.dtype, device=h.device) if needs_grad else None
        in_place = grad is not None and h.dtype == torch.float32
        if in_place:  # one GEMM for all rows: GEMMs of row slices repack the whole weight each (~40% slower on CPU)
            _logits_into(grad, h, weight)  # (N, V) logits, turned into their own gradient below
        total = torch.zeros((), device=h.device)
        safe_targets = targets.clamp(min=0)[:, None]  # (N, 1); rows that do not count are masked by `counted`
        for s in range(0, N, rows):
            e = min(s + rows, N)
            c = counted[s:e]
            z = grad[s:e] if in_place else _logits_into(h.new_empty(e - s, V), h[s:e], weight).float()  # (rows, V)
            if round_bf16:
                z.copy_(z.to(torch.bfloat16))  # the logits of a bf16 matmul
            if z_loss:
                z_max, z_arg = z.max(dim=-1)
                total += z_loss * (z_max.square() * c).sum()
            logp = torch.log_softmax(z, dim=-1, out=z)  # in place: one fused kernel, no (rows, V) temporaries
            total -= (logp.gather(1, safe_targets[s:e]).squeeze(1) * c).sum()
            if grad is None:
                continue
            # d loss / d logits = softmax - onehot(target) + 2 z_loss max onehot(argmax), then times counted / n,
            # which backward applies to the (N, dim) operands instead of this (N, V) buffer
            p = logp.exp_()
            p.scatter_add_(1, safe_targets[s:e], p.new_full((e - s, 1), -1.0))
            if z_loss:
                p.scatter_add_(1, z_arg[:, None], (2 * z_loss * z_max)[:, None])
            if round_bf16:
                p.copy_(p.to(torch.bfloat16))  # the bf16 gradient autocast would pass on
            elif p.data_ptr() != grad[s:e].data_ptr():
                grad[s:e] = p  # rounds into a bf16 / fp16 buffer
        ctx.save_for_backward(h, weight, grad, counted, n)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, grad, counted, n = ctx.saved_tensors
        scale = (counted * (grad_loss / n))[:, None]  # (N, 1) fp32: zero for rows that do not count
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = by_weight_rows(grad, lambda s, e: weight[s:e].to(grad.dtype), _vocab_slices(weight, h),
                                     transpose=True)
            grad_h = (grad_h * scale).to(h.dtype)  # (N, dim)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.T @ (h * scale).to(h.dtype)).to(weight.dtype)  # (vocab, dim)
        return grad_h, grad_w, None, None, None


# Hugging Face's `kernels` package (hub kernels, a dependency of transformers >= 5.25) has this file's import name.
# Started in this folder, Python finds this file first, so in a process that imports both transformers and this
# project, `import kernels` is this module whatever the order. So that transformers still gets the package it asked
# for, a name this file does not define is looked up in Hugging Face's package, loaded from where pip installed it; its
# own submodules (`kernels._internals...`) resolve through __path__. Only missing names are forwarded: nothing this
# file defines is shadowed, so no op here computes anything differently.
_HF_KERNELS: list = []  # [spec or None, module or None], found and loaded on first use


def _hf_kernels_spec():
    if not _HF_KERNELS:
        import importlib.machinery
        here = Path(__file__).resolve().parent
        others = [p for p in sys.path if Path(p or ".").resolve() != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", others)
        _HF_KERNELS[:] = [spec if spec is not None and spec.submodule_search_locations else None, None]
    return _HF_KERNELS[0]


def __getattr__(name: str):
    spec = None if name.startswith("__") and name != "__path__" else _hf_kernels_spec()
    if spec is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    if name == "__path__":
        return list(spec.submodule_search_locations)
    if _HF_KERNELS[1] is None:
        import importlib.util
        hf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hf)
        _HF_KERNELS[1] = hf
    try:
        return getattr(_HF_KERNELS[1], name)
    except AttributeError:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}") from None
