"""train.py: pretraining and supervised fine-tuning of model.py's Transformer, with exact resume.

    python train.py config/default.py                          # the default small model on data/default
    python train.py config/default.py --max_iters=100 --dtype=bfloat16
    python train.py config/default.py --init_from=resume       # continue the run in out_dir exactly
    python train.py config/sft_tiny.py --init_from=path/to/checkpoint_dir   # fine-tune converted weights
    python train.py config/baichuan2_13b_sft.py --dry_run      # memory and step time on its mesh (support/planner.py)
    torchrun --standalone --nproc_per_node=4 train.py config/default.py --tp=2   # dp=2 x tp=2

The defaults are the fields of `Config`; a config/<recipe>.py assigns some of them and `--key=value` overrides come
last (any ModelArgs field too: `--n_layers=4`). A run walks its data in epochs of seq_len windows (EpochSampler),
saves a step dir (support/stepdir.py) every ckpt_interval steps and resumes from one exactly. One process is the
trivial (1, 1) mesh; under torchrun the same code runs on a (dp, tp) mesh: FSDP2 over dp, tensor and sequence
parallelism over tp. docs/training.md says the rest.
"""

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from tqdm import tqdm

import kernels
import prepare
from prepare import TokenSplit, unigram_entropy
from convert import dcp_to_native, merge_lora
from model import LORA_DEFAULT_TARGETS, PRESET_FAMILY, PRESETS, CheckpointError, ModelArgs, Transformer, apply_lora, lora_state_dict, read_config
from support import config as configurator
from support.collectives import barrier, mean_over_ranks, rank_device, ranks_of, stop_requested
from support import diskspace, dry_run, preemption, runlock, train_checks
from support.config import ConfigError
from support.checks import ranged
from support.metrics_file import Throughput, read_steps, start_metrics
from support.peft import write_peft_adapter
from support.stepdir import (RESUME_FIELDS, dcp_load, newest_step_dir, read_step_dir, step_dirs,
                             verify_step_dir, write_step_dir)
from support.train_checks import TrainError, as_train_error, check_room
from support.weights import load_tensors
from support.device import freed_memory_returned_to_os


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
    seq_len: int = ranged(128, "[1, 2**24]")
    micro_batch_size: int = ranged(8, "[1, inf)")
    global_batch_size: int = ranged(8, "[1, inf)")
    # how a step's loss averages its targets (train_step): 'token' = every target the loss counts (loss mask 1) in the
    # step's micro batches on every dp rank weighs the same, whatever the micro batch size and the mesh (torchtitan's
    # global_valid_tokens); 'micro_batch' = the mean of each micro batch's own mean (Megatron/AscendSpeed, DeepSpeed
    # with the 2023 Hugging Face Trainer, FlagAI): a target in a micro batch with few counted targets weighs more
    loss_weighting: str = "token"
    # AdamW and the schedule: linear warmup to lr, then cosine decay to min_lr at lr_decay_iters
    max_iters: int = ranged(1000, "[1, inf)")
    lr: float = ranged(1e-3, "[0, inf)")
    min_lr: float = ranged(1e-4, "[0, inf)")
    warmup_iters: int = ranged(100, "[0, inf)")
    lr_decay_iters: int = ranged(1000, "[0, inf)")
    weight_decay: float = ranged(0.1, "[0, inf)")  # matrices only; norms gains are not decayed
    warmup_start_lr: float = ranged(0.0, "[0, inf)")  # the warmup rises linearly from here (DeepSpeed WarmupLR's
    # warmup_min_lr)
    lr_decay: str = "cosine"  # 'cosine' | 'linear' (Hugging Face Trainer's default) from lr to min_lr
    beta1: float = ranged(0.9, "[0, 1)")
    beta2: float = ranged(0.95, "[0, 1)")
    adam_eps: float = ranged(1e-8, "(0, inf)")
    grad_clip: float = ranged(1.0, "[0, inf)")  # 0 = no clipping
    seed: int = ranged(1337, "[0, 2**63)")
    # precision: 'float32' | 'bfloat16' (autocast) | 'float16' (autocast + loss scaling, DeepSpeed's fp16 semantics)
    dtype: str = "float32"
    loss_scale: float = ranged(65536.0, "(0, inf)")  # initial dynamic float16 scale (DeepSpeed: 2^initial_scale_power)
    loss_scale_window: int = ranged(1000, "[1, inf)")  # good steps before the dynamic scale doubles
    static_loss_scale: float = ranged(0.0, "[0, inf)")  # > 0: a fixed float16 loss scale (DeepSpeed's fp16
    # "loss_scale"); 0 = dynamic
    loss_scale_hysteresis: int = ranged(1, "[1, inf)")  # overflows in a row before the dynamic scale halves
    # (DeepSpeed's "hysteresis")
    min_loss_scale: float = ranged(0.0, "[0, inf)")  # floor of the dynamic scale; an overflow at the floor stops the
    # run (DeepSpeed's)
    compile: bool = False
    # parallelism under torchrun: a (dp, tp) device mesh over the WORLD_SIZE processes
    dp: int = ranged(0, "[0, inf)")  # data parallel (FSDP2) degree; 0 = WORLD_SIZE // tp
    tp: int = ranged(1, "[1, inf)")  # tensor parallel degree (sequence-parallel norms); divides heads and seq_len
    # 'none' | 'full' (keep each block's input, recompute the block) | 'selective' (per op, as torchtitan: keep the
    # attention outputs and every other matmul output, recompute the rest: norms, RoPE, SwiGLU, the other matmuls)
    activation_checkpointing: str = "none"
    activation_checkpointing_layers: int = ranged(0, "[0, inf)")  # only the first N blocks (FlagAI's ckpoint_layer,
    # Megatron's recompute_method=block); 0 = every block
    # FSDP2 shards parameters, gradients and optimiser state over dp whatever the stage; the ZeRO stage a recipe names
    # sets when gathered parameters are freed: 3 after each block's forward (reshard_after_forward), 1 or 2 at the
    # end of its backward (ZeRO-1/2 keep whole parameters on every device: less communication, more memory)
    zero_stage: int = ranged(3, "[1, 3]")
    # collective timeout: a dead or stuck rank makes the others exit after this long
    dist_timeout_s: int = ranged(600, "[1, inf)")
    # eval, logs, checkpoints
    eval_interval: int = ranged(200, "[1, inf)")
    eval_iters: int = ranged(20, "[1, inf)")
    log_interval: int = ranged(10, "[1, inf)")
    ckpt_interval: int = ranged(200, "[1, inf)")
    keep_last: int = ranged(2, "[0, inf)")  # step dirs kept in out_dir; 0 keeps all
    export: bool = False  # write out_dir/export (a checkpoint dir for sample.py) at the end
    peak_flops: float = ranged(0.0, "[0, inf)")  # per device, for MFU; 0 = measure a torch.mm peak at start
    # LoRA / QLoRA (model.py's LoRA section): adapters on the lora_targets linear layers of the base model in
    # init_from; only they train. The run ends with out_dir/adapter and, with export, the merged checkpoint dir
    lora_rank: int = ranged(0, "[0, inf)")  # 0 = full fine-tuning
    lora_alpha: float = ranged(16.0, "(0, inf)")  # adapter output scaled by lora_alpha / lora_rank
    lora_dropout: float = ranged(0.0, "[0, 1)")
    lora_targets: str = LORA_DEFAULT_TARGETS  # comma-separated fnmatch patterns: "wq,wv", "*.attention.*"
    qlora: bool = False  # keep the frozen block weights in 4-bit NF4, dequantised per matmul
    # --dry_run: print parameters, per-device memory and step time of this config on its mesh, then exit (plan())
    dry_run: bool = False
    devices: int = ranged(0, "[0, inf)")  # devices the plan is for; 0 = the launched world size (WORLD_SIZE, else 1)
    device_memory_gib: float = ranged(64.0, "(0, inf)")  # per device, the plan's total is checked against (910B: 64)
    mfu: float = ranged(0.4, "(0, 1]")  # model FLOPs utilisation the plan's step time assumes


