"""The memory and FLOP planner, and the device figures it and the logs rest on: used by train.py (--dry_run's plan,
check_memory's refusal of a run that cannot fit, the log line's MFU and memory) and bench.py (MFU of its timings).

It adds what a run needs to know before it allocates anything: training FLOPs per token (flops_per_token), the
bytes one training step of a config takes per device on a (dp, tp) mesh, term by term (memory_plan), and the step
time at a given MFU (training_plan, printed as --dry_run's table); and three measurements: the best torch.mm FLOP/s
of this device (mm_peak_flops, the MFU denominator when no peak_flops is configured), this process's peak memory
and the bytes of parameters and optimiser state it holds (local_state_bytes).
Standing here (not in bench.py) ends the train <-> bench import circle: both import it, it imports neither.
"""

import resource
import time

import torch

from model import ModelArgs, Transformer, apply_lora


# --------------------------------------------------------------------------------------------------------------------
# device figures: peak FLOP/s, peak memory, FLOPs per token


def synchronize(device: torch.device):
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).synchronize(device)


def mm_peak_flops(dtype, n: int, device: torch.device, repeats: int = 5, seconds: float = 0.2,
                  budget: float = 4.0) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) torch.mm in dtype over up to `repeats` timings of >= `seconds` each.

    Stops after two timings once `budget` seconds are spent: a CPU without bf16 units takes seconds per bf16 GEMM.
    """
    g = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run's restored state must stay untouched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm up (library init, autotuning)
    synchronize(device)
    best, start = 0.0, time.perf_counter()
    for r in range(repeats):
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            if iters % 8 == 0 or device.type == "cpu":
                synchronize(device)
                if time.perf_counter() - t0 >= seconds:
                    break
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
        if r >= 1 and time.perf_counter() - start > budget:
            break
    return best


def peak_memory_gib(device: torch.device) -> float:
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**30
    try:  # Linux: this process's own peak; ru_maxrss also holds the peak of the process that started it (vfork, exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def local_state_bytes(model, optimizer) -> int:
    """Bytes of parameters and optimiser state held by this rank: its shards under FSDP and TP."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(nbytes(t) for t in [*model.parameters(), *state])


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12 * n_layers * seq_len * dim."""
    d, L = args.dim, args.n_layers
    kv = args.kv_heads * args.head_dim
    n = L * (2 * d * d + 2 * d * kv + 3 * d * args.hidden_dim + 2 * d) + d + args.vocab_size * d
    return 6 * n + 12 * L * seq_len * d


def n_params_flops(model_args: ModelArgs) -> int:
    """N of the MFU formulas: every parameter except the input embedding (flops_per_token's 6N, /6)."""
    return (flops_per_token(model_args, 0)) // 6


# --------------------------------------------------------------------------------------------------------------------
# training plan (train.py --dry_run): what a config needs per device on its mesh and how long a step takes, computed
# from ModelArgs without allocating the model


# dense 16-bit peak per device when peak_flops is not set: the Ascend 910B the recipes name (313 TFLOP/s fp16/bf16,
# Huawei's figure for the 910B3); recipes for other hardware set peak_flops (A100: 312e12)
DEFAULT_PEAK_FLOPS = {"bfloat16": 313e12, "float16": 313e12}


def nf4_bytes(n: int, block: int = 64, absmax_block: int = 256) -> int:
    """Bytes support.quant.nf4_quantize stores for n weights: 4-bit codes, one int8 absmax per block of 64 (padded to whole
    groups of 256), one fp32 scale per group, one fp32 offset: ~4.13 bits per weight."""
    groups = -(-(n // block) // absmax_block)
    return n // 2 + groups * absmax_block + 4 * groups + 4


def memory_plan(args: ModelArgs, cfg, dp: int, tp: int, packed: bool) -> dict:
    """Per-device bytes of one training step of `cfg` (train.py's Config) on a (dp, tp) mesh, term by term, plus
    parameter counts. ValueError for lora_targets that match no layer.

    Storage, sharded over dp * tp (FSDP2 shards every block and the root over dp; TP splits them over tp):
      full training: fp32 parameters (the master copy) 4 B, fp32 gradients 4 B, AdamW m and v 8 B per parameter;
      LoRA: frozen base in the compute dtype (QLoRA: NF4 block linears, nf4_bytes), fp32 adapters + their grads + m, v.
    Working weights (16-bit runs): FSDP all-gathers the root and two blocks (current + prefetched) in the compute
    dtype, or every block with zero_stage 1/2 (kept from forward to backward); in one process autocast caches a
    16-bit copy of every trainable linear weight; QLoRA dequantises each
    linear and autograd keeps the result for backward (one block's worth under activation checkpointing).
    Activations of one micro-batch of b sequences of T tokens, s bytes per element (2 in 16-bit, 4 in fp32), divided by
    tp (sequence-parallel norms shard the rest); the residual stream (block input x, mid-block h) stays fp32 under
    autocast, 4 bytes. Per layer and token, the tensors a block keeps for backward:
      attention: input x, normed x, q, k, v, attention output = 4d + 2kv;  feed-forward: residual h, normed h, gate,
      up, swiglu output = 2d + 3f;  so s(4d + 2kv + 3f) + 8d (the per-layer estimate of Korthikanti et al. 2022,
      redone for SwiGLU, RMSNorm, no dropout, and fused attention, which keeps only 4 B of softmax statistics per head;
      kernels.rms_norm hands the projections one 16-bit normed copy, kernels.swiglu keeps no silu(gate)).
      Masks: ALiBi's bias (1, H, T, T) in s bytes, (b, H, T, T) with packed rows' document masks, built once per
      forward and shared by the layers; a RoPE model with packed rows keeps a (b, 1, T, T) bool mask per layer. LoRA
      adds rank outputs (and dropout copies of the input).
      Full checkpointing keeps only each block's input (4d per token and layer), selective (per op, see train.py's
      apply_activation_checkpointing) also the outputs of wq, wv, w1, w2 and attention: 4d + s(3d + kv + f); both
      recompute one block at a time in the backward pass; with activation_checkpointing_layers = n only the first n
      blocks are checkpointed, the others keep everything.
      The loss head: the final norm's input and output, b T d (4 + s), and kernels.linear_cross_entropy's one (b T, V)
      buffer in s bytes (the logits turned into their gradient); vocab-sharded (tp > 1) or adapted output layers
      take the logits, their fp32 copy and fp32 log-softmax instead, b T V (s + 8) bytes.
    tests/test_recipes.py checks activations + working weights against the bytes autograd saves (within 3%).
    """
    d, L = args.dim, args.n_layers
    s = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    shard = dp * tp
    with torch.device("meta"):
        model = Transformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    block_linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    n_block_linear = sum(m.weight.numel() for m in block_linears)
    n_block = sum(p.numel() for p in model.layers[0].parameters())  # one block
    n_root = n_params - L * n_block  # embedding, final norm, output head
    lora_extra = 0  # activation bytes per token and layer that the adapters add
    adapted = []
    if cfg.lora_rank:
        adapted = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name in (n for n in adapted if n.startswith("layers.0.")):
            adapter = model.get_submodule(name)  # LoRALinear, or a fused wqkv LoRA (dropout once, on its input)
            lora_extra += s * cfg.lora_rank + (adapter.in_features * (s + 1) if cfg.lora_dropout else 0)
        if cfg.qlora:  # block linears in NF4, the rest (embedding, norms, head) in the compute dtype
            weights = sum(nf4_bytes(m.weight.numel()) for m in block_linears) + s * (n_params - n_block_linear)
        else:
            weights = s * n_params
        weights = (weights + 4 * n_train) / shard
    else:
        n_train = n_params
        weights = 4 * n_params / shard
    mem = {"weights": weights, "gradients": 4 * n_train / shard, "optimizer": 8 * n_train / shard}

    ac = cfg.activation_checkpointing
    block_bytes = s * n_block if not cfg.qlora else s * n_block_linear / L  # one block in the compute dtype
    if s == 4 and not cfg.qlora:
        working = 0.0  # fp32: the parameters are used as they are
    elif dp > 1 and not cfg.qlora:  # FSDP2's unsharded root and two blocks; ZeRO-1/2 keep every block to backward
        working = (s * n_root + (2 if cfg.zero_stage == 3 else L) * block_bytes) / tp
    elif cfg.qlora:
        working = (block_bytes if ac != "none" else L * block_bytes) / tp  # dequantised weights kept for backward
    elif cfg.lora_rank:
        working = 0.0  # the frozen base is already in the compute dtype
    else:
        working = s * (n_block_linear + args.vocab_size * d) / tp  # autocast's cache of 16-bit linear weights
    mem["working weights"] = working

    fused_loss = tp == 1 and "output" not in adapted  # (model.Transformer._plain_head_weight)
    for mode, nbytes in activation_bytes(args, cfg, tp, packed, s, lora_extra, fused_loss).items():
        mem[f"activations ({mode})"] = nbytes
    mem["activations"] = mem[f"activations ({ac})"]
    mem["total"] = sum(mem[k] for k in ("weights", "gradients", "optimizer", "working weights", "activations"))
    return {"n_params": n_params, "n_trainable": n_train, "bytes": mem, "activation_checkpointing": ac}


def activation_bytes(args: ModelArgs, cfg, tp: int, packed: bool, s: int, lora_extra: int, fused_loss: bool) -> dict:
    """memory_plan's activations per device, {activation checkpointing mode: bytes}, as its docstring derives them."""
    d, L, H, f = args.dim, args.n_layers, args.n_heads, args.hidden_dim
    kv = args.kv_heads * args.head_dim
    b, T = cfg.micro_batch_size, cfg.seq_len
    per_token_layer = s * (4 * d + 2 * kv + 3 * f) + 8 * d + 4 * H + lora_extra  # + attention's softmax statistics
    alibi_mask = (b if packed else 1) * H * T * T * s / tp if args.pos_emb == "alibi" else 0  # one for all layers
    mask_layer = b * T * T if packed and args.pos_emb != "alibi" else 0
    layer = (b * T * per_token_layer + mask_layer) / tp
    head = b * T * (d * (4 + s) + args.vocab_size * (s if fused_loss else s + 8)) / tp
    kept = {"none": layer, "full": b * T * 4 * d / tp,  # selective: block input, outputs of wq, wv, w1, w2, attention
            "selective": b * T * (4 * d + s * (3 * d + kv + f) + 4 * H) / tp}
    # all but 'none' recompute one block at a time in the backward pass, after the L - n blocks that keep everything
    # (checkpointed: the first n) are done with theirs
    n = cfg.activation_checkpointing_layers or L
    return {mode: (L * layer if mode == "none" else n * kept[mode] + max(L - n, 1) * layer) + alibi_mask + head
            for mode in kept}


def training_plan(args: ModelArgs, family: str, cfg, dp: int, tp: int, meta: dict, notes=()) -> dict:
    """train.py --dry_run once it has resolved the model and the mesh: memory_plan, FLOPs per token and the step time
    at cfg.mfu of the peak, printed as a table (with notes) and returned."""
    m = memory_plan(args, cfg, dp, tp, bool(meta.get("packed")))
    world, tokens_per_step = dp * tp, cfg.global_batch_size * cfg.seq_len
    flops_token = flops_per_token(args, cfg.seq_len)
    if cfg.lora_rank:  # frozen weights need no weight gradients: 4 FLOPs per weight instead of 6, adapters 6
        n_matmul = (flops_token - 12 * args.n_layers * cfg.seq_len * args.dim) // 6
        flops_token += -2 * n_matmul + 6 * m["n_trainable"]
    peak = cfg.peak_flops or DEFAULT_PEAK_FLOPS.get(cfg.dtype, 0.0)
    step_s = tokens_per_step * flops_token / (world * peak * cfg.mfu) if peak else None
    out = {**m, "family": family, "dp": dp, "tp": tp, "devices": world, "flops_per_token": flops_token,
           "tokens_per_step": tokens_per_step, "peak_flops": peak, "step_s": step_s,
           "fits": m["bytes"]["total"] <= cfg.device_memory_gib * 2**30,
           "grad_accum": cfg.global_batch_size // (cfg.micro_batch_size * dp)}
    print("\n".join(plan_lines(out, cfg, meta) + [f"note: {n}" for n in notes]))
    return out


def plan_lines(out: dict, cfg, meta: dict) -> list[str]:
    """training_plan's table: what is trained, the mesh, memory per device term by term, FLOPs and step time."""
    mem, world, tokens_per_step, step_s = out["bytes"], out["devices"], out["tokens_per_step"], out["step_s"]
    gib = lambda x: f"{x / 2**30:10.2f} GiB"  # noqa: E731
    kind = ("QLoRA" if cfg.qlora else "LoRA") + f" rank {cfg.lora_rank}" if cfg.lora_rank else "full training"
    lines = [f"plan: {cfg.model if cfg.init_from in ('scratch', 'resume') else cfg.init_from} ({out['family']}), "
             f"{out['n_params']:,} parameters, {out['n_trainable']:,} trained ({kind})",
             f"mesh: {world} device(s) = dp {out['dp']} x tp {out['tp']}; micro-batch {cfg.micro_batch_size} x "
             f"{cfg.seq_len} tokens, global batch {cfg.global_batch_size} (grad accum {out['grad_accum']}); "
             f"{cfg.dtype}; activation checkpointing {out['activation_checkpointing']}",
             "per device:"]
    for key in ("weights", "gradients", "optimizer", "working weights",
                *(k for k in mem if k.startswith("activations ("))):
        this = key == f"activations ({cfg.activation_checkpointing})"
        lines.append(f"  {key:34s}{gib(mem[key])}" + ("  <- this config" if this else ""))
    lines.append(f"  {'total':34s}{gib(mem['total'])}  {'fits' if out['fits'] else 'does NOT fit'} in "
                 f"{cfg.device_memory_gib:g} GiB (device_memory_gib)")
    lines.append(f"FLOPs per token {out['flops_per_token'] / 1e9:.2f} G; {tokens_per_step:,} tokens per step"
                 + (f"; {cfg.max_iters:,} steps = {cfg.max_iters * tokens_per_step / meta['train_tokens']:.2f} epochs "
                    f"of {cfg.data_dir}" if meta.get("train_tokens") else ""))
    if step_s:
        lines.append(f"step time at MFU {cfg.mfu:.0%} of {out['peak_flops'] / 1e12:.0f} TFLOP/s x {world}: "
                     f"{step_s:.2f} s ({tokens_per_step / step_s / world:,.0f} tokens/s per device); "
                     f"{cfg.max_iters:,} steps = {cfg.max_iters * step_s / 3600:.1f} h")
    else:
        lines.append("step time: set peak_flops (no default peak for float32)")
    return lines
