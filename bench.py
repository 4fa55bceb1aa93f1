"""bench.py: training and generation speed, MFU against a torch.mm peak measured in the same run, and loss curves.

    python bench.py --preset=bench-llama --mode=train --dtype=float32            # one JSON line
    python bench.py --preset=bench-llama --mode=generate --dtype=bfloat16 --compile
    python bench.py --preset=baichuan-7b --mode=generate --quantize=int4 --new_tokens=32   # a 7B on a CPU
    python bench.py --mode=matvec         # one token times a 7B weight, each way to multiply it quantised, alternated
    python bench.py --mode=train --compare        # ours and transformers' LlamaForCausalLM alternated, medians, ratio
    python bench.py --mode=train --lora_rank=8 [--qlora]    # fine-tuning speed: LoRA adapters (on an NF4 base)
    python bench.py --preset=bench-llama --mode=serve --batch_size=4   # 4 HTTP clients at once vs one after another
    python bench.py --plot out/a/metrics.jsonl out/b/metrics.jsonl --out=loss.png   # curves + relative difference
    python bench.py --plot ref/metrics.jsonl out/b/metrics.jsonl --max_rel_err=0.02   # exit 1 above the criterion

The training plan behind `python train.py CONFIG --dry_run` (per-device memory term by term and step time of a config
on its mesh, estimated from ModelArgs without allocating the model) stands in support/planner.py, with the peak
FLOP/s and memory figures both scripts use.

Train mode times what train.py runs: forward with the loss, backward, grad clipping, train.py's AdamW, zero_grad;
--dtype=bfloat16 is autocast over fp32 weights, as in train.py. MFU = flops_per_token
(6N + 12 * n_layers * seq_len * dim) * tokens/s / peak. Generate mode times sample.generate (greedy, static KV cache,
batch_size prompts of prompt_len random tokens, new_tokens each) with the weights in --dtype; its MFU counts 2N FLOPs
per generated token (N = parameters except the input embedding; attention over the cache is left out). The peak is
the best of several square torch.mm of the same dtype, sized like the model's largest matrix, in the same process.
Decoding is bound by memory, not FLOPs: generate mode also reports MBU, the bytes of those weights (as decoding holds
them) times tokens/s over the best rate the device streams them in the same process, and --compare its ratio_bound,
1 / transformers' MBU: the most any decoder reading every weight once per token could beat it by here.
Peak memory is torch.{cuda,npu}.max_memory_allocated on accelerators, the process's ru_maxrss on CPU (in --compare
the process holds both models, so it is one figure for the pair). load_avg_1m is the machine's load at the end: on a
shared CPU other processes take cores and memory bandwidth, so compare only figures from one --compare run.

--quantize=int8|int4|nf4 decodes with sample.py's quantised linears; the model is built on the meta device and each weight
drawn in fp32 then quantised, one at a time (sample.quantize_from_meta), so a 7B model never exists in fp32. Generate
mode also reports decode_tokens_per_s and decode_mbu, the prefill (time to the first token) left out.

--lora_rank=R trains rank-R adapters on every block linear (model.apply_lora, as train.py's lora_rank) with the base
frozen, --qlora on an NF4 base. Their MFU counts 4 FLOPs per frozen weight (forward + input gradient), 6 per adapter
weight, plus attention's 12 * n_layers * seq_len * dim.

Serve mode times sample.py's OpenAI-compatible server (support/server.py, in this process, on a free 127.0.0.1
port) with the weights as generate mode holds them: --batch_size clients each POST one greedy /v1/completions request
(prompt_len random token ids, new_tokens each), first all at once from threads (the server decodes them as one batch),
then one after another, alternated for --rounds rounds. It reports the total generated tokens/s of each (medians)
and their ratio. Then `streams`: 1, 4 and 8 clients at once, each streaming its answer, --rounds times: the time to
the first token and each client's tokens/s (its tokens over the seconds from sending to the last token), medians over
clients and rounds.

--compare builds transformers' LlamaForCausalLM with the same config (sdpa attention) and the same weights, the same
batch and train.py's AdamW, then alternates ours and theirs for --rounds rounds (timings drift between runs; only
figures from one run are compared). The first losses / greedy tokens are printed so the workloads can be checked equal.
"""

import argparse
import http.client
import json
import math
import os
import resource
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import kernels
from model import PRESETS, ModelArgs, Transformer, apply_lora
from support import quant
from support.planner import flops_per_token, mm_peak_flops, n_params_flops, peak_memory_gib, synchronize
from support.checks import check_json_fields, parse_json
from support.device import check_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BenchError(Exception):
    """A measurement that cannot run as asked (flags, files, the device): main says it as bench.py's one line."""


# --------------------------------------------------------------------------------------------------------------------
# device, peak FLOP/s and memory






def stream_peak_bytes(tensors: list[torch.Tensor], device: torch.device, repeats: int = 5) -> float:
    """Best bytes/s at which the device reads `tensors` once: the weights one decoded token streams, so tokens/s
    can be no more than this over their bytes (on a CPU the model does not fit in cache). The bytes are summed as
    fp32 whatever the dtype: a bf16 sum on a CPU without bf16 units is bound by its conversions, not by memory."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    tensors = [t.reshape(-1).view(torch.float32) if t.numel() * t.element_size() % 4 == 0 else t for t in tensors]
    best = 0.0
    for _ in range(repeats + 1):  # the first pass warms up
        synchronize(device)
        t0 = time.perf_counter()
        for t in tensors:
            t.sum()
        synchronize(device)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def mm_size(args: ModelArgs) -> int:
    """A square GEMM like the model's: the power of two nearest its FFN width (bench-llama 1024, 7B 8192)."""
    return 2 ** round(math.log2(args.hidden_dim))




def reset_peak_memory(device: torch.device):
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).reset_peak_memory_stats(device)


def figures(fraction: float) -> float:
    """A figure to 4 significant figures (a loaded CPU can put MFU below 1e-4, where 4 decimals say nothing)."""
    return float(f"{fraction:.4g}")


def load_average() -> float | None:
    """The machine's 1-minute load average at the end of the run: on a shared machine, how much else was running."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None






# --------------------------------------------------------------------------------------------------------------------
# the two models: ours and transformers' LlamaForCausalLM with the same config and weights


def quantized_kernel() -> dict:
    """Which way quantised weights decode here (support/quant.py: the C kernels, or dequantising blocks of rows
    where they cannot be built) and the seconds the first call took to build them, or to load them from the cache."""
    t0 = time.perf_counter()
    built = quant.quant_kernels() is not None
    return {"kernel": "c" if built else "dequantised", "kernel_build_s": round(time.perf_counter() - t0, 2)}


def build_ours(model_args: ModelArgs, device, seed: int, quantize=None, group_size=None) -> Transformer:
    """Our model with random weights; quantised straight from the meta device one weight at a time with quantize
    (sample.quantize_from_meta: a 7B model is never whole in fp32)."""
    torch.manual_seed(seed)
    if not quantize:
        with torch.device(device):
            return Transformer(model_args)
    from support.quant import quantize_from_meta

    with torch.device("meta"):
        model = Transformer(model_args)
    shapes = {name: p.shape for name, p in model.named_parameters()}

    def weight(name):  # drawn as Transformer.init_weights draws it
        w = torch.empty(shapes[name], device=device)
        model.init_parameter(name, w)
        return w

    return quantize_from_meta(model, quantize, group_size, weight, device)


def build_hf(model_args: ModelArgs, ours: Transformer, device):
    """transformers' LlamaForCausalLM with sdpa attention and our weights (native layout = HF rotate-half layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from support.hf_names import HF_LAYER

    a = model_args
    if a.pos_emb != "rope" or a.norm_head or a.tie_embeddings or a.z_loss:
        raise BenchError("--compare: transformers' LlamaForCausalLM only matches plain LLaMA presets (RoPE, untied, no NormHead)")
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         attn_implementation="sdpa")
    with torch.device(device):
        hf = LlamaForCausalLM(config)
    ours_sd = ours.state_dict()
    state = {"model.embed_tokens.weight": ours_sd["tok_embeddings.weight"], "model.norm.weight": ours_sd["norm.weight"],
             "lm_head.weight": ours_sd["output.weight"]}
    for i in range(a.n_layers):
        for hf_name, name in HF_LAYER.items():
            state[f"model.layers.{i}.{hf_name}"] = ours_sd[f"layers.{i}.{name}"]
    hf.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return hf


