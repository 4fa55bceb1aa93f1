"""Used by train.py: what a run is given, checked where it enters, and refused in one line (TrainError, which
train.py's main says) before the run allocates, joins a process group or writes what it cannot finish.

What it adds to train.py: the checks of its config beyond each key's declared range (check_config), of the model
against the data and the run (check_preset, check_vocabulary, check_model_args), of a resume's LoRA settings against
its step dir (resumed_lora_settings), of the launch and the (dp, tp) mesh (check_launch, check_mesh), of the data's
size (check_windows), of loaded weights (check_same_shape, check_tensors, check_base_tensor), of out_dir
(prepare_out_dir: never an input, one run at a time, a previous run kept unless resumed or overwritten), of memory
(check_memory) and of disk room for the next checkpoint (check_room); the stops of a run that cannot go on (float16
overflows no loss scale helps: skip_overflowed_step) with the words naming its last good checkpoint (last_good); and
as_train_error, which says a library's own error (a checkpoint's, the data's) as the run's.
"""

import contextlib
import difflib
import os
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path

from tqdm import tqdm

from model import PRESETS, ModelArgs
from support import diskspace, runlock
from support.checks import check_value
from support.outputs import check_output
from support.collectives import all_gather, barrier, gather_over_ranks, mean_over_ranks, rank_device
from support.device import available_memory
from support.planner import local_state_bytes, memory_plan
from support.stepdir import (ROOM_ADVICE, last_good_step_dir, newest_step_dir, read_train_state,
                             remove_unfinished_step_dirs, step_dirs)

AC_MODES = ("none", "full", "selective")
LOSS_WEIGHTINGS = ("token", "micro_batch")
RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets beside WORLD_SIZE
MAX_SKIPPED_IN_A_ROW = 32  # float16 steps skipped in a row (loss scale / 2^32) before a run stops as diverged


class TrainError(Exception):
    """A run that cannot start or go on (its config, data, mesh, weights or out_dir): one line for a person, which
    main says as train.py's with a non-zero exit and no traceback."""


@contextlib.contextmanager
def as_train_error(*kinds, prefix: str = ""):
    """A library's one-line errors of `kinds` (a checkpoint's, the data's, ModelArgs') as the run's TrainError."""
    try:
        yield
    except kinds as e:
        raise TrainError(f"{prefix}{e}")


# --------------------------------------------------------------------------------------------------------------------
# the config and the model


