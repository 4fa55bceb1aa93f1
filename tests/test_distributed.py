"""Tests for train.py's distributed training on CPU with gloo: FSDP2, tensor + sequence parallel, 2-D meshes,
resharding resume, activation checkpointing, bad input and a rank that dies.

Multi-process runs are real `torchrun --standalone` launches (python -m torch.distributed.run). A launch costs tens of
seconds on a small shared CPU, so one launch runs several trainings in a row: a driver joins the process group once
and calls train.main for each (train.py leaves a group it did not create alone). Every run is compared with one
process on the same global batch (fp32, 6 steps, relative loss difference <= 1e-5).

    python -m pytest -q tests/test_distributed.py
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import train
from model import PRESETS, Transformer
from test_train import V, first_step_gradients, markov_tokens, uneven_mask, write_data
from conftest import is_timing

pytestmark = pytest.mark.slow  # the file takes ~2 minutes on 2 cores, most of it in 4 torchrun launches
ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-5
# the tiny preset is RoPE with grouped-query attention (4 heads, 2 kv heads); the ALiBi model is Baichuan2-13B's
# kind: multi-head, NormHead, max-z loss
ALIBI = ["--pos_emb=alibi", "--n_kv_heads=None", "--norm_head=True", "--z_loss=1e-3"]
# adapters on an NF4 base (drawn from the seed: no base checkpoint needed here) with activation checkpointing; one
# adapter across the fused q/k/v projection (Baichuan's W_pack), the others on single linears
QLORA = ["--lora_rank=4", "--lora_alpha=8", "--qlora", "--lora_targets=W_pack,wo,w1,w2,w3",
         "--activation_checkpointing=full", "--lr=1e-2"]

# joins the process group once, then runs the jobs of a JSON file one after another; rank 0 writes their losses, and
# the whole gradients of step 1 of a job that asks (to out_dir/grads.pt)
DRIVER = """
import contextlib, json, os, shutil, sys
from datetime import timedelta
import torch, torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import train
from test_train import first_step_gradients

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
results = []
for job in json.loads(open(sys.argv[1]).read()):
    if job["copy"] and dist.get_rank() == 0:  # resume on another mesh: a fresh out_dir holding one step dir
        shutil.copytree(job["copy"], os.path.join(job["out"], os.path.basename(job["copy"])))
    dist.barrier()
    with first_step_gradients() if job["grads"] else contextlib.nullcontext() as grads:
        results.append(train.main(job["argv"] + ["--out_dir=" + job["out"]])["losses"])
    if job["grads"] and dist.get_rank() == 0:
        torch.save(grads, os.path.join(job["out"], "grads.pt"))
