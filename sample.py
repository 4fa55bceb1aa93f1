"""
Generate text from a checkpoint dir: streamed sampling, family-aware chat, int8/int4 weight-only quantisation.

Run:
  python sample.py --ckpt=ckpt/llama-7b --prompt="Once upon a time" --max_new_tokens=100
  python sample.py --ckpt=ckpt/baichuan2-7b-chat --chat --system="You are helpful."   # /reset, /exit
  echo -e "Hi\\nWhat is 2+2?" | python sample.py --ckpt=DIR --chat                   # scripted chat
  python sample.py --ckpt=DIR --quantize=int4 --group_size=128 --save_quantized=DIR-int4   # then --ckpt=DIR-int4
  python sample.py --ckpt=DIR --prompt_file=prompts.txt --temperature=0               # one batch, left padded
  python sample.py --ckpt=ckpt/baichuan-7b --adapter=out/baichuan_7b_qlora/adapter --chat  # LoRA adapters of train.py

Generated text goes to stdout as it decodes; everything else (settings, speed, warnings) goes to stderr.

Library use:
  from sample import generate
  for token in generate(model, prompt_ids, 64, temperature=0.0, eos_id=tok.eos_id): ...

How it is fast (gpt-fast style): a static KV cache allocated once per call (model.setup_cache), the prompt is
prefilled in one forward, then one token per step; the per-step key padding mask and positions are views of
buffers allocated once; only the last position's logits are sampled; everything runs under inference_mode; and
`--compile` compiles the one-token decode step. `--quantize` quantises while loading, one weight at a time, and on a
CPU multiplies by the int8/int4 weights in two small C kernels that read each stored byte once (a 7B model in 5-8 GiB
at 2-3 tokens/s on two cores).
"""
import argparse
import ctypes
import functools
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import model as model_lib
import prepare

# In --chat, the published settings of the family's chat models (model.FAMILIES) apply unless a flag overrides them;
# without --chat (base models, plain continuation), nanoGPT-like settings.
PLAIN_GENERATION_DEFAULTS = dict(temperature=0.8, top_k=200, top_p=None, repetition_penalty=1.0)


