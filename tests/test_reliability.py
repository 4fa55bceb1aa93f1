"""Crash safety of train.py: kill -9 at many points then resume, damaged checkpoints, unsafe pickles, NaN/inf, full disk.

One uninterrupted reference run (in-process, 8 steps, a checkpoint every 2) is shared by every test. Kills are real:
train.py runs as a subprocess with TRAIN_CRASH_AT=<point>:<step>, which SIGKILLs it there (train.on_event); the
resume then runs in-process and must reproduce the reference's losses exactly (fp32, same seed, one thread).

    python -m pytest -q tests/test_reliability.py
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import convert
import support.stepdir
import support.weights
import train
from test_train import markov_tokens, write_data

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--model=tiny", "--seq_len=32", "--micro_batch_size=4", "--global_batch_size=8", "--log_interval=1",
        "--eval_interval=3", "--eval_iters=2", "--ckpt_interval=2", "--peak_flops=1e9", "--warmup_iters=2",
        "--lr_decay_iters=40", "--lr=3e-3", "--min_lr=3e-4", "--max_iters=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "markov", markov_tokens(1200, 1), markov_tokens(600, 2))


def run(data_dir, out_dir, *extra):
    return train.main(ARGS + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: losses per step, val loss, and out_dir with step dirs 2, 4, 6, 8 (keep_last=0)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = run(data, out, "--keep_last=0")
    assert [p.name for p in train.step_dirs(out)] == [f"step_0000000{i}" for i in (2, 4, 6, 8)]
    return {**summary, "out": out}


def assert_continues_reference(resumed, reference, start):
    assert sorted(resumed["losses"]) == list(range(start + 1, 9))
    assert [resumed["losses"][s] for s in range(start + 1, 9)] == [reference["losses"][s] for s in range(start + 1, 9)]
    assert resumed["val_loss"] == reference["val_loss"]


# --------------------------------------------------------------------------------------------------------------------
# kill -9, then resume

# (TRAIN_CRASH_AT, step dirs on disk after the kill, leftover temporary dir, the step the resume starts from)
KILLS = [
    ("step:5", [2, 4], None, 4),  # gradients of step 5 computed, weights not updated
    ("eval:6", [2, 4], None, 4),  # during the eval of step 6, before its checkpoint
    ("save:6", [2, 4], ".tmp_step_00000006", 4),  # step 6's files written, not yet renamed
    ("saved:6", [2, 4, 6], None, 6),  # just renamed, before keep_last pruned step 2
]


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """Each kill point's out_dir after its SIGKILLed run (the subprocesses run side by side)."""
    root = tmp_path_factory.mktemp("killed")

    def kill_at(point):
        out = root / point.replace(":", "_")
        env = {**os.environ, "TRAIN_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, str(ROOT / "train.py"), *ARGS, f"--data_dir={data}", f"--out_dir={out}",
                "--keep_last=2"]
        return out, subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=len(KILLS)) as pool:
        return dict(zip([k[0] for k in KILLS], pool.map(kill_at, [k[0] for k in KILLS])))


@pytest.mark.parametrize("point, dirs, leftover, start", KILLS, ids=[k[0] for k in KILLS])
def test_kill_9_then_resume_matches_an_uninterrupted_run(point, dirs, leftover, start, killed, reference, data,
                                                         capsys):
    out, proc = killed[point]
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in train.step_dirs(out)] == [f"step_{i:08d}" for i in dirs]
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == sorted([".train.lock", *([leftover] if leftover else [])])  # the dead run's lock does not block:
    resumed = run(data, out, "--keep_last=2", "--init_from=resume")
    assert f"resumed from {out / f'step_{start:08d}'} at step {start}" in capsys.readouterr().err
    assert_continues_reference(resumed, reference, start)
    # the temporary dir is gone; keep_last=2 holds
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]


# --------------------------------------------------------------------------------------------------------------------
# damaged checkpoints: detected by size / sha256, reported, and the previous one is used


def latest_is_4(reference, tmp_path):
    """A copy of the reference out_dir without steps 6 and 8: step 4 is the latest, step 2 the one before."""
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    for step in (6, 8):
        shutil.rmtree(out / f"step_{step:08d}")
    return out


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    ("truncated-distcp", "__0_0.distcp", truncate, r"__0_0\.distcp: \d+ bytes, expected \d+ \(truncated\?\)"),
    ("flipped-byte-distcp", "__0_0.distcp", flip_a_byte, r"__0_0\.distcp: sha256 differs .*\(corrupted\)"),
    ("missing-metadata", ".metadata", Path.unlink, r"\.metadata: missing"),
    ("truncated-train-state", "train_state.json", truncate, r"train_state\.json: not valid JSON"),
    ("flipped-byte-rng", "rng_rank0.json", flip_a_byte, r"rng_rank0\.json: sha256 differs"),
]


