"""bench.py: training and generation speed, MFU against a torch.mm peak measured in the same run, and loss curves.

    python bench.py --preset=bench-llama --mode=train --dtype=float32            # one JSON line
    python bench.py --preset=bench-llama --mode=generate --dtype=bfloat16 --compile
    python bench.py --mode=train --compare        # ours and transformers' LlamaForCausalLM alternated, medians, ratio
    python bench.py --mode=train --lora_rank=8 [--qlora]    # fine-tuning speed: LoRA adapters (on an NF4 base)
    python bench.py --plot out/a/metrics.jsonl out/b/metrics.jsonl --out=loss.png   # curves + relative difference

Train mode times what train.py runs: forward with the loss, backward, grad clipping, train.py's AdamW, zero_grad;
--dtype=bfloat16 is autocast over fp32 weights, as in train.py. MFU = flops_per_token (model.py:
6N + 12 * n_layers * seq_len * dim) * tokens/s / peak. Generate mode times sample.generate (greedy, static KV cache,
batch_size prompts of prompt_len random tokens, new_tokens each) with the weights in --dtype; its MFU counts 2N FLOPs
per generated token (N = parameters except the input embedding; attention over the cache is left out). The peak is
the best of several square torch.mm of the same dtype, sized like the model's largest matrix, in the same process.
Decoding is bound by memory, not FLOPs: generate mode also reports MBU, the bytes of those weights (as decoding holds
them) times tokens/s over the best rate the device streams them in the same process, and --compare its ratio_bound,
1 / transformers' MBU: the most any decoder reading every weight once per token could beat it by here.
Peak memory is torch.{cuda,npu}.max_memory_allocated on accelerators, the process's ru_maxrss on CPU (in --compare
the process holds both models, so it is one figure for the pair). load_avg_1m is the machine's load at the end: on a
shared CPU other processes take cores and memory bandwidth, so compare only figures from one --compare run.

--lora_rank=R trains rank-R adapters on every block linear (model.apply_lora, as train.py's lora_rank) with the base
frozen, --qlora on an NF4 base. Their MFU counts 4 FLOPs per frozen weight (forward + input gradient), 6 per adapter
weight, plus attention's 12 * n_layers * seq_len * dim.

--compare builds transformers' LlamaForCausalLM with the same config (sdpa attention) and the same weights, the same
batch and train.py's AdamW, then alternates ours and theirs for --rounds rounds (timings drift between runs; only
figures from one run are compared). The first losses / greedy tokens are printed so the workloads can be checked equal.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import kernels
from model import PRESETS, ModelArgs, Transformer, flops_per_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fail(msg: str):
    raise SystemExit(f"bench.py: {msg}")


# --------------------------------------------------------------------------------------------------------------------
# device, peak FLOP/s and memory


def synchronize(device: torch.device):
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).synchronize(device)


def mm_peak_flops(dtype, n: int, device: torch.device, repeats: int = 5, seconds: float = 0.2,
                  budget: float = 4.0) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) torch.mm in dtype over up to `repeats` timings of >= `seconds` each.

    Stops after two timings once `budget` seconds are spent: a CPU without bf16 units takes seconds per bf16 GEMM.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
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


def peak_memory_gib(device: torch.device) -> float:
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device):
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).reset_peak_memory_stats(device)


def figures(fraction: float) -> float:
    """A utilisation to 4 significant figures (a loaded CPU can put MFU below 1e-4, where 4 decimals say nothing)."""
    return float(f"{fraction:.4g}")


def load_average() -> float | None:
    """The machine's 1-minute load average at the end of the run: on a shared machine, how much else was running."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def n_params_flops(model_args: ModelArgs) -> int:
    """N of the MFU formulas: every parameter except the input embedding (flops_per_token's 6N, /6)."""
    return (flops_per_token(model_args, 0)) // 6


# --------------------------------------------------------------------------------------------------------------------
# the two models: ours and transformers' LlamaForCausalLM with the same config and weights


def build_ours(model_args: ModelArgs, device, seed: int) -> Transformer:
    torch.manual_seed(seed)
    with torch.device(device):
        return Transformer(model_args)