MODEL_FIELDS = {f.name: f for f in fields(ModelArgs)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------------------------
# configuration: defaults < config files < --key=value


def parse_config(argv) -> tuple[Config, dict]:
    """argv (without the program name) -> (Config, ModelArgs overrides): config files, then --key=value, each value
    checked against its field (support/config.py; ConfigError naming the file or flag)."""
    bools = [k for k, f in Config.__dataclass_fields__.items() if f.type is bool]
    values = configurator.load(argv, {**Config.__dataclass_fields__, **MODEL_FIELDS}, flags=bools)
    train = {k: v for k, v in values.items() if k in Config.__dataclass_fields__}
    model_overrides = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    return Config(**train), model_overrides


def model_args_for(cfg: Config, overrides: dict, meta: dict) -> tuple[ModelArgs, str]:
    """The run's ModelArgs and family, then the overrides: a resumed run's own (the config.json of its newest step dir
    that has a readable one: resume checks the rest), the checkpoint's when fine-tuning, else the preset's."""
    saved, source = None, None
    if cfg.init_from == "resume":
        source, saved = newest_step_dir(cfg.out_dir, read_config)
    elif cfg.init_from != "scratch":
        with as_train_error(CheckpointError, prefix="init_from: "):
            saved, source = read_config(cfg.init_from), cfg.init_from
    if source is not None:  # the data must be tokenized as the model was
        train_checks.check_vocabulary(source, cfg.data_dir, prepare.vocabulary_difference(source, cfg.data_dir))
    if saved is not None:
        base, family = saved[0], saved[1].get("family", "llama")
    else:  # from scratch, or a resume with no step dir (which resume then reports)
        train_checks.check_preset(cfg.model)
        base, family = PRESETS[cfg.model], PRESET_FAMILY[cfg.model]
        if "vocab_size" not in overrides:  # a model trained from scratch takes the data's vocabulary
            base = replace(base, vocab_size=meta["vocab_size"])
    with as_train_error(ValueError):
        args = replace(base, **overrides)
    train_checks.check_model_args(cfg, args, meta)
    return args, family


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
    cpu_group: object = None  # gloo, for the stop flag each step without a device sync (None: the default group)

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config, args: ModelArgs) -> Dist:
    """Check the mesh against the launch and the model (before the first collective: bad input is one line, never a
    hang at the rendezvous), then join the process group and build the (dp, tp) mesh. Collectives time out after
    dist_timeout_s, so a dead rank cannot hang the others.
    """
    from datetime import timedelta

    env = os.environ
    world_size, dp = train_checks.check_launch(cfg, args, env)
    if world_size == 1:
        return Dist()
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
                tp_rank=mesh.get_local_rank("tp"), mesh=mesh, own_group=own_group,
                cpu_group=None if device == "cpu" else dist.new_group(backend="gloo"))


