"""train.py: pretraining and supervised fine-tuning of model.py's Transformer, with exact resume.

    python train.py config/default.py                          # the default small model on data/default
    python train.py config/default.py --max_iters=100 --dtype=bfloat16
    python train.py config/default.py --init_from=resume       # continue the run in out_dir exactly
    python train.py config/sft_tiny.py --init_from=path/to/checkpoint_dir   # fine-tune converted weights

Configuration is nanoGPT-style: the defaults are the fields of `Config` below; each config/<recipe>.py assigns some
of them as plain Python globals; `--key=value` overrides come last (values parsed with ast.literal_eval, anything
that is not a Python literal is a string). Every value is type-checked against its default. The model is a preset
of model.PRESETS (`model='tiny'`) plus overrides of any ModelArgs field (`--n_layers=4`).

Data (prepare.py's output dir): train.bin / val.bin memmapped tokens, train.mask.bin / val.mask.bin
for instruction data (loss only on mask=1 tokens), meta.json. Training walks through the tokens in epochs of
non-overlapping seq_len windows in an order drawn from (seed, epoch), so the data position is two integers.

Checkpoints: out_dir/step_XXXXXXXX/, written under a temporary name and renamed when complete:
    .metadata, *.distcp     torch.distributed.checkpoint of {"model": model state dict, "optim": optimiser state}
                            (parameter names as in model.py, whatever the sharding: FSDP2 / TP runs save the same)
    train_state.json        step, loss scaler, data position, config, counters, and "files": the size and sha256 of
                            every other file (resume checks them; a damaged step dir is reported, the one before used)
    rng_rank{r}.json        each rank's torch RNG state
    config.json             ModelArgs fields + "family" (the checkpoint-dir config, so convert.py can export)
    tokenizer files         copied from the data dir
convert.py's dcp_to_native() turns a step dir into a checkpoint dir; with export=True train.py does that at the end.

Distributed (torchrun) runs the same code on a (dp, tp) device mesh; a single process is the trivial (1, 1) mesh
and needs no process group. FSDP2 shards over dp, tensor + sequence parallelism splits each block over tp:

    torchrun --standalone --nproc_per_node=4 train.py config/default.py --tp=2   # dp=2 x tp=2
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST0 --nproc_per_node=8 train.py ...   # and node_rank=1 on HOST1
"""

import ast
import ctypes
import difflib
import functools
import hashlib
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from tqdm import tqdm

import kernels
from model import LORA_DEFAULT_TARGETS, PRESET_FAMILY, PRESETS, CheckpointError, ModelArgs, NF4Linear, Transformer, \
    apply_lora, flops_per_token, load_tensors, lora_state_dict, read_config



@dataclass
class Config:
    # I/O
    out_dir: str = "out/default"
    data_dir: str = "data/default"
    init_from: str = "scratch"  # 'scratch' | 'resume' (latest complete step in out_dir) | a checkpoint dir | a step dir
    overwrite: bool = False  # allow init_from='scratch' to replace another run in out_dir
    # model: a preset of model.PRESETS; any ModelArgs field can be overridden as a key of its own (--n_layers=4)
    model: str = "tiny"
    # batch: global_batch_size sequences per optimiser step = micro_batch_size * dp * gradient accumulation steps
    seq_len: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 8
    # AdamW and the schedule: linear warmup to lr, then cosine decay to min_lr at lr_decay_iters
    max_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 1000
    weight_decay: float = 0.1  # matrices only; norms gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    seed: int = 1337
    # precision: 'float32' | 'bfloat16' (autocast) | 'float16' (autocast + dynamic loss scaling)
    dtype: str = "float32"
    loss_scale: float = 65536.0  # initial float16 loss scale
    loss_scale_window: int = 1000  # good steps before the scale doubles
    compile: bool = False
    # parallelism under torchrun: a (dp, tp) device mesh over the WORLD_SIZE processes
    dp: int = 0  # data parallel (FSDP2) degree; 0 = WORLD_SIZE // tp
    tp: int = 1  # tensor parallel degree (sequence-parallel norms); must divide n_heads, n_kv_heads and seq_len
    # 'none' | 'full' (keep each block's input, recompute the block) | 'selective' (per op, as torchtitan: keep the
    # attention outputs and every other matmul output, recompute the rest: norms, RoPE, SwiGLU, the other matmuls)
    activation_checkpointing: str = "none"
    dist_timeout_s: int = 600  # collective timeout: a dead or stuck rank makes the others exit after this long
    # eval, logs, checkpoints
    eval_interval: int = 200
    eval_iters: int = 20
    log_interval: int = 10
    ckpt_interval: int = 200
    keep_last: int = 2  # step dirs kept in out_dir; 0 keeps all
    export: bool = False  # write out_dir/export (a checkpoint dir for sample.py) at the end
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure a torch.mm peak at start
    # LoRA / QLoRA (model.py's LoRA section): adapters on the lora_targets linear layers of the base model in
    # init_from; only they train. The run ends with out_dir/adapter and, with export, the merged checkpoint dir
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = LORA_DEFAULT_TARGETS  # comma-separated fnmatch patterns: "wq,wv", "*.attention.*"
    qlora: bool = False  # keep the frozen block weights in 4-bit NF4, dequantised per matmul
    # --dry_run: print parameters, per-device memory and step time of this config on its mesh, then exit (plan())
    dry_run: bool = False
    devices: int = 0  # devices the plan is for; 0 = the launched world size (WORLD_SIZE, else 1)
    device_memory_gib: float = 64.0  # per device, what the plan's total is checked against (Ascend 910B: 64)
    mfu: float = 0.4  # model FLOPs utilisation the plan's step time assumes


MODEL_FIELDS = {f.name: f for f in fields(ModelArgs)}
MAX_SKIPPED_IN_A_ROW = 32  # float16 steps skipped in a row (loss scale / 2^32) before a run stops as diverged
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(msg: str):
    """One clear line for a person, non-zero exit, no traceback."""
    raise SystemExit(f"train.py: {msg}")


# --------------------------------------------------------------------------------------------------------------------
# configuration: defaults < config files < --key=value


def _expected_type(key):
    """(type name, check) for a config key: a Config field or a ModelArgs field."""
    default = getattr(Config, key) if key in Config.__dataclass_fields__ else MODEL_FIELDS[key].default
    if default is None:  # Optional[int] fields such as n_kv_heads
        return "int or None", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))
    if isinstance(default, bool):
        return "bool", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "int", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return "str", lambda v: isinstance(v, str)