def build_hf(model_args: ModelArgs, ours: Transformer, device):
    """transformers' LlamaForCausalLM with sdpa attention and our weights (native layout = HF rotate-half layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert import HF_LAYER

    a = model_args
    if a.pos_emb != "rope" or a.norm_head or a.tie_embeddings or a.z_loss:
        fail("--compare: transformers' LlamaForCausalLM only matches plain LLaMA presets (RoPE, untied, no NormHead)")
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
    from sample import generate

    rows = prompt.tolist()
    out = list(generate(model, rows, new_tokens, temperature=0.0, decode_step=decode_step))  # (new_tokens, B)
    return torch.tensor(out, dtype=torch.long).T  # (B, new_tokens)


def generate_hf(model, prompt, new_tokens: int, _decode_step=None):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    return out[:, prompt.size(1):].cpu()  # (B, new_tokens)


def time_generate(fn, model, prompt, new_tokens, decode_step, device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    t0 = time.perf_counter()
    tokens = fn(model, prompt, new_tokens, decode_step)
    synchronize(device)
    return time.perf_counter() - t0, tokens


# --------------------------------------------------------------------------------------------------------------------
# benchmark


def run_bench(opt, model_args: ModelArgs, device: torch.device) -> dict:
    dtype = DTYPES[opt.dtype]
    if opt.mode == "train" and opt.seq_len > model_args.max_seq_len:
        fail(f"--seq_len={opt.seq_len} is above the preset's max_seq_len={model_args.max_seq_len}")
    if opt.mode == "generate" and opt.prompt_len + opt.new_tokens > model_args.max_seq_len:
        fail(f"--prompt_len + --new_tokens = {opt.prompt_len + opt.new_tokens} is above the preset's "
             f"max_seq_len={model_args.max_seq_len}")
    n = mm_size(model_args)
    peak = mm_peak_flops(dtype, n, device)
    ours = build_ours(model_args, device, opt.seed)
    if opt.lora_rank:
        from model import apply_lora

        apply_lora(ours, opt.lora_rank, alpha=2.0 * opt.lora_rank, quantize_base=opt.qlora)
    g = torch.Generator().manual_seed(opt.seed)
    result = {"mode": opt.mode, "preset": opt.preset, "dtype": opt.dtype, "device": device.type,
              "compile": opt.compile, "batch_size": opt.batch_size, "threads": torch.get_num_threads()}
    if opt.mode == "train":
        data = torch.randint(model_args.vocab_size, (opt.batch_size, opt.seq_len + 1), generator=g).to(device)
        batch = (data[:, :-1], data[:, 1:])  # (B, T) inputs and next-token targets
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        flops_token = flops_per_token(model_args, opt.seq_len)
        basis = "6N + 12*n_layers*seq_len*dim per trained token (model.flops_per_token)"
        if opt.lora_rank:
            adapters = sum(p.numel() for p in ours.parameters() if p.requires_grad)
            flops_token += 6 * adapters - 2 * n_params_flops(model_args)
            basis = "4N frozen + 6 per adapter weight + 12*n_layers*seq_len*dim per trained token"
            result.update(lora_rank=opt.lora_rank, qlora=opt.qlora, trainable_params=adapters)
        tokens_per_call = opt.batch_size * opt.seq_len
        result.update(seq_len=opt.seq_len, steps=opt.steps, mfu_flops_per_token=flops_token, mfu_basis=basis)

        def workload(model, hf):
            model.train()
            if opt.compile:
                compile_blocks(model.model.layers if hf else model.layers)
            step = train_step_fn(model, optimizer_for(model, device), autocast, hf)
            for _ in range(opt.warmup):
                step(*batch)
            return lambda: time_train(step, batch, opt.steps, device)
    else:
        prompt = torch.randint(model_args.vocab_size, (opt.batch_size, opt.prompt_len), generator=g).to(device)
        flops_token = 2 * n_params_flops(model_args)
        tokens_per_call = opt.batch_size * opt.new_tokens
        result.update(prompt_len=opt.prompt_len, new_tokens=opt.new_tokens, mfu_flops_per_token=flops_token,
                      mfu_basis="2N per generated token (N: parameters except the input embedding; attention "
                                "over the KV cache not counted)")

        def workload(model, hf):
            model.to(dtype).eval()
            if not hf:
                model.init_buffers()  # RoPE tables back to fp32 after .to(dtype)
                from sample import decode_layout

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
                for _ in range(opt.warmup):
                    fn(model, prompt, opt.new_tokens, decode_step)

            def timed():
                with torch.inference_mode():
                    return time_generate(fn, model, prompt, opt.new_tokens, decode_step, device)

            return timed

    # a bf16 MFU can exceed 1 where the device has no bf16 units: also give it against the fp32 peak
    peak_fp32 = peak if dtype == torch.float32 else mm_peak_flops(torch.float32, n, device)

    def summary(seconds: list[float]) -> dict:
        tokens_per_s = tokens_per_call / statistics.median(seconds)
        row = {"tokens_per_s": round(tokens_per_s, 2), "mfu": figures(flops_token * tokens_per_s / peak)}
        if dtype != torch.float32:
            row["mfu_vs_fp32_peak"] = figures(flops_token * tokens_per_s / peak_fp32)
        if stream:  # generate: the fraction of the weight-streaming bound reached
            row["mbu"] = figures(result["bytes_per_token"] * tokens_per_s / stream)
        row["tokens_per_s_runs"] = [round(tokens_per_call / s, 2) for s in seconds]
        return row

    result.update(mm_peak_flops=round(peak), mm_size=n, params=ours.num_params())
    if dtype != torch.float32:
        result["mm_peak_flops_fp32"] = round(peak_fp32)
    reset_peak_memory(device)
    stream = None

    def measure_stream():  # after workload(ours): the weights as decoding holds them (dtype, decode_layout)
        nonlocal stream
        weights = [t for name, t in [*ours.named_parameters(), *ours.named_buffers()]
                   if t.dim() == 2 and not name.startswith(("tok_embeddings.", "rope_"))]
        stream = stream_peak_bytes(weights, device)
        result.update(bytes_per_token=sum(t.numel() * t.element_size() for t in weights),
                      stream_peak_bytes_per_s=round(stream))

    if not opt.compare:
        timed = workload(ours, hf=False)
        if opt.mode == "generate":
            measure_stream()
        runs = [timed() for _ in range(opt.rounds)]
        result.update(summary([s for s, _ in runs]), peak_mem_gib=round(peak_memory_gib(device), 3),
                      load_avg_1m=load_average())
        if opt.mode == "train":
            result["last_loss"] = round(runs[-1][1], 4)
        return result

    hf = build_hf(model_args, ours, device)
    timed = {"ours": workload(ours, hf=False), "transformers": workload(hf, hf=True)}
    if opt.mode == "generate":
        measure_stream()
    seconds, outputs = {k: [] for k in timed}, {}
    for _ in range(opt.rounds):  # alternate, so drifts in machine speed hit both alike
        for name, fn in timed.items():
            s, out = fn()
            seconds[name].append(s)
            outputs.setdefault(name, out)
    for name in timed:
        result[name] = summary(seconds[name])
    result["ratio"] = round(result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3)
    if stream:  # no decoder that reads every weight once per token can beat transformers by more than this
        result["ratio_bound"] = round(1 / result["transformers"]["mbu"], 3)
    if opt.mode == "train":  # both took the same steps from the same weights and data: losses must agree
        result["first_round_last_loss"] = {k: round(v, 5) for k, v in outputs.items()}
    else:
        same = outputs["ours"].shape == outputs["transformers"].shape and \
            (outputs["ours"] == outputs["transformers"]).float().mean().item()
        result["greedy_tokens_agree"] = round(float(same), 4)  # fraction of equal tokens (bf16 may diverge)
    result["peak_mem_gib"] = round(peak_memory_gib(device), 3)
    result["load_avg_1m"] = load_average()
    return result


# --------------------------------------------------------------------------------------------------------------------
# --plot: loss curves of train.py runs, and the relative difference of two


def read_losses(path: str) -> dict[int, float]:
    """step -> training loss from a train.py metrics.jsonl (rows with "step" and "loss"; val rows are skipped)."""
    if not os.path.isfile(path):
        fail(f"--plot: {path}: no such file (expected a train.py metrics.jsonl)")
    losses = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                fail(f"--plot: {path}: line {n}: expected a JSON object")
            if isinstance(row, dict) and "step" in row and "loss" in row:
                losses[int(row["step"])] = float(row["loss"])
    if not losses:
        fail(f"--plot: {path}: no rows with 'step' and 'loss' (is it a train.py metrics.jsonl?)")
    return losses


def relative_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """Per-step |loss_b - loss_a| / |loss_a| over the steps both runs logged (a is the reference)."""
    steps = sorted(set(a) & set(b))
    if not steps:
        fail("--plot: the two runs have no logged step in common")
    rel = [abs(b[s] - a[s]) / max(abs(a[s]), 1e-12) for s in steps]
    return {"rel_diff_max": max(rel), "rel_diff_mean": sum(rel) / len(rel), "steps_compared": len(steps),
            "worst_step": steps[rel.index(max(rel))]}


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
        fail(f"--out={out}: cannot write ({e.strerror})")
    finally:
        plt.close(fig)
    return result


# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-llama", help="a model.PRESETS name")
    p.add_argument("--model_args", default=None, help='ModelArgs overrides as JSON, e.g. \'{"n_layers": 4}\'')
    p.add_argument("--mode", choices=["train", "generate"], default="train")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--compile", action="store_true", help="compile the blocks (train) / the decode step (generate)")
    p.add_argument("--batch_size", type=int, default=None, help="default 4 for train, 1 for generate")
    p.add_argument("--seq_len", type=int, default=256, help="train: tokens per sequence")
    p.add_argument("--prompt_len", type=int, default=16, help="generate: prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128, help="generate: tokens generated per prompt")
    p.add_argument("--steps", type=int, default=3, help="train: optimiser steps per timing")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1, 3 with --compile)")
    p.add_argument("--rounds", type=int, default=3, help="timings per model (medians reported)")
    p.add_argument("--compare", action="store_true", help="also run transformers' LlamaForCausalLM, alternated")
    p.add_argument("--lora_rank", type=int, default=0, help="train: rank of LoRA adapters (0 = full training)")
    p.add_argument("--qlora", action="store_true", help="train: --lora_rank adapters on an NF4-quantised base")
    p.add_argument("--device", default=None, help="default: kernels.device_type()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", nargs="+", default=None, metavar="METRICS_JSONL", help="plot train.py loss curves")
    p.add_argument("--out", default="loss.png", help="--plot: the PNG to write")
    p.add_argument("--overwrite", action="store_true", help="--plot: replace an existing --out")
    opt = p.parse_args(argv)
    opt.batch_size = opt.batch_size or (4 if opt.mode == "train" else 1)
    opt.warmup = opt.warmup if opt.warmup is not None else (3 if opt.compile else 1)
    for key in ("batch_size", "seq_len", "prompt_len", "new_tokens", "steps", "rounds"):
        if getattr(opt, key) <= 0:
            fail(f"--{key}={getattr(opt, key)}: expected a positive integer")
    if opt.warmup < 0:
        fail(f"--warmup={opt.warmup}: expected >= 0")
    if opt.lora_rank < 0 or (opt.qlora and not opt.lora_rank):
        fail(f"--lora_rank={opt.lora_rank}: expected a positive rank with --qlora, >= 0 otherwise")
    if opt.lora_rank and (opt.mode != "train" or opt.compare):
        fail("--lora_rank: fine-tuning speed is measured in --mode=train, without --compare (transformers has no "
             "LoRA without peft)")
    return opt


def model_args_for(opt) -> ModelArgs:
    if opt.preset not in PRESETS:
        fail(f"--preset={opt.preset!r}: unknown; expected one of {', '.join(PRESETS)}")
    args = PRESETS[opt.preset]
    if opt.model_args:
        try:
            overrides = json.loads(opt.model_args)
            assert isinstance(overrides, dict)
            args = ModelArgs(**{**args.__dict__, **overrides})
        except (json.JSONDecodeError, AssertionError):
            fail(f"--model_args={opt.model_args!r}: expected a JSON object of ModelArgs fields")
        except (TypeError, ValueError) as e:
            fail(f"--model_args: {e}")
    return args


def main(argv=None) -> dict:
    opt = parse_args(sys.argv[1:] if argv is None else argv)
    if opt.plot:
        if os.path.exists(opt.out) and not opt.overwrite:
            fail(f"--out={opt.out} exists; pass --overwrite to replace it")
        result = plot(opt.plot, opt.out)
    else:
        device = torch.device(opt.device or kernels.device_type())
        result = run_bench(opt, model_args_for(opt), device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