def check_config(cfg, dtypes):
    """What the declared ranges (checked as each key is set) cannot say alone."""
    if cfg.dtype not in dtypes:
        raise TrainError(f"dtype={cfg.dtype!r}: expected one of {', '.join(dtypes)}")
    if cfg.activation_checkpointing not in AC_MODES:
        raise TrainError(f"activation_checkpointing={cfg.activation_checkpointing!r}: expected one of {', '.join(AC_MODES)}")
    if cfg.loss_weighting not in LOSS_WEIGHTINGS:
        raise TrainError(f"loss_weighting={cfg.loss_weighting!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
    if cfg.lr_decay not in ("cosine", "linear"):
        raise TrainError(f"lr_decay={cfg.lr_decay!r}: expected 'cosine' or 'linear'")
    if cfg.qlora and not cfg.lora_rank:
        raise TrainError("qlora=True trains adapters on a 4-bit base: set lora_rank too (e.g. --lora_rank=8)")
    if cfg.lora_rank and cfg.init_from not in ("scratch", "resume") and (Path(cfg.init_from) / ".metadata").exists():
        raise TrainError(f"init_from={cfg.init_from}: LoRA needs a checkpoint dir as its base; export the step dir first "
             f"(python convert.py dcp-to-native --src={cfg.init_from} --dst=...)")


LORA_SHAPE = ("lora_rank", "lora_targets", "qlora")  # what a LoRA run's step dir holds: fixed for its resumes


def resumed_lora_settings(cfg):
    """A resume trains what its newest readable step dir holds: a LoRA run takes that run's LoRA settings when the
    command line gives none (as a fine-tuning run takes its model); settings that contradict it are refused."""
    if cfg.init_from != "resume":
        return cfg
    Config = type(cfg)
    step_dir, state = newest_step_dir(cfg.out_dir, read_train_state)
    saved = state.get("config") if step_dir is not None else None
    if not isinstance(saved, dict):  # no step dir (resume reports it), or no settings recorded: resume checks the rest
        return cfg
    file = step_dir / "train_state.json"
    lora = {k: saved.get(k, getattr(Config, k)) for k in ("lora_alpha", "lora_dropout", *LORA_SHAPE)}
    for key, value in lora.items():
        try:
            check_value(key, value, Config.__dataclass_fields__[key].type,
                        Config.__dataclass_fields__[key].metadata.get("range"))
        except ValueError as e:
            raise TrainError(f"{file}: config: {e}")
    if lora["lora_rank"] and not cfg.lora_rank:
        return replace(cfg, **lora)
    if (lora["lora_rank"] or cfg.lora_rank) and any(getattr(cfg, k) != lora[k] for k in LORA_SHAPE):
        held = ", ".join(f"{k}={lora[k]!r}" for k in LORA_SHAPE)
        raise TrainError(f"init_from=resume: {step_dir} holds a LoRA run with {held}; resume it with those (or none)"
             if lora["lora_rank"] else f"init_from=resume: {step_dir} holds a run without LoRA; resume it without "
             f"lora_rank")
    return cfg


def check_vocabulary(source, data_dir: str, diff):
    """diff: prepare.vocabulary_difference(source, data_dir), None when the data's tokenizer is the model's."""
    if diff:
        raise TrainError(f"data_dir={data_dir}: prepared with another tokenizer than init_from={source}'s ({diff}); "
             f"prepare it with --tokenizer={source}")


def check_preset(name: str):
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise TrainError(f"model={name!r}: unknown preset" + (f"; did you mean {close[0]!r}?" if close else "")
             + f" (presets: {', '.join(PRESETS)})")


def check_model_args(cfg, args: ModelArgs, meta: dict):
    """The model against the run's sequence length and activation checkpointing, and the data's vocabulary."""
    if cfg.seq_len > args.max_seq_len:
        raise TrainError(f"seq_len={cfg.seq_len} is above the model's max_seq_len={args.max_seq_len}")
    if cfg.activation_checkpointing_layers > args.n_layers:
        raise TrainError(f"activation_checkpointing_layers={cfg.activation_checkpointing_layers} is above the model's "
             f"n_layers={args.n_layers}")
    if meta["vocab_size"] > args.vocab_size:
        raise TrainError(f"{cfg.data_dir}/meta.json: vocab_size={meta['vocab_size']} is larger than the model's "
             f"vocab_size={args.vocab_size} (was the data prepared with this model's tokenizer?)")


def check_windows(n_tokens: int, windows: int, per_step: int, seq_len: int):
    """The train split holds at least one micro step of windows (EpochSampler)."""
    if windows < per_step:
        raise TrainError(f"train split has {n_tokens} tokens: fewer than one micro step of {per_step} windows of "
             f"{seq_len + 1} tokens; lower micro_batch_size or seq_len")


# --------------------------------------------------------------------------------------------------------------------
# the launch and the mesh


def check_launch(cfg, args: ModelArgs, env) -> tuple[int, int]:
    """(world size, dp) of a launch whose environment, mesh, model and batch fit together. Every check runs before
    the first collective, on every rank: bad input is one clear line and an exit, never a hang at the rendezvous."""
    if not env.get("WORLD_SIZE", "1").isdigit() or int(env.get("WORLD_SIZE", "1")) < 1:
        raise TrainError(f"WORLD_SIZE={env['WORLD_SIZE']!r}: expected a positive integer (torchrun sets it)")
    world_size = int(env.get("WORLD_SIZE", "1"))
    dp = check_mesh(cfg, args, world_size)
    if world_size == 1:
        return world_size, dp
    missing = [k for k in RENDEZVOUS_ENV if k not in env]
    if missing:
        raise TrainError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun --nproc_per_node=N "
             "(and --nnodes, --node_rank, --master_addr across machines)")
    if not (env["RANK"].isdigit() and env["LOCAL_RANK"].isdigit() and int(env["RANK"]) < world_size):
        raise TrainError(f"RANK={env['RANK']!r}, LOCAL_RANK={env['LOCAL_RANK']!r}: expected integers, RANK < WORLD_SIZE")
    return world_size, dp