def _set(values: dict, key: str, value, where: str):
    known = list(Config.__dataclass_fields__) + list(MODEL_FIELDS)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        fail(f"{where}: unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    type_name, ok = _expected_type(key)
    if not ok(value):
        fail(f"{where}: {key}={value!r} has type {type(value).__name__}, expected {type_name}")
    if type_name == "float":
        value = float(value)
    values[key] = value


def parse_config(argv) -> tuple[Config, dict]:
    """argv (without the program name) -> (Config, ModelArgs overrides)."""
    if "-h" in argv or "--help" in argv:
        keys = "\n".join(f"  --{k}={getattr(Config, k)!r}" for k in Config.__dataclass_fields__)
        print(f"{__doc__}\nkeys and defaults:\n{keys}\n  and every ModelArgs field: {', '.join(MODEL_FIELDS)}")
        raise SystemExit(0)
    values = {}
    # config files first, then --key=value, wherever they stand on the command line
    for arg in sorted(argv, key=lambda a: a.startswith("--")):
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:  # a bare --flag sets a bool key
                if key in Config.__dataclass_fields__ and isinstance(getattr(Config, key), bool):
                    _set(values, key, True, arg)
                    continue
                fail(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a Python literal: a string such as a path
            _set(values, key, value, arg)
        else:
            path = Path(arg)
            if not path.is_file():
                fail(f"{arg}: config file not found (expected config/<recipe>.py or --key=value)")
            namespace = {}
            try:
                exec(compile(path.read_text(), str(path), "exec"), namespace)
            except Exception as e:  # a config file is the user's Python: report where it broke, in one line
                line = getattr(e, "lineno", None)
                fail(f"{path}" + (f": line {line}" if line else "") + f": {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    _set(values, key, value, str(path))
    train = {k: v for k, v in values.items() if k in Config.__dataclass_fields__}
    model_overrides = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    return Config(**train), model_overrides


def model_args_for(cfg: Config, overrides: dict, meta: dict) -> tuple[ModelArgs, str]:
    """The run's ModelArgs and family: from the checkpoint when fine-tuning, else the preset; then the overrides."""
    if cfg.init_from not in ("scratch", "resume"):
        try:
            base, config = read_config(cfg.init_from)
        except CheckpointError as e:
            fail(f"init_from: {e}")
        family = config.get("family", "llama")
    else:
        if cfg.model not in PRESETS:
            close = difflib.get_close_matches(cfg.model, list(PRESETS), n=1)
            fail(f"model={cfg.model!r}: unknown preset" + (f"; did you mean {close[0]!r}?" if close else "")
                 + f" (presets: {', '.join(PRESETS)})")
        base, family = PRESETS[cfg.model], PRESET_FAMILY[cfg.model]
        if "vocab_size" not in overrides:  # a model trained from scratch takes the data's vocabulary
            base = replace(base, vocab_size=meta["vocab_size"])
    try:
        args = replace(base, **overrides)
    except ValueError as e:
        fail(str(e))
    if cfg.seq_len > args.max_seq_len:
        fail(f"seq_len={cfg.seq_len} is above the model's max_seq_len={args.max_seq_len}")
    if meta["vocab_size"] > args.vocab_size:
        fail(f"{cfg.data_dir}/meta.json: vocab_size={meta['vocab_size']} is larger than the model's "
             f"vocab_size={args.vocab_size} (was the data prepared with this model's tokenizer?)")
    return args, family


def check_config(cfg: Config):
    if cfg.dtype not in DTYPES:
        fail(f"dtype={cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    for key in ("seq_len", "micro_batch_size", "global_batch_size", "max_iters", "eval_iters", "log_interval",
                "eval_interval", "ckpt_interval"):
        if getattr(cfg, key) <= 0:
            fail(f"{key}={getattr(cfg, key)}: expected a positive integer")
    if cfg.lora_rank < 0 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1:
        fail(f"lora_rank={cfg.lora_rank}, lora_alpha={cfg.lora_alpha}, lora_dropout={cfg.lora_dropout}: expected "
             "lora_rank >= 0 (0 = no adapters), lora_alpha > 0 and 0 <= lora_dropout < 1")
    if cfg.qlora and not cfg.lora_rank:
        fail("qlora=True trains adapters on a 4-bit base: set lora_rank too (e.g. --lora_rank=8)")
    if cfg.lora_rank and cfg.init_from not in ("scratch", "resume") and (Path(cfg.init_from) / ".metadata").exists():
        fail(f"init_from={cfg.init_from}: LoRA needs a checkpoint dir as its base; export the step dir first "
             f"(python convert.py dcp-to-native --src={cfg.init_from} --dst=...)")


# --------------------------------------------------------------------------------------------------------------------
# distributed setup: a (dp, tp) device mesh; one process is the trivial (1, 1) mesh without a process group


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    mesh: object = None  # torch DeviceMesh with dims ("dp", "tp"), None in one process
    own_group: bool = False  # this run joined the process group (and leaves it at the end)

    @property
    def master(self) -> bool:
        return self.rank == 0


AC_MODES = ("none", "full", "selective")
RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets beside WORLD_SIZE


def setup_distributed(cfg: Config, args: ModelArgs) -> Dist:
    """Check the mesh against the launch and the model, then join the process group and build the (dp, tp) mesh.

    Every check runs before the first collective, on every rank: bad input is one clear line and an exit, never a
    hang at the rendezvous. Collectives time out after dist_timeout_s, so a dead rank cannot hang the others.
    """
    from datetime import timedelta

    env = os.environ
    if not env.get("WORLD_SIZE", "1").isdigit() or int(env.get("WORLD_SIZE", "1")) < 1:
        fail(f"WORLD_SIZE={env['WORLD_SIZE']!r}: expected a positive integer (torchrun sets it)")
    world_size = int(env.get("WORLD_SIZE", "1"))
    if cfg.activation_checkpointing not in AC_MODES:
        fail(f"activation_checkpointing={cfg.activation_checkpointing!r}: expected one of {', '.join(AC_MODES)}")
    if cfg.dist_timeout_s <= 0 or cfg.tp < 1 or cfg.dp < 0:
        fail(f"dist_timeout_s={cfg.dist_timeout_s}, tp={cfg.tp}, dp={cfg.dp}: expected dist_timeout_s > 0, tp >= 1 "
             "and dp >= 0 (0 = WORLD_SIZE // tp)")
    dp = cfg.dp or max(1, world_size // cfg.tp)
    if dp * cfg.tp != world_size:
        fail(f"dp={dp} x tp={cfg.tp} = {dp * cfg.tp} processes, but WORLD_SIZE={world_size}: dp * tp must be the "
             f"number of processes (--nnodes x --nproc_per_node of torchrun)")
    if cfg.tp > 1:
        for key, n in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("seq_len", cfg.seq_len)):
            if n % cfg.tp:
                fail(f"tp={cfg.tp} does not divide {key}={n}: each tensor-parallel rank holds whole attention heads "
                     "and an equal slice of the sequence")
        if args.tie_embeddings or cfg.lora_rank:
            fail(f"tp={cfg.tp} with {'tie_embeddings' if args.tie_embeddings else 'lora_rank'}: not supported; "
                 "use data parallelism (--tp=1)")
    if world_size == 1:
        return Dist()
    missing = [k for k in RENDEZVOUS_ENV if k not in env]
    if missing:
        fail(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun --nproc_per_node=N "
             "(and --nnodes, --node_rank, --master_addr across machines)")
    if not (env["RANK"].isdigit() and env["LOCAL_RANK"].isdigit() and int(env["RANK"]) < world_size):
        fail(f"RANK={env['RANK']!r}, LOCAL_RANK={env['LOCAL_RANK']!r}: expected integers, RANK < WORLD_SIZE")
    from torch.distributed.device_mesh import init_device_mesh

    device = kernels.device_type()
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    if device != "cpu":
        getattr(torch, device).set_device(local_rank)
    own_group = not dist.is_initialized()  # a caller may have joined already, to run several trainings in a launch
    if own_group:
        dist.init_process_group(kernels.dist_backend(device), timeout=timedelta(seconds=cfg.dist_timeout_s))
    mesh = init_device_mesh(device, (dp, cfg.tp), mesh_dim_names=("dp", "tp"))
    return Dist(rank, world_size, local_rank, dp=dp, dp_rank=mesh.get_local_rank("dp"), tp=cfg.tp,
                tp_rank=mesh.get_local_rank("tp"), mesh=mesh, own_group=own_group)


def barrier(d: Dist):
    if d.world_size > 1:
        dist.barrier()


def mean_over_ranks(x: float, d: Dist) -> float:
    return sum(gather_over_ranks(x, d)) / d.world_size


def gather_over_ranks(x: float, d: Dist) -> list[float]:
    """Every rank's value of x, in rank order (a collective: every rank calls it)."""
    if d.world_size == 1:
        return [x]
    t = torch.tensor([x], dtype=torch.float64, device=_device(d))
    out = [torch.zeros_like(t) for _ in range(d.world_size)]
    dist.all_gather(out, t)
    return [v.item() for v in out]


def loss_parallel_context(d: Dist):
    """Forward and backward of a tensor-parallel model run in torch's loss_parallel: its logits are sharded on the
    vocabulary and model.vocab_parallel_cross_entropy computes the loss on the shards."""
    if d.tp == 1:
        return nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _device(d: Dist) -> torch.device:
    kind = kernels.device_type()
    return torch.device(kind, d.local_rank) if kind in ("cuda", "npu") else torch.device(kind)


def build_lora_model(args: ModelArgs, cfg: Config, device: torch.device) -> Transformer:
    """The frozen base with adapters on cfg.lora_targets, built layer by layer from the meta device: each linear gets
    its weights (memory-mapped from init_from, or drawn as from scratch) just before it is wrapped, and QLoRA quantises
    it then, so the full-precision base never sits in memory as a whole. On resume the values are placeholders that
    load_checkpoint overwrites (the step dirs hold the base too, so a resumed run does not need init_from)."""
    with torch.device("meta"):
        model = Transformer(args)
    tensors = load_tensors(cfg.init_from) if cfg.init_from not in ("scratch", "resume") else None
    frozen_dtype = DTYPES[cfg.dtype]  # frozen weights need no fp32 master copy: keep them in the compute dtype
    torch.manual_seed(cfg.seed)

    def fill(name: str, module: torch.nn.Module):
        module.to_empty(device=device, recurse=False)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if tensors is not None:
                if full not in tensors or tensors[full].shape != p.shape:
                    fail(f"init_from={cfg.init_from}: tensor {full} is missing or has another shape than the "
                         f"config's {tuple(p.shape)}")
                p.data = tensors[full].to(device=device, dtype=frozen_dtype)
            else:
                model.init_parameter(full, p)
                p.data = p.data.to(frozen_dtype)

    try:
        adapted = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                             quantize_base=cfg.qlora, fill=fill)
    except ValueError as e:
        fail(str(e))
    for name, module in model.named_modules():  # what apply_lora did not reach: embeddings, norms, the head
        if any(p.is_meta for p in module.parameters(recurse=False)):
            fill(name, module)
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_meta:
                setattr(module, bname, torch.empty_like(buf, device=device))
    model.init_buffers()
    for p in lora_state_dict(model).values():  # adapters train in fp32 whatever the frozen dtype
        p.data = p.data.to(device=device, dtype=torch.float32)
    model.lora_adapted = adapted
    return model


def apply_activation_checkpointing(model: Transformer, mode: str):
    """Keep less of each block's activations for the backward pass, and recompute the rest there.

    'full': only the block's input is kept; the whole block runs again in the backward pass. 'selective': per op, as
    torchtitan's op-level policy: attention outputs and every other matmul output are kept, the rest recomputed.
    The block's forward is wrapped in place (not by checkpoint_wrapper), so parameter names stay model.py's.
    """
    if mode == "none":
        return
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def selective_contexts():
        mm_count = {False: 0, True: 0}  # per pass: the recompute must make the forward pass's choices again

        def policy(ctx, op, *args, **kwargs):
            if op is torch.ops.aten.mm.default:
                mm_count[ctx.is_recompute] += 1
                keep = mm_count[ctx.is_recompute] % 2 == 1
            else:
                keep = op.__name__.startswith(("_scaled_dot_product", "npu_fusion_attention"))
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    options = {"context_fn": selective_contexts} if mode == "selective" else {}
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, **options)


def apply_tensor_parallel(model: Transformer, d: Dist):
    """Tensor parallel over the mesh's "tp" dimension with sequence parallelism, as torchtitan does for LLaMA.

    wq, wk, wv, w1, w3 are split by output columns (whole heads per rank: q and kv heads, so GQA and ALiBi slopes
    split with them), wo and w2 by input rows. Between the matmuls the residual stream and the norms hold a slice of
    the sequence, (B, T/tp, dim). The embedding is split by vocabulary rows, the output (NormHead too: each rank
    normalises whole rows) by vocabulary columns; the loss is computed on the vocab-sharded logits.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    mesh = d.mesh["tp"]
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    heads = model.args.n_heads // d.tp
    for layer in model.layers:
        parallelize_module(layer, mesh, {
            "attention_norm": SequenceParallel(),
            # Attention(x, cos, sin): x gathered to the whole sequence; the RoPE tables are not sharded
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
        attention = layer.attention  # this rank's heads: model.init_buffers gives it their ALiBi slopes
        attention.heads = slice(d.tp_rank * heads, (d.tp_rank + 1) * heads)
        if attention.alibi_slopes is not None:
            attention.alibi_slopes = torch.empty(heads, device=attention.alibi_slopes.device)


def set_mmap_threshold(nbytes: int):
    """glibc: serve allocations of nbytes and more with mmap, so they go back to the OS when freed (smaller ones come
    from its heap and are reused). Not glibc: no mallopt, nothing to do."""
    try:
        set_mmap_threshold.changed = bool(ctypes.CDLL(None).mallopt(-3, nbytes))  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass


set_mmap_threshold.changed = False


def build_model(args: ModelArgs, cfg: Config, d: Dist) -> torch.nn.Module:
    """The model, then (torchtitan's order) activation checkpointing, compile, tensor parallel, FSDP2 over dp.

    Built on the meta device, so a rank allocates only its shards. A run from scratch starts from the same weights
    whatever the mesh and the device: rank 0 draws the whole model on the CPU with this seed and broadcasts it, each
    rank keeping its shards (set_model_state_dict with broadcast_from_rank0); a run that loads weights (resume,
    init_from) skips the draw. A LoRA model comes from build_lora_model already materialised, with its base loaded:
    sharding keeps its values.
    """
    if cfg.lora_rank:
        # A multi-GB frozen base on the CPU, built and then dequantised a slice at a time, mixes long-lived buffers
        # with GBs of short-lived scratch: glibc's heap fragments into GBs of holes (QLoRA baichuan-7b peaked at
        # 8.5 GiB; 7.0 GiB and rising mid-step with the heap kept for blocks under 32 MB after building). With
        # every block of 1 MB or more mmapped and returned at free it peaks at 5.5 GiB, for page faults that cost
        # ~30% more wall time on that run and ~25% on bench-llama; so only LoRA on a CPU pays them.
        if _device(d).type == "cpu":
            set_mmap_threshold(1 << 20)
        model = build_lora_model(args, cfg, _device(d))
    else:
        with torch.device("meta"):
            model = Transformer(args)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        for layer in model.layers:  # per block, before sharding, as torchtitan does; state dict names unchanged
            layer.compile()
    if d.tp > 1:
        apply_tensor_parallel(model, d)
    if d.dp > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = DTYPES[cfg.dtype]
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=d.mesh["dp"], mp_policy=mp)
        fully_shard(model, mesh=d.mesh["dp"], mp_policy=mp)
    if cfg.lora_rank:
        return model
    model.to_empty(device=_device(d))
    model.init_buffers()
    if cfg.init_from == "scratch" and d.world_size == 1 and _device(d).type == "cpu":
        torch.manual_seed(cfg.seed)  # the very draws of the path below, without a second copy of the model
        model.init_weights()
    elif cfg.init_from == "scratch":
        full = {}
        if d.master:
            with torch.device("meta"):
                whole = Transformer(args)
            whole.to_empty(device="cpu")
            torch.manual_seed(cfg.seed)
            whole.init_weights()
            full = whole.state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world_size > 1)
        set_model_state_dict(model, full, options=options)
    return model


def local_state_bytes(model, optimizer) -> int:
    """Bytes of parameters and optimiser state held by this rank: its shards under FSDP and TP."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(nbytes(t) for t in [*model.parameters(), *state])


def build_optimizer(model, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, linear weights) only, not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu", "npu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def get_lr(step: int, cfg: Config) -> float:
    """Linear warmup over warmup_iters, then cosine from lr down to min_lr at lr_decay_iters, then min_lr."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class LossScaler:
    """Dynamic loss scaling for float16: the loss is multiplied by `scale` so small gradients survive in fp16.

    A step whose gradients overflow is skipped and the scale halved; after `window` good steps in a row it doubles.
    Disabled (scale 1, never skips) for float32 and bfloat16.
    """

    def __init__(self, enabled: bool, scale: float, window: int):
        self.enabled, self.scale, self.window = enabled, scale if enabled else 1.0, window
        self.good_steps = 0
        self.skipped = 0

    def unscale_(self, params):
        if self.enabled:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool):
        if not self.enabled:
            return
        if not finite:
            self.scale, self.good_steps, self.skipped = self.scale / 2, 0, self.skipped + 1
            return
        self.good_steps += 1
        if self.good_steps == self.window:
            self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state["skipped"]


# --------------------------------------------------------------------------------------------------------------------
# data


def load_meta(data_dir: str) -> dict:
    path = Path(data_dir)
    if not path.is_dir():
        fail(f"data_dir={data_dir}: not found (run `python prepare.py` first, or set --data_dir)")
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        fail(f"{file}: not found (is {data_dir} a prepare.py output dir?)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{file}: not valid JSON ({e})")
    if not isinstance(meta, dict):
        fail(f"{file}: expected a JSON object")
    for key, kind in (("dtype", str), ("vocab_size", int)):
        if not isinstance(meta.get(key), kind):
            fail(f"{file}: expected field {key!r} of type {kind.__name__}, got {meta.get(key)!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        fail(f"{file}: dtype={meta['dtype']!r}, expected 'uint16' or 'uint32'")
    return meta


class TokenSplit:
    """One split's memmapped tokens as (B, T) windows: inputs, next-token targets, loss masks, document ids.

    Text is one stream of documents, read in windows at any offset. Data that prepare.py packed (`packed` in
    meta.json) is rows of exactly seq_len tokens holding whole documents: windows are the rows, attention stays
    within each document (doc_ids from {split}.docs.bin), and a row's last target (the next row's first token) does
    not count.
    """

    def __init__(self, data_dir: str, split: str, meta: dict, seq_len: int):
        file = Path(data_dir) / f"{split}.bin"
        if not file.exists():
            fail(f"{file}: not found")
        if file.stat().st_size == 0:
            fail(f"{file}: empty (no tokens)")
        itemsize = np.dtype(meta["dtype"]).itemsize
        if file.stat().st_size % itemsize:
            fail(f"{file}: size {file.stat().st_size} is not a multiple of {meta['dtype']}'s {itemsize} bytes")
        self.tokens = np.memmap(file, dtype=meta["dtype"], mode="r")
        mask_file = Path(data_dir) / f"{split}.mask.bin"
        self.mask = None
        if mask_file.exists():
            if mask_file.stat().st_size != len(self.tokens):  # one uint8 per token
                fail(f"{mask_file}: {mask_file.stat().st_size} entries for {len(self.tokens)} tokens in {file.name}")
            self.mask = np.memmap(mask_file, dtype=np.uint8, mode="r")
        self.packed = bool(meta.get("packed"))
        self.doc_starts = None
        if self.packed:
            if meta.get("seq_len") != seq_len:
                fail(f"{Path(data_dir) / 'meta.json'}: the data is packed in rows of {meta.get('seq_len')} tokens; "
                     f"train with --seq_len={meta.get('seq_len')}")
            docs_file = Path(data_dir) / f"{split}.docs.bin"
            if docs_file.exists():  # int64 start offset of every document, then the total
                self.doc_starts = np.fromfile(docs_file, dtype=np.int64)[:-1]
        self.seq_len, self.file = seq_len, file
        if len(self.tokens) < seq_len + (0 if self.packed else 1):
            fail(f"{file}: {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")

    def check_ids(self, vocab_size: int, chunk: int = 1 << 24):
        """Fail on a token id the model has no embedding for (data from another tokenizer): one chunked pass."""
        for start in range(0, len(self.tokens), chunk):
            piece = np.asarray(self.tokens[start : start + chunk])
            if piece.max() >= vocab_size:
                i = start + int(np.argmax(piece >= vocab_size))
                fail(f"{self.file}: token id {int(self.tokens[i])} at position {i} is not below the model's "
                     f"vocab_size={vocab_size} (prepared with another tokenizer?)")

    def _rows(self, array, starts, length, pad):
        out = np.full((len(starts), length), pad, dtype=np.int64)
        for i, s in enumerate(starts):
            piece = array[s : s + length]  # the last packed row has no next token to read
            out[i, : len(piece)] = piece
        return out

    def batch(self, starts, device):
        """Windows starting at `starts` -> x (B, T), y (B, T) shifted by one, loss_mask (B, T) or None,
        doc_ids (B, T) or None."""
        T = self.seq_len
        rows = self._rows(self.tokens, starts, T + 1, 0)  # (B, T + 1)
        x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
        mask = doc_ids = None
        if self.mask is not None:  # the mask marks tokens that count as targets
            mask = torch.from_numpy(self._rows(self.mask, [s + 1 for s in starts], T, 0))
        if self.packed:
            mask = torch.ones_like(y) if mask is None else mask
            mask[:, -1] = 0  # the next row's first token belongs to another row
            if self.doc_starts is not None:
                positions = np.asarray(starts)[:, None] + np.arange(T)  # (B, T)
                doc_ids = torch.from_numpy(np.searchsorted(self.doc_starts, positions, side="right"))
        to = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return to(x), to(y), to(mask), to(doc_ids)


class EpochSampler:
    """Non-overlapping windows in a random order per epoch; the state is (epoch, index), so resume is exact.

    Epoch e shifts the window grid by an offset in [0, seq_len) and permutes the windows, both drawn from a generator
    seeded with (seed, e). Each micro step takes the next micro_batch_size * dp windows; dp rank r gets its slice, so
    the same global batch is seen whatever the mesh. The tail of an epoch too short for a micro step is dropped.
    """

    def __init__(self, n_tokens: int, seq_len: int, per_step: int, seed: int, rows: bool = False):
        # rows: packed data, whose windows are the fixed rows (no offset; the last row needs no next token)
        self.n_tokens, self.seq_len, self.per_step, self.seed, self.rows = n_tokens, seq_len, per_step, seed, rows
        self.epoch, self.index = 0, 0
        self._order_epoch, self._offset, self._order = None, 0, None
        if self._windows(0) < per_step:
            fail(f"train split has {n_tokens} tokens: fewer than one micro step of {per_step} windows of "
                 f"{seq_len + 1} tokens; lower micro_batch_size or seq_len")

    def _windows(self, offset):
        return (self.n_tokens - offset - (0 if self.rows else 1)) // self.seq_len

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._offset = int(torch.randint(self.seq_len, (1,), generator=g))
            if self.rows or self._windows(self._offset) < self.per_step:
                self._offset = 0
            self._order = torch.randperm(self._windows(self._offset), generator=g).numpy()
            self._order_epoch = self.epoch
        return self._order

    def next_starts(self, dp_rank: int, dp: int) -> list[int]:
        order = self._epoch_order()
        if self.index + self.per_step > len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order = self._epoch_order()
        chunk = order[self.index : self.index + self.per_step]
        self.index += self.per_step
        mine = np.array_split(chunk, dp)[dp_rank]
        return [self._offset + int(w) * self.seq_len for w in mine]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]


def unigram_entropy(split: TokenSplit, vocab_size: int, max_tokens: int = 20_000_000) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context. Learning means beating it."""
    tokens = np.asarray(split.tokens[:max_tokens]).astype(np.int64)
    if split.mask is not None:
        tokens = tokens[np.asarray(split.mask[:max_tokens]) == 1]
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------------------------------
# checkpoints


STEP_DIR = re.compile(r"step_(\d{8})$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


@contextmanager
def quiet_dcp():
    """DCP warns on every save/load without a process group: in one process that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def crash_point(point: str, step: int):
    """Fault injection for tests/test_reliability.py: TRAIN_CRASH_AT=<point>:<step> SIGKILLs this process there, as a
    node failure or the OOM killer would (no cleanup). Points: step (gradients computed, weights not yet updated),
    eval, save (checkpoint files written, not yet renamed), saved (just renamed)."""
    if os.environ.get("TRAIN_CRASH_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def all_gather(obj, d: Dist) -> list:
    """Every rank's obj in rank order (a list of one in a single process)."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def file_digest(path: Path, sync: bool = False) -> dict:
    """{"size", "sha256"} of a file; sync also fsyncs it, so what the digest describes is on disk."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def fsync_dir(path: Path):
    """Make a rename or a new file in path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(out_dir: Path) -> list[Path]:
    """Complete step dirs, oldest first (temporary names never match)."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if STEP_DIR.match(p.name) and (p / "train_state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def remove_step_dir(step_dir: Path):
    """Renamed out of the step_XXXXXXXX namespace first, so a crash halfway through the delete leaves no half dir
    that looks complete (prepare_out_dir removes the leftovers)."""
    doomed = step_dir.with_name(f".old_{step_dir.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    step_dir.rename(doomed)
    shutil.rmtree(doomed)


def save_checkpoint(out_dir: Path, step: int, model, optimizer, train_state: dict, args: ModelArgs, family: str,
                    cfg: Config, d: Dist) -> Path:
    """Write out_dir/step_XXXXXXXX: every file into a temporary dir, then the size and sha256 of each into
    train_state.json, which is written last; then one rename. A crash at any point leaves either the previous
    checkpoints alone or this one complete, and resume detects a file damaged later (verify_checkpoint)."""
    final = out_dir / f"step_{step:08d}"
    tmp = out_dir / f".tmp_step_{step:08d}"
    with save_errors(tmp, out_dir):
        _save_checkpoint(final, tmp, step, model, optimizer, train_state, args, family, cfg, d)
    return final


@contextmanager
def save_errors(tmp: Path, out_dir: Path):
    """A full disk or a lost mount while saving: one line that says which checkpoint is still intact."""
    try:
        yield
    except (OSError, CheckpointException) as e:
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        shutil.rmtree(tmp, ignore_errors=True)
        intact = step_dirs(out_dir)
        fail(f"{tmp}: writing the checkpoint failed ({type(e).__name__}: {(str(e) or '?').splitlines()[0]}); "
             + (f"the last complete checkpoint is {intact[-1]}" if intact else "no complete checkpoint was written"))


def _save_checkpoint(final: Path, tmp: Path, step: int, model, optimizer, train_state: dict, args: ModelArgs,
                     family: str, cfg: Config, d: Dist):
    out_dir = final.parent
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with quiet_dcp():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=d.world_size == 1)
    rng = {"torch": torch.get_rng_state().tolist()}
    if _device(d).type in ("cuda", "npu"):
        rng["device"] = getattr(torch, _device(d).type).get_rng_state().tolist()
    (tmp / f"rng_rank{d.rank}.json").write_text(json.dumps(rng))
    barrier(d)
    if d.master:
        (tmp / "config.json").write_text(json.dumps({**asdict(args), "family": family}, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(cfg.data_dir) / name).exists():
                shutil.copy2(Path(cfg.data_dir) / name, tmp / name)
    barrier(d)
    crash_point("save", step)
    # each rank hashes (and fsyncs) a share of the files; the manifest goes into train_state.json
    names = sorted(p.name for p in tmp.iterdir())
    manifest = {k: v for part in all_gather({n: file_digest(tmp / n, sync=True) for n in names[d.rank::d.world_size]},
                                            d) for k, v in part.items()}
    if d.master:
        # written last: a step dir without train_state.json is never taken as complete
        with open(tmp / "train_state.json", "w") as f:
            f.write(json.dumps({**train_state, "files": manifest}, indent=2))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # a rerun of this step (after a resume): the old one goes once the new one is in place
            final.rename(final.with_name(f".old_{final.name}"))
        os.rename(tmp, final)
        fsync_dir(out_dir)
        crash_point("saved", step)
        shutil.rmtree(final.with_name(f".old_{final.name}"), ignore_errors=True)
        if cfg.keep_last > 0:
            for old in step_dirs(out_dir)[: -cfg.keep_last]:
                remove_step_dir(old)
    barrier(d)


def verify_checkpoint(step_dir: Path, d: Dist) -> dict:
    """train_state.json of a step dir whose files all have the size and sha256 recorded when it was written; else
    CheckpointError naming the file and what is wrong. Each rank hashes a share; every rank gets the same verdict."""
    file = step_dir / "train_state.json"
    try:
        state = json.loads(file.read_text())
        assert isinstance(state, dict) and isinstance(state.get("step"), int)
        assert isinstance(state.get("files", {}), dict)
    except (OSError, UnicodeDecodeError, ValueError, AssertionError):
        raise CheckpointError(f"{file}: unreadable or not a train.py train_state (truncated?)") from None
    manifest = state.get("files", {})  # step dirs written before manifests have none: nothing to check against
    problems = []
    for name in sorted(manifest)[d.rank::d.world_size]:
        path, want = step_dir / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {want['size']} (truncated?)")
        elif file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the one recorded when it was written (corrupted)")
    problems = [p for part in all_gather(problems, d) for p in part]
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return state


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's own planner unpickles a checkpoint's non-tensor entries (optimiser hyper-parameters) with
    weights_only=False, which runs whatever code a crafted file holds; this one reads plain data only."""

    def load_bytes(self, read_item, value):
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"entry {fqn}: refused to unpickle: it holds more than plain data and could run "
                                  f"code (weights_only=True)") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict, step_dir: Path, no_dist: bool):
    """dcp.load, safe on untrusted files: .metadata is first read by convert.py's allow-list unpickler (DCP reads it
    with a bare pickle.load) and non-tensor entries go through SafeLoadPlanner. CheckpointError says what failed."""
    from convert import check_dcp_metadata

    try:
        check_dcp_metadata(step_dir)
    except SystemExit as e:  # convert.py's one-line message
        raise CheckpointError(str(e).removeprefix("convert.py: ")) from None
    try:
        with quiet_dcp():
            dcp.load(state, checkpoint_id=step_dir, planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # CheckpointException wraps each rank's error
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        why = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
        raise CheckpointError(f"{step_dir}: cannot be loaded: {why}") from None


def load_checkpoint(step_dir: Path, model, optimizer, d: Dist) -> dict:
    """Restore model and optimiser (resharded to this mesh by DCP) and this rank's RNG; returns train_state.
    CheckpointError if the DCP files cannot be read safely (verify_checkpoint has checked them against the manifest)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, step_dir, no_dist=d.world_size == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = step_dir / f"rng_rank{d.rank}.json"
    if rng_file.exists():  # a rank that did not exist in the saving run keeps its seeded RNG
        try:
            rng = json.loads(rng_file.read_text())
        except ValueError:
            raise CheckpointError(f"{rng_file}: not valid JSON") from None
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "device" in rng and _device(d).type in ("cuda", "npu"):
            getattr(torch, _device(d).type).set_rng_state(torch.tensor(rng["device"], dtype=torch.uint8))
    return json.loads((step_dir / "train_state.json").read_text())


def resume_checkpoint(out_dir: Path, model, optimizer, args: ModelArgs, d: Dist, log) -> tuple[Path, dict]:
    """Load the latest intact step dir of out_dir: a damaged one is reported and the one before it is tried."""
    found = step_dirs(out_dir)
    if not found:
        fail(f"init_from=resume: no complete step_XXXXXXXX dir in out_dir={out_dir}")
    while found:
        step_dir = found.pop()
        try:
            verify_checkpoint(step_dir, d)
            saved, _ = read_config(step_dir)
            check_same_shape(step_dir, saved, args)  # another model is a mistake in the config, not damage: fails
            return step_dir, load_checkpoint(step_dir, model, optimizer, d)
        except CheckpointError as e:
            problem = str(e)
            if found:
                log(f"train.py: {step_dir.name} is damaged: {problem}; falling back to {found[-1].name}")
    fail(f"init_from=resume: {problem}; no intact checkpoint left in out_dir={out_dir}")


def check_same_shape(path, saved: ModelArgs, args: ModelArgs):
    diff = [f"{f}={getattr(saved, f)!r} (config has {getattr(args, f)!r})" for f in MODEL_FIELDS
            if getattr(saved, f) != getattr(args, f)]
    if diff:
        fail(f"{path}: checkpoint of another model: " + ", ".join(diff))


def load_weights(path: Path, model, args: ModelArgs):
    """Weights only, from a checkpoint dir (config.json + safetensors) or a training step dir (DCP).

    args came from the checkpoint's config.json (plus overrides), so a shape mismatch means an override changed one.
    """
    if (path / ".metadata").exists():  # a training step dir: read just the model from the DCP files
        state = {"model": get_model_state_dict(model)}
        try:
            if (path / "train_state.json").exists():  # each rank checks every file here: init happens once
                verify_checkpoint(path, Dist())
            dcp_load(state, path, no_dist=not dist.is_initialized())
        except CheckpointError as e:
            fail(f"init_from={path}: {e}")
        set_model_state_dict(model, state["model"])
        return
    try:
        tensors = load_tensors(path)
    except CheckpointError as e:
        fail(f"init_from: {e}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    expected = {k: tuple(v.shape) for k, v in full.items()}
    for name in sorted(set(expected) | set(tensors)):
        if name not in tensors or name not in expected:
            fail(f"init_from={path}: tensor {name} is {'missing' if name not in tensors else 'unexpected'}")
        if tuple(tensors[name].shape) != expected[name]:
            fail(f"init_from={path}: tensor {name} has shape {tuple(tensors[name].shape)}, model expects "
                 f"{expected[name]}")
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))


def prepare_out_dir(cfg: Config, d: Dist) -> Path:
    """Refuse to mix two runs in one out_dir: init_from='scratch' needs an empty out_dir or --overwrite."""
    out_dir = Path(cfg.out_dir)
    previous = step_dirs(out_dir) + [p for p in (out_dir / "metrics.jsonl", out_dir / "export") if p.exists()]
    if cfg.init_from != "resume" and previous and not cfg.overwrite:
        fail(f"out_dir={out_dir} holds another run ({previous[-1].name}); use --init_from=resume to continue "
             f"it, or --overwrite to replace it")
    if d.master:
        try:  # a path under a file, a read-only dir or file system: one line now, not a traceback at the first save
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write_test_{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            fail(f"out_dir={out_dir}: cannot write there ({e.strerror}: {e.filename})")
    barrier(d)
    if d.master:
        if cfg.init_from != "resume":
            for p in previous:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for tmp in [*out_dir.glob(".tmp_step_*"), *out_dir.glob(".old_step_*")]:  # left by a run killed saving
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(d)
    return out_dir


def export_checkpoint(step_dir: Path, dst: Path) -> Path:
    """A step dir -> a checkpoint dir sample.py loads, by convert.py's dcp_to_native."""
    try:
        from convert import dcp_to_native
    except ImportError as e:
        print(f"train.py: export skipped: convert.dcp_to_native is not available ({e})", file=sys.stderr)
        return None
    dcp_to_native(step_dir, dst, overwrite=True)
    return dst


# --------------------------------------------------------------------------------------------------------------------
# speed and memory


def measure_peak_flops(device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a float32 torch.mm on this device: the peak MFU is measured against when none is configured."""
    g = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run's restored state must stay untouched
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    a @ b  # warm up
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def memory_gib(device: torch.device) -> float:
    """Peak memory: the accelerator's allocated memory, or the process's resident set on CPU."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def evaluate(model, val: TokenSplit, starts: list[list[int]], autocast, device) -> float:
    model.eval()
    losses = []
    for batch_starts in starts:
        x, y, mask, doc_ids = val.batch(batch_starts, device)
        with autocast:
            _, loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)
        losses.append(loss.float().item())
    model.train()
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------------------------------
# --dry_run: what a config needs per device on its mesh, computed from ModelArgs without allocating the model


# dense 16-bit peak per device when peak_flops is not set: the Ascend 910B the recipes name (313 TFLOP/s fp16/bf16,
# Huawei's figure for the 910B3); recipes for other hardware set peak_flops (A100: 312e12)
DEFAULT_PEAK_FLOPS = {"bfloat16": 313e12, "float16": 313e12}


def nf4_bytes(n: int, block: int = 64, absmax_block: int = 256) -> int:
    """Bytes kernels.nf4_quantize stores for n weights: 4-bit codes, one int8 absmax per block of 64 (padded to whole
    groups of 256), one fp32 scale per group, one fp32 offset: ~4.13 bits per weight."""
    groups = -(-(n // block) // absmax_block)
    return n // 2 + groups * absmax_block + 4 * groups + 4


def memory_plan(args: ModelArgs, cfg: Config, dp: int, tp: int, packed: bool) -> dict:
    """Per-device bytes of one training step of `cfg` on a (dp, tp) mesh, term by term, plus parameter counts.

    Storage, sharded over dp * tp (FSDP2 shards every block and the root over dp; TP splits them over tp):
      full training: fp32 parameters (the master copy) 4 B, fp32 gradients 4 B, AdamW m and v 8 B per parameter;
      LoRA: frozen base in the compute dtype (QLoRA: NF4 block linears, nf4_bytes), fp32 adapters + their grads + m, v.
    Working weights (16-bit runs): FSDP all-gathers the root and two blocks (current + prefetched) in the compute
    dtype; in one process autocast caches a 16-bit copy of every trainable linear weight; QLoRA dequantises each
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
      Full checkpointing keeps only each block's input (4d per token and layer), selective (per op, see
      apply_activation_checkpointing) also the outputs of wq, wv, w1, w2 and attention: 4d + s(3d + kv + f); both
      recompute one block at a time in the backward pass.
      The loss head: the final norm's input and output, b T d (4 + s), and kernels.linear_cross_entropy's one (b T, V)
      buffer in s bytes (the logits turned into their gradient); vocab-sharded (tp > 1) or adapted output layers
      take the logits, their fp32 copy and fp32 log-softmax instead, b T V (s + 8) bytes.
    tests/test_recipes.py checks activations + working weights against the bytes autograd saves (within 3%).
    """
    d, L, H, f = args.dim, args.n_layers, args.n_heads, args.hidden_dim
    kv = args.kv_heads * args.head_dim
    s = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    b, T, shard = cfg.micro_batch_size, cfg.seq_len, dp * tp
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
        try:
            adapted = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        except ValueError as e:
            fail(str(e))
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
    elif dp > 1 and not cfg.qlora:
        working = (s * n_root + 2 * block_bytes) / tp  # FSDP2's unsharded root and two blocks
    elif cfg.qlora:
        working = (block_bytes if ac != "none" else L * block_bytes) / tp  # dequantised weights kept for backward
    elif cfg.lora_rank:
        working = 0.0  # the frozen base is already in the compute dtype
    else:
        working = s * (n_block_linear + args.vocab_size * d) / tp  # autocast's cache of 16-bit linear weights
    mem["working weights"] = working

    per_token_layer = s * (4 * d + 2 * kv + 3 * f) + 8 * d + 4 * H + lora_extra  # + attention's softmax statistics
    alibi_mask = (b if packed else 1) * H * T * T * s / tp if args.pos_emb == "alibi" else 0  # one for all layers
    mask_layer = b * T * T if packed and args.pos_emb != "alibi" else 0
    layer = (b * T * per_token_layer + mask_layer) / tp
    fused_loss = tp == 1 and "output" not in adapted  # (model.Transformer._plain_head_weight)
    head = b * T * (d * (4 + s) + args.vocab_size * (s if fused_loss else s + 8)) / tp
    kept = {"none": layer, "full": b * T * 4 * d / tp,  # selective: block input, outputs of wq, wv, w1, w2, attention
            "selective": b * T * (4 * d + s * (3 * d + kv + f) + 4 * H) / tp}
    for mode in AC_MODES:  # all but 'none' recompute one block at a time in the backward pass
        mem[f"activations ({mode})"] = L * kept[mode] + (layer if mode != "none" else 0) + alibi_mask + head
    mem["activations"] = mem[f"activations ({ac})"]
    mem["total"] = sum(mem[k] for k in ("weights", "gradients", "optimizer", "working weights", "activations"))
    return {"n_params": n_params, "n_trainable": n_train, "bytes": mem, "activation_checkpointing": ac}


def plan(cfg: Config, model_overrides: dict) -> dict:
    """--dry_run: print the parameter count, per-device memory and step time of this config on its mesh; build nothing
    but a meta-device model. Returns the numbers (tests)."""
    if cfg.devices < 0 or not 0 < cfg.mfu <= 1 or cfg.device_memory_gib <= 0 or cfg.peak_flops < 0:
        fail(f"devices={cfg.devices}, mfu={cfg.mfu}, device_memory_gib={cfg.device_memory_gib}, peak_flops="
             f"{cfg.peak_flops}: expected devices >= 0 (0 = WORLD_SIZE), 0 < mfu <= 1, a positive memory size and "
             "peak_flops >= 0")
    world = cfg.devices or int(os.environ.get("WORLD_SIZE", "1"))
    tp = cfg.tp
    dp = cfg.dp or world // tp
    if dp * tp != world or dp < 1:
        fail(f"dry run: dp={dp} x tp={tp} does not make devices={world}")
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        fail(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size * dp = "
             f"{cfg.micro_batch_size * dp}")
    notes = []
    data = Path(cfg.data_dir) / "meta.json"
    meta = load_meta(cfg.data_dir) if data.exists() else None
    if cfg.init_from not in ("scratch", "resume") and not Path(cfg.init_from).exists():
        notes.append(f"init_from={cfg.init_from} is not here: planned with the preset model={cfg.model!r}")
        cfg = replace(cfg, init_from="scratch")
    if meta is None:
        notes.append(f"{data} is not here: the model's vocabulary and unpacked rows assumed (prepare.py --pack adds "
                     "a per-sequence attention mask, in the plan once the data is here)")
        vocab = PRESETS[cfg.model].vocab_size if cfg.model in PRESETS else 1
        meta = {"vocab_size": model_overrides.get("vocab_size", vocab)}
    args, family = model_args_for(cfg, model_overrides, meta)
    for key, n in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("seq_len", cfg.seq_len)):
        if n % tp:
            fail(f"tp={tp} does not divide {key}={n}")
    m = memory_plan(args, cfg, dp, tp, bool(meta.get("packed")))
    mem = m["bytes"]

    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    flops_token = flops_per_token(args, cfg.seq_len)
    if cfg.lora_rank:  # frozen weights need no weight gradients: 4 FLOPs per weight instead of 6, adapters 6
        n_matmul = (flops_token - 12 * args.n_layers * cfg.seq_len * args.dim) // 6
        flops_token += -2 * n_matmul + 6 * m["n_trainable"]
    peak = cfg.peak_flops or DEFAULT_PEAK_FLOPS.get(cfg.dtype, 0.0)
    step_s = tokens_per_step * flops_token / (world * peak * cfg.mfu) if peak else None
    capacity = cfg.device_memory_gib * 2**30
    out = {**m, "family": family, "dp": dp, "tp": tp, "devices": world, "flops_per_token": flops_token,
           "tokens_per_step": tokens_per_step, "peak_flops": peak, "step_s": step_s, "fits": mem["total"] <= capacity,
           "grad_accum": cfg.global_batch_size // (cfg.micro_batch_size * dp)}

    gib = lambda x: f"{x / 2**30:10.2f} GiB"  # noqa: E731
    kind = ("QLoRA" if cfg.qlora else "LoRA") + f" rank {cfg.lora_rank}" if cfg.lora_rank else "full training"
    lines = [f"plan: {cfg.model if cfg.init_from in ('scratch', 'resume') else cfg.init_from} ({family}), "
             f"{m['n_params']:,} parameters, {m['n_trainable']:,} trained ({kind})",
             f"mesh: {world} device(s) = dp {dp} x tp {tp}; micro-batch {cfg.micro_batch_size} x {cfg.seq_len} tokens, "
             f"global batch {cfg.global_batch_size} (grad accum {out['grad_accum']}); {cfg.dtype}; activation "
             f"checkpointing {m['activation_checkpointing']}",
             "per device:"]
    for key in ("weights", "gradients", "optimizer", "working weights", *(f"activations ({a})" for a in AC_MODES)):
        this = key == f"activations ({cfg.activation_checkpointing})"
        lines.append(f"  {key:34s}{gib(mem[key])}" + ("  <- this config" if this else ""))
    lines.append(f"  {'total':34s}{gib(mem['total'])}  {'fits' if out['fits'] else 'does NOT fit'} in "
                 f"{cfg.device_memory_gib:g} GiB (device_memory_gib)")
    lines.append(f"FLOPs per token {flops_token / 1e9:.2f} G; {tokens_per_step:,} tokens per step"
                 + (f"; {cfg.max_iters:,} steps = {cfg.max_iters * tokens_per_step / meta['train_tokens']:.2f} epochs "
                    f"of {cfg.data_dir}" if meta.get("train_tokens") else ""))
    if step_s:
        lines.append(f"step time at MFU {cfg.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s x {world}: {step_s:.2f} s "
                     f"({tokens_per_step / step_s / world:,.0f} tokens/s per device); {cfg.max_iters:,} steps = "
                     f"{cfg.max_iters * step_s / 3600:.1f} h")
    else:
        lines.append("step time: set peak_flops (no default peak for float32)")
    print("\n".join(lines + [f"note: {n}" for n in notes]))
    return out


# --------------------------------------------------------------------------------------------------------------------
# the run


def main(argv=None) -> dict:
    """Train; returns a summary (losses per step, last val loss, baseline, paths) for tests and callers."""
    try:
        return _main(argv)
    finally:  # a caller in the same process (tests) gets back a heap for blocks under 32 MB, as glibc's warm default
        if set_mmap_threshold.changed:
            set_mmap_threshold(32 << 20)
            set_mmap_threshold.changed = False


def _main(argv):
    cfg, model_overrides = parse_config(sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    if cfg.dry_run:  # the plan only: no data, no model, no process group
        return plan(cfg, model_overrides)
    meta = load_meta(cfg.data_dir)
    args, family = model_args_for(cfg, model_overrides, meta)
    d = setup_distributed(cfg, args)
    device = _device(d)
    micro_per_step = cfg.micro_batch_size * d.dp
    if cfg.global_batch_size % micro_per_step:
        fail(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size * dp = "
             f"{micro_per_step}")
    grad_accum = cfg.global_batch_size // micro_per_step
    train_data = TokenSplit(cfg.data_dir, "train", meta, cfg.seq_len)
    val_data = TokenSplit(cfg.data_dir, "val", meta, cfg.seq_len)
    for split in (train_data, val_data):
        split.check_ids(args.vocab_size)
    out_dir = prepare_out_dir(cfg, d)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if d.master else (lambda msg: None)

    # model, optimiser, scaler, data; then the state they continue from
    model = build_model(args, cfg, d)
    optimizer = build_optimizer(model, cfg, device)
    scaler = LossScaler(cfg.dtype == "float16", cfg.loss_scale, cfg.loss_scale_window)
    sampler = EpochSampler(len(train_data.tokens), cfg.seq_len, micro_per_step, cfg.seed, rows=train_data.packed)
    step, best_val = 0, None
    lora_base = str(Path(cfg.init_from).resolve()) if cfg.lora_rank and cfg.init_from != "scratch" else None
    if cfg.init_from == "resume":
        resumed_from, state = resume_checkpoint(out_dir, model, optimizer, args, d, log)
        step, best_val = state["step"], state.get("best_val_loss")
        lora_base = state.get("lora_base")
        scaler.load_state_dict(state["loss_scaler"])
        sampler.load_state_dict(state["data"])
        log(f"resumed from {resumed_from} at step {step}")
    elif cfg.init_from != "scratch" and not cfg.lora_rank:  # a LoRA model was built on its base already
        load_weights(Path(cfg.init_from), model, args)
        log(f"initialised weights from {cfg.init_from}")
    if cfg.lora_rank:
        if cfg.init_from == "scratch":
            log("warning: LoRA on a randomly initialised base (init_from='scratch'): fine for tests and memory "
                "measurements, useless for fine-tuning")
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"{'QLoRA (NF4 base)' if cfg.qlora else 'LoRA'}: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on "
            f"{len(model.lora_adapted)} layers ({cfg.lora_targets}); {n_train:,} trainable parameters")
    model.train()

    # evaluation batches are fixed (their own generator), so val losses are comparable and training RNG untouched
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n_val = len(val_data.tokens) // cfg.seq_len if val_data.packed else len(val_data.tokens) - cfg.seq_len
    stride = cfg.seq_len if val_data.packed else 1  # packed: whole rows
    eval_starts = [(np.array_split(torch.randint(n_val, (micro_per_step,), generator=g).numpy(), d.dp)[d.dp_rank]
                    * stride).tolist() for _ in range(cfg.eval_iters)]
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.dtype]) if cfg.dtype != "float32" else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    flops_token = flops_per_token(args, cfg.seq_len)
    peak = cfg.peak_flops or measure_peak_flops(device)
    baseline = unigram_entropy(train_data, args.vocab_size)
    metrics = open(out_dir / "metrics.jsonl", "a") if d.master else None

    def record(row):
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    n_params = sum(p.numel() for p in model.parameters()) + sum(  # QLoRA's NF4 weights are buffers
        m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    log(f"model {cfg.model if cfg.init_from in ('scratch', 'resume') else cfg.init_from} ({family}): "
        f"{n_params / 1e6:.2f}M parameters, {args.n_layers} layers, dim {args.dim}; {len(train_data.tokens):,} train "
        f"tokens; {tokens_per_step:,} tokens per step (grad_accum {grad_accum}, dp {d.dp}, tp {d.tp}); "
        f"dtype {cfg.dtype}; activation checkpointing {cfg.activation_checkpointing}")
    log(f"unigram baseline (entropy of the train tokens): {baseline:.4f} nats; MFU against a peak of "
        f"{peak / 1e9:.1f} GFLOP/s per device ({'configured' if cfg.peak_flops else 'measured torch.mm fp32'})")
    record({"unigram_baseline": baseline, "n_params": n_params, "peak_flops": peak, "start_step": step})

    def checkpoint(step):
        train_state = {"step": step, "best_val_loss": best_val, "loss_scaler": scaler.state_dict(),
                       "data": sampler.state_dict(), "world_size": d.world_size, "config": asdict(cfg),
                       "model_overrides": model_overrides, "lora_base": lora_base}
        return save_checkpoint(out_dir, step, model, optimizer, train_state, args, family, cfg, d)

    losses, val_loss, last_ckpt = {}, None, (step_dirs(out_dir) or [None])[-1]
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not d.master, dynamic_ncols=True, file=sys.stderr)
    t_log, steps_since_log, t_start = time.perf_counter(), 0, time.perf_counter()
    skipped_in_a_row = 0
    while step < cfg.max_iters:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y, mask, doc_ids = train_data.batch(sampler.next_starts(d.dp_rank, d.dp), device)
            if d.dp > 1:  # FSDP2: reduce-scatter gradients only on the last micro step
                model.set_requires_gradient_sync(micro == grad_accum - 1)
            with loss_parallel_context(d):  # tensor parallel: forward and backward of the vocab-sharded loss
                with autocast:
                    _, loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)
                loss = loss.float() / grad_accum
                (loss * scaler.scale).backward()
            loss_sum += loss.detach()
        loss_value = mean_over_ranks(loss_sum.item(), d)
        scaler.unscale_(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP / TP
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if not finite and not scaler.enabled:
            where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written"
            fail(f"step {step + 1}: loss {loss_value}, grad norm {grad_norm} is not finite in {cfg.dtype}; "
                 f"stopping{where}")
        crash_point("step", step + 1)
        if finite:
            optimizer.step()
            skipped_in_a_row = 0
        else:
            log(f"step {step + 1}: float16 overflow (loss scale {scaler.scale:g}): step skipped")
            skipped_in_a_row += 1
            if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:  # no loss scale helps: a NaN from the data or the weights
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written"
                fail(f"step {step + 1}: loss {loss_value}, grad norm {grad_norm} not finite in {skipped_in_a_row} "
                     f"float16 steps in a row (loss scale down to {scaler.scale / 2:g}); stopping{where}")
        scaler.update(finite)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since_log += 1
        losses[step] = loss_value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            # tokens/s per device and MFU (against each device's peak) as the mean over ranks; memory per device
            rank_tokens_per_s = tokens_per_step * steps_since_log / (time.perf_counter() - t_log) / d.world_size
            tokens_per_s = mean_over_ranks(rank_tokens_per_s, d)
            mfu = mean_over_ranks(flops_token * rank_tokens_per_s / peak, d)
            mem = gather_over_ranks(memory_gib(device), d)
            state_bytes = [int(b) for b in gather_over_ranks(local_state_bytes(model, optimizer), d)]
            row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                   "mfu": mfu, "mem_gib": max(mem), "mem_gib_per_device": mem,
                   "param_optim_bytes_per_device": state_bytes, "skipped_steps": scaler.skipped,
                   "loss_scale": scaler.scale, "elapsed_s": time.perf_counter() - t_start}
            record(row)
            log(f"step {step}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                f"{tokens_per_s:,.0f} tokens/s/device, MFU {mfu:.1%}, mem {max(mem):.2f} GiB"
                + (f" (max over {d.world_size} devices)" if d.world_size > 1 else "")
                + (f", loss scale {scaler.scale:g}, skipped {scaler.skipped}" if scaler.enabled else ""))
            t_log, steps_since_log = time.perf_counter(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            crash_point("eval", step)
            with loss_parallel_context(d):
                val_loss = mean_over_ranks(evaluate(model, val_data, eval_starts, autocast, device), d)
            best_val = val_loss if best_val is None else min(best_val, val_loss)
            record({"step": step, "val_loss": val_loss, "unigram_baseline": baseline})
            log(f"step {step}: val loss {val_loss:.4f} (unigram baseline {baseline:.4f})")
            t_log = time.perf_counter()  # eval time is not training throughput
        if step % cfg.ckpt_interval == 0 or step == cfg.max_iters:
            last_ckpt = checkpoint(step)
            t_log = time.perf_counter()
    bar.close()
    export_dir = adapter_dir = None
    if cfg.lora_rank:  # the adapters alone, a few MB, in PEFT's format: convert.py merge-lora folds them into any
        adapters = lora_state_dict(model, full=True)  # copy of the base; gathered from every rank
        if d.master:
            from convert import write_peft_adapter

            adapter_dir = out_dir / "adapter"
            write_peft_adapter(adapter_dir, adapters, args, family, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               dropout=cfg.lora_dropout, base=lora_base,
                               metadata={"lora_targets": cfg.lora_targets, "quantize_base": str(cfg.qlora),
                                         "step": str(step)})
            log(f"adapters of step {step} saved to {adapter_dir} (PEFT LoRA format)")
        barrier(d)
    if cfg.export and last_ckpt is not None:
        if d.master:
            if not cfg.lora_rank:
                export_dir = export_checkpoint(last_ckpt, out_dir / "export")
            elif lora_base:  # merged into the base's own full-precision weights (for QLoRA too)
                from convert import merge_lora

                merge_lora(lora_base, adapter_dir, out_dir / "export", overwrite=True)
                export_dir = out_dir / "export"
            else:
                log("export skipped: a LoRA run from scratch has no base checkpoint to merge into")
            if export_dir:
                log(f"exported step {step} to {export_dir} (python sample.py --ckpt={export_dir})")
        barrier(d)
    if metrics:
        metrics.close()
    summary = {"losses": losses, "val_loss": val_loss, "best_val_loss": best_val, "unigram_baseline": baseline,
               "last_checkpoint": last_ckpt, "export_dir": export_dir, "adapter_dir": adapter_dir, "skipped_steps": scaler.skipped,
               "wall_s": time.perf_counter() - t_start}
    if d.own_group:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