if dist.get_rank() == 0:
    json.dump(results, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def common(data, *extra):
    """A tiny run: 6 steps of 8 sequences of 32 tokens, micro batches of 2, checkpoints at steps 3 and 6."""
    return [f"--data_dir={data}", "--model=tiny", "--seq_len=32", "--micro_batch_size=2", "--global_batch_size=8",
            "--max_iters=6", "--ckpt_interval=3", "--keep_last=0", "--log_interval=1", "--eval_interval=1000",
            "--eval_iters=1", "--peak_flops=1e9", "--warmup_iters=2", "--lr_decay_iters=40", "--lr=3e-3",
            "--min_lr=3e-4", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8,224 tokens: 256 windows of 32 whatever an epoch's offset, so every mesh's micro steps see the same windows
    return write_data(tmp_path_factory.mktemp("dist") / "markov", markov_tokens(8224, 1), markov_tokens(2000, 2))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """data with a loss mask of prompts and replies of 1 to 60 tokens: sequences count different numbers of targets"""
    return write_data(tmp_path_factory.mktemp("dist_sft") / "sft", markov_tokens(8224, 1), markov_tokens(2000, 2),
                      uneven_mask(8224, 5), uneven_mask(2000, 6))


# one step of 4 sequences in micro batches of 1 (dp=2: 2 on each rank), its gradients unclipped
SFT_STEP = ["--micro_batch_size=1", "--global_batch_size=4", "--max_iters=1", "--grad_clip=0"]


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """Reference runs in this process: {"rope": (losses, out_dir), "alibi": ...}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    for name, extra in (("rope", []), ("alibi", ALIBI), ("qlora", QLORA)):
        out = tmp_path_factory.mktemp(f"one_{name}")
        runs[name] = (train.main(common(data, *extra, f"--out_dir={out}"))["losses"], out)
    torch.set_num_threads(threads)
    return runs


def torchrun(nproc, *args, timeout=400, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def launch(tmp_path, nproc, jobs, grads=()):
    """Run jobs [(name, argv, step dir to resume from or None)] in one torchrun launch -> {name: (losses, out_dir)};
    the jobs named in grads save the gradients of their step 1 to out_dir/grads.pt."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    spec = [{"argv": argv, "out": str(tmp_path / name), "copy": str(copy) if copy else None, "grads": name in grads}
            for name, argv, copy in jobs]
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    result = torchrun(nproc, driver, tmp_path / "jobs.json", tmp_path / "losses.json")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    return {name: ({int(k): v for k, v in run.items()}, tmp_path / name) for (name, _, _), run in zip(jobs, losses)}


@pytest.fixture(scope="module")
def two_ranks(data, sft_data, one_process, tmp_path_factory):
    """dp=2 from scratch (ZeRO-3 and ZeRO-2 resharding); tp=2 resumed from its step 3 (dp=2 -> tp=2); the ALiBi model
    with tp=2 from scratch; one SFT step on dp=2 with its gradients."""
    tmp = tmp_path_factory.mktemp("two")
    return launch(tmp, 2, [("rope_dp2", common(data, "--dp=2"), None),
                           ("rope_dp2_zero2", common(data, "--dp=2", "--zero_stage=2"), None),
                           ("rope_tp2_from_dp2", common(data, "--tp=2", "--init_from=resume"),
                            tmp / "rope_dp2" / "step_00000003"),
                           ("alibi_tp2", common(data, *ALIBI, "--tp=2"), None),
                           ("qlora_dp2", common(data, *QLORA, "--dp=2"), None),
                           ("sft_dp2", common(sft_data, "--dp=2", *SFT_STEP), None)], grads=["sft_dp2"])


@pytest.fixture(scope="module")
def four_ranks(data, two_ranks, tmp_path_factory):
    """A 2x2 mesh from scratch; dp=4 resumed from its step 3 (2x2 -> dp=4); the ALiBi model on 2x2 resumed from
    the tp=2 run's step 3 (tp=2 -> 2x2)."""
    tmp = tmp_path_factory.mktemp("four")
    return launch(tmp, 4, [("rope_2x2", common(data, "--dp=2", "--tp=2"), None),
                           ("rope_dp4_from_2x2", common(data, "--dp=4", "--init_from=resume"),
                            tmp / "rope_2x2" / "step_00000003"),
                           ("alibi_2x2_from_tp2", common(data, *ALIBI, "--dp=2", "--tp=2", "--init_from=resume"),
                            two_ranks["alibi_tp2"][1] / "step_00000003")])


def assert_same_losses(losses, reference, steps):
    assert sorted(losses) == list(steps)
    for step in steps:
        assert abs(losses[step] - reference[step]) <= RTOL * abs(reference[step]), (step, losses, reference)


def log_rows(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


# --------------------------------------------------------------------------------------------------------------------
# the same training on every mesh


def test_fsdp_dp2_matches_one_process(two_ranks, one_process):
    assert_same_losses(two_ranks["rope_dp2"][0], one_process["rope"][0], range(1, 7))


def test_fsdp_zero2_matches_one_process(two_ranks, one_process):
    assert_same_losses(two_ranks["rope_dp2_zero2"][0], one_process["rope"][0], range(1, 7))


def test_zero_stage_sets_when_fsdp_frees_gathered_parameters(tmp_path):
    """ZeRO-1/2 (reshard_after_forward=False): a block's parameters stay whole from its forward to its backward;
    ZeRO-3: sharded again right after the forward."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        mesh, x = init_device_mesh("cpu", (1,)), torch.randint(V, (2, 32))
        for stage, resharded in ((1, False), (2, False), (3, True)):
            model = Transformer(replace(PRESETS["tiny"], vocab_size=V))
            train.apply_fsdp(model, train.Config(zero_stage=stage), mesh)
            loss = model(x, x)[1]  # between forward and backward: whole tensors, or shards (DTensors) again
            assert isinstance(model.layers[0].attention.wq.weight, DTensor) == resharded, stage
            loss.backward()
            assert isinstance(model.layers[0].attention.wq.weight, DTensor)  # sharded once backward is done
    finally:
        dist.destroy_process_group()


def test_fsdp_qlora_with_checkpointing_matches_one_process(two_ranks, one_process):
    losses = two_ranks["qlora_dp2"][0]
    assert_same_losses(losses, one_process["qlora"][0], range(1, 7))
    assert losses[6] < losses[1]  # the adapters learn


def test_token_weighting_gives_dp2_the_gradient_of_one_process(two_ranks, sft_data, tmp_path):
    """SFT sequences counting different numbers of targets, 2 micro batches of 1 on each of 2 ranks: every counted
    target of the step weighs the same, so the loss and the gradient are those of one micro batch of the 4 sequences
    in one process (and of 4 micro batches of 1: tests/test_training_reference.py), its mean over all their counted
    targets. The mean over ranks and micro batches of each micro batch's mean would not be."""
    meta = {"dtype": "uint16"}
    split = train.TokenSplit(str(sft_data), "train", meta, 32)
    sampler = train.EpochSampler(len(split.tokens), 32, 1, train.Config.seed)
    counted = [int(split.windows(sampler.next_starts(0, 1))[2].sum()) for _ in range(4)]
    assert len(set(counted)) > 1, counted
    with first_step_gradients() as grads:
        loss = train.main(common(sft_data, f"--out_dir={tmp_path}", *SFT_STEP, "--micro_batch_size=4"))["losses"][1]
    losses, out_dir = two_ranks["sft_dp2"]
    assert losses[1] == pytest.approx(loss, rel=1e-6)
    dp2 = torch.load(out_dir / "grads.pt")
    assert sorted(dp2) == sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(dp2[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_tensor_parallel_matches_one_process(two_ranks, one_process):
    assert_same_losses(two_ranks["alibi_tp2"][0], one_process["alibi"][0], range(1, 7))  # ALiBi slopes per rank
    assert_same_losses(two_ranks["rope_tp2_from_dp2"][0], one_process["rope"][0], range(4, 7))


def test_2d_mesh_matches_one_process(four_ranks, one_process):
    assert_same_losses(four_ranks["rope_2x2"][0], one_process["rope"][0], range(1, 7))
    assert_same_losses(four_ranks["alibi_2x2_from_tp2"][0], one_process["alibi"][0], range(4, 7))


def test_resume_on_another_mesh_continues_exactly(two_ranks, four_ranks, one_process):
    # dp=2 -> tp=2, 2x2 -> dp=4, tp=2 -> 2x2 (dp=2 -> dp=1: test_rank_death_...); steps 4-6 as if never stopped
    for run, model in (("rope_tp2_from_dp2", "rope"), ("rope_dp4_from_2x2", "rope"), ("alibi_2x2_from_tp2", "alibi")):
        runs = {**two_ranks, **four_ranks}
        assert_same_losses(runs[run][0], one_process[model][0], range(4, 7))


def test_fsdp_cuts_parameter_and_optimiser_memory(two_ranks, four_ranks, one_process):
    """Bytes of parameters + AdamW state each rank holds: 1/dp of one process's (FSDP shards all three)."""
    def per_device(out_dir):
        return log_rows(out_dir)[-1]["param_optim_bytes_per_device"]

    (one,) = per_device(one_process["rope"][1])
    dp2, dp4 = per_device(two_ranks["rope_dp2"][1]), per_device(four_ranks["rope_dp4_from_2x2"][1])
    mesh_2x2 = per_device(four_ranks["rope_2x2"][1])
    assert len(dp2) == 2 and len(dp4) == len(mesh_2x2) == 4
    for share, n in ((dp2, 2), (dp4, 4), (mesh_2x2, 4)):
        assert all(abs(b - one / n) <= 0.01 * one / n for b in share), (one, share)
    print(f"\nparameters + optimiser per rank: dp=1 {one:,} B, dp=2 {dp2}, dp=4 {dp4}, 2x2 {mesh_2x2}")


def test_logs_memory_per_device_and_speed_over_ranks(four_ranks):
    for row in log_rows(four_ranks["rope_2x2"][1]):
        assert len(row["mem_gib_per_device"]) == 4 and row["mem_gib"] == max(row["mem_gib_per_device"]) > 0
        assert is_timing(row["tokens_per_s"], row["mfu"])


# --------------------------------------------------------------------------------------------------------------------
# a rank that dies


def worker_pids(agent_pid):
    """{rank: pid} of the workers torchrun started (its child processes)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    pids = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0])] = pid
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_rank_death_ends_the_job_and_resume_continues(data, tmp_path):
    out = tmp_path / "run"
    args = common(data, "--dp=2", "--max_iters=100000", "--ckpt_interval=2", "--dist_timeout_s=30",
                  f"--out_dir={out}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py", *args]
    with open(tmp_path / "log.txt", "w") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not (out / "step_00000002" / "train_state.json").exists():
                assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
                time.sleep(0.2)
            os.kill(worker_pids(agent.pid)[1], signal.SIGKILL)
            returncode = agent.wait(timeout=120)  # a hang, not a speed: the agent must notice the lost rank at all
        finally:
            if agent.poll() is None:
                agent.kill()
    assert returncode != 0
    # resume the survivor's checkpoints in one process (dp=2 -> dp=1): as if the run had never stopped
    last = train.step_dirs(out)[-1]
    k = int(last.name.split("_")[1])
    resumed = train.main(common(data, f"--out_dir={out}", "--init_from=resume", f"--max_iters={k + 2}"))["losses"]
    reference = train.main(common(data, f"--out_dir={tmp_path / 'reference'}", f"--max_iters={k + 2}"))["losses"]
    assert_same_losses(resumed, reference, range(k + 1, k + 3))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(data, tmp_path):
    """A scheduler may signal some ranks only: rank 1 gets SIGTERM, rank 0 none; both stop after the same step, whose
    checkpoint holds both ranks, and rank 0 says how to resume; the resume continues as if nothing had stopped."""
    out = tmp_path / "run"
    args = common(data, "--dp=2", "--max_iters=100000", "--ckpt_interval=1000", f"--out_dir={out}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py", *args]
    with open(tmp_path / "log.txt", "w") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not ((out / "metrics.jsonl").exists() and log_rows(out)):
                assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
                time.sleep(0.05)
            os.kill(worker_pids(agent.pid)[1], signal.SIGTERM)
            agent.wait(timeout=120)  # a hang, not a speed: rank 0 must learn of the stop at all
        finally:
            if agent.poll() is None:
                agent.kill()
    text = (tmp_path / "log.txt").read_text()
    m = re.search(r"train\.py: stopped by SIGTERM after step (\d+), saved in (\S+); resume with: (.*)", text)
    assert m, text[-3000:]
    k = int(m[1])
    assert m[2] == str(out / f"step_{k:08d}") and m[3].startswith("torchrun --nproc_per_node=2 --standalone train.py ")
    assert m[3].endswith(" --init_from=resume") and text.count("stopped by SIGTERM") == 1  # rank 0 alone says it
    assert [p.name for p in train.step_dirs(out)] == [f"step_{k:08d}"]
    assert {p.name for p in (out / f"step_{k:08d}").glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}
    assert max(r["step"] for r in log_rows(out)) == k  # no rank went on past it
    resumed = train.main(common(data, f"--out_dir={out}", "--init_from=resume", f"--max_iters={k + 2}"))["losses"]
    reference = train.main(common(data, f"--out_dir={tmp_path / 'reference'}", f"--max_iters={k + 2}"))["losses"]
    assert_same_losses(resumed, reference, range(k + 1, k + 3))


# --------------------------------------------------------------------------------------------------------------------
# bad input: one clear line on every rank before the first collective


RANK0 = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}


@pytest.mark.parametrize("env, extra, message", [
    ({"WORLD_SIZE": "2"}, [], "WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({**RANK0, "MASTER_ADDR": None}, [], "WORLD_SIZE=2 but MASTER_ADDR not set"),
    ({"WORLD_SIZE": "two"}, [], "WORLD_SIZE='two': expected a positive integer"),
    (RANK0, ["--tp=3"], "dp=1 x tp=3 = 3 processes, but WORLD_SIZE=2"),
    (RANK0, ["--dp=2", "--tp=2"], "dp=2 x tp=2 = 4 processes, but WORLD_SIZE=2"),
    (RANK0, ["--tp=2", "--n_kv_heads=1"], "tp=2 does not divide n_kv_heads=1"),
    (RANK0, ["--tp=2", "--dim=48", "--n_heads=3", "--n_kv_heads=None"], "tp=2 does not divide n_heads=3"),
    (RANK0, ["--tp=2", "--seq_len=33"], "tp=2 does not divide seq_len=33"),
    ({}, ["--activation_checkpointing='some'"], "activation_checkpointing='some': expected one of none, full"),
])
def test_bad_mesh_or_launch_is_one_line_before_any_collective(data, tmp_path, monkeypatch, env, extra, message):
    for key in RANK0:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        train.main(common(data, f"--out_dir={tmp_path}", "--dist_timeout_s=5", *extra))
    assert str(e.value).startswith("train.py: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()


def test_bad_mesh_under_torchrun_stops_every_rank(data, tmp_path):
    result = torchrun(2, "train.py", *common(data, f"--out_dir={tmp_path}", "--tp=2", "--n_kv_heads=1"), timeout=200)
    assert result.returncode != 0  # and it stopped: a rank left waiting in a collective would hang past the timeout
    # every rank refuses on its own, before any collective; torchrun then stops the others, so a slower rank may be
    # stopped before it says so: one line at least, and no traceback out of train.py
    assert 1 <= result.stderr.count("train.py: tp=2 does not divide n_kv_heads=1") <= 2, result.stderr[-3000:]
    assert 'train.py", line' not in result.stderr, result.stderr[-3000:]


def test_an_out_dir_in_use_stops_every_rank_of_a_launch(data, tmp_path):
    """This process holds out_dir as a run would; a 2-rank launch into it stops on both ranks with rank 0's line
    naming this process, at once (the other rank waits for no collective that will not come)."""
    from support import runlock

    with runlock.OutDirLock() as lock:
        lock.take(tmp_path)
        result = torchrun(2, "train.py", *common(data, f"--out_dir={tmp_path}", "--dp=2"), timeout=200)
    assert result.returncode != 0
    assert f"train.py: out_dir={tmp_path} is in use by another run (pid {os.getpid()} on host " in result.stderr, \
        result.stderr[-3000:]
    assert 'train.py", line' not in result.stderr and not train.step_dirs(tmp_path), result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------------
# activation checkpointing


class CountOps(TorchDispatchMode):
    """Counts the aten ops that run, forward and backward (recomputed ones included)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_activation_checkpointing_same_gradients_less_kept(pos_emb):
    """full and selective give the gradients of none; full recomputes every matmul and the attention, selective only
    every other matmul (it keeps the attention outputs)."""
    args = replace(PRESETS["tiny"], vocab_size=V, pos_emb=pos_emb)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(V, (2, 32), generator=g), torch.randint(V, (2, 32), generator=g)
    grads, ops = {}, {}
    for mode in ("none", "full", "selective"):
        model = train.build_model(args, train.Config(activation_checkpointing=mode), train.Dist())
        with CountOps() as count:
            model(x, y)[1].backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        ops[mode] = count.counts
    for mode in ("full", "selective"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
    attention = [k for k in ops["none"] if k.startswith("_scaled_dot_product")]
    assert attention and ops["full"][attention[0]] == 2 * ops["none"][attention[0]]
    assert ops["selective"][attention[0]] == ops["none"][attention[0]]
    assert ops["none"]["mm"] < ops["selective"]["mm"] < ops["full"]["mm"]


def test_activation_checkpointing_of_the_first_blocks_only():
    """activation_checkpointing_layers=n (FlagAI's ckpoint_layer): the first n blocks recompute, the rest do not; the
    gradients stay those of no checkpointing."""
    args = replace(PRESETS["tiny"], vocab_size=V, n_layers=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(V, (2, 32), generator=g), torch.randint(V, (2, 32), generator=g)
    grads, mms, wrapped = {}, {}, {}
    for n in (0, 1, 2, 3):
        cfg = train.Config(activation_checkpointing="full" if n else "none", activation_checkpointing_layers=n)
        model = train.build_model(args, cfg, train.Dist())
        wrapped[n] = ["forward" in vars(layer) for layer in model.layers]  # wrapped in place
        with CountOps() as count:
            model(x, y)[1].backward()
        grads[n], mms[n] = {k: p.grad for k, p in model.named_parameters()}, count.counts["mm"]
    assert wrapped == {0: [False] * 3, 1: [True, False, False], 2: [True, True, False], 3: [True] * 3}
    assert mms[0] < mms[1] < mms[2] < mms[3] and mms[2] - mms[1] == mms[1] - mms[0]  # one block's matmuls each
    for n in (1, 2, 3):
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[n][name], grad, rtol=1e-6, atol=1e-7, msg=f"{n}: {name}")