@pytest.mark.parametrize("name, file, damage, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_is_reported_and_the_previous_one_used(name, file, damage, message, reference, data,
                                                                    tmp_path, capsys):
    out = latest_is_4(reference, tmp_path)
    damage(out / "step_00000004" / file)
    resumed = run(data, out, "--keep_last=0", "--init_from=resume")
    err = capsys.readouterr().err
    assert re.search(r"step_00000004 is damaged: .*step_00000004/" + message + r".*; falling back to step_00000002",
                     err), err
    assert_continues_reference(resumed, reference, 2)


def test_no_intact_checkpoint_fails_clearly(reference, data, tmp_path):
    out = latest_is_4(reference, tmp_path)
    truncate(out / "step_00000004" / "__0_0.distcp")
    flip_a_byte(out / "step_00000002" / "__0_0.distcp")
    with pytest.raises(SystemExit, match=r"init_from=resume: .*step_00000002/__0_0\.distcp: sha256 differs.*; no intact "
                                         r"checkpoint left in out_dir="):
        run(data, out, "--init_from=resume")


def test_init_from_a_damaged_step_dir_fails_clearly(reference, data, tmp_path):
    step = tmp_path / "step_00000004"
    shutil.copytree(reference["out"] / "step_00000004", step)
    flip_a_byte(step / "__0_0.distcp")
    with pytest.raises(SystemExit, match=r"init_from=.*step_00000004: .*__0_0\.distcp: sha256 differs"):
        run(data, tmp_path / "out", f"--init_from={step}")