def loss_parallel_context(d: Dist):
    """Forward and backward of a tensor-parallel model run in torch's loss_parallel: its logits are sharded on the
    vocabulary and kernels.cross_entropy computes the loss on the shards."""
    if d.tp == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def apply_activation_checkpointing(model: Transformer, mode: str, n_blocks: int = 0):
    """Keep less of each block's activations for the backward pass, and recompute the rest there.

    'full': only the block's input is kept; the whole block runs again in the backward pass. 'selective': per op, as
    torchtitan's op-level policy: attention outputs and every other matmul output are kept, the rest recomputed.
    n_blocks > 0 checkpoints only the first n_blocks blocks and runs the others as they are (FlagAI's Aquila
    ckpoint_layer counts blocks from the input as Megatron's recompute_method=block does).
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
    for layer in list(model.layers)[:n_blocks or None]:
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


def build_model(args: ModelArgs, cfg: Config, d: Dist) -> torch.nn.Module:
    """The model of the run with its weights: the one way they come into being, in torchtitan's order (activation
    checkpointing, compile, tensor parallel, FSDP2 over dp) on the meta device, so a rank allocates only its shards.

    - scratch: drawn from cfg.seed, the same weights whatever the mesh and the device (draw_weights).
    - init_from a checkpoint dir or a step dir (full fine-tuning): loaded and resharded to this mesh (load_weights).
    - LoRA / QLoRA: the frozen base is filled layer by layer while the adapters go on (build_lora_model: each linear
      memory-mapped from init_from, or drawn as from scratch, then quantised for QLoRA), never whole in full
      precision; sharding keeps its values.
    - resume: placeholders (uninitialised, or the draws above); restore() loads the step dir's weights together with
      the optimiser state, which needs the optimiser built first.
    """
    if cfg.lora_rank:
        model = build_lora_model(args, cfg, rank_device(d))
    else:
        with torch.device("meta"):
            model = Transformer(args)
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.activation_checkpointing_layers)
    if cfg.compile:
        for layer in model.layers:  # per block, before sharding, as torchtitan does; state dict names unchanged
            layer.compile()
    if d.tp > 1:
        apply_tensor_parallel(model, d)
    if d.dp > 1:
        apply_fsdp(model, cfg, d.mesh["dp"])
    if cfg.lora_rank:
        return model
    model.to_empty(device=rank_device(d))
    model.init_buffers()
    if cfg.init_from == "scratch":
        draw_weights(model, args, cfg, d)
    elif cfg.init_from != "resume":
        load_weights(Path(cfg.init_from), model, args)
    return model


def apply_fsdp(model: Transformer, cfg: Config, mesh):
    """FSDP2 over the dp mesh: each block, then the root, with parameters gathered in the compute dtype and gradients
    reduced in fp32. zero_stage 3 frees a block's gathered parameters after its forward and gathers them again for
    its backward; stages 1 and 2 keep them until the backward (reshard_after_forward=False), as ZeRO-1/2 never free
    whole parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.dtype], reduce_dtype=torch.float32)
    reshard = cfg.zero_stage == 3
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)


def draw_weights(model, args: ModelArgs, cfg: Config, d: Dist):
    """Weights from scratch: one CPU process draws them in place; otherwise rank 0 draws the whole model on the CPU
    with the seed and broadcasts it, each rank keeping its shards (the same draws, so every mesh starts alike)."""
    if d.world_size == 1 and rank_device(d).type == "cpu":
        torch.manual_seed(cfg.seed)  # the very draws of the path below, without a second copy of the model
        model.init_weights()
        return
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
                train_checks.check_base_tensor(cfg.init_from, tensors, full, p.shape)
                p.data = tensors[full].to(device=device, dtype=frozen_dtype)
            else:
                model.init_parameter(full, p)
                p.data = p.data.to(frozen_dtype)

    with as_train_error(ValueError):  # lora_targets that match no layer
        adapted = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                             quantize_base=cfg.qlora, fill=fill)
    for name, module in model.named_modules():  # what apply_lora did not reach: embeddings, norms, the head
        if any(p.is_meta for p in module.parameters(recurse=False)):
            fill(name, module)
    model.materialize_buffers(device)
    for p in lora_state_dict(model).values():  # adapters train in fp32 whatever the frozen dtype
        p.data = p.data.to(device=device, dtype=torch.float32)
    model.lora_adapted = adapted
    return model


