"""support/metrics_file.py: used by train.py (its loop: start_metrics, read_steps, Throughput). metrics.jsonl is
the history of the run that exists: a resume from step S drops the rows of the steps after S, which the rolled-back
run had logged and the resumed one logs again (a loss curve, or bench.py --plot, would read them twice).

Rows are JSON objects, one a line: a step's row has "step", a start row "start_step". Kept: the rows of steps up to
S and the start rows of runs that started before S (the resumed run adds its own); dropped: the rest, and a line cut
short by a killed run. The file is replaced whole (written beside it, then renamed), so a kill while rewinding leaves
the old or the new one.

It also makes the rows: the start of a run (start_metrics: what is trained, the unigram baseline, the peak FLOP/s
MFU is measured against), the losses and grad norms of the steps, read off the device at once when a row, an eval or
a checkpoint needs them (read_steps: a step does not wait for the device; a non-finite one stops the run), and every
log interval's row (Throughput: loss, lr, grad norm, tokens/s, MFU, memory).
"""

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model import count_weights
from support.planner import flops_per_token, local_state_bytes, mm_peak_flops, peak_memory_gib
from support.collectives import gather_over_ranks, mean_over_ranks
from support.train_checks import TrainError, last_good


def rewind(path, step: int) -> int:
    """Drop the rows of metrics.jsonl at path that come after `step`; returns how many went (0 if none or no file)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or _number(row, "step") > step or _number(row, "start_step") >= step:
            dropped += bool(line.strip())
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else -1


def start_metrics(run, baseline: float) -> float:
    """Open metrics.jsonl, log what is trained and the unigram baseline; -> the peak FLOP/s for MFU."""
    cfg, args, d = run.cfg, run.args, run.d
    peak = cfg.peak_flops or mm_peak_flops(torch.float32, 1024, run.device, repeats=1, seconds=0.5)
    if d.master and cfg.init_from == "resume" and (dropped := rewind(run.out_dir / "metrics.jsonl", run.step)):
        run.log(f"metrics.jsonl: dropped {dropped} rows of the steps after {run.step}, which this run trains again")
    run.metrics = open(run.out_dir / "metrics.jsonl", "a") if d.master else None
    n_params = count_weights(run.model)  # QLoRA's NF4 weights too
    source = {"scratch": cfg.model, "resume": f"of {run.out_dir}"}.get(cfg.init_from, cfg.init_from)
    run.log(f"model {source} ({run.family}): "
            f"{n_params / 1e6:.2f}M parameters, {args.n_layers} layers, dim {args.dim}; {len(run.train_data.tokens):,} "
            f"train tokens; {cfg.global_batch_size * cfg.seq_len:,} tokens per step (grad_accum {run.grad_accum}, "
            f"dp {d.dp}, tp {d.tp}); dtype {cfg.dtype}; activation checkpointing {cfg.activation_checkpointing}")
    run.log(f"unigram baseline (entropy of the train tokens): {baseline:.4f} nats; MFU against a peak of "
            f"{peak / 1e9:.1f} GFLOP/s per device ({'configured' if cfg.peak_flops else 'measured torch.mm fp32'})")
    run.record({"unigram_baseline": baseline, "n_params": n_params, "peak_flops": peak, "start_step": run.step})
    return peak


def read_steps(run) -> tuple[float, float, float]:
    """The losses and grad norms of the steps since the last read, off the device at once: each step's loss (the
    mean of its dp ranks' parts) into run.losses. A float32 or bfloat16 step whose loss or grad norm is not finite
    stops the run, named (a float16 one was skipped). -> (loss, lr, grad norm) of the last step."""
    d = run.d
    steps, lrs, losses, grad_norms = zip(*run.unread)
    run.unread.clear()
    values = torch.stack([torch.stack(losses), torch.stack(grad_norms)]).double()  # (2, steps)
    if d.dp > 1:  # the grad norms are the same on every rank
        parts = [torch.empty_like(values) for _ in range(d.dp)]
        dist.all_gather(parts, values, group=d.mesh.get_group("dp"))
        values[0] = sum(part[0] for part in parts) / d.dp
    losses, grad_norms = values.tolist()
    for step, loss, grad_norm in zip(steps, losses, grad_norms):
        if not run.scaler.enabled and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainError(f"step {step}: loss {loss}, grad norm {grad_norm} is not finite in {run.cfg.dtype}; stopping"
                 f"{last_good(run)}")
        run.losses[step] = loss
    return losses[-1], lrs[-1], grad_norms[-1]


class Throughput:
    """The log line every log_interval steps: loss, lr, grad norm, tokens/s per device and MFU (means over ranks),
    memory per device; to stderr and metrics.jsonl."""

    def __init__(self, run, peak: float):
        self.run, self.peak = run, peak
        self.flops_token = flops_per_token(run.args, run.cfg.seq_len)
        self.t_log, self.first_step = time.perf_counter(), run.step

    def restart(self):
        """Time and count steps from now on (an eval or a checkpoint is not training throughput)."""
        self.t_log, self.first_step = time.perf_counter(), self.run.step

    def log(self, loss: float, lr: float, grad_norm: float):
        run, d, scaler = self.run, self.run.d, self.run.scaler
        tokens = run.cfg.global_batch_size * run.cfg.seq_len * (run.step - self.first_step)
        rank_tokens_per_s = tokens / (time.perf_counter() - self.t_log) / d.world_size
        tokens_per_s = mean_over_ranks(rank_tokens_per_s, d)
        mfu = mean_over_ranks(self.flops_token * rank_tokens_per_s / self.peak, d)
        mem = gather_over_ranks(peak_memory_gib(run.device), d)
        state_bytes = [int(b) for b in gather_over_ranks(local_state_bytes(run.model, run.optimizer), d)]
        run.record({"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                    "mfu": mfu, "mem_gib": max(mem), "mem_gib_per_device": mem,
                    "param_optim_bytes_per_device": state_bytes, "skipped_steps": scaler.skipped,
                    "loss_scale": scaler.scale, "elapsed_s": time.perf_counter() - run.t_start})
        run.log(f"step {run.step}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                f"{tokens_per_s:,.0f} tokens/s/device, MFU {mfu:.1%}, mem {max(mem):.2f} GiB"
                + (f" (max over {d.world_size} devices)" if d.world_size > 1 else "")
                + (f", loss scale {scaler.scale:g}, skipped {scaler.skipped}" if scaler.enabled else ""))
        self.t_log, self.first_step = time.perf_counter(), run.step