# --------------------------------------------------------------------------------------------------------------------
# untrusted checkpoints: a non-tensor DCP entry that would run code when unpickled


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_dcp_entry_that_runs_code_is_refused(reference, data, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from model import PRESETS, Transformer

    # step 4 rewritten with an optimiser hyper-parameter replaced by a pickle that runs os.mkdir, manifest updated
    cfg = train.Config()
    model = Transformer(train.replace(PRESETS["tiny"], vocab_size=64))
    model_sd, optim_sd = get_state_dict(model, train.build_optimizer(model, cfg, torch.device("cpu")))
    state = {"model": model_sd, "optim": optim_sd}
    with support.stepdir.quiet_dcp():
        dcp.load(state, checkpoint_id=reference["out"] / "step_00000004")
    marker = tmp_path / "PWNED"
    state["optim"]["param_groups"][0]["lr"] = Evil(str(marker))
    step = tmp_path / "out" / "step_00000004"
    shutil.copytree(reference["out"] / "step_00000004", step)
    with support.stepdir.quiet_dcp():
        dcp.save(state, checkpoint_id=tmp_path / "evil")
    for f in (tmp_path / "evil").iterdir():
        shutil.copy(f, step / f.name)
    train_state = json.loads((step / "train_state.json").read_text())
    train_state["files"] = {n: support.stepdir.file_digest(step / n) for n in train_state["files"]}
    (step / "train_state.json").write_text(json.dumps(train_state))
    # the file is truly dangerous: torch's own planner runs the payload
    with support.stepdir.quiet_dcp():
        dcp.load({"optim": optim_sd}, checkpoint_id=step)
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(SystemExit, match=r"step_00000004: cannot be loaded: entry optim\.param_groups\.0\.lr: refused "
                                         r"to unpickle"):
        run(data, tmp_path / "out", "--init_from=resume")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# NaN / inf, and a full disk


@pytest.fixture
def poison(monkeypatch):
    """poison(n): from the n-th training forward on, the final norm's output is NaN (so is the loss)."""
    calls = {"n": 0, "from": None}
    build_model = train.build_model

    def build_poisoned(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] >= calls["from"]:
                    return output * float("nan")
        model.norm.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", build_poisoned)
    return lambda n: calls.update({"from": n})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_stops_naming_the_step_and_keeps_last_checkpoint(dtype, poison, data, tmp_path):
    poison(9)  # grad accumulation 2: the 9th micro batch is step 5's first
    with pytest.raises(SystemExit, match=rf"step 5: loss nan.* not finite in {dtype}; stopping; the last good "
                                         r"checkpoint is .*step_00000004"):
        run(data, tmp_path / "out", f"--dtype={dtype}", "--keep_last=0")
    assert [p.name for p in train.step_dirs(tmp_path / "out")] == ["step_00000002", "step_00000004"]


def test_float16_skips_nan_steps_then_stops_when_no_loss_scale_helps(poison, data, tmp_path, capsys):
    poison(9)
    with pytest.raises(SystemExit, match=r"step 36: loss nan.* not finite in 32 float16 steps in a row .*the last "
                                         r"good checkpoint is .*step_00000034"):
        run(data, tmp_path / "out", "--dtype=float16", "--max_iters=100", "--eval_interval=1000")
    err = capsys.readouterr().err
    scales = [float(re.search(rf"step {s}: float16 overflow \(loss scale ([\d.e+-]+)\): step skipped", err)[1])
              for s in (5, 6, 36)]
    assert scales[1] == scales[0] / 2 and scales[2] == pytest.approx(scales[0] / 2**31, rel=1e-5)  # halved each skip


def test_full_disk_while_saving_names_the_last_complete_checkpoint(data, tmp_path, monkeypatch):
    save = dcp.save

    def save_then_fill_the_disk(state, checkpoint_id, **kwargs):
        if "step_00000004" in str(checkpoint_id):
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(dcp, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit, match=r"step_00000004: the disk is full: it needs more, [\d,]+ bytes \(.*\) are free "
                                         r"on /.*; free space, or keep fewer step dirs \(keep_last=2: .*\); the last "
                                         r"good checkpoint is .*step_00000002"):
        run(data, tmp_path / "out")  # it needs 1.4 MB, as step_00000002, with more free: "more"
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["step_00000002"]


def test_no_checkpoint_is_written_from_non_finite_weights(data, tmp_path, monkeypatch):
    """A step whose update made a weight infinite (the loss of that step was still finite): its checkpoint is refused
    and the run stops naming the previous one, which verifies; convert.py refuses such weights the same way."""
    save = support.stepdir.write_step_dir

    def poisoned_save(out_dir, step, dcp_state, *args, **kwargs):
        if step == 4:
            dcp_state["model"]["norm.weight"] = dcp_state["model"]["norm.weight"] * float("inf")
        return save(out_dir, step, dcp_state, *args, **kwargs)

    monkeypatch.setattr(train, "write_step_dir", poisoned_save)
    with pytest.raises(SystemExit, match=r"step_00000004: tensor norm\.weight holds NaN or infinite values: not "
                                         r"writing a checkpoint of it; the last good checkpoint is .*step_00000002"):
        run(data, tmp_path / "out")
    assert [p.name for p in train.step_dirs(tmp_path / "out")] == ["step_00000002"]
    assert not list((tmp_path / "out").glob(".tmp_step_*"))
    weights = {"tok_embeddings.weight": torch.zeros(4, 2), "norm.weight": torch.tensor([1.0, float("nan")])}
    with pytest.raises(convert.CheckpointError, match=r"tensor norm\.weight holds NaN or infinite values"):
        support.weights.write_checkpoint(tmp_path / "ckpt", weights, train.PRESETS["tiny"], "llama")


def test_the_last_good_checkpoint_is_the_newest_that_verifies(reference, tmp_path):
    out = shutil.copytree(reference["out"], tmp_path / "out")
    with open(out / "step_00000008" / "__0_0.distcp", "r+b") as f:  # a bit flip: same size, other sha256
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 1]))
    (out / "step_00000006" / "rng_rank0.json").unlink()
    assert support.stepdir.last_good_step_dir(out) == out / "step_00000004"


# --------------------------------------------------------------------------------------------------------------------
# convert.py killed while writing its output dir, and while swapping it in: the old dir or the new one, whole

KILLED_CONVERT = """
import os, pathlib, signal, sys
import convert
import support.weights
from support import outputs
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
point = os.environ["KILL_AT"]
if point == "write":  # the first output shard is on disk, the others are not
    flush = support.weights.ShardWriter._flush
    support.weights.ShardWriter._flush = lambda self: (flush(self), die())
elif point == "swap":  # the new dir complete, not yet swapped in
    outputs.swap_paths = die
elif point == "swapped":  # swapped in, the old one not yet removed
    exchange = outputs.swap_paths
    outputs.swap_paths = lambda a, b: (exchange(a, b), die())
elif point == "aside":  # where no atomic swap exists: the old dir renamed aside, the new one not yet in
    outputs.swap_paths = lambda a, b: False
    rename = pathlib.Path.rename
    pathlib.Path.rename = lambda self, to: (rename(self, to), ".old-" in str(to) and die())[0]
convert.main(sys.argv[1:])
"""