def build_optimizer(model, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, linear weights) only, not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu", "npu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)


def get_lr(step: int, cfg: Config) -> float:
    """Linear warmup from warmup_start_lr over warmup_iters, then cosine (or linear) from lr down to min_lr at
    lr_decay_iters, then min_lr."""
    if step < cfg.warmup_iters:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    if cfg.lr_decay == "linear":
        return cfg.min_lr + (1 - progress) * (cfg.lr - cfg.min_lr)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class LossScaler:
    """float16 loss scaling as DeepSpeed's fp16 config does it: the loss is multiplied by `scale` so that small
    gradients survive in fp16, and a step whose gradients overflow is skipped.

    Dynamic (static=0, DeepSpeed's DynamicLossScaler): an overflow halves the scale, not below min_scale, once
    `hysteresis` overflows have come without a rise in between (each earlier one only uses up one); after `window`
    steps without an overflow the scale doubles and the hysteresis is refilled. Static (static > 0): the scale stays
    `static`. Disabled (scale 1, never skips) for float32 and bfloat16.
    """

    def __init__(self, enabled: bool, scale: float, window: int, static: float = 0.0, hysteresis: int = 1,
                 min_scale: float = 0.0):
        self.enabled, self.dynamic = enabled, enabled and not static
        self.scale = (static or scale) if enabled else 1.0
        self.window, self.hysteresis, self.min_scale = window, hysteresis, min_scale
        self.hysteresis_left = hysteresis
        self.good_steps = 0
        self.skipped = 0

    def unscale_(self, params):
        if self.enabled:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def at_floor(self) -> bool:
        """An overflow now would need a scale below min_scale: DeepSpeed stops the run there."""
        return self.dynamic and self.min_scale > 0 and self.scale <= self.min_scale and self.hysteresis_left <= 1

    def update(self, finite: bool):
        if not self.enabled:
            return
        if not finite:
            self.good_steps, self.skipped = 0, self.skipped + 1
            if self.dynamic and self.hysteresis_left <= 1:
                self.scale = max(self.scale / 2, self.min_scale)
            elif self.dynamic:
                self.hysteresis_left -= 1
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps == self.window:
            self.scale, self.good_steps, self.hysteresis_left = self.scale * 2, 0, self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped,
                "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict):
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state["skipped"]
        self.hysteresis_left = state.get("hysteresis_left", self.hysteresis)


# --------------------------------------------------------------------------------------------------------------------
# data


def load_meta(data_dir: str) -> dict:
    with as_train_error(prepare.DataError):
        return prepare.read_meta(data_dir)


def batch_on(split: TokenSplit, starts, device):
    """prepare.TokenSplit's windows at `starts` as tensors on `device`: x, y, loss_mask or None, doc_ids or None."""
    return tuple(None if a is None else torch.from_numpy(a).to(device, non_blocking=True)
                 for a in split.windows(starts))


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
        train_checks.check_windows(n_tokens, self._windows(0), per_step, seq_len)

    def _windows(self, offset):
        return (self.n_tokens - offset - (0 if self.rows else 1)) // self.seq_len

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)  # any int64 seed
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


# --------------------------------------------------------------------------------------------------------------------
# checkpoints: support/stepdir.py owns the step dir format (layout, manifest, atomic write, verification, safe loading);
# here the model, optimiser and RNG go into it and come back, on every rank


