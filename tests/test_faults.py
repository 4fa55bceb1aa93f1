"""The faults a long run meets: a second run on the same out_dir, preemption (SIGTERM, SIGINT), a full disk, and the
metrics of a resumed run.

One uninterrupted reference run (in-process, 40 steps, an eval every 3) is shared. Runs that are signalled or that
race for an out_dir are real train.py subprocesses; their losses (metrics.jsonl) must equal the reference's exactly
(fp32, same seed, one thread). Full disks are small tmpfs mounts where this machine lets the tests mount one (root),
and otherwise writes made to fail with ENOSPC.

    python -m pytest -q tests/test_faults.py
"""

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import convert
import prepare
import train
from support import diskspace, gguf, metrics_file, preemption, runlock, stepdir
from test_train import markov_tokens, write_data

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
R = 40  # steps of the reference run
ARGS = ["--model=tiny", "--seq_len=32", "--micro_batch_size=4", "--global_batch_size=8", "--log_interval=1",
        "--eval_interval=3", "--eval_iters=2", "--ckpt_interval=1000", "--peak_flops=1e9", "--warmup_iters=2",
        "--lr_decay_iters=40", "--lr=3e-3", "--min_lr=3e-4", f"--max_iters={R}", "--keep_last=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "markov", markov_tokens(1200, 1), markov_tokens(600, 2))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}"])
    return {**summary, "rows": rows(out)}


def rows(out_dir, key=None):
    found = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in found if key is None or key in r]


def losses_of(out_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(out_dir, "loss")]


def argv(data, out, *extra):
    return [sys.executable, str(ROOT / "train.py"), *ARGS, f"--data_dir={data}", f"--out_dir={out}", *extra]


def start(cmd, tmp_path, name):
    """cmd as a terminal starts it: SIGINT and SIGTERM at their defaults, even where this test runs in a background
    job (which starts with SIGINT ignored, and a run keeps an ignored signal ignored, as nohup wants)."""
    err = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)])


def stderr_lines(tmp_path, name) -> list[str]:
    text = (tmp_path / f"{name}.err").read_text()
    return [line for line in re.split(r"[\r\n]", text) if line.strip() and "it/s" not in line and "s/it" not in line]