def check_mesh(cfg, args: ModelArgs, world: int, world_name: str = "WORLD_SIZE") -> int:
    """The dp degree of the (dp, tp) mesh over `world` devices, once the mesh fits them, the model and the batch; else
    one clear line. A run (setup_distributed) and its plan (--dry_run, world_name 'devices') ask the same."""
    dp = cfg.dp or max(1, world // cfg.tp)
    if dp * cfg.tp != world:
        raise TrainError(f"dp={dp} x tp={cfg.tp} = {dp * cfg.tp} processes, but {world_name}={world}: dp * tp must be the "
             "number of processes (--nnodes x --nproc_per_node of torchrun)")
    if cfg.tp > 1:
        for key, n in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("seq_len", cfg.seq_len)):
            if n % cfg.tp:
                raise TrainError(f"tp={cfg.tp} does not divide {key}={n}: each tensor-parallel rank holds whole attention heads "
                     "and an equal slice of the sequence")
        if args.tie_embeddings or cfg.lora_rank:
            raise TrainError(f"tp={cfg.tp} with {'tie_embeddings' if args.tie_embeddings else 'lora_rank'}: not supported; "
                 "use data parallelism (--tp=1)")
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise TrainError(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size * dp = "
             f"{cfg.micro_batch_size * dp}")
    return dp


def check_memory(args: ModelArgs, cfg, d, packed: bool):
    """Refuse, before allocating any of it, a run whose planned bytes per device (planner.memory_plan, what --dry_run
    prints) exceed the memory this device has available; the processes of one machine share its CPU memory."""
    device = rank_device(d)
    available = available_memory(device)
    try:
        plan = memory_plan(args, cfg, d.dp, d.tp, packed)
    except ValueError as e:  # lora_targets that match no layer
        raise TrainError(str(e))
    need = plan["bytes"]["total"] * (int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1)
    if available is not None and need > available:
        raise TrainError(f"the model (dim={args.dim}, n_layers={args.n_layers}, vocab_size={args.vocab_size}: "
             f"{plan['n_params'] / 1e9:.2f}B parameters) needs {need / 2**30:.1f} GiB for this run on {device}, which "
             f"has {available / 2**30:.1f} GiB available; see --dry_run for where it goes")


# --------------------------------------------------------------------------------------------------------------------
# weights


def check_same_shape(path, saved: ModelArgs, args: ModelArgs):
    diff = [f"{f}={getattr(saved, f)!r} (config has {getattr(args, f)!r})" for f in (f.name for f in fields(ModelArgs))
            if getattr(saved, f) != getattr(args, f)]
    if diff:
        raise TrainError(f"{path}: checkpoint of another model: " + ", ".join(diff))


def check_tensors(path, tensors: dict, expected: dict):
    """A checkpoint dir's tensors are the model's, each of its shape (expected: name -> shape)."""
    for name in sorted(set(expected) | set(tensors)):
        if name not in tensors or name not in expected:
            raise TrainError(f"init_from={path}: tensor {name} is {'missing' if name not in tensors else 'unexpected'}")
        if tuple(tensors[name].shape) != expected[name]:
            raise TrainError(f"init_from={path}: tensor {name} has shape {tuple(tensors[name].shape)}, model expects "
                 f"{expected[name]}")


def check_base_tensor(init_from, tensors: dict, name: str, shape):
    """A LoRA base's tensor, as build_lora_model fills it."""
    if name not in tensors or tensors[name].shape != shape:
        raise TrainError(f"init_from={init_from}: tensor {name} is missing or has another shape than the "
             f"config's {tuple(shape)}")


# --------------------------------------------------------------------------------------------------------------------
# out_dir: its writing, its disk room