def files_of(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


KILL_POINTS = {"write": "old", "swap": "old", "swapped": "new", "aside": "old"}  # kill point -> the dst it leaves


@pytest.fixture(scope="module")
def killed_converts(tmp_path_factory):
    """Per kill point, a dir whose dst held an older conversion when `native-to-hf --overwrite` was SIGKILLed there
    (the kills run side by side); and the files of the old dst and of the new one converted without a kill."""
    from model import PRESETS, Transformer
    root = tmp_path_factory.mktemp("killed_converts")
    for name, seed in (("src", 0), ("older", 1)):
        torch.manual_seed(seed)
        model = Transformer(PRESETS["tiny"])
        model.init_weights()
        support.weights.write_checkpoint(root / name, model.state_dict(), PRESETS["tiny"], "llama")
    flags = ["--max_shard_size", "100KB", "--overwrite"]
    convert.main(["native-to-hf", "--src", str(root / "older"), "--dst", str(root / "old"), *flags])
    convert.main(["native-to-hf", "--src", str(root / "src"), "--dst", str(root / "new"), *flags])

    def kill(point):
        shutil.copytree(root / "old", root / point / "dst")
        argv = ["native-to-hf", "--src", str(root / "src"), "--dst", str(root / point / "dst"), *flags]
        return subprocess.run([sys.executable, "-c", KILLED_CONVERT, *argv], cwd=ROOT, capture_output=True,
                              env={**os.environ, "KILL_AT": point, "PYTHONPATH": str(ROOT)}, timeout=300)
    with ThreadPoolExecutor(max_workers=len(KILL_POINTS)) as pool:
        results = dict(zip(KILL_POINTS, pool.map(kill, KILL_POINTS)))
    return {"root": root, "results": results, "old": files_of(root / "old"), "new": files_of(root / "new"),
            "argv": ["native-to-hf", "--src", str(root / "src"), *flags]}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_of_convert_leaves_the_old_or_the_new_dir_whole(killed_converts, point):
    from support.outputs import remove_stale
    k, d = killed_converts, killed_converts["root"] / point
    assert k["results"][point].returncode == -signal.SIGKILL, k["results"][point].stderr.decode()[-2000:]
    left = k[KILL_POINTS[point]]
    if point == "aside":  # dst is away for a moment; the old one lies whole beside it, and the next run puts it back
        assert not (d / "dst").exists()
        assert files_of(next(d.glob(".dst.old-*"))) == left
    else:
        assert files_of(d / "dst") == left
    assert list(d.glob(".dst.tmp-*"))  # what the killed run left
    remove_stale(d / "dst")  # the first thing the next run does
    assert files_of(d / "dst") == left and not list(d.glob(".dst.*"))
    convert.main([*k["argv"], "--dst", str(d / "dst")])
    assert files_of(d / "dst") == k["new"] and not list(d.glob(".dst.*"))


def test_a_diverging_run_ends_with_one_line_naming_the_last_good_checkpoint(data, tmp_path):
    """A run whose weights blow up (a finite but absurd lr) stops at the first non-finite step: stderr's last line is
    the message, after the progress bar rather than inside it, and the checkpoint it names verifies."""
    out = tmp_path / "out"
    argv = [*ARGS, f"--data_dir={data}", f"--out_dir={out}", "--lr=1e30", "--warmup_iters=0", "--ckpt_interval=1"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [ln for ln in re.split(r"[\r\n]", r.stderr) if ln.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.fullmatch(r"train\.py: step 2: loss .* not finite in float32; stopping; the last good checkpoint is "
                        + re.escape(str(out / "step_00000001")), lines[-1]), r.stderr[-2000:]
    assert [p.name for p in train.step_dirs(out)] == ["step_00000001"]
    support.stepdir.verify_step_dir(out / "step_00000001")


def test_the_next_run_removes_what_dead_runs_left_and_spares_a_running_ones(tmp_path):
    """Temporary dirs beside --dst of a process no longer running (this version's name and the older dst.tmp-PID) go
    at the next conversion to that dst; an old dst renamed aside goes once dst is back; a live process's stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = str(os.getppid())  # the process that started this one: running
    left = [f".dst.tmp-{dead}", f"dst.tmp-{dead}", f".dst.old-{dead}", f".dst.tmp-{live}", f".other.tmp-{dead}"]
    for name in left:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.safetensors").write_bytes(b"\0" * 1000)
    src = tmp_path / "src"
    support.weights.write_checkpoint(src, train.Transformer(train.PRESETS["tiny"]).state_dict(), train.PRESETS["tiny"],
                             "llama")
    convert.main(["native-to-hf", "--src", str(src), "--dst", str(tmp_path / "dst"), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".dst.tmp-" + live, ".other.tmp-" + dead, "dst",
                                                                 "src"])
    assert (tmp_path / "dst" / "config.json").exists()