def wait_for(condition, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def logged_step(out_dir) -> int:
    try:
        return max([r["step"] for r in rows(out_dir, "loss")], default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


# --------------------------------------------------------------------------------------------------------------------
# one run per out_dir


def test_two_runs_started_together_one_trains_the_other_is_refused_naming_it(data, tmp_path):
    out = tmp_path / "out"
    runs = [start(argv(data, out, "--max_iters=100000"), tmp_path, f"run{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in runs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(runs) if p.poll() is not None)
        winner = runs[1 - loser]
        assert runs[loser].returncode == 1 and winner.poll() is None  # refused while the other trains
        last = stderr_lines(tmp_path, f"run{loser}")[-1]
        assert re.fullmatch(rf"train\.py: out_dir={re.escape(str(out))} is in use by another run \(pid {winner.pid} on "
                            rf"host \S+ since [\d-]+ [\d:]+: \S*python\S* \S*train\.py .*\); wait for it to end, stop "
                            r"it, or choose another out_dir", last), last
        wait_for(lambda: logged_step(out) >= 2, winner, "step 2")
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=300) == preemption.PREEMPTED
    finally:
        for p in runs:
            p.kill() if p.poll() is None else None
    steps = [s for s, _ in losses_of(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, each step once


def test_a_resume_or_an_overwrite_started_during_a_run_is_refused(data, tmp_path):
    out = tmp_path / "out"
    first = start(argv(data, out, "--max_iters=100000", "--ckpt_interval=2"), tmp_path, "first")
    try:
        wait_for(lambda: (out / "step_00000002" / "train_state.json").exists(), first, "step_00000002")
        others = [start(argv(data, out, *extra), tmp_path, f"other{i}")
                  for i, extra in enumerate((["--init_from=resume", "--lr=1e-4"], ["--overwrite"]))]
        assert [p.wait(timeout=300) for p in others] == [1, 1] and first.poll() is None
        for i in range(len(others)):
            lines = stderr_lines(tmp_path, f"other{i}")
            assert "Traceback" not in "\n".join(lines)
            assert re.match(rf"train\.py: out_dir={re.escape(str(out))} is in use by another run \(pid {first.pid} ",
                            lines[-1]), lines[-3:]
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == preemption.PREEMPTED
    finally:
        first.kill() if first.poll() is None else None
    steps = [s for s, _ in losses_of(out)]
    assert steps == list(range(1, len(steps) + 1)) and train.step_dirs(out)  # the first run's, untouched


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; from support import runlock; "
                               f"lock = runlock.OutDirLock(); lock.take({str(tmp_path)!r}); print('held', flush=True); "
                               "time.sleep(600)"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with runlock.OutDirLock() as lock, pytest.raises(runlock.Busy, match=rf"\(pid {holder.pid} on host "):
            lock.take(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / runlock.LOCK_FILE).exists()  # what the killed run left
    with runlock.OutDirLock() as lock:
        assert lock.take(tmp_path) is None
        assert json.loads((tmp_path / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()


# --------------------------------------------------------------------------------------------------------------------
# preemption: SIGTERM or SIGINT at a random step, the exact resume command, the same losses


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_random_step_saves_it_and_the_printed_command_resumes_exactly(sig, data, reference, tmp_path):
    out, k = tmp_path / "out", random.randint(2, 8)
    run = start(argv(data, out), tmp_path, "run")
    try:
        wait_for(lambda: logged_step(out) >= k, run, f"step {k}")
        run.send_signal(sig)
        assert run.wait(timeout=300) == preemption.PREEMPTED, (k, stderr_lines(tmp_path, "run")[-5:])
    finally:
        run.kill() if run.poll() is None else None
    lines = stderr_lines(tmp_path, "run")
    assert "Traceback" not in "\n".join(lines)
    assert f"train.py: {sig.name}: stopping after this step, with a checkpoint (a second {sig.name} stops at once)" \
        in lines
    m = re.fullmatch(rf"train\.py: stopped by {sig.name} after step (\d+), saved in (.*); resume with: (.*)", lines[-1])
    assert m, lines[-3:]
    s = int(m[1])
    assert k <= s < R and Path(m[2]) == out / f"step_{s:08d}"
    assert [p.name for p in train.step_dirs(out)] == [f"step_{s:08d}"] and not (out / "export").exists()
    assert losses_of(out) == [(i, reference["losses"][i]) for i in range(1, s + 1)]

    resumed = subprocess.run(shlex.split(m[3]), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / f'step_{s:08d}'} at step {s}" in resumed.stderr
    assert losses_of(out) == sorted(reference["losses"].items())  # each step once, as the uninterrupted run
    assert [(r["step"], r["val_loss"]) for r in rows(out, "val_loss")] == \
        [(r["step"], r["val_loss"]) for r in reference["rows"] if "val_loss" in r]


# train.py with a SIGTERM to itself during step 6 and a disk that takes minutes to write the stop's checkpoint
DRIVER = """
import os, signal, sys, time
import train
from support import preemption

handle, signalled = preemption.StopSignals.handle, []

def handle_and_note(self, signum, frame):
    signalled.append(signum)
    handle(self, signum, frame)

def on_event(name, step):
    if name == "step" and step == 6:
        os.kill(os.getpid(), signal.SIGTERM)
    if name == "save" and signalled:  # the stop's checkpoint, its files written, not yet renamed
        open(sys.argv[1], "w").write(str(step))
        time.sleep(300)

preemption.StopSignals.handle, train.on_event = handle_and_note, on_event
train.main(sys.argv[2:])
"""


def test_a_second_signal_stops_at_once_leaving_the_checkpoints_as_they_were(data, reference, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "saving"
    (tmp_path / "driver.py").write_text(DRIVER)
    run = start([sys.executable, str(tmp_path / "driver.py"), str(marker), *argv(data, out, "--ckpt_interval=4")[2:]],
                tmp_path, "run")
    try:
        wait_for(marker.exists, run, "the stop's checkpoint")
        time.sleep(preemption.SAME_STOP_S + 0.5)  # later than a forwarded copy of the first signal would come
        before = [p.name for p in train.step_dirs(out)]
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == -signal.SIGTERM  # at once: the save sleeps for minutes
    finally:
        run.kill() if run.poll() is None else None
    newest = train.step_dirs(out)[-1]
    assert re.fullmatch(rf"train\.py: second SIGTERM: stopped at once; the checkpoints are as they were, the newest "
                        rf"{re.escape(str(newest))}; resume with: .* --init_from=resume",
                        stderr_lines(tmp_path, "run")[-1])
    assert before == [newest.name] == ["step_00000004"] and marker.read_text() == "6"
    assert (out / ".tmp_step_00000006").is_dir()  # the cut save, removed by the next run
    stepdir.verify_step_dir(newest)
    n = int(newest.name.split("_")[1])
    resumed = train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume",
                                 f"--max_iters={n + 2}"])
    assert resumed["losses"] == {i: reference["losses"][i] for i in (n + 1, n + 2)}
    assert not list(out.glob(".tmp_step_*"))


def test_resume_command_names_the_launch(monkeypatch):
    for key, value in {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2",
                       "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    cmd = preemption.command_line("train.py", ["config/x.py", "--init_from=ckpt/a b", "--overwrite", "--lr=1"],
                                  resume=True)
    assert cmd == ("torchrun --nproc_per_node=4 --nnodes=2 --node_rank=N --master_addr=10.0.0.1 --master_port=29500 "
                   "train.py config/x.py --lr=1 --init_from=resume")


# --------------------------------------------------------------------------------------------------------------------
# metrics.jsonl: the history of the run that exists


def test_resume_drops_the_metrics_rows_of_the_rolled_back_steps(data, reference, tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run(argv(data, out, "--ckpt_interval=4"), cwd=tmp_path, capture_output=True, text=True,
                            env={**ENV, "TRAIN_CRASH_AT": "eval:6"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [s for s, _ in losses_of(out)] == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 are rolled back: step_4 is the last
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss"')  # a line the kill cut short
    train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=8"])
    assert losses_of(out) == [(i, reference["losses"][i]) for i in range(1, 9)]
    assert [(r["step"], r["val_loss"]) for r in rows(out, "val_loss")][:2] == \
        [(r["step"], r["val_loss"]) for r in reference["rows"] if "val_loss" in r][:2]  # steps 3 and 6, once each
    assert [r["start_step"] for r in rows(out, "start_step")] == [0, 4]


def test_rewind_keeps_the_history_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"start_step": 0}', '{"step": 1, "loss": 3.0}', '{"step": 2, "val_loss": 2.5}',
             '{"step": 3, "loss": 2.0}', '{"start_step": 2}', '{"step": 3, "loss": 2.1}', '{"step": "x"}',
             '{"step": 4, "lo']
    path.write_text("\n".join(lines))
    assert metrics_file.rewind(path, 2) == 4
    assert path.read_text().splitlines() == lines[:3] + ['{"step": "x"}']
    assert metrics_file.rewind(path, 2) == 0 and metrics_file.rewind(tmp_path / "none.jsonl", 2) == 0


# --------------------------------------------------------------------------------------------------------------------
# a full disk: one line (file, bytes needed, bytes free) in train.py (checkpoints, export), convert.py, prepare.py


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path (unmounted at the end); skips where it cannot."""
    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the ENOSPC tests that "
                        "patch the writers cover the same messages")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


FULL = r"the disk is full: it needs ([\d,]+) bytes \([\d.,]+ MiB\), ([\d,]+) bytes \([\d.,]+ MiB\) are free on (\S+)"


def number(text):
    return int(text.replace(",", ""))


def test_train_checks_room_before_each_save_and_at_a_resume(data, small_disk, capsys):
    disk = small_disk("2560k")  # room for one step dir of the tiny model (1.4 MB) and not for a second beside it
    out = disk / "out"
    base = ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--ckpt_interval=2", "--max_iters=4"]
    with pytest.raises(SystemExit) as e:
        train.main(base)
    m = re.fullmatch(rf"train\.py: {re.escape(str(out))}: not enough disk space for step_00000004: it needs ([\d,]+) "
                     rf"bytes \(.*\), ([\d,]+) bytes \(.*\) are free on {re.escape(str(disk))}; free space, or keep "
                     rf"fewer step dirs \(keep_last=2: a save writes the next beside them before the oldest goes\); "
                     rf"the last good checkpoint is {re.escape(str(out / 'step_00000002'))}", str(e.value))
    assert m, e.value
    assert number(m[1]) == diskspace.tree_bytes(out / "step_00000002") > number(m[2])
    assert [p.name for p in train.step_dirs(out)] == ["step_00000002"] and not list(out.glob(".tmp_step_*"))
    logged = len(rows(out))
    with pytest.raises(SystemExit, match=r"not enough disk space for the next checkpoint: it needs"):
        train.main(base + ["--init_from=resume"])  # said at the start, before steps the save would lose
    assert len(rows(out)) == logged


def test_a_save_that_fills_the_disk_is_one_line(data, small_disk, monkeypatch):
    disk = small_disk("2560k")
    out = disk / "out"
    monkeypatch.setattr(diskspace, "room_problem", lambda *a, **k: None)  # as if another process filled the disk
    with pytest.raises(SystemExit) as e:  # inside torch's writer: 'unexpected pos' without the check
        train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--ckpt_interval=2", "--max_iters=4"])
    m = re.fullmatch(rf"train\.py: {re.escape(str(out / 'step_00000004'))}: {FULL}; free space, or keep fewer step "
                     rf"dirs \(keep_last=2: .*\); the last good checkpoint is {re.escape(str(out / 'step_00000002'))}",
                     str(e.value))
    assert m and m[3] == str(disk), e.value
    assert number(m[1]) == diskspace.tree_bytes(out / "step_00000002") and not list(out.glob(".tmp_step_*"))


def test_a_full_disk_anywhere_else_in_a_run_is_one_line(data, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def record(run, row):  # metrics.jsonl cannot grow
        raise OSError(28, "No space left on device", str(out / "metrics.jsonl"))

    monkeypatch.setattr(train.Run, "record", record)
    with pytest.raises(SystemExit) as e:
        train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=1"])
    assert re.fullmatch(rf"train\.py: {re.escape(str(out / 'metrics.jsonl'))}: the disk is full: it needs more, "
                        r"[\d,]+ bytes \(.*\) are free on /\S*; free space there", str(e.value)), e.value


def fill_with_enospc(monkeypatch, free=1000):
    """safetensors' and prepare.py's writers fail as on a full disk, which has `free` bytes left (train.py's check
    before a save, tested on a tmpfs above, is passed)."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a shard")
        raise OSError(28, "No space left on device", filename)

    def write(self, ids, mask):
        raise OSError(28, "No space left on device", str(self.tokens_file.name))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(prepare.SplitWriter, "_write", write)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: free)
    monkeypatch.setattr(diskspace, "room_problem", lambda *a, **k: None)


def full_disk_path(how, name, size, small_disk, tmp_path, monkeypatch):
    """Where to write `name` so that the disk fills: on a small tmpfs of `size`, or (patched) where writes fail with
    ENOSPC."""
    if how == "tmpfs":
        return small_disk(size) / name
    fill_with_enospc(monkeypatch)
    return tmp_path / name


@pytest.fixture(scope="module")
def step_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("step") / "out"
    train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--export"])
    return {"step": out / "step_00000002", "export_bytes": diskspace.tree_bytes(out / "export")}


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_export_on_a_full_disk_is_one_line_and_keeps_the_step_dir(how, data, step_dir, small_disk, tmp_path,
                                                                  monkeypatch):
    # a step dir (1.4 MB) fits on the tmpfs, its export (0.4 MB) beside it does not
    out = full_disk_path(how, "out", "1700k", small_disk, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        train.main(ARGS + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--export"])
    m = re.fullmatch(rf"train\.py: {re.escape(str(out / 'export'))}: {FULL}; free space there, or write elsewhere; "
                     rf"{re.escape(str(out / 'step_00000002'))} is complete: export it with python convert\.py "
                     rf"dcp-to-native --src={re.escape(str(out / 'step_00000002'))} --dst=DIR", str(e.value))
    assert m, e.value
    assert abs(number(m[1]) - step_dir["export_bytes"]) < 0.02 * step_dir["export_bytes"]  # the weights, not the
    assert not (out / "export").exists() and not list(out.glob(".export*"))  # tokenizer: within 2%
    stepdir.verify_step_dir(out / "step_00000002")


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_convert_on_a_full_disk_is_one_line(how, step_dir, small_disk, tmp_path, monkeypatch):
    dst = full_disk_path(how, "ckpt", "256k", small_disk, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        convert.main(["dcp-to-native", "--src", str(step_dir["step"]), "--dst", str(dst)])
    m = re.fullmatch(rf"convert\.py: {re.escape(str(dst))}: {FULL}; free space there, or write elsewhere",
                     str(e.value))
    assert m, e.value
    assert abs(number(m[1]) - step_dir["export_bytes"]) < 0.02 * step_dir["export_bytes"]
    assert sorted(p.name for p in dst.parent.iterdir()) == []  # nothing partial left


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "the a model data token chat user reply question answer code small large fast hello world".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) + "." for i in range(4000)]
    sp = prepare.train_sentencepiece(lines[:2000], root / "tok", vocab_size=300)
    text = root / "corpus.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 20])}) + "\n" for i in range(0, 4000, 20)))
    prepare.main(["--input", str(text), "--tokenizer", str(sp), "--out", str(root / "data")])
    return {"text": text, "sp": sp, "bytes": sum(diskspace.tree_bytes(root / "data" / f"{s}.{ext}")
                                                 for s in ("train", "val") for ext in ("bin", "docs.bin"))}


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_prepare_on_a_full_disk_is_one_line(how, corpus, small_disk, tmp_path, monkeypatch):
    out = full_disk_path(how, "data", "64k", small_disk, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(corpus["text"]), "--tokenizer", str(corpus["sp"]), "--out", str(out)])
    m = re.fullmatch(rf"prepare\.py: {re.escape(str(out))}(/\w+\.bin)?: {FULL}; free space there, or choose another "
                     r"--out", str(e.value))
    assert m, e.value
    assert 0.9 * corpus["bytes"] < number(m[2]) < 1.1 * corpus["bytes"]  # the tokens the input makes
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_gguf_export_on_a_full_disk_is_one_line(how, corpus, small_disk, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    args = train.replace(train.PRESETS["tiny"], vocab_size=300)
    convert.write_checkpoint(ckpt, train.Transformer(args).state_dict(), args, "llama")
    prepare.load_tokenizer(corpus["sp"]).save(ckpt)
    if how == "tmpfs":
        dst = small_disk("128k") / "m.gguf"
    else:
        dst = tmp_path / "out" / "m.gguf"
        dst.parent.mkdir()
        monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)

        def write_gguf(path, *args):
            Path(path).write_bytes(b"GGUF and no room for more")
            raise OSError(28, "No space left on device", str(path))

        monkeypatch.setattr(gguf, "write_gguf", write_gguf)
    with pytest.raises(SystemExit) as e:
        convert.main(["native-to-gguf", "--src", str(ckpt), "--dst", str(dst), "--type", "f16"])
    m = re.fullmatch(rf"convert\.py: {re.escape(str(dst))}: {FULL}; free space there, or write elsewhere",
                     str(e.value))
    assert m, e.value
    assert number(m[1]) == 2 * sum(t.numel() for t in train.Transformer(args).state_dict().values())  # f16
    assert list(dst.parent.iterdir()) == []


def test_a_full_disk_is_told_by_errno_text_or_no_room_left(tmp_path):
    assert diskspace.is_full(OSError(28, "No space left on device"), tmp_path)
    assert diskspace.is_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                             tmp_path)
    wrapped = RuntimeError("outer")
    wrapped.__context__ = OSError(122, "Disk quota exceeded")
    assert diskspace.is_full(wrapped, tmp_path)
    assert not diskspace.is_full(RuntimeError("unexpected pos 704 vs 598"), tmp_path)  # with room left: not a full disk