def on_event(name: str, step: int):
    """The one fault-injection hook, called where a run can die: "step" (gradients computed, weights not yet
    updated), "eval", "save" (checkpoint files written, not yet renamed), "saved" (just renamed). Tests replace it, or
    set TRAIN_CRASH_AT=<name>:<step> to SIGKILL the process there, as a node failure or the OOM killer would."""
    if os.environ.get("TRAIN_CRASH_AT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(out_dir: Path, step: int, model, optimizer, train_state: dict, args: ModelArgs, family: str,
                    cfg: Config, d: Dist, need: int = 0) -> Path:
    """out_dir/step_XXXXXXXX with this rank's shards of model and optimiser, its RNG, and train_state (need: the
    bytes it is expected to take, for the message of a full disk)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rng = {"torch": torch.get_rng_state().tolist()}
    if rank_device(d).type in ("cuda", "npu"):
        rng["device"] = getattr(torch, rank_device(d).type).get_rng_state().tolist()
    return write_step_dir(out_dir, step, {"model": model_sd, "optim": optim_sd}, rng,
                          {**asdict(args), "family": family}, train_state,
                          copy_tokenizer=lambda dst: prepare.copy_tokenizer_files(cfg.data_dir, dst),
                          keep_last=cfg.keep_last, ranks=ranks_of(d), on_event=on_event, need=need or None)


def load_checkpoint(step_dir: Path, model, optimizer, d: Dist) -> dict:
    """Restore model and optimiser (resharded to this mesh by DCP) and this rank's RNG; returns train_state.
    CheckpointError if the DCP files cannot be read safely (verify_step_dir has checked them against the manifest)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    train_state, rng = read_step_dir(step_dir, state, d.rank, no_dist=d.world_size == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng:  # a rank that did not exist in the saving run keeps its seeded RNG
        try:
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
            if "device" in rng and rank_device(d).type in ("cuda", "npu"):
                getattr(torch, rank_device(d).type).set_rng_state(torch.tensor(rng["device"], dtype=torch.uint8))
        except RuntimeError as e:  # a state of the wrong size
            raise CheckpointError(f"{step_dir / f'rng_rank{d.rank}.json'}: not an RNG state of this torch "
                                  f"({str(e).splitlines()[0]})") from None
    return train_state


def resume_checkpoint(out_dir: Path, model, optimizer, args: ModelArgs, d: Dist, log) -> tuple[Path, dict]:
    """Load the latest intact step dir of out_dir: a damaged one is reported and the one before it is tried."""
    found = step_dirs(out_dir)
    if not found:
        raise TrainError(f"init_from=resume: no complete step_XXXXXXXX dir in out_dir={out_dir}")
    while found:
        step_dir = found.pop()
        try:
            verify_step_dir(step_dir, ranks_of(d), required=RESUME_FIELDS)
            saved, _ = read_config(step_dir)
            train_checks.check_same_shape(step_dir, saved, args)  # another model is a mistake in the config, not damage: fails
            return step_dir, load_checkpoint(step_dir, model, optimizer, d)
        except CheckpointError as e:
            problem = str(e)
            if found:
                log(f"train.py: {step_dir.name} is damaged: {problem}; falling back to {found[-1].name}")
    raise TrainError(f"init_from=resume: {problem}; no intact checkpoint left in out_dir={out_dir}")


def load_weights(path: Path, model, args: ModelArgs):
    """Weights only, from a checkpoint dir (config.json + safetensors) or a training step dir (DCP).

    args came from the checkpoint's config.json (plus overrides), so a shape mismatch means an override changed one.
    """
    if (path / ".metadata").exists():  # a training step dir: read just the model from the DCP files
        state = {"model": get_model_state_dict(model)}
        with as_train_error(CheckpointError, prefix=f"init_from={path}: "):
            if (path / "train_state.json").exists():  # each rank checks every file here: init happens once
                verify_step_dir(path)
            dcp_load(state, path, no_dist=not dist.is_initialized())
        set_model_state_dict(model, state["model"])
        return
    with as_train_error(CheckpointError, prefix="init_from: "):
        tensors = load_tensors(path)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    train_checks.check_tensors(path, tensors, {k: tuple(v.shape) for k, v in full.items()})
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, val: TokenSplit, starts: list[list[int]], autocast, device) -> float:
    """The mean loss of the evaluation batches that hold a counted target; a batch of prompt tokens only (loss mask 0
    throughout) has no loss to average, and nan when no batch has one."""
    model.eval()
    losses = []
    for batch_starts in starts:
        x, y, mask, doc_ids = batch_on(val, batch_starts, device)
        if mask is not None and not mask.any():
            continue
        with autocast:
            _, loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)
        losses.append(loss.float().item())
    model.train()
    return sum(losses) / len(losses) if losses else math.nan


# --------------------------------------------------------------------------------------------------------------------
# --dry_run: the plan of a config on its mesh (support/dry_run.py and support/planner.py compute it)


def plan(cfg: Config, model_overrides: dict) -> dict:
    """--dry_run: print the parameter count, per-device memory and step time of this config on its mesh."""
    return dry_run.plan(cfg, model_overrides, model_args_for, load_meta)


# --------------------------------------------------------------------------------------------------------------------
# the run: main = setup, restore, train, finish


@dataclass
class Run:
    """What the steps of a run share: set up by setup(), continued by restore(), advanced by train(), closed by
    finish()."""
    cfg: Config
    model_overrides: dict
    args: ModelArgs
    family: str
    d: Dist
    device: torch.device  # this rank's
    out_dir: Path
    train_data: TokenSplit
    val_data: TokenSplit
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    sampler: EpochSampler
    grad_accum: int
    losses: dict  # step -> training loss, this run's steps
    lora_base: str | None  # the base checkpoint dir of a LoRA run
    step: int = 0
    best_val: float | None = None
    val_loss: float | None = None
    last_ckpt: Path | None = None
    skipped_in_a_row: int = 0  # float16 steps skipped in a row
    unread: list = field(default_factory=list)  # (step, lr, loss, grad norm) of the steps since the last read_steps
    metrics: object = None  # metrics.jsonl, open on rank 0
    t_start: float = 0.0
    stop: object = None  # preemption.StopSignals: the signal this process received, if any
    stopped_by: int = 0  # the signal every rank stopped on

    def log(self, msg: str):
        if self.d.master:
            tqdm.write(msg, file=sys.stderr)

    def record(self, row: dict):
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()