def prepare_out_dir(cfg, d, lock: runlock.OutDirLock) -> Path:
    """Refuse an out_dir that is, holds or lies inside this run's data or start checkpoint, and two runs in one
    out_dir: one that another process holds (lock: rank 0 holds it for this run until the end), and a previous run's
    unless init_from='resume' or --overwrite."""
    out_dir = Path(cfg.out_dir)
    inputs = [cfg.data_dir] + ([cfg.init_from] if cfg.init_from not in ("scratch", "resume") else [])
    try:  # not ".", a file, the data or the checkpoint this run reads, nor a dir holding them (so nothing that
        # --overwrite removes is an input) or inside them
        check_output(out_dir, inputs, flag="out_dir")
    except ValueError as e:
        raise TrainError(str(e))
    problem = None
    if d.master:
        try:  # a path under a file, a read-only dir or file system: one line now, not a traceback at the first save
            out_dir.mkdir(parents=True, exist_ok=True)
            if warning := lock.take(out_dir):
                tqdm.write(f"train.py: warning: {warning}", file=sys.stderr)
            probe = out_dir / f".write_test_{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            problem = f"out_dir={out_dir}: cannot write there ({e.strerror}: {e.filename})"
        except runlock.Busy as e:
            problem = str(e)
    if problem := all_gather(problem, d)[0]:  # every rank stops with rank 0's line
        raise TrainError(problem)
    previous = step_dirs(out_dir) + [p for p in (out_dir / "metrics.jsonl", out_dir / "export") if p.exists()]
    if cfg.init_from != "resume" and previous and not cfg.overwrite:
        raise TrainError(f"out_dir={out_dir} holds another run ({previous[-1].name}); use --init_from=resume to continue "
             f"it, or --overwrite to replace it")
    if d.master:
        if cfg.init_from != "resume":
            for p in previous:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        remove_unfinished_step_dirs(out_dir)
    barrier(d)
    return out_dir


def check_room(run, where: Path | None = None, step_bytes: int = 0) -> int:
    """The bytes a step dir takes: the newest one's (step_bytes, or the newest in out_dir), before the first the
    parameters and optimiser state of every rank; stops every rank in one line, naming the last good checkpoint,
    when out_dir's disk has not that much room (plus a margin) for the next one beside the keep_last kept."""
    state_bytes = sum(gather_over_ranks(local_state_bytes(run.model, run.optimizer), run.d))  # on every rank
    problem, need = None, 0
    if run.d.master:
        newest = step_dirs(run.out_dir)
        need = step_bytes or (diskspace.tree_bytes(newest[-1]) if newest else int(state_bytes))
        problem = diskspace.room_problem(run.out_dir, need, ROOM_ADVICE.format(run.cfg.keep_last),
                                         f"{where.name if where else 'the next checkpoint'}")
    if problem := all_gather(problem, run.d)[0]:
        raise TrainError(f"{problem}{last_good(run)}")
    return need


# --------------------------------------------------------------------------------------------------------------------
# a run that cannot go on


def skip_overflowed_step(run, loss_sum, grad_norm):
    """A float16 step whose gradients overflowed (train_step skips its update): said and counted; an overflow at
    min_loss_scale, or the MAX_SKIPPED_IN_A_ROW-th in a row, stops the run naming the last good checkpoint."""
    scaler, d = run.scaler, run.d
    if scaler.at_floor():
        raise TrainError(f"step {run.step + 1}: float16 overflow at min_loss_scale={scaler.min_scale:g}: no lower scale is "
             f"allowed; stopping{last_good(run)}")
    run.log(f"step {run.step + 1}: float16 overflow (loss scale {scaler.scale:g}): step skipped")
    run.skipped_in_a_row += 1
    if run.skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:  # no loss scale helps: a NaN from the data or the weights
        raise TrainError(f"step {run.step + 1}: loss {mean_over_ranks(loss_sum.item(), d)}, grad norm {grad_norm.item()} not "
             f"finite in {run.skipped_in_a_row} float16 steps in a row (last loss scale {scaler.scale:g}); "
             f"stopping{last_good(run)}")


def last_good(run) -> str:
    """'; the last good checkpoint is ...': the newest step dir that verifies (and so holds finite weights)."""
    last = last_good_step_dir(run.out_dir)
    return f"; the last good checkpoint is {last}" if last else "; no good checkpoint was written"