def optimizer_for(model, device):
    """train.py's AdamW (same groups, betas, fused choice) for either model, so the optimiser step is the same work."""
    from train import Config, build_optimizer

    return build_optimizer(model, Config(), device)


def compile_blocks(layers):
    """Compile every block as train.py does (per block, so names and sharding are unchanged)."""
    for layer in layers:
        layer.compile()


# --------------------------------------------------------------------------------------------------------------------
# timed workloads


def train_step_fn(model, optimizer, autocast, hf: bool):
    """One train.py step: forward + loss, backward, clip to 1.0, AdamW, zero_grad. Returns the loss (float)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        with autocast:
            if hf:  # shift_labels: the same next-token targets as ours, no second shift
                loss = model(input_ids=x, labels=y, shift_labels=y.contiguous()).loss
            else:
                _, loss = model(x, y)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_train(step, batch, steps: int, device) -> tuple[float, float]:
    """(seconds per step over `steps` steps, last loss)."""
    x, y = batch
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x, y)
    loss = loss.item()  # also waits for the device
    return (time.perf_counter() - t0) / steps, loss


def generate_ours(model, prompt, new_tokens: int, decode_step):
    """(tokens (B, new_tokens), seconds to the first token: the prefill)."""
    from sample import generate

    out, t0 = [], time.perf_counter()
    for step in generate(model, prompt.tolist(), new_tokens, temperature=0.0, decode_step=decode_step):
        out.append(step)
        if len(out) == 1:
            first = time.perf_counter() - t0
    return torch.tensor(out, dtype=torch.long).T, first


def generate_hf(model, prompt, new_tokens: int, _decode_step=None):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    return out[:, prompt.size(1):].cpu(), None  # (B, new_tokens), its prefill untimed


def time_generate(fn, model, prompt, new_tokens, decode_step, device) -> tuple[float, torch.Tensor, float | None]:
    """(seconds, tokens (B, new_tokens), seconds to the first token or None)."""
    synchronize(device)
    t0 = time.perf_counter()
    tokens, first = fn(model, prompt, new_tokens, decode_step)
    synchronize(device)
    return time.perf_counter() - t0, tokens, first


# --------------------------------------------------------------------------------------------------------------------
# benchmark


def train_workload(opt, model_args: ModelArgs, ours, device, dtype, result: dict):
    """--mode=train: (workload(model, hf) -> a timed call of --steps steps, FLOPs per token, tokens per call); the
    batch is random tokens, the same for both models."""
    g = torch.Generator().manual_seed(opt.seed)
    data = torch.randint(model_args.vocab_size, (opt.batch_size, opt.seq_len + 1), generator=g).to(device)
    batch = (data[:, :-1], data[:, 1:])  # (B, T) inputs and next-token targets
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    flops_token = flops_per_token(model_args, opt.seq_len)
    basis = "6N + 12*n_layers*seq_len*dim per trained token (support.planner.flops_per_token)"
    if opt.lora_rank:
        adapters = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        flops_token += 6 * adapters - 2 * n_params_flops(model_args)
        basis = "4N frozen + 6 per adapter weight + 12*n_layers*seq_len*dim per trained token"
        result.update(lora_rank=opt.lora_rank, qlora=opt.qlora, trainable_params=adapters)
    result.update(seq_len=opt.seq_len, steps=opt.steps, mfu_flops_per_token=flops_token, mfu_basis=basis)

    def workload(model, hf):
        model.train()
        if opt.compile:
            compile_blocks(model.model.layers if hf else model.layers)
        step = train_step_fn(model, optimizer_for(model, device), autocast, hf)
        for _ in range(opt.warmup):
            step(*batch)
        return lambda: time_train(step, batch, opt.steps, device)

    return workload, flops_token, opt.batch_size * opt.seq_len


def generate_workload(opt, model_args: ModelArgs, ours, device, dtype, result: dict):
    """--mode=generate: (workload(model, hf) -> a timed greedy generation, FLOPs per token, tokens per call); ours is
    laid out as sample.py decodes (decode_layout, CompiledDecode with --compile)."""
    g = torch.Generator().manual_seed(opt.seed)
    prompt = torch.randint(model_args.vocab_size, (opt.batch_size, opt.prompt_len), generator=g).to(device)
    flops_token = 2 * n_params_flops(model_args)
    result.update(prompt_len=opt.prompt_len, new_tokens=opt.new_tokens, mfu_flops_per_token=flops_token,
                  mfu_basis="2N per generated token (N: parameters except the input embedding; attention "
                            "over the KV cache not counted)")

    def workload(model, hf):
        model.to(dtype).eval()
        if not hf:
            model.init_buffers()  # RoPE tables back to fp32 after .to(dtype)
            from support.decode_layout import decode_layout

            decode_layout(model)  # as sample.py loads it
        decode_step = None
        if opt.compile:
            if hf:
                compile_blocks(model.model.layers)
            else:
                from sample import CompiledDecode

                decode_step = CompiledDecode()
        fn = generate_hf if hf else generate_ours
        with torch.inference_mode():
            for i in range(opt.warmup):
                t0 = time.perf_counter()
                fn(model, prompt, opt.new_tokens, decode_step)
                if i == 0 and not hf:  # with --compile: tracing and compiling the decode step
                    result["first_call_s"] = round(time.perf_counter() - t0, 2)

        def timed():
            with torch.inference_mode():
                return time_generate(fn, model, prompt, opt.new_tokens, decode_step, device)

        return timed

    return workload, flops_token, opt.batch_size * opt.new_tokens


@dataclass
class Rates:
    """What turns a workload's seconds into the reported figures: tokens/s, MFU against the dtype's peak (and the fp32
    peak: a bf16 MFU can exceed 1 where the device has no bf16 units), and for generation MBU, the fraction of the
    weight-streaming bound reached (measure_stream gives its bytes per token and bound)."""
    tokens_per_call: int
    flops_token: float
    peak: float
    peak_fp32: Optional[float] = None  # None: the run is fp32
    bytes_per_token: Optional[int] = None
    stream: Optional[float] = None  # bytes/s the device streams the weights at

    def summary(self, seconds: list[float]) -> dict:
        tokens_per_s = self.tokens_per_call / statistics.median(seconds)
        row = {"tokens_per_s": round(tokens_per_s, 2), "mfu": figures(self.flops_token * tokens_per_s / self.peak)}
        if self.peak_fp32:
            row["mfu_vs_fp32_peak"] = figures(self.flops_token * tokens_per_s / self.peak_fp32)
        if self.stream:
            row["mbu"] = figures(self.bytes_per_token * tokens_per_s / self.stream)
        row["tokens_per_s_runs"] = [round(self.tokens_per_call / s, 2) for s in seconds]
        return row

    def measure_stream(self, ours, device, result: dict):
        """After the workload has laid ours out as decoding holds it (dtype, decode_layout): the bytes of its weights
        and the best rate the device streams them at."""
        weights = [t for name, t in [*ours.named_parameters(), *ours.named_buffers()]
                   if (t.dim() == 2 or name.endswith((".scales", ".nf4_absmax_scale")))
                   and not name.startswith(("tok_embeddings.", "rope_"))]
        self.bytes_per_token = sum(t.numel() * t.element_size() for t in weights)
        self.stream = stream_peak_bytes(weights, device)
        result.update(bytes_per_token=self.bytes_per_token, stream_peak_bytes_per_s=round(self.stream))


def run_bench(opt, model_args: ModelArgs, device: torch.device) -> dict:
    """--mode=train / generate: build the model, time its workload alone or alternated with transformers' (--compare),
    and return the figures."""
    dtype = DTYPES[opt.dtype]
    if opt.mode == "train" and opt.seq_len > model_args.max_seq_len:
        raise BenchError(f"--seq_len={opt.seq_len} is above the preset's max_seq_len={model_args.max_seq_len}")
    if opt.mode == "generate" and opt.prompt_len + opt.new_tokens > model_args.max_seq_len:
        raise BenchError(f"--prompt_len + --new_tokens = {opt.prompt_len + opt.new_tokens} is above the preset's "
             f"max_seq_len={model_args.max_seq_len}")
    n = mm_size(model_args) if opt.mode == "train" else min(mm_size(model_args), 4096)  # 16384: minutes on a CPU
    peak = mm_peak_flops(dtype, n, device)
    t0 = time.perf_counter()
    try:
        ours = build_ours(model_args, device, opt.seed, opt.quantize, opt.group_size)
    except ValueError as e:  # a --group_size that does not suit the preset's shapes
        raise BenchError(str(e))
    build_s = time.perf_counter() - t0
    if opt.lora_rank:
        apply_lora(ours, opt.lora_rank, alpha=2.0 * opt.lora_rank, quantize_base=opt.qlora)
    result = {"mode": opt.mode, "preset": opt.preset, "dtype": opt.dtype, "device": device.type,
              "compile": opt.compile, "batch_size": opt.batch_size, "threads": torch.get_num_threads()}
    if opt.quantize:
        picked = [m.group_size for m in ours.modules() if isinstance(m, quant.Int4Linear)]
        result.update(quantize=opt.quantize, group_size=picked[0] if picked else None,
                      build_s=round(build_s, 1), **quantized_kernel())
    make = train_workload if opt.mode == "train" else generate_workload
    workload, flops_token, tokens_per_call = make(opt, model_args, ours, device, dtype, result)
    peak_fp32 = None if dtype == torch.float32 else mm_peak_flops(torch.float32, n, device)
    rates = Rates(tokens_per_call, flops_token, peak, peak_fp32)
    with torch.device("meta"):
        params = Transformer(model_args).num_params()  # a quantised model's linears hold buffers, not parameters
    result.update(mm_peak_flops=round(peak), mm_size=n, params=params)
    if peak_fp32:
        result["mm_peak_flops_fp32"] = round(peak_fp32)
    reset_peak_memory(device)
    if opt.compare:
        return measure_against_transformers(opt, model_args, ours, workload, rates, device, result)
    return measure_alone(opt, ours, workload, rates, device, result)


def measure_alone(opt, ours, workload, rates: Rates, device, result: dict) -> dict:
    timed = workload(ours, hf=False)
    if opt.mode == "generate":
        rates.measure_stream(ours, device, result)
    runs = [timed() for _ in range(opt.rounds)]
    result.update(rates.summary([s for s, *_ in runs]))
    if opt.mode == "generate" and opt.new_tokens > 1:  # the decode steps alone, the prefill left out
        decode_s = statistics.median(s - first for s, _, first in runs)
        decode_tokens_per_s = opt.batch_size * (opt.new_tokens - 1) / decode_s
        result.update(decode_tokens_per_s=round(decode_tokens_per_s, 2),
                      decode_mbu=figures(rates.bytes_per_token * decode_tokens_per_s / rates.stream))
    result.update(peak_mem_gib=round(peak_memory_gib(device), 3), load_avg_1m=load_average())
    if opt.mode == "train":
        result["last_loss"] = round(runs[-1][1], 4)
    return result


def measure_against_transformers(opt, model_args: ModelArgs, ours, workload, rates: Rates, device,
                                 result: dict) -> dict:
    """--compare: ours and transformers' model of the same weights, their workloads alternated round by round, so
    drifts in machine speed hit both alike; their outputs compared."""
    hf = build_hf(model_args, ours, device)
    timed = {"ours": workload(ours, hf=False), "transformers": workload(hf, hf=True)}
    if opt.mode == "generate":
        rates.measure_stream(ours, device, result)
    seconds, outputs = {k: [] for k in timed}, {}
    for _ in range(opt.rounds):
        for name, fn in timed.items():
            s, out, *_ = fn()
            seconds[name].append(s)
            outputs.setdefault(name, out)
    for name in timed:
        result[name] = rates.summary(seconds[name])
    result["ratio"] = round(result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3)
    if rates.stream:  # no decoder that reads every weight once per token can beat transformers by more than this
        result["ratio_bound"] = round(1 / result["transformers"]["mbu"], 3)
    if opt.mode == "train":  # both took the same steps from the same weights and data: losses must agree
        result["first_round_last_loss"] = {k: round(v, 5) for k, v in outputs.items()}
    else:
        same = outputs["ours"].shape == outputs["transformers"].shape and \
            (outputs["ours"] == outputs["transformers"]).float().mean().item()
        result["greedy_tokens_agree"] = round(float(same), 4)  # fraction of equal tokens (bf16 may diverge)
    result.update(peak_mem_gib=round(peak_memory_gib(device), 3), load_avg_1m=load_average())
    return result


# --------------------------------------------------------------------------------------------------------------------
# --mode=npu-check: every fused Ascend op against the portable path and an fp32 reference, on a real model's shapes

TRAIN_KERNELS = ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention")
NPU_KERNELS = TRAIN_KERNELS + ("npu_incre_flash_attention", "npu_prompt_flash_attention")


def reference_attention(q, k, v, q_start=0, kv_len=None, key_padding_mask=None, alibi_slopes=None, doc_ids=None):
    """Causal attention written out in fp32, softmax(q k^T / sqrt(D) + slope * (j - i)) v, with the masks
    kernels.attention documents: query i (at position q_start + i) sees key j <= q_start + i of its own document
    that is real (key_padding_mask), and always itself."""
    B, H, T, D = q.shape
    kv_len = kv_len or k.size(2)
    k, v = (t[:, :, :kv_len].float().repeat_interleave(H // t.size(1), 1) for t in (k, v))
    i = torch.arange(q_start, q_start + T, device=q.device)[:, None]
    j = torch.arange(kv_len, device=q.device)[None, :]
    s = q.float() @ k.transpose(-1, -2) / math.sqrt(D)
    if alibi_slopes is not None:
        s = s + alibi_slopes.float()[:, None, None] * (j - i)
    allowed = j <= i
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_padding_mask is not None:
        allowed = (allowed & key_padding_mask[:, None, None, :kv_len]) | (j == i)
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _rotate_ref(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin


def npu_check_cases(a: ModelArgs, B: int, T: int, device) -> list[dict]:
    """The cases of --mode=npu-check for a model's shapes: each op in training (forward and backward) on B rows of
    T tokens, attention with ALiBi (compressed past 1024 tokens), packed documents and left padding, and decoding:
    a decode step and a prefill on a left-padded cache of T positions. kernel: the torch_npu op it must run on."""
    H, H_kv, D = a.n_heads, a.kv_heads, a.head_dim
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    cos, sin = (t[None, :, None] for t in kernels.rope_cos_sin(torch.arange(T, device=device), D, a.rope_theta))
    slopes = kernels.alibi_slopes(H).to(device)
    docs = (torch.arange(T, device=device) * 8 // T).expand(B, T)  # 8 documents a row
    Bi, kv_len, prompt = max(B, 4), T - T // 8, T // 2  # decoding: 4 rows at least, row r left padded by r * T / 16
    pad = torch.arange(T, device=device)[None] >= (torch.arange(Bi + 1, device=device)[:, None] % 4) * (T // 16)
    qkv = dict(q=randn(B, H, T, D), k=randn(B, H_kv, T, D), v=randn(B, H_kv, T, D))
    cache = dict(k=randn(Bi, H_kv, T, D), v=randn(Bi, H_kv, T, D))
    train_attention = dict(op="attention", kernel="npu_fusion_attention", fn=kernels.attention,
                           ref=reference_attention, tensors=qkv, grad=("q", "k", "v"))
    decode = dict(op="attention", kernel="npu_incre_flash_attention", fn=kernels.attention, ref=reference_attention,
                  tensors=dict(q=randn(Bi, H, 1, D), **cache), grad=(),
                  extra=dict(q_start=kv_len - 1, kv_len=kv_len, key_padding_mask=pad[:Bi, :kv_len]))
    prefill = dict(decode, case="prefill left-padded", kernel="npu_prompt_flash_attention",
                   tensors=dict(q=randn(Bi, H, prompt, D), **cache),
                   extra=dict(kv_len=prompt, key_padding_mask=pad[:Bi, :prompt]))
    return [
        dict(op="rms_norm", case="train", kernel="npu_rms_norm", fn=kernels.rms_norm, grad=("x", "weight"),
             ref=lambda x, weight, eps: x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight,
             tensors=dict(x=randn(B, T, a.dim), weight=1 + 0.1 * randn(a.dim)), extra=dict(eps=a.norm_eps)),
        dict(op="apply_rotary", case="train", kernel="npu_rotary_mul", fn=kernels.apply_rotary, ref=_rotate_ref,
             tensors=dict(x=randn(B, T, H, D)), extra=dict(cos=cos, sin=sin), grad=("x",)),
        dict(op="swiglu", case="train", kernel="npu_swiglu", fn=kernels.swiglu, grad=("gate", "up"),
             ref=lambda gate, up: F.silu(gate.float()) * up.float(),
             tensors=dict(gate=randn(B, T, a.hidden_dim), up=randn(B, T, a.hidden_dim))),
        dict(train_attention, case="train causal"),
        dict(train_attention, case="train alibi" + (" (compressed pse)" if T > kernels.ALIBI_ROWS else ""),
             extra=dict(alibi_slopes=slopes)),
        dict(train_attention, case="train packed docs (TND)", extra=dict(doc_ids=docs)),
        dict(train_attention, case="train alibi left-padded",
             extra=dict(alibi_slopes=slopes, key_padding_mask=pad[1:B + 1])),
        dict(decode, case="decode left-padded"),
        dict(decode, case="decode alibi left-padded", extra=dict(decode["extra"], alibi_slopes=slopes)),
        prefill,
        dict(prefill, case="prefill alibi left-padded", extra=dict(prefill["extra"], alibi_slopes=slopes)),
    ]


@contextmanager
def counting_calls(npu, names):
    """{name: calls} of the torch_npu functions `names` while in the block (kernels looks them up per call)."""
    counts, originals = dict.fromkeys(names, 0), {n: getattr(npu, n) for n in names}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(npu, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(npu, name, fn)


def _run_case(case, tensors, device):
    """Output and input gradients of one case (inference cases under inference_mode, without gradients)."""
    grad = case["grad"]
    xs = {n: t.detach().requires_grad_(n in grad) for n, t in tensors.items()}
    with torch.inference_mode(not grad):
        out = case["fn"](**xs, **case.get("extra", {}))
    if not grad:
        return out.float(), []
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out.float() * upstream).sum().backward()
    return out.detach().float(), [xs[n].grad.float() for n in grad]


def _median_ms(fn, rounds, device) -> float:
    fn()  # warm up (kernel compilation, caches)
    times = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return round(statistics.median(times), 3)


def run_npu_check(a: ModelArgs, batch_size: int, seq_len: int, rounds: int, device) -> dict:
    """Every case of npu_check_cases in bf16 and fp16: the fused path (it must call the case's torch_npu kernel where
    this part has it) and the portable path in that dtype, each against the fp32 reference on the same rounded
    inputs, output and input gradients; ok where the fused error is at most twice the portable one plus one rounding
    step of the dtype. A case whose kernel raises is a failed row with the error; the other cases still run."""
    name, family = kernels.npu_chip()
    print(f"npu-check on {name} ({family}): {a.n_heads} heads ({a.kv_heads} kv), head_dim {a.head_dim}, batch "
          f"{batch_size}, {seq_len} tokens. err: max |x - fp32 reference| of the output, grad: of the input "
          "gradients, fused (portable); ms: median forward (+ backward) time, fused (portable)", file=sys.stderr)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for case in npu_check_cases(a, batch_size, seq_len, device):
            row = dict(op=case["op"], case=case["case"], dtype=str(dtype).split(".")[-1], kernel=case["kernel"],
                       on_this_part=case["kernel"] in kernels.NPU_OPS[family])
            try:
                row.update(_check_case(case, dtype, rounds, device))
                row["ok"] = row["ok"] and (row["ran"].get(case["kernel"], 0) > 0 or not row["on_this_part"])
            except Exception as e:  # a kernel refusing these shapes (or these arguments) is a finding, not the end
                row.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0])
            rows.append(row)
            _print_check_row(row, family)
    return {"mode": "npu-check", "device": device.type, "chip": name, "family": family, "heads": a.n_heads,
            "kv_heads": a.kv_heads, "head_dim": a.head_dim, "batch_size": batch_size, "seq_len": seq_len,
            "cases": rows, "ok": all(r["ok"] for r in rows)}


def _check_case(case, dtype, rounds, device) -> dict:
    """One npu-check case in one dtype: errors and times of the fused and the portable path, and the kernels ran."""
    import torch_npu

    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    tensors = {n: t.to(dtype) for n, t in case["tensors"].items()}
    ref, ref_grads = _run_case(dict(case, fn=case["ref"]), {n: t.float() for n, t in tensors.items()}, device)

    def errors(result):
        out, grads = result
        return ((out - ref).abs().max().item(),
                max([(x - r).abs().max().item() for x, r in zip(grads, ref_grads)], default=0.0))

    with counting_calls(torch_npu, NPU_KERNELS) as ran:
        fused = errors(_run_case(case, tensors, device))
        fused_ms = _median_ms(lambda: _run_case(case, tensors, device), rounds, device)
    with kernels.force_npu(False):
        plain = errors(_run_case(case, tensors, device))
        plain_ms = _median_ms(lambda: _run_case(case, tensors, device), rounds, device)
    scale = [ref.abs().max().item()] + [r.abs().max().item() for r in ref_grads]
    return dict(ran={k: n for k, n in ran.items() if n}, max_err=fused[0], grad_max_err=fused[1],
                portable_max_err=plain[0], portable_grad_max_err=plain[1], ms=fused_ms, portable_ms=plain_ms,
                ok=all(e <= 2 * p + ulp * s for e, p, s in zip(fused, plain, scale)))


def _print_check_row(r: dict, family: str):
    ran = ", ".join(r.get("ran", {})) or "portable"
    if not r["on_this_part"]:
        ran += f" ({r['kernel']}: not on {family})"
    head = f"{r['dtype']:9s} {r['op']:13s} {r['case']:34s} {ran:27s}"
    if "error" in r:
        print(f"{head} FAIL: {r['error']}", file=sys.stderr)
        return
    grad = (f"grad {r['grad_max_err']:.2e} ({r['portable_grad_max_err']:.2e})" if r["kernel"] in TRAIN_KERNELS
            else "grad -")
    print(f"{head} err {r['max_err']:.2e} ({r['portable_max_err']:.2e}) {grad:29s} {r['ms']:9.3f} ms "
          f"({r['portable_ms']:9.3f})  {'ok' if r['ok'] else 'FAIL'}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------------
# serving: concurrent HTTP clients against sample.py's server


class IdTokenizer:
    """Serve mode's stand-in tokenizer for random weights: a token's text is its id. No eos: every request generates
    exactly new_tokens."""

    bos_id = eos_id = pad_id = None

    def decode(self, ids):
        return "".join(f"{i} " for i in ids)


def post_completion(port: int, prompt: list[int], new_tokens: int) -> int:
    """One greedy /v1/completions request -> the tokens it generated."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"the server answered {resp.status}: {body}")
    return body["usage"]["completion_tokens"]