def main(argv=None) -> dict:
    """Train; returns a summary (losses per step, last val loss, baseline, paths) for tests and callers. What stops a
    run (TrainError, a bad config, checkpoint or data dir) is one line "train.py: ..." and exit status 1; a run stopped
    by SIGTERM or SIGINT saves its step and exits with preemption.PREEMPTED, saying how to resume it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__}\nkeys, defaults and values:\n{configurator.keys_help(Config, Config.__dataclass_fields__)}"
              f"\n  and every ModelArgs field: {', '.join(MODEL_FIELDS)}")
        raise SystemExit(0)
    try:
        summary = run_training(argv)
    except (TrainError, ConfigError, CheckpointError, prepare.DataError, prepare.TemplateError) as e:
        raise SystemExit(f"train.py: {e}") from None
    if summary.get("stopped_by"):  # SIGTERM / SIGINT: saved, and said how to resume (run_training)
        raise SystemExit(preemption.PREEMPTED)
    return summary


def run_training(argv: list[str]) -> dict:
    """The plan (--dry_run), or the run: setup, restore, train, finish."""
    cfg, model_overrides = parse_config(argv)
    cfg = train_checks.resumed_lora_settings(cfg)
    train_checks.check_config(cfg, DTYPES)
    if cfg.dry_run:  # the plan only: no data, no model, no process group
        return plan(cfg, model_overrides)
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else os.path.relpath(__file__)
    resume = preemption.command_line(script, argv, resume=True)
    say = preemption.say_now if os.environ.get("RANK", "0") == "0" else None
    disk_full = diskspace.reported(cfg.out_dir, error=TrainError,  # the last resort: metrics.jsonl, the lock file
                                   advice="free space there", by_room=False)
    with freed_memory_returned_to_os(cfg.lora_rank > 0 and kernels.device_type() == "cpu"), disk_full, \
            runlock.OutDirLock() as lock, \
            preemption.StopSignals(say, lambda: (step_dirs(cfg.out_dir) or [None])[-1], resume) as stop:
        try:
            run = setup(cfg, model_overrides, lock)
            run.stop = stop
            restore(run)
            summary = finish(run, train(run))
        except CheckpointError as e:  # support/stepdir.py's, a full disk's too: main's line as it is, not disk_full's
            raise TrainError(str(e)) from None
    if run.stopped_by:  # preempted: a normal stop, with a status of its own (main's)
        name = preemption.signal_name(run.stopped_by)
        run.log(f"train.py: stopped by {name} after step {run.step}, saved in {run.last_ckpt}; resume with: {resume}"
                if run.last_ckpt else f"train.py: stopped by {name} before the first step: nothing to save; start "
                f"again with: {preemption.command_line(script, argv + ['--overwrite'], resume=False)}")
    return {**summary, "stopped_by": run.stopped_by}


def setup(cfg: Config, model_overrides: dict, lock: runlock.OutDirLock) -> Run:
    """Data, mesh, out_dir, the model with its weights (build_model), optimiser, loss scaler and data sampler."""
    meta = load_meta(cfg.data_dir)
    args, family = model_args_for(cfg, model_overrides, meta)
    d = setup_distributed(cfg, args)
    micro_per_step = cfg.micro_batch_size * d.dp
    with as_train_error(prepare.DataError):
        train_data, val_data = (TokenSplit(cfg.data_dir, split, meta, cfg.seq_len) for split in ("train", "val"))
        for split in (train_data, val_data):
            split.check_ids(args.vocab_size)
    train_checks.check_memory(args, cfg, d, train_data.packed)
    out_dir = train_checks.prepare_out_dir(cfg, d, lock)  # refused, or ours alone
    model = build_model(args, cfg, d)
    return Run(cfg, model_overrides, args, family, d, rank_device(d), out_dir, train_data, val_data, model,
               optimizer=build_optimizer(model, cfg, rank_device(d)),
               scaler=LossScaler(cfg.dtype == "float16", cfg.loss_scale, cfg.loss_scale_window, cfg.static_loss_scale,
                                 cfg.loss_scale_hysteresis, cfg.min_loss_scale),
               sampler=EpochSampler(len(train_data.tokens), cfg.seq_len, micro_per_step, cfg.seed,
                                    rows=train_data.packed),
               grad_accum=cfg.global_batch_size // micro_per_step, losses={},
               lora_base=str(Path(cfg.init_from).resolve()) if cfg.lora_rank and cfg.init_from != "scratch" else None)


def restore(run: Run):
    """Continue a run (init_from='resume': the latest intact step dir's weights, optimiser, counters, data position,
    RNG), or say where the weights came from."""
    cfg = run.cfg
    if cfg.init_from == "resume":
        resumed_from, state = resume_checkpoint(run.out_dir, run.model, run.optimizer, run.args, run.d, run.log)
        run.step, run.best_val, run.lora_base = state["step"], state.get("best_val_loss"), state.get("lora_base")
        run.scaler.load_state_dict(state["loss_scaler"])
        run.sampler.load_state_dict(state["data"])
        run.log(f"resumed from {resumed_from} at step {run.step}")
        if run.step < cfg.max_iters:  # a disk without room for the next save: said now, not after the steps up to it
            check_room(run, step_bytes=diskspace.tree_bytes(resumed_from))
    elif cfg.init_from != "scratch" and not cfg.lora_rank:  # build_model loaded them
        run.log(f"initialised weights from {cfg.init_from}")
    if cfg.lora_rank:
        if cfg.init_from == "scratch":
            run.log("warning: LoRA on a randomly initialised base (init_from='scratch'): fine for tests and memory "
                    "measurements, useless for fine-tuning")
        n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        run.log(f"{'QLoRA (NF4 base)' if cfg.qlora else 'LoRA'}: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on "
                f"{len(run.model.lora_adapted)} layers ({cfg.lora_targets}); {n_train:,} trainable parameters")
    run.last_ckpt = (step_dirs(run.out_dir) or [None])[-1]


def eval_batches(run: Run) -> list[list[int]]:
    """This rank's window starts of the eval_iters evaluation batches: fixed (their own generator), so val losses are
    comparable and the training RNG untouched."""
    cfg, val, d = run.cfg, run.val_data, run.d
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n_val = len(val.tokens) // cfg.seq_len if val.packed else len(val.tokens) - cfg.seq_len
    stride = cfg.seq_len if val.packed else 1  # packed: whole rows
    return [(np.array_split(torch.randint(n_val, (cfg.micro_batch_size * d.dp,), generator=g).numpy(),
                            d.dp)[d.dp_rank] * stride).tolist() for _ in range(cfg.eval_iters)]


def train(run: Run) -> dict:
    """The loop: a step, then a log line, an eval and a checkpoint when their intervals say so. -> the summary."""
    cfg, d = run.cfg, run.d
    run.model.train()
    eval_starts = eval_batches(run)
    autocast = contextlib.nullcontext() if cfg.dtype == "float32" else torch.autocast(run.device.type,
                                                                                     dtype=DTYPES[cfg.dtype])
    baseline = unigram_entropy(run.train_data, run.args.vocab_size)  # the loss of knowing token frequencies only
    throughput = Throughput(run, start_metrics(run, baseline))
    run.t_start = time.perf_counter()
    bar = tqdm(total=cfg.max_iters, initial=run.step, disable=not d.master, dynamic_ncols=True, file=sys.stderr)
    with bar:  # closed however the loop ends: a stopping run's message comes after the bar, not inside it
        while run.step < cfg.max_iters:
            run.stopped_by = stop_requested(run)  # SIGTERM / SIGINT: every rank stops after the same step
            if run.stopped_by:
                if run.step and (run.last_ckpt is None or run.last_ckpt.name != f"step_{run.step:08d}"):
                    if run.unread:  # never a checkpoint of NaN weights
                        read_steps(run)
                    run.last_ckpt = checkpoint(run)
                break
            run.unread.append((run.step + 1, *train_step(run, autocast)))
            run.step += 1
            bar.update(1)
            due = lambda interval: run.step % interval == 0 or run.step == cfg.max_iters  # noqa: E731
            if due(cfg.log_interval) or due(cfg.eval_interval) or due(cfg.ckpt_interval):
                loss, lr, grad_norm = read_steps(run)  # before an eval or a checkpoint too: never of NaN weights
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if due(cfg.log_interval):
                throughput.log(loss, lr, grad_norm)
            if due(cfg.eval_interval):
                on_event("eval", run.step)
                with loss_parallel_context(d):
                    run.val_loss = mean_over_ranks(evaluate(run.model, run.val_data, eval_starts, autocast,
                                                            run.device), d)
                if math.isfinite(run.val_loss):  # nan: no eval batch had a counted target
                    run.best_val = run.val_loss if run.best_val is None else min(run.best_val, run.val_loss)
                run.record({"step": run.step, "val_loss": run.val_loss, "unigram_baseline": baseline})
                run.log(f"step {run.step}: val loss {run.val_loss:.4f} (unigram baseline {baseline:.4f})"
                        + ("; no eval batch held a counted target (loss mask 1)" if math.isnan(run.val_loss) else ""))
                throughput.restart()
            if due(cfg.ckpt_interval):
                run.last_ckpt = checkpoint(run)
                throughput.restart()
    return {"losses": run.losses, "val_loss": run.val_loss, "best_val_loss": run.best_val,
            "unigram_baseline": baseline, "last_checkpoint": run.last_ckpt, "skipped_steps": run.scaler.skipped}


def train_step(run: Run, autocast) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One optimiser step over grad_accum micro-batches -> (lr, this rank's part of the loss, grad norm), the last two
    left on the device: the loop reads them at the log interval (read_steps), so the host never waits for the device
    here but in float16, to know whether the gradients overflowed; that skips the update, and 32 skips in a row stop
    the run naming the last good checkpoint."""
    cfg, d, model, scaler = run.cfg, run.d, run.model, run.scaler
    lr = get_lr(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [batch_on(run.train_data, run.sampler.next_starts(d.dp_rank, d.dp), run.device)
               for _ in range(run.grad_accum)]
    shares, whole = loss_weights(batches, cfg.loss_weighting, d)
    loss_sum = torch.zeros((), device=run.device)
    for micro, (x, y, mask, doc_ids) in enumerate(batches):
        if d.dp > 1:  # FSDP2: reduce-scatter gradients only on the last micro step
            model.set_requires_gradient_sync(micro == run.grad_accum - 1)
        with loss_parallel_context(d):  # tensor parallel: forward and backward of the vocab-sharded loss
            with autocast:
                _, loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)  # the mean over its counted targets
            loss = loss.float() * shares[micro] / whole  # its part of the step's loss
            (loss * scaler.scale).backward()
        loss_sum += loss.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    scaler.unscale_(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor: FSDP/TP
    on_event("step", run.step + 1)
    # float16 reads one value: did the gradients overflow (NaN and inf spread through the backward and the gradient
    # reduction, so the norm, the same on every rank, sees an overflow anywhere). float32 and bfloat16 read none: a
    # non-finite step stops the run when read_steps reads it, before any eval or checkpoint
    finite = not scaler.enabled or bool(torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
        run.skipped_in_a_row = 0
    else:  # said and counted; one at min_loss_scale, or 32 in a row, stops the run
        train_checks.skip_overflowed_step(run, loss_sum, grad_norm)
    scaler.update(finite)
    run.optimizer.zero_grad(set_to_none=True)
    return lr, loss_sum, grad_norm


def loss_weights(batches: list, weighting: str, d: Dist) -> tuple[list, object]:
    """(shares, whole): micro batch i's loss, the mean over its counted targets, times shares[i] / whole is its part of
    the step's loss on this rank; FSDP then averages the gradients over the dp ranks.

    'token': shares[i] = its counted targets (loss mask 1) x dp, whole = the counted targets of every micro batch on
    every dp rank (summed on the device, nothing waits for it), so every counted target of the step weighs the same.
    'micro_batch': shares[i] = 1, whole = grad_accum, the mean of the micro batches' means.
    """
    if weighting == "micro_batch":
        return [1] * len(batches), len(batches)
    counted = [((y != -100) if mask is None else (y != -100) & (mask != 0)).sum() for _, y, mask, _ in batches]
    whole = torch.stack(counted).sum()
    if d.dp > 1:
        dist.all_reduce(whole, group=d.mesh.get_group("dp"))
    return [n * d.dp for n in counted], whole.clamp(min=1)  # none counted: a zero loss, as a micro batch's alone


def checkpoint(run: Run) -> Path:
    """Save the run at its current step (save_checkpoint with everything needed to continue it exactly), once the
    disk has room for it (check_room)."""
    cfg = run.cfg
    need = check_room(run, run.out_dir / f"step_{run.step:08d}")
    train_state = {"step": run.step, "best_val_loss": run.best_val, "loss_scaler": run.scaler.state_dict(),
                   "data": run.sampler.state_dict(), "world_size": run.d.world_size, "config": asdict(cfg),
                   "model_overrides": run.model_overrides, "lora_base": run.lora_base}
    return save_checkpoint(run.out_dir, run.step, run.model, run.optimizer, train_state, run.args, run.family, cfg,
                           run.d, need)


def finish(run: Run, summary: dict) -> dict:
    """The LoRA adapters (PEFT format) and, with export, a checkpoint dir for sample.py; close the run."""
    cfg, d, step, out_dir = run.cfg, run.d, run.step, run.out_dir
    export_dir = adapter_dir = None
    # the adapters alone, a few MB, in PEFT's format: convert.py merge-lora folds them into any copy of the base;
    # gathered from every rank. A preempted run's result is its step dir until a resume finishes it
    if cfg.lora_rank and not run.stopped_by:
        adapters = lora_state_dict(run.model, full=True)
        if d.master:
            adapter_dir = out_dir / "adapter"
            write_peft_adapter(adapter_dir, adapters, run.args, run.family, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               dropout=cfg.lora_dropout, base=run.lora_base,
                               metadata={"lora_targets": cfg.lora_targets, "quantize_base": str(cfg.qlora),
                                         "step": str(step)})
            run.log(f"adapters of step {step} saved to {adapter_dir} (PEFT LoRA format)")
        barrier(d)
    if cfg.export and run.last_ckpt is not None and not run.stopped_by:
        if d.master:
            if not cfg.lora_rank:
                export_dir = out_dir / "export"
                try:
                    dcp_to_native(run.last_ckpt, export_dir, overwrite=True)
                except CheckpointError as e:  # a full disk: the run itself is saved
                    raise TrainError(f"{e}; {run.last_ckpt} is complete: export it with python convert.py dcp-to-native "
                         f"--src={run.last_ckpt} --dst=DIR")
            elif run.lora_base:  # merged into the base's own full-precision weights (for QLoRA too)
                export_dir = out_dir / "export"
                merge_lora(run.lora_base, adapter_dir, export_dir, overwrite=True)
            else:
                run.log("export skipped: a LoRA run from scratch has no base checkpoint to merge into")
            if export_dir:
                run.log(f"exported step {step} to {export_dir} (python sample.py --ckpt={export_dir})")
        barrier(d)
    if run.metrics:
        run.metrics.close()
    if d.own_group:
        dist.destroy_process_group()
    return {**summary, "export_dir": export_dir, "adapter_dir": adapter_dir,
            "wall_s": time.perf_counter() - run.t_start}


if __name__ == "__main__":
    main()