# -----------------------------------------------------------------------------
# sampling

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style penalty (as transformers' RepetitionPenaltyLogitsProcessor): for tokens already present,
    positive logits are divided by `penalty` and negative ones multiplied. logits (B, V) float, seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / the top-p nucleus to -inf (the most likely token always stays). (B, V)."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (cum_probs - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token per row from last-position logits (B, V) float -> (B,) long. temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# -----------------------------------------------------------------------------
# generation

def decode_one(model, token, start_pos, positions, key_padding_mask):
    """One decode step: token (B, 1) -> last-position logits (B, V)."""
    logits, _ = model(token, start_pos=start_pos, positions=positions, key_padding_mask=key_padding_mask)
    return logits[:, -1]


class CompiledDecode:
    """decode_one under torch.compile; falls back to eager with a warning if this platform cannot compile."""

    def __init__(self):
        # dynamic: start_pos changes every step; one symbolic-shape graph instead of a recompile per value
        self.fn = torch.compile(decode_one, dynamic=True)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.fn(*args)
            except Exception as e:  # inductor raises many types (no C++ compiler, unsupported op, ...)
                self.failed = True
                warnings.warn(f"sample.py: --compile failed on this platform ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); decoding without compile")
        return decode_one(*args)


def _as_rows(prompt_ids):
    """A single prompt (list of ints or 1-D tensor) or a batch (list of lists or 2-D tensor) -> (rows, batched)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) > 0 and isinstance(prompt_ids[0], (list, tuple)):
        return [list(r) for r in prompt_ids], True
    return [list(prompt_ids)], False


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, eos_id=None, pad_id=0, seed=None, generator=None, decode_step=None):
    """Yield generated tokens one step at a time (streaming).

    prompt_ids: one prompt (list of ints / 1-D tensor) -> yields ints; or a batch (list of lists / 2-D tensor,
    lengths may differ: rows are left padded) -> yields a list per step with one int per row, None for rows that
    already produced eos. eos_id: an int or several (any of them ends a row); it is yielded, then that row stops;
    iteration ends when every row has stopped or after max_new_tokens. Close the generator (break) to stop early,
    e.g. on a stop string. seed / generator make sampling reproducible. decode_step: e.g. CompiledDecode().
    The KV cache lives for the call only: the model is left without one, as it was.
    """
    rows, batched = _as_rows(prompt_ids)
    if any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token (e.g. bos)")
    if max_new_tokens <= 0:
        return
    B, T = len(rows), max(len(r) for r in rows)
    total = T + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_seq_len ({model.args.max_seq_len})")
    param = next(model.parameters())
    device = param.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    decode_step = decode_step or decode_one
    end_ids = torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ())), dtype=torch.long,
                           device=device)

    # left padding: (B, T) tokens and mask (True = real token); real tokens get positions 0..len-1
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, total), dtype=torch.bool, device=device)  # (B, T + max_new_tokens), grown as views
    for b, r in enumerate(rows):
        idx[b, T - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[b, T - len(r):] = True
    padded = len({len(r) for r in rows}) > 1
    # no padding: let the model use its plain causal path (positions = start_pos + arange)
    positions = (mask[:, :T].long().cumsum(-1) - 1).clamp(min=0) if padded else None  # (B, T)
    next_pos = mask[:, :T].sum(-1, keepdim=True) if padded else None  # (B, 1) position of the next token

    seen = torch.zeros((B, model.args.vocab_size), dtype=torch.bool, device=device)
    if repetition_penalty != 1.0:  # count occurrences so that pads (mask 0) never mark or unmark a token
        seen = torch.zeros_like(seen, dtype=torch.long).scatter_add_(1, idx, mask[:, :T].long()) > 0

    model.setup_cache(B, total, dtype=param.dtype, device=device)
    try:  # the cache lives for this call only, even when the caller stops early (closing the generator)
        logits, _ = model(idx, start_pos=0, positions=positions, key_padding_mask=mask[:, :T] if padded else None)
        logits = logits[:, -1]  # (B, V)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_id)
            out = token.tolist()
            if batched:
                yield [None if f else t for t, f in zip(out, finished.tolist())]
            else:
                yield out[0]
            if len(end_ids):
                finished |= torch.isin(token, end_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if repetition_penalty != 1.0:
                seen.scatter_(1, token[:, None], True)
            mask[:, T + step] = True
            logits = decode_step(model, token[:, None], T + step, next_pos,
                                 mask[:, :T + step + 1] if padded else None)
            if padded:
                next_pos += 1
    finally:
        model.clear_cache()


def apply_stop(text, stop):
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def stream_text(tok, tokens, context_ids=(), stop=(), end_ids=None):
    """Turn a stream of token ids into a stream of text pieces.

    Decodes incrementally without splitting multi-byte characters: a piece is released only when the decoded
    text grew and does not end in U+FFFD (an incomplete UTF-8 sequence). Decoding starts from the last prompt
    tokens (context_ids) so that leading spaces survive sentencepiece's stripping. Text that might be the start
    of a stop string is held back; on a stop string the stream ends (closing `tokens`). End tokens (default
    tok.eos_id) are not printed.
    """
    end_ids = {tok.eos_id} if end_ids is None else set(end_ids)
    ids = list(context_ids)[-4:]
    prefix, read = 0, len(ids)
    pending = ""  # decoded, not yet released because it may begin a stop string
    for t in tokens:
        if t in end_ids:
            break
        ids.append(t)
        before, after = tok.decode(ids[prefix:read]), tok.decode(ids[prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            continue
        pending += after[len(before):]
        prefix, read = read, len(ids)
        pending, stopped = apply_stop(pending, stop)
        if stopped:
            if pending:
                yield pending
            tokens.close() if hasattr(tokens, "close") else None
            return
        keep = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > keep:
            yield pending[:len(pending) - keep]
            pending = pending[len(pending) - keep:]
    if pending:
        yield pending


# -----------------------------------------------------------------------------
# decode layout

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


# -----------------------------------------------------------------------------
# weight-only quantisation: int8 per output channel, int4 per group of input columns
#
# Decoding a token multiplies one row of activations by every weight matrix, so its speed is the rate the weights
# stream from memory: int8 and int4 read 4x and ~7x fewer bytes than fp32, if the product reads the stored bytes and
# nothing more (dequantising a matrix for F.linear writes and rereads an fp32 copy: slower than fp32 itself). On an
# AVX2 CPU neither torch's packed int8/int4 kernels (written for AVX-512 and AMX) nor a dequantise-and-dot fused by
# torch.compile come near that rate (`bench.py --mode=matvec` measures each side by side), so on a CPU every product
# goes through the two small C kernels below, built for the CPU at hand on first use and cached; with 16-64 rows
# (prefill) they still match MKL's fp32 GEMM. Other devices, and machines without a C compiler, dequantise a block of
# rows at a time (dequantised_linear).

QUANT_KERNELS_C = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AVX2 1
static float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#define PARALLEL_WORK (1L << 18) /* multiply-adds below which one thread is faster than waking a second */
#define PREFETCH 1024 /* bytes ahead asked for early: the hardware prefetcher alone leaves DRAM idle 10-25% */

/* y (M, N) = x (M, K) @ (w (N, K) * s (N))^T: each int8 weight read once, converted in registers, fp32 sums */
void int8_matmul(const float* x, const int8_t* w, const float* s, float* y, long M, long N, long K) {
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK)
  for (long n = 0; n < N; n++) {
    const int8_t* wn = w + n * K;
    for (long m = 0; m < M; m++) {
      const float* xm = x + m * K;
      float acc = 0;
      long k = 0;
#ifdef AVX2
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (; k + 32 <= K; k += 32) {  /* 4 x 8 weights: sign-extend to int32, convert, multiply-add */
        __builtin_prefetch(wn + k + PREFETCH);
        for (int j = 0; j < 4; j++)
          a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                     _mm_loadl_epi64((const __m128i*)(wn + k + 8 * j)))),
                                 _mm256_loadu_ps(xm + k + 8 * j), a[j]);
      }
      acc = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
#endif
      for (; k < K; k++) acc += xm[k] * wn[k];
      y[m * N + n] = acc * s[n];
    }
  }
}

/* y (M, N) = x (M, K) @ w^T, w[n, k] = q[n, k] * s[n, g] + z[n, g] for group g = k / gs, q in [0, 15] two per byte
   (column 2b in the low nibble of byte b). As llama.cpp does, x is rounded to int8 per block of 32 columns (step
   max|x| / 127), so q . x runs in integers: 64 weights per step (vpmaddubsw) where fp32 would take 8 per step. The
   codes are centred, (q - 8) * s + (z + 8 s), so that x's rounding errors are multiplied by |q - 8| <= 8. */
void int4_matmul(const float* x, const uint8_t* w, const float* s, const float* z, float* y,
                 long M, long N, long K, long gs) {
  long G = K / gs, C = (K + 63) / 64, B = (K + 31) / 32;  /* weight groups, 64-column chunks, 32-column blocks */
  int8_t* xq = calloc(M * C * 64, 1);  /* per row and chunk: the int8 x of its 32 even columns, then of its odd */
  int32_t* centre = malloc(M * C * 8 * sizeof(int32_t));  /* per chunk: 8 x the sum of xq under each int32 lane */
  float* step = malloc((M * B + M * G) * sizeof(float));  /* per row: the step of each block, then x summed per group */
  float* xsum = step + M * B;
  for (long m = 0; m < M; m++) {
    const float* xm = x + m * K;
    for (long blk = 0; blk < B; blk++) {
      float amax = 0;
      for (long k = 32 * blk; k < K && k < 32 * blk + 32; k++) amax = fmaxf(amax, fabsf(xm[k]));
      float inv = amax > 0 ? 127 / amax : 0;
      for (long k = 32 * blk; k < K && k < 32 * blk + 32; k++)
        xq[m * C * 64 + (k / 64) * 64 + (k % 2) * 32 + (k % 64) / 2] = (int8_t)lrintf(xm[k] * inv);
      step[m * B + blk] = amax / 127;
    }
    for (long g = 0; g < G; g++) {
      float t = 0;
      for (long k = g * gs; k < g * gs + gs; k++) t += xm[k];
      xsum[m * G + g] = t;
    }
    for (long i = 0; i < C * 8; i++) {  /* lane i % 8 of a chunk: bytes 4i..4i+3, their even and odd columns */
      const int8_t* e = xq + m * C * 64 + (i / 8) * 64 + (i % 8) * 4;
      centre[m * C * 8 + i] = 8 * (e[0] + e[1] + e[2] + e[3] + e[32] + e[33] + e[34] + e[35]);
    }
  }
  long chunks = gs % 32 == 0 ? K / 64 : 0;  /* chunks of whole blocks, each block inside one group */
  #pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_WORK)
  for (long n = 0; n < N; n++) {
    const uint8_t* p = w + n * (K / 2);
    const float* sn = s + n * G;
    for (long m = 0; m < M; m++) {
      const int8_t* xm = xq + m * C * 64;
      const float* dx = step + m * B;
      float acc = 0;
      long c = 0;
#ifdef AVX2
      const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
      __m256 vacc = _mm256_setzero_ps();
      for (long g = 0, end = gs; c < chunks; c++) {  /* 32 bytes = 64 weights, two blocks */
        __builtin_prefetch(p + 32 * c + PREFETCH);
        __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * c));
        __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        __m256i even = _mm256_loadu_si256((const __m256i*)(xm + 64 * c));
        __m256i odd = _mm256_loadu_si256((const __m256i*)(xm + 64 * c + 32));
        __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
        __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones),  /* lanes 0-3 the first block, 4-7 the second */
                                       _mm256_loadu_si256((const __m256i*)(centre + (m * C + c) * 8)));
        float s0 = sn[g] * dx[2 * c];
        if (64 * c + 32 >= end) { g++; end += gs; }
        float s1 = sn[g] * dx[2 * c + 1];
        if (64 * c + 64 >= end) { g++; end += gs; }
        __m256 scale = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s0)), _mm_set1_ps(s1), 1);
        vacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, vacc);
      }
      acc = hsum(vacc);
#endif
      for (long b = 32 * c; b < K / 2; b++) {  /* the rest, one byte (two weights) at a time */
        const int8_t* xc = xm + (b / 32) * 64 + b % 32;
        acc += sn[2 * b / gs] * dx[b / 16] * (float)(((p[b] & 15) - 8) * xc[0] + ((p[b] >> 4) - 8) * xc[32]);
      }
      for (long g = 0; g < G; g++) acc += (z[n * G + g] + 8 * sn[g]) * xsum[m * G + g];
      y[m * N + n] = acc;
    }
  }
  free(xq);
  free(centre);
  free(step);
}
"""


def _cpu_id() -> str:
    """What -march=native builds for: the CPU's feature flags (Linux) or its name, so that a cache shared between
    machines never hands one CPU a binary built for another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


@functools.cache
def quant_kernels():
    """QUANT_KERNELS_C as a ctypes library: built with the C compiler ($CC, else cc) for this CPU on first use (about a
    second) into ~/.cache/nanollama, then loaded from there. None, with one warning, where that fails (no compiler,
    no OpenMP): the products are then dequantised a block at a time (dequantised_linear)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256("\n".join([QUANT_KERNELS_C, *cmd, platform.machine(), _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanollama"
    lib = cache / f"quant_kernels_{key[:16]}.so"
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            src, tmp = lib.with_suffix(f".{os.getpid()}.c"), lib.with_suffix(f".{os.getpid()}.tmp")
            src.write_text(QUANT_KERNELS_C)
            t0 = time.perf_counter()
            try:
                subprocess.run([*cmd, str(src), "-o", str(tmp)], check=True, capture_output=True, text=True)
                os.replace(tmp, lib)  # atomic: a process building beside this one never loads half a file
            finally:
                src.unlink(missing_ok=True)
                tmp.unlink(missing_ok=True)
            log(f"sample.py: built the quantised matmul kernels for this CPU in {time.perf_counter() - t0:.1f}s "
                f"({lib})")
        c = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1:] or [type(e).__name__]
        warnings.warn(f"sample.py: cannot build the quantised matmul kernels with {cc} ({why[0][:200]}); "
                      f"dequantising blocks of weights instead (slower decoding)")
        return None
    ptr, long = ctypes.c_void_p, ctypes.c_long
    c.int8_matmul.argtypes = [ptr] * 4 + [long] * 3
    c.int4_matmul.argtypes = [ptr] * 5 + [long] * 4
    return c


def int8_dequantize(weight, scales, dtype):
    """Int8Linear's weight (rows, in) int8 and scales (rows,) -> the weight in dtype."""
    return weight.to(dtype) * scales[:, None].to(dtype)


def int4_dequantize(weight, scales, zeros, dtype):
    """Int4Linear's packed weight (rows, in/2) and scales, zeros (rows, groups) -> the weight (rows, in) in dtype."""
    q = torch.stack([weight & 0xF, weight >> 4], dim=-1)  # (rows, in/2, 2): low nibble = even column
    q = q.reshape(weight.size(0), scales.size(1), -1).to(dtype)  # (rows, groups, group_size)
    return (q * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).flatten(1)


def dequantised_linear(x, dequantize, weight, *params):
    """x @ W^T for W = dequantize(weight, *params, x.dtype): on a CPU a block of kernels.CHUNK_WEIGHTS weights (rows of
    every tensor) at a time, so memory never holds a dequantised matrix; elsewhere all at once."""
    if x.device.type != "cpu":
        return kernels.linear(x, dequantize(weight, *params, x.dtype))
    out = x.new_empty(*x.shape[:-1], weight.size(0))
    step = max(1, kernels.CHUNK_WEIGHTS // x.size(-1))
    for s in range(0, weight.size(0), step):
        rows = slice(s, s + step)
        out[..., rows] = kernels.linear(x, dequantize(weight[rows], *(p[rows] for p in params), x.dtype))
    return out


# The kernels as torch ops (a torch.compile'd decode step keeps them in its graph), dequantising where none was built.
@torch.library.custom_op("nanollama::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 @ (weight (N, K) int8 * scales (N,) fp32)^T."""
    c = quant_kernels()
    if c is None:
        return dequantised_linear(x, int8_dequantize, weight, scales)
    x, weight, scales = x.contiguous(), weight.contiguous(), scales.contiguous()
    y = x.new_empty(x.size(0), weight.size(0))
    c.int8_matmul(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), *y.shape, x.size(1))
    return y


@torch.library.custom_op("nanollama::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 @ W^T for Int4Linear's packed weight (N, K/2) and fp32 scales, zeros (N, groups)."""
    c = quant_kernels()
    if c is None:
        return dequantised_linear(x, int4_dequantize, weight, scales, zeros)
    x, weight, scales, zeros = x.contiguous(), weight.contiguous(), scales.contiguous(), zeros.contiguous()
    y = x.new_empty(x.size(0), weight.size(0))
    c.int4_matmul(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), y.data_ptr(), *y.shape,
                  x.size(1), x.size(1) // scales.size(1))
    return y


@int8_matmul.register_fake
@int4_matmul.register_fake
def _(x, weight, *_):
    return x.new_empty(x.size(0), weight.size(0))


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: on a CPU the product runs in a C kernel (in fp32, whatever the dtype of x),
    reading each stored byte once; elsewhere it is dequantised_linear."""

    def forward(self, x):
        if x.device.type != "cpu":
            return dequantised_linear(x, self.unpack, *self.stored())
        weight, *params = self.stored()
        y = self.matmul(x.reshape(-1, self.in_features).float(), weight, *(p.float() for p in params))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype):
        return self.unpack(*self.stored(), dtype)

    @torch.no_grad()
    def quantize_from(self, w):
        """Quantise w (out, in), any float dtype (a memory-mapped tensor too), a block of kernels.CHUNK_WEIGHTS
        weights at a time: tens of MB of fp32 scratch whatever the size of w."""
        step = max(1, kernels.CHUNK_WEIGHTS // self.in_features)
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

    def stored(self):
        return self.weight, self.scales

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
        return self.weight, self.scales, self.zeros

    def quantize_rows(self, w):
        g = w.reshape(w.size(0), -1, self.group_size)  # (rows, n_groups, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (rows, n_groups)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
        return q[:, 0::2] | (q[:, 1::2] << 4), scales, lo  # (rows, in/2): even column in the low nibble


def quantize_model(model, mode, group_size=128, *, empty=False):
    """Replace every nn.Linear by Int8Linear / Int4Linear in place. empty=True builds the modules without
    quantising (to load a saved quantised state dict). Shapes that do not suit int4 raise a clear ValueError."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"--quantize: expected int8 or int4, got {mode!r}")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode == "int4":
        for name, m in linears:
            if group_size <= 0 or group_size % 2 or m.in_features % group_size:
                raise ValueError(f"--group_size={group_size} does not suit layer {name} (weight "
                                 f"{m.out_features}x{m.in_features}): it must be even and divide in_features "
                                 f"{m.in_features}")
    for name, m in linears:
        w = m.weight
        if mode == "int8":
            q = Int8Linear(m.in_features, m.out_features, dtype=w.dtype, device=w.device)
        else:
            q = Int4Linear(m.in_features, m.out_features, group_size, dtype=w.dtype, device=w.device)
        if not empty:
            q.quantize_from(w)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


@torch.no_grad()
def quantize_from_meta(model, mode, group_size, weight, device="cpu"):
    """Make a model built on the meta device real, straight into its quantised form: every linear layer's weight comes
    from weight(name) (fp32, or anything .float() turns into it: a memory-mapped tensor, a random one) one at a time and
    is quantised a block of rows at a time; the other tensors (embedding, norms) are weight(name) as they are. So a 7B
    model never exists in fp32: memory holds the quantised model plus one fp32 weight."""
    quantize_model(model, mode, group_size, empty=True)
    layers = {name: mod.to_empty(device=device) for name, mod in model.named_modules()
              if isinstance(mod, QuantizedLinear)}  # all first: quantising's scratch never sits between them
    for name, mod in layers.items():
        mod.quantize_from(weight(f"{name}.weight"))
    rest = {name: weight(name).to(device=device, dtype=p.dtype) for name, p in model.named_parameters()}
    model.load_state_dict(rest, strict=False, assign=True)
    model.materialize_buffers(device)
    return model


def model_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# -----------------------------------------------------------------------------
# loading



def normalise_head(model):
    """Baichuan2's NormHead re-normalises the output rows in every forward; for inference do it once, in fp32."""
    head = model.output
    if isinstance(head, model_lib.NormHead):
        plain = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(F.normalize(head.weight.float(), dim=-1).to(head.weight.dtype),
                                    requires_grad=False)
        model.output = plain
    return model


def load_model(ckpt, device, dtype, quantize=None, group_size=128, adapter=None, family="llama"):
    """A checkpoint dir -> (Transformer in eval mode, config.json dict). Reads dirs written by --save_quantized.
    adapter: a LoRA adapter dir folded into the weights. quantize='int8'|'int4' quantises while loading, one weight
    at a time from the memory-mapped file (a 7B model never whole in fp32)."""
    try:
        args, config = model_lib.read_config(ckpt)
        quant = config.get("quantization")
        if not quant and not quantize:
            model = normalise_head(model_lib.Transformer.from_checkpoint(ckpt, device=device, dtype=dtype))
            if adapter:
                add_adapter(model, adapter, family)
            return model.eval(), config
        if not quant:  # names and shapes checked against config.json, nothing read yet
            model = model_lib.Transformer.from_checkpoint(ckpt, device="meta", dtype=dtype)
        tensors = model_lib.load_tensors(ckpt)
    except model_lib.CheckpointError as e:
        fail(str(e))
    if not quant:
        updates, replaced = read_adapter(adapter, args, family) if adapter else ({}, {})

        def weight(name):  # as the full-precision path: normalise_head, then the adapter
            w = tensors[name]
            w = F.normalize(w.float(), dim=-1) if name == "output.weight" and args.norm_head else w
            return fold_adapter(name, w, updates, replaced)

        normalise_head(model)  # the module type; weight() normalises the rows
        return quantize_from_meta(model, quantize, group_size, weight, device).eval(), config
    # build the quantised structure on meta, then assign the saved tensors (nothing materialised twice)
    with torch.device("meta"):
        model = model_lib.Transformer(args)
    normalise_head(model)  # saved heads are already normalised: this only swaps the module type
    quantize_model(model.to(dtype), quant["mode"], quant.get("group_size", 128), empty=True)
    expected = model.state_dict()
    if set(expected) != set(tensors):
        fail(f"{ckpt}: quantised tensors do not match config.json "
             f"(e.g. {sorted(set(expected) ^ set(tensors))[:1]})")
    state = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for k, t in tensors.items()}
    model.load_state_dict(state, assign=True)
    model.materialize_buffers(device)
    return model.eval(), config


def read_adapter(path, args, family: str = "llama"):
    """A LoRA adapter dir (PEFT's, as train.py writes, or our older one) -> (updates, replaced), see fold_adapter
    (convert.py reads the formats and checks them against the model)."""
    import convert

    try:
        return convert.read_adapter(path, args, family)
    except model_lib.CheckpointError as e:
        fail(f"--adapter={path}: {e}")


def fold_adapter(name, w, updates, replaced):
    """Weight `name` with its adapter folded in: the adapter's tensor where it replaces w, then + scale * B A where it
    is adapted."""
    w = replaced.get(name, w)
    if name not in updates:
        return w
    u = updates[name]
    return (w.float() + u.scale * (u.b.float() @ u.a.float()).to(w.device)).to(w.dtype)


def add_adapter(model, path, family: str = "llama"):
    """Fold a LoRA adapter dir into the weights of a full-precision model, in place."""
    updates, replaced = read_adapter(path, model.args, family)
    with torch.no_grad():
        for name in {*updates, *replaced}:
            p = model.get_parameter(name)
            p.copy_(fold_adapter(name, p, updates, replaced))


def save_quantized(model, src_ckpt, dst, mode, group_size, family):
    if os.path.exists(dst) and os.listdir(dst):
        raise SystemExit(f"sample.py: --save_quantized={dst}: directory exists and is not empty")
    state = {k: v for k, v in model.state_dict().items()}
    import convert
    convert.write_checkpoint(dst, state, model.args, family,
                             extra_config={"quantization": {"mode": mode, "group_size": group_size}})
    prepare.copy_tokenizer_files(src_ckpt, dst)


# -----------------------------------------------------------------------------
# command line

def fail(msg):
    raise SystemExit(f"sample.py: {msg}")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fit_prompt(ids, max_new_tokens, max_seq_len, policy, what, bos_id=None):
    """Make prompt + max_new_tokens fit the context: a clear error, or keep the last tokens (and bos) with a
    warning, as --on_long_prompt says."""
    room = max_seq_len - max_new_tokens
    if room < 1:
        fail(f"--max_new_tokens={max_new_tokens}: leaves no room for a prompt in the model's max_seq_len "
             f"{max_seq_len}")
    if len(ids) <= room:
        return ids
    if policy == "error":
        fail(f"{what}: {len(ids)} tokens + --max_new_tokens={max_new_tokens} exceed the model's max_seq_len "
             f"{max_seq_len}; shorten it, lower --max_new_tokens, or pass --on_long_prompt=truncate")
    keep_bos = bos_id is not None and ids[0] == bos_id
    kept = ids[:1] + ids[len(ids) - room + 1:] if keep_bos else ids[len(ids) - room:]
    log(f"sample.py: warning: {what}: {len(ids)} tokens do not fit with --max_new_tokens={max_new_tokens} in "
        f"max_seq_len {max_seq_len}; keeping the last {len(kept)} tokens")
    return kept


def resolve_template(flag, tok, family):
    """--template, else the checkpoint's own (a built-in name, or its Jinja template: "hf"), else the family's."""
    own = tok.template_name
    name = flag or own or (family in model_lib.FAMILIES and model_lib.FAMILIES[family].chat_template) or None
    names = ", ".join(sorted(prepare.TEMPLATES)) + f" or {prepare.HF_TEMPLATE}"
    if name is None:
        fail(f"--chat: no chat template for family {family!r}; pass --template (one of {names})")
    if name not in prepare.TEMPLATES and name != prepare.HF_TEMPLATE:
        fail(f"--template: unknown chat template {name!r}; expected one of {names}")
    if name == prepare.HF_TEMPLATE:
        if own != prepare.HF_TEMPLATE:
            fail(f"--template=hf: {tok.template_file} holds no Jinja chat_template")
        try:
            prepare.check_jinja_template(tok)
        except SystemExit as e:
            fail(str(e).removeprefix("prepare.py: "))
    return name


def generation_settings(args, family, chat):
    """Family chat defaults (or plain defaults), overridden by any flag given."""
    family = model_lib.FAMILIES.get(family)
    settings = dict(family.generation if chat and family else PLAIN_GENERATION_DEFAULTS)
    for k in settings:
        if getattr(args, k) is not None:
            settings[k] = getattr(args, k)
    settings["top_k"] = settings["top_k"] or None  # 0 = off
    return settings


def timed_stream(pieces, stats, out):
    """Write text pieces to `out` as they come; count time."""
    t0 = time.perf_counter()
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    stats["seconds"] += time.perf_counter() - t0
    return "".join(text)


def counted(tokens, stats):
    for t in tokens:
        stats["tokens"] += 1
        yield t


def chat_end_ids(tok, template):
    """eos plus the template's own end-of-turn tokens (those the vocabulary has; for a model's Jinja template, the
    special token that closes an assistant turn in it)."""
    ids = {tok.eos_id}
    if template == prepare.HF_TEMPLATE:
        ids.add(prepare.jinja_turn_end(tok))
    for t in getattr(prepare.TEMPLATES.get(template), "stop", ()):
        if not isinstance(t, str):  # strings are stop text, handled by stream_text
            ids.add(t if isinstance(t, int) else tok.token_to_id(t.name))
    return sorted(i for i in ids if i is not None)


def encode_turn(tok, template, messages, system):
    try:
        return prepare.encode_chat(tok, template, messages, system=system, add_generation_prompt=True)[0]
    except prepare.TemplateError as e:
        fail(f"--chat: {e}")


def run_chat(model, tok, template, settings, *, system, max_new_tokens, on_long_prompt, stop, stdin, stdout,
             generator=None, decode_step=None):
    """Interactive chat: each user line is a turn; /reset clears the history, /exit (or end of input) quits."""
    history, stats = [], dict(tokens=0, seconds=0.0)
    end_ids = chat_end_ids(tok, template)
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    log(f"chat: template {template}, {settings}; /reset clears the history, /exit quits")
    while True:
        if interactive:
            sys.stderr.write("user> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = []
            log("(history cleared)")
            continue
        if not line.strip():
            continue
        messages = history + [{"role": "user", "content": line}]
        ids = encode_turn(tok, template, messages, system)
        # drop the oldest turns while the conversation does not fit; a single turn follows --on_long_prompt
        while len(ids) + max_new_tokens > model.args.max_seq_len and len(messages) > 2:
            messages = messages[2:]
            ids = encode_turn(tok, template, messages, system)
            log("sample.py: warning: conversation too long for the context; dropped the oldest turn")
        ids = fit_prompt(ids, max_new_tokens, model.args.max_seq_len, on_long_prompt, "chat turn", tok.bos_id)
        tokens = generate(model, ids, max_new_tokens, eos_id=end_ids, pad_id=max(tok.pad_id or 0, 0),
                          generator=generator, decode_step=decode_step, **settings)
        if interactive:
            sys.stderr.write("assistant> ")
        reply = timed_stream(stream_text(tok, counted(tokens, stats), ids, stop, end_ids), stats, stdout)
        stdout.write("\n")
        stdout.flush()
        history = messages + [{"role": "assistant", "content": reply.strip()}]
    return stats


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (config.json, weights, tokenizer)")
    p.add_argument("--prompt", default=None, help="text to continue (default: start from bos)")
    p.add_argument("--prompt_file", default=None, help="one prompt per line, generated as one left-padded batch")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8, or family chat)")
    p.add_argument("--top_k", type=int, default=None, help="0 = off (default 200, or family chat default)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; \\n and \\t understood)")
    p.add_argument("--chat", action="store_true", help="interactive chat with the checkpoint's template")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--template", default=None, help="chat template: a built-in name, or hf for the checkpoint's own "
                                                    "Jinja template (default: the checkpoint's, else the family's)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter dir (train.py's out_dir/adapter, or any PEFT "
                   "LoRA adapter of the checkpoint's HF export) folded into the weights at load")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantisation")
    p.add_argument("--group_size", type=int, default=128, help="int4 group size (must divide in_features)")
    p.add_argument("--save_quantized", default=None, help="write the quantised checkpoint to this dir")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on accelerators, float32 on CPU")
    p.add_argument("--device", default=None, help="default: kernels.device_type()")
    p.add_argument("--on_long_prompt", choices=["error", "truncate"], default="error")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        fail(f"--max_new_tokens={args.max_new_tokens}: expected a positive integer")
    if args.num_samples < 1:
        fail(f"--num_samples={args.num_samples}: expected a positive integer")
    if args.temperature is not None and args.temperature < 0:
        fail(f"--temperature={args.temperature}: expected >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        fail(f"--top_p={args.top_p}: expected a value in (0, 1]")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        fail(f"--repetition_penalty={args.repetition_penalty}: expected > 0")
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    return args


def main(argv=None, stdin=None, stdout=None):
    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        fail(f"--ckpt={args.ckpt}: no config.json there (expected a checkpoint dir from convert.py or train.py)")
    if not any(os.path.isfile(os.path.join(args.ckpt, f)) for f in prepare.TOKENIZER_FILES):
        fail(f"--ckpt={args.ckpt}: no tokenizer ({' or '.join(prepare.TOKENIZER_FILES)}) in the checkpoint dir")
    device = args.device or kernels.device_type()
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    try:
        model_args, ckpt_config = model_lib.read_config(args.ckpt)
    except model_lib.CheckpointError as e:  # malformed config.json: one line, not a traceback
        fail(str(e))
    family = ckpt_config.get("family", "llama")
    tok = prepare.load_tokenizer(args.ckpt)
    template = resolve_template(args.template, tok, family) if args.chat else None
    if tok.vocab_size > model_args.vocab_size:  # ids past the embedding would crash mid-generation
        fail(f"--ckpt={args.ckpt}: the tokenizer has {tok.vocab_size} tokens, the model's "
             f"vocab_size={model_args.vocab_size} (a tokenizer from another model?)")

    t0 = time.perf_counter()
    quantized = ckpt_config.get("quantization")
    if args.adapter and quantized:
        fail(f"--adapter: {args.ckpt} is quantised; fold adapters into a full-precision checkpoint")
    if args.quantize and quantized:
        fail(f"--quantize={args.quantize}: {args.ckpt} is already quantised ({quantized})")
    try:  # quantised while loading, one weight at a time
        model, config = load_model(args.ckpt, device, dtype, args.quantize, args.group_size, args.adapter, family)
    except ValueError as e:  # a --group_size that does not suit the shapes
        fail(str(e))
    log(f"loaded {args.ckpt} ({family}, {model.num_params():,} params, {args.quantize or config.get('quantization', {}).get('mode', args.dtype or str(dtype)[6:])}) "
        f"in {time.perf_counter() - t0:.1f}s; weights {model_bytes(model) / 2**20:.1f} MiB on {device}")
    if args.save_quantized:
        if not args.quantize:
            fail("--save_quantized: also pass --quantize=int8|int4")
        try:
            save_quantized(model, args.ckpt, args.save_quantized, args.quantize, args.group_size, family)
        except OSError as e:  # read-only or full destination
            fail(f"--save_quantized={args.save_quantized}: cannot write there ({e.strerror}: {e.filename})")
        log(f"wrote {args.save_quantized}")
        if args.prompt is None and args.prompt_file is None and not args.chat:
            return

    decode_layout(model)
    settings = generation_settings(args, family, args.chat)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    decode_step = CompiledDecode() if args.compile else None
    pad_id = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    common = dict(eos_id=tok.eos_id, pad_id=pad_id, generator=generator, decode_step=decode_step, **settings)
    max_seq_len = model.args.max_seq_len

    if args.chat:
        stop = args.stop + [s for s in getattr(prepare.TEMPLATES.get(template), "stop", ()) if isinstance(s, str)]
        stats = run_chat(model, tok, template, settings, system=args.system, max_new_tokens=args.max_new_tokens,
                         on_long_prompt=args.on_long_prompt, stop=stop, stdin=stdin, stdout=stdout,
                         generator=generator, decode_step=decode_step)
    elif args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            fail(f"--prompt_file={args.prompt_file}: no such file")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            fail(f"--prompt_file={args.prompt_file}: not UTF-8 text (byte {e.start}: {e.reason})")
        if not prompts:
            fail(f"--prompt_file={args.prompt_file}: expected one prompt per line, found none")
        rows = [fit_prompt(tok.encode(p, add_special_tokens=True), args.max_new_tokens, max_seq_len,
                           args.on_long_prompt, f"--prompt_file line {i + 1}", tok.bos_id)
                for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        outs = [[] for _ in rows]
        n = 0
        for step in generate(model, rows, args.max_new_tokens, **common):
            for b, t in enumerate(step):
                if t is not None and t != tok.eos_id:
                    outs[b].append(t)
                    n += 1
        stats = dict(tokens=n, seconds=time.perf_counter() - t0)
        for out in outs:
            stdout.write(apply_stop(tok.decode(out), args.stop)[0] + "\n")
    else:
        # the prompt gets the special tokens the tokenizer itself adds (transformers' tokenizer(prompt).input_ids);
        # an empty prompt starts from bos
        ids = tok.encode(args.prompt or "", add_special_tokens=True) or [tok.bos_id] * (tok.bos_id is not None)
        if not ids:
            fail("--prompt: encodes to no tokens and the tokenizer has no bos token to start from")
        ids = fit_prompt(ids, args.max_new_tokens, max_seq_len, args.on_long_prompt, "--prompt", tok.bos_id)
        stats = dict(tokens=0, seconds=0.0)
        for i in range(args.num_samples):
            if i:
                log("---------------")
            tokens = generate(model, ids, args.max_new_tokens, **common)
            timed_stream(stream_text(tok, counted(tokens, stats), ids, args.stop), stats, stdout)
            stdout.write("\n")
            stdout.flush()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    log(f"{stats['tokens']} tokens in {stats['seconds']:.2f}s ({stats['tokens'] / max(stats['seconds'], 1e-9):.1f} "
        f"tokens/s); weights {model_bytes(model) / 2**20:.1f} MiB, peak memory {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