def time_clients(port: int, prompts: list[list[int]], new_tokens: int, at_once: bool) -> tuple[float, int]:
    """One request per prompt, each from its own thread at the same time or one after another -> (seconds,
    tokens generated)."""
    counts = [0] * len(prompts)

    def client(i):
        counts[i] = post_completion(port, prompts[i], new_tokens)

    t0 = time.perf_counter()
    if at_once:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(prompts)):
            client(i)
    return time.perf_counter() - t0, sum(counts)


def stream_completion(port: int, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """One greedy streamed /v1/completions request -> (seconds to the first token, seconds to the last, tokens).
    Sent as HTTP/1.0, so the answer comes unframed until the server closes: no chunked encoding for this process, where
    the server runs too, to take apart in Python (a real client does that in its own process)."""
    t0 = time.perf_counter()
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    sock.sendall(b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    first = tokens = None
    pending, status = b"", None
    while data := sock.recv(65536):
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if status is None:
                status = line.split()[1]
                if status != b"200":
                    raise RuntimeError(f"the server answered {status.decode()}")
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    sock.close()
    return first, time.perf_counter() - t0, tokens


def time_streams(port: int, prompts: list[list[int]], new_tokens: int, clients: int, rounds: int) -> dict:
    """`clients` streamed requests at once, `rounds` times: the medians over clients and rounds of the time to the
    first token and of each client's tokens/s (its tokens over the seconds from sending to the last token), and the
    CPU time this process (server and clients) spent per token, which other processes on the machine change less."""
    ttft, per_client = [], []
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731 (user + system seconds)
    cpu_start = cpu()
    for _ in range(rounds):
        out = [None] * clients

        def client(i):
            out[i] = stream_completion(port, prompts[i % len(prompts)], new_tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for first, last, tokens in out:
            if tokens != new_tokens:
                raise BenchError(f"a streamed request got {tokens} tokens, expected {new_tokens}")
            ttft.append(first)
            per_client.append(tokens / last)
    return {"ttft_s": round(statistics.median(ttft), 3),
            "tokens_per_s_per_client": round(statistics.median(per_client), 2),
            "cpu_ms_per_token": round(1000 * (cpu() - cpu_start) / (rounds * clients * new_tokens), 2)}


def time_joining(port: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """Seconds a short request (16 tokens) takes alone, and sent while a long one (new_tokens) decodes: continuous
    batching lets it join at once instead of waiting for the long one to end."""
    t0 = time.perf_counter()
    post_completion(port, prompts[1], 16)
    alone = time.perf_counter() - t0
    long = threading.Thread(target=post_completion, args=(port, prompts[0], new_tokens))
    long.start()
    time.sleep(alone * 2)  # the long one is decoding
    t0 = time.perf_counter()
    post_completion(port, prompts[1], 16)
    during = time.perf_counter() - t0
    long.join()
    return {"short_alone_s": round(alone, 3), "short_during_long_s": round(during, 3)}


STREAMS = (1, 4, 8)  # concurrent streamed clients serve mode times


def serve_bench(opt, model_args: ModelArgs, device: torch.device) -> dict:
    """--mode=serve: total tokens/s of --batch_size concurrent clients and of the same requests sent in turn; the
    time of a short request sent while a long one decodes."""
    from sample import CompiledDecode, Engine
    from support.decode_layout import decode_layout
    from support.server import ModelServer

    if opt.prompt_len + opt.new_tokens > model_args.max_seq_len:
        raise BenchError(f"--prompt_len + --new_tokens = {opt.prompt_len + opt.new_tokens} is above the preset's "
             f"max_seq_len={model_args.max_seq_len}")
    model = build_ours(model_args, device, opt.seed).to(DTYPES[opt.dtype]).eval()
    model.init_buffers()  # RoPE tables back to fp32 after .to(dtype)
    decode_layout(model)  # as sample.py loads it
    g = torch.Generator().manual_seed(opt.seed)
    prompts = torch.randint(model_args.vocab_size, (opt.batch_size, opt.prompt_len), generator=g).tolist()
    greedy = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0)
    server = ModelServer(Engine(model, IdTokenizer(), plain_settings=greedy, max_batch=opt.batch_size,
                                decode_step=CompiledDecode() if opt.compile else None), port=0, name="bench",
                         access_log=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, expected = server.server_address[1], opt.batch_size * opt.new_tokens
    seconds = {"concurrent": [], "sequential": []}
    try:
        for r in range(opt.warmup + opt.rounds):  # alternate, so drifts in machine speed hit both alike
            for name in seconds:
                s, tokens = time_clients(port, prompts, opt.new_tokens, at_once=name == "concurrent")
                if tokens != expected:
                    raise BenchError(f"{name} clients got {tokens} tokens, expected {expected}: a request was lost")
                if r >= opt.warmup:
                    seconds[name].append(s)
        joining = time_joining(port, prompts, opt.new_tokens) if len(prompts) > 1 else {}
    finally:
        server.shutdown()
        server.server_close()
    largest_batch = max(rows for rows, _ in server.batcher.batches)
    # streamed clients at 1, 4 and 8 at once: what each sees (a server that batches up to 8)
    streaming = ModelServer(Engine(model, IdTokenizer(), plain_settings=greedy, max_batch=max(STREAMS),
                                   decode_step=CompiledDecode() if opt.compile else None), port=0, name="bench",
                            access_log=False)
    threading.Thread(target=streaming.serve_forever, daemon=True).start()
    try:
        if opt.warmup:
            time_streams(streaming.server_address[1], prompts, opt.new_tokens, 1, opt.warmup)
        streams = {f"{n}_clients": time_streams(streaming.server_address[1], prompts, opt.new_tokens, n, opt.rounds)
                   for n in STREAMS}
    finally:
        streaming.shutdown()
        streaming.server_close()
    result = {"mode": "serve", "preset": opt.preset, "dtype": opt.dtype, "device": device.type,
              "clients": opt.batch_size, "prompt_len": opt.prompt_len, "new_tokens": opt.new_tokens}
    for name, runs in seconds.items():
        result[f"{name}_tokens_per_s"] = round(expected / statistics.median(runs), 2)
        result[f"{name}_tokens_per_s_runs"] = [round(expected / s, 2) for s in runs]
    result["ratio"] = round(result["concurrent_tokens_per_s"] / result["sequential_tokens_per_s"], 3)
    result["largest_batch"] = largest_batch
    result.update(joining)
    result["streams"] = streams
    result["load_avg_1m"] = load_average()
    return result


# --------------------------------------------------------------------------------------------------------------------
# matvec: the ways to multiply one token by a quantised weight, side by side


MATVEC_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): a 7B model's attention and MLP weights


def matvec_candidates(w: torch.Tensor, x: torch.Tensor, group_size: int) -> dict:
    """name -> (function computing x @ w^T from w quantised as sample.py stores it, bytes it reads): ours, torch's
    packed CPU kernels, a dequantise-and-dot fused by torch.compile, and dequantising blocks of rows."""
    from support.quant import nf4_dequantised_matmul, nf4_matmul
    from support.quant import dequantised_linear, int4_dequantize, int4_matmul, int8_dequantize, int8_matmul
    from support.quant import fp32_matmul, NF4Linear
    from support.quant import Int4Linear, Int8Linear

    q8 = Int8Linear(w.size(1), w.size(0)).quantize_from(w)
    q4 = Int4Linear(w.size(1), w.size(0), group_size).quantize_from(w)
    nf4 = NF4Linear(w.size(1), w.size(0)).quantize_from(w)
    n8, n4 = [sum(t.numel() * t.element_size() for t in q.stored()) for q in (q8, q4)]
    nf4_parts = nf4.nf4()  # packed codes, absmax_q, absmax_scale, absmax_offset: nf4_matmul's arguments in order
    n_nf4 = sum(t.numel() * t.element_size() for t in nf4_parts.values())
    scales_and_zeros = torch.stack([q4.scales, q4.zeros + 8 * q4.scales], -1).transpose(0, 1).contiguous()  # q - 8
    codes = torch.stack([q4.weight & 15, q4.weight >> 4], -1).flatten(1).int()
    packed4 = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    fused8 = torch.compile(lambda x, q, s: (x * q.float()).sum(-1) * s)

    def int_mm(x, q, s):  # x rounded to int8 (one step per row), then int8 x int8 -> int32
        step = x.abs().amax(-1, keepdim=True) / 127
        return torch._int_mm(torch.round(x / step).to(torch.int8), q.t()) * step * s
    fused4 = torch.compile(lambda x, q, s, z: ((int4_dequantize(q, s, z, x.dtype)) * x).sum(-1))
    return {
        "fp32 C kernel": (lambda: fp32_matmul(x, w), 4 * w.numel()),  # what support/decode_layout.py decodes with
        "fp32 torch F.linear": (lambda: F.linear(x, w), 4 * w.numel()),
        "int8 C kernel": (lambda: int8_matmul(x, q8.weight, q8.scales), n8),
        "int8 torch._weight_int8pack_mm": (lambda: torch._weight_int8pack_mm(x, q8.weight, q8.scales), n8),
        "int8 torch.compile dequantise-and-dot": (lambda: fused8(x, q8.weight, q8.scales), n8),
        "int8 torch._int_mm": (lambda: int_mm(x, q8.weight, q8.scales), n8),
        "int8 dequantised blocks": (lambda: dequantised_linear(x, int8_dequantize, q8.weight, q8.scales), n8),
        "int4 C kernel": (lambda: int4_matmul(x, q4.weight, q4.scales, q4.zeros), n4),
        "int4 torch._weight_int4pack_mm_for_cpu": (
            lambda: torch._weight_int4pack_mm_for_cpu(x, packed4, group_size, scales_and_zeros), n4),
        "int4 torch.compile dequantise-and-dot": (lambda: fused4(x, q4.weight, q4.scales, q4.zeros), n4),
        "int4 dequantised blocks": (lambda: dequantised_linear(x, int4_dequantize, q4.weight, q4.scales, q4.zeros),
                                    n4),
        "nf4 C kernel": (lambda: nf4_matmul(x, *nf4_parts.values()), n_nf4),
        "nf4 dequantised blocks": (lambda: nf4_dequantised_matmul(x, nf4_parts, w.shape, torch.float32), n_nf4),
    }


def run_matvec(opt) -> dict:
    """One token (x: 1 x in, fp32) times each MATVEC_SHAPES weight, every candidate alternated for --rounds rounds
    (best of each: other processes come and go), beside the rate a plain pass reads the fp32 weight at (the memory
    bound). Reports ms, GB/s of the bytes each reads, and G weights/s; the first call of the compiled ones (tracing
    and building) is reported as compile_s."""
    g = torch.Generator().manual_seed(opt.seed)
    opt.group_size = opt.group_size or 128  # one 11008x4096 weight: 128 divides it
    result = {"mode": "matvec", "device": "cpu", "threads": torch.get_num_threads(), "group_size": opt.group_size,
              "rounds": opt.rounds, **quantized_kernel()}
    for out_f, in_f in MATVEC_SHAPES:
        w, x = torch.randn(out_f, in_f, generator=g) * 0.02, torch.randn(1, in_f, generator=g)
        candidates = matvec_candidates(w, x, opt.group_size)
        row = {"fp32 stream (sum)": {}, **{name: {} for name in candidates}}
        for name, (fn, _) in candidates.items():
            t0 = time.perf_counter()
            fn()
            if "compile" in name:
                row[name]["compile_s"] = round(time.perf_counter() - t0, 1)
        best = dict.fromkeys(candidates, math.inf)
        for _ in range(opt.rounds):
            for name, (fn, _) in candidates.items():
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
        row["fp32 stream (sum)"]["GB_per_s"] = round(stream_peak_bytes([w], torch.device("cpu")) / 1e9, 2)
        for name, (_, nbytes) in candidates.items():
            row[name].update(ms=figures(best[name] * 1e3), GB_per_s=figures(nbytes / best[name] / 1e9),
                             G_weights_per_s=figures(w.numel() / best[name] / 1e9))  # a slow one on a tiny shape: > 0
        result[f"{out_f}x{in_f}"] = row
    result["load_avg_1m"] = load_average()
    return result




# --------------------------------------------------------------------------------------------------------------------
# --plot: loss curves of train.py runs, and the relative difference of two


def read_losses(path: str) -> dict[int, float]:
    """step -> training loss from a train.py metrics.jsonl (rows with "step" and "loss"; val rows are skipped)."""
    if not os.path.isfile(path):
        raise BenchError(f"--plot: {path}: no such file (expected a train.py metrics.jsonl)")
    losses = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--plot: {path}: line {n}"
            try:  # train.py logs a non-finite loss as NaN or Infinity
                row = parse_json(line, where, unique_keys=False, allow_nan=True)
                if isinstance(row, dict) and "step" in row and "loss" in row:
                    check_json_fields(row, {"step": (int, "[0, inf)"), "loss": float}, where)
                    losses[row["step"]] = float(row["loss"])
            except ValueError as e:
                raise BenchError(str(e))
    if not losses:
        raise BenchError(f"--plot: {path}: no rows with 'step' and 'loss' (is it a train.py metrics.jsonl?)")
    return losses


def relative_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """Per-step |loss_b - loss_a| / |loss_a| and |loss_b - loss_a| over the steps both runs logged (a is the
    reference): their maxima and where they are, and the mean relative difference."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise BenchError("--plot: the two runs have no logged step in common")
    rel = [abs(b[s] - a[s]) / max(abs(a[s]), 1e-12) for s in steps]
    absolute = [abs(b[s] - a[s]) for s in steps]
    return {"rel_diff_max": max(rel), "rel_diff_mean": sum(rel) / len(rel), "steps_compared": len(steps),
            "worst_step": steps[rel.index(max(rel))], "abs_diff_max": max(absolute),
            "worst_abs_step": steps[absolute.index(max(absolute))]}


def check_criterion(result: dict, max_rel_err: float | None, max_abs_err: float | None) -> bool:
    """Print the two curves' maximum relative and absolute errors as loss-alignment reports state them, against the
    criterion given; -> whether they are within it."""
    rel, absolute = result["rel_diff_max"], result["abs_diff_max"]
    ok = (max_rel_err is None or rel <= max_rel_err) and (max_abs_err is None or absolute <= max_abs_err)
    limits = " and ".join(f"{name} <= {limit:g}" for name, limit in (("relative", max_rel_err),
                                                                     ("absolute", max_abs_err)) if limit is not None)
    print(f"The maximum relative error is {rel:.4f} (step {result['worst_step']}), and the maximum absolute error is "
          f"{absolute:.4f} (step {result['worst_abs_step']}) over {result['steps_compared']} common steps: "
          f"{'within' if ok else 'NOT within'} {limits}", file=sys.stderr)
    return ok


def plot(paths: list[str], out: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_losses(p) for p in paths]
    two = len(runs) == 2
    fig, axes = plt.subplots(2 if two else 1, 1, figsize=(8, 7 if two else 4.5), sharex=True, squeeze=False)
    for path, losses in zip(paths, runs):
        steps = sorted(losses)
        axes[0, 0].plot(steps, [losses[s] for s in steps], label=path)
    axes[0, 0].set_ylabel("training loss")
    axes[0, 0].legend(fontsize=8)
    result = {"plot": out, "runs": paths}
    if two:
        result.update(relative_difference(*runs), reference=paths[0])
        steps = sorted(set(runs[0]) & set(runs[1]))
        axes[1, 0].plot(steps, [abs(runs[1][s] - runs[0][s]) / abs(runs[0][s]) for s in steps])
        axes[1, 0].set_ylabel("relative loss difference")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:  # a read-only or missing directory
        raise BenchError(f"--out={out}: cannot write ({e.strerror})")
    finally:
        plt.close(fig)
    return result


# --------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="a model.PRESETS name (default bench-llama; npu-check: "
                                                "baichuan2-13b)")
    p.add_argument("--model_args", default=None, help='ModelArgs overrides as JSON, e.g. \'{"n_layers": 4}\'')
    p.add_argument("--mode", choices=["train", "generate", "serve", "matvec", "npu-check"], default="train",
                   help="matvec: one token times a quantised 7B weight, every way; npu-check: every fused Ascend op "
                   "against the portable path, on an NPU")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--compile", action="store_true", help="compile the blocks (train) / the decode step (generate)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="default 4 for train, 1 for generate and npu-check; serve: clients (default 4)")
    p.add_argument("--seq_len", type=int, default=None, help="train: tokens per sequence (default 256; "
                                                                "npu-check: 4096)")
    p.add_argument("--prompt_len", type=int, default=16, help="generate: prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128, help="generate: tokens generated per prompt")
    p.add_argument("--steps", type=int, default=3, help="train: optimiser steps per timing")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1, 3 with --compile)")
    p.add_argument("--rounds", type=int, default=3, help="timings per model (medians reported)")
    p.add_argument("--compare", nargs="?", const="transformers", default=None, choices=["transformers", "llama.cpp"],
                   help="also run transformers' LlamaForCausalLM (train, generate), or llama.cpp on --gguf "
                        "(generate), alternated")
    p.add_argument("--gguf", default=None, help="--compare=llama.cpp: the GGUF file both run (convert.py "
                                                "native-to-gguf writes one)")
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], default=None,
                   help="generate: weights quantised as sample.py --quantize does, built one weight at a time")
    p.add_argument("--group_size", type=int, default=None, help="--quantize=int4: weights per scale and zero (default: "
                   "as sample.py, the largest up to 128 that divides every layer)")
    p.add_argument("--lora_rank", type=int, default=0, help="train: rank of LoRA adapters (0 = full training)")
    p.add_argument("--qlora", action="store_true", help="train: --lora_rank adapters on an NF4-quantised base")
    p.add_argument("--device", default=None, help="default: kernels.device_type()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", nargs="+", default=None, metavar="METRICS_JSONL", help="plot train.py loss curves")
    p.add_argument("--out", default="loss.png", help="--plot: the PNG to write")
    p.add_argument("--overwrite", action="store_true", help="--plot: replace an existing --out")
    p.add_argument("--max_rel_err", type=float, default=None, help="--plot A B: exit 1 when a step's |B - A| / |A| "
                   "is above this (AscendSpeed's loss alignment: 0.02)")
    p.add_argument("--max_abs_err", type=float, default=None, help="--plot A B: exit 1 when a step's |B - A| is "
                   "above this")
    opt = p.parse_args(argv)
    check = opt.mode == "npu-check"
    opt.preset = opt.preset or ("baichuan2-13b" if check else "bench-llama")
    opt.seq_len = opt.seq_len if opt.seq_len is not None else (4096 if check else 256)
    opt.batch_size = opt.batch_size or (4 if opt.mode in ("train", "serve") else 1)
    opt.warmup = opt.warmup if opt.warmup is not None else (3 if opt.compile else 1)
    for key in ("batch_size", "seq_len", "prompt_len", "new_tokens", "steps", "rounds"):
        if getattr(opt, key) <= 0:
            raise BenchError(f"--{key}={getattr(opt, key)}: expected a positive integer")
    if opt.warmup < 0:
        raise BenchError(f"--warmup={opt.warmup}: expected >= 0")
    if opt.lora_rank < 0 or (opt.qlora and not opt.lora_rank):
        raise BenchError(f"--lora_rank={opt.lora_rank}: expected a positive rank with --qlora, >= 0 otherwise")
    if opt.mode == "serve" and opt.compare:
        raise BenchError("--compare: transformers has no server here; --mode=serve compares concurrent with sequential clients")
    for key in ("max_rel_err", "max_abs_err"):
        if getattr(opt, key) is not None and (getattr(opt, key) < 0 or not opt.plot or len(opt.plot) != 2):
            raise BenchError(f"--{key}={getattr(opt, key)}: expected a value >= 0 with --plot REFERENCE RUN (two metrics files)")
    if (opt.compare == "llama.cpp") != bool(opt.gguf) or (opt.gguf and opt.mode != "generate"):
        raise BenchError("--compare=llama.cpp goes with --gguf=FILE, in --mode=generate")
    if opt.quantize and (opt.mode != "generate" or opt.compare == "transformers"):
        raise BenchError(f"--quantize={opt.quantize}: measured in --mode=generate, without --compare (transformers' model has "
             f"no int8/int4 linears)")
    if opt.lora_rank and (opt.mode != "train" or opt.compare):
        raise BenchError("--lora_rank: fine-tuning speed is measured in --mode=train, without --compare (transformers has no "
             "LoRA without peft)")
    return opt


def gguf_bytes_per_token(path) -> int:
    """Bytes of weights llama.cpp reads per decoded token: every tensor of the file but the input embedding (one
    row a token), which a tied model reads whole as its output layer."""
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


def run_llama_cpp_compare(opt) -> dict:
    """--compare=llama.cpp --gguf=FILE: llama.cpp (llama-cpp-python) and ours decode the file's model, greedy, batch 1,
    --new_tokens after a --prompt_len prompt, alternated for --rounds; medians. Ours reads the file back
    (support/gguf.py: dequantised to fp32), quantised again with --quantize, laid out as sample.py decodes. Prints
    the README's table row: tokens/s, weight bytes per token and the GB/s they make."""
    try:
        import llama_cpp
    except ImportError:
        raise BenchError("--compare=llama.cpp: llama_cpp is not importable; build llama-cpp-python from source "
                         "(docs/speed.md)")
    from sample import CompiledDecode, generate
    from support.decode_layout import decode_layout
    from support.quant import quantize_model
    from support import gguf as gguf_format

    threads = torch.get_num_threads()
    args, family, _, tensors = gguf_format.read_gguf(opt.gguf)
    with torch.device("meta"):
        ours = Transformer(args)
    ours.load_state_dict(dict(tensors), assign=True)
    ours.materialize_buffers("cpu")
    if opt.quantize:
        quantize_model(ours, opt.quantize, opt.group_size)
    decode_layout(ours.eval())
    decode_step = CompiledDecode() if opt.compile else None  # compiled in the first (warm-up) round
    n_ctx = opt.prompt_len + opt.new_tokens
    llm = llama_cpp.Llama(model_path=str(opt.gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=max(opt.prompt_len, 8), verbose=False)
    prompt = torch.randint(args.vocab_size, (opt.prompt_len,), generator=torch.Generator().manual_seed(opt.seed))

    def run(which) -> tuple[float, float, list[int]]:
        """(seconds to the first token: the prompt, seconds for the rest, the tokens)."""
        t0 = time.perf_counter()
        if which == "llama.cpp":
            llm.reset()  # else it keeps the last run's prompt in its cache and evaluates only the last token again
            stream = llm.generate(prompt.tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        else:
            stream = generate(ours, prompt.tolist(), opt.new_tokens, temperature=0.0, decode_step=decode_step)
        tokens, first = [], None
        for token in stream:
            tokens.append(int(token))
            first = first or time.perf_counter() - t0
            if len(tokens) == opt.new_tokens:
                break
        return first, time.perf_counter() - t0 - first, tokens

    times = {"llama.cpp": [], "ours": []}
    for r in range(opt.warmup + opt.rounds):
        for which in times:
            got = run(which)
            if r >= opt.warmup:
                times[which].append(got)
    weights = [t for name, t in list(ours.named_parameters()) + list(ours.named_buffers())
               if (t.dim() == 2 or name.endswith(".scales")) and not name.startswith(("tok_embeddings.", "rope_"))]
    ours_bytes = sum(t.numel() * t.element_size() for t in weights)
    embedding = ours.tok_embeddings.weight
    if ours.output is None or getattr(ours.output, "weight", None) is embedding:  # tied, not quantised: the embedding
        ours_bytes += embedding.numel() * embedding.element_size()           # is the output layer
    result = {"mode": "generate", "compare": "llama.cpp", "gguf": str(opt.gguf), "family": family,
              "quantize": opt.quantize, "compile": opt.compile, "threads": threads, "prompt_len": opt.prompt_len,
              "new_tokens": opt.new_tokens, "llama_cpp_version": getattr(llama_cpp, "__version__", None)}
    rows = {}
    for which, runs in times.items():
        decode = (opt.new_tokens - 1) / statistics.median(r[1] for r in runs)
        prefill = opt.prompt_len / statistics.median(r[0] for r in runs)
        nbytes = gguf_bytes_per_token(opt.gguf) if which == "llama.cpp" else ours_bytes
        rows[which] = {"decode_tokens_per_s": round(decode, 2), "prompt_tokens_per_s": round(prefill, 1),
                       "bytes_per_token": nbytes, "gb_per_s": round(nbytes * decode / 1e9, 1)}
    result.update(rows, ratio=round(rows["ours"]["decode_tokens_per_s"] / rows["llama.cpp"]["decode_tokens_per_s"],
                                    2), same_tokens=times["ours"][0][2] == times["llama.cpp"][0][2])
    a, b = rows["llama.cpp"], rows["ours"]
    print(f"| {Path(opt.gguf).name} | {opt.quantize or 'fp32'}{' compiled' if opt.compile else ''} | "
          f"{a['decode_tokens_per_s']} | "
          f"{b['decode_tokens_per_s']} | {result['ratio']}x | {a['bytes_per_token'] / 1e6:,.0f} / "
          f"{b['bytes_per_token'] / 1e6:,.0f} MB | {a['gb_per_s']} / {b['gb_per_s']} |", file=sys.stderr)
    return result


def model_args_for(opt) -> ModelArgs:
    if opt.preset not in PRESETS:
        raise BenchError(f"--preset={opt.preset!r}: unknown; expected one of {', '.join(PRESETS)}")
    args = PRESETS[opt.preset]
    if opt.model_args:
        try:
            overrides = parse_json(opt.model_args, "--model_args")
        except ValueError as e:
            raise BenchError(str(e))
        if not isinstance(overrides, dict):
            raise BenchError(f"--model_args={opt.model_args!r}: expected a JSON object of ModelArgs fields")
        try:
            args = ModelArgs(**{**args.__dict__, **overrides})
        except (TypeError, ValueError) as e:
            raise BenchError(f"--model_args: {e}")
    return args


def main(argv=None) -> dict:
    """Run what the flags ask, print it as one JSON line and return it; a BenchError is one line, exit status 1."""
    try:
        result = measure(parse_args(sys.argv[1:] if argv is None else argv))
    except BenchError as e:
        raise SystemExit(f"bench.py: {e}") from None
    print(json.dumps(result))
    if result.get("ok") is False or result.get("within_criterion") is False:
        sys.exit(1)
    return result


def measure(opt) -> dict:
    if opt.plot:
        if os.path.exists(opt.out) and not opt.overwrite:
            raise BenchError(f"--out={opt.out} exists; pass --overwrite to replace it")
        result = plot(opt.plot, opt.out)
        if opt.max_rel_err is not None or opt.max_abs_err is not None:
            result["within_criterion"] = check_criterion(result, opt.max_rel_err, opt.max_abs_err)
    elif opt.mode == "matvec":
        result = run_matvec(opt)
    elif opt.compare == "llama.cpp":
        result = run_llama_cpp_compare(opt)
    else:
        try:
            device = check_device(opt.device or kernels.device_type())
        except ValueError as e:
            raise BenchError(f"--device={opt.device}: {e}")
        if opt.mode != "npu-check":
            result = (serve_bench if opt.mode == "serve" else run_bench)(opt, model_args_for(opt), device)
        elif device.type != "npu":
            raise BenchError(f"--mode=npu-check: needs an Ascend NPU (torch_npu and a device); this machine's device is "
                 f"{device.type}")
        else:
            result = run_npu_check(model_args_for(opt), opt.batch_size, opt.seq_len, opt.rounds, device)
    return result


if __name__ == "__main__":
    main()
