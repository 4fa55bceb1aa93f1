"""Tests for train.py: learning, SFT masking, exact resume, float16 loss scaling, bfloat16, fine-tuning, bad input.

Runs train.main(argv) in-process on tiny data dirs the tests write (numpy tokens + meta.json as prepare.py writes
them); a couple of runs go through a subprocess to check what a user sees on the command line.

    python -m pytest -q tests/test_train.py
"""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
import train
from model import ModelArgs, Transformer
from support import metrics_file
from conftest import is_timing

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
V = 64  # vocabulary of the test data
# tiny model (the 'tiny' preset: dim 64, 2 layers), tiny batches; no torch.mm peak measurement (peak_flops given)
BASE = ["--model=tiny", "--seq_len=32", "--micro_batch_size=4", "--global_batch_size=8", "--log_interval=1",
        "--eval_interval=1000", "--eval_iters=2", "--ckpt_interval=1000", "--peak_flops=1e9", "--warmup_iters=2",
        "--lr_decay_iters=40", "--lr=3e-3", "--min_lr=3e-4"]


def markov_tokens(n, seed):
    """A Markov chain where every token has two equally likely successors: learnable, entropy ~ln 2 once learned."""
    succ = np.random.default_rng(0).integers(0, V, size=(V, 2))
    choice = np.random.default_rng(seed).integers(0, 2, size=n)
    out = np.zeros(n, dtype=np.uint16)
    for i in range(1, n):
        out[i] = succ[out[i - 1], choice[i]]
    return out


def uneven_mask(n, seed):
    """A loss mask of prompts (0) and replies (1) of 1 to 60 tokens each: windows of 32 tokens count anything from
    none to all of their targets, as SFT rows with short and long replies do."""
    lengths = np.random.default_rng(seed).integers(1, 61, size=n)
    return (np.repeat(np.arange(n) % 2, lengths)[:n]).astype(np.uint8)


@contextlib.contextmanager
def first_step_gradients():
    """Yields a dict that train.main fills with the gradients of its first step as the optimiser gets them (unscaled,
    clipped unless --grad_clip=0), whole: a sharded one is gathered, so under torchrun every rank runs this."""
    models, grads = [], {}
    build, event = train.build_model, train.on_event

    def on_event(name, step):
        if name == "step" and step == 1:
            for n, p in models[-1].named_parameters():
                if p.grad is not None:
                    grads[n] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        event(name, step)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_model", lambda *args, **kwargs: models.append(build(*args, **kwargs)) or models[-1])
        patch.setattr(train, "on_event", on_event)
        yield grads


def write_data(path, train_tokens, val_tokens, train_mask=None, val_mask=None):
    path.mkdir(parents=True, exist_ok=True)
    train_tokens.astype(np.uint16).tofile(path / "train.bin")
    val_tokens.astype(np.uint16).tofile(path / "val.bin")
    if train_mask is not None:
        train_mask.astype(np.uint8).tofile(path / "train.mask.bin")
        val_mask.astype(np.uint8).tofile(path / "val.mask.bin")
    meta = {"dtype": "uint16", "vocab_size": V, "bos_id": 1, "eos_id": 2, "pad_id": 0,
            "train_tokens": len(train_tokens), "val_tokens": len(val_tokens)}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 1,200 train tokens = 37 windows of 32: an epoch is under 5 steps of 8 sequences, so runs cross epochs
    root = tmp_path_factory.mktemp("data")
    return write_data(root / "markov", markov_tokens(1200, 1), markov_tokens(600, 2))


def run(data_dir, out_dir, *extra):
    return train.main(BASE + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


def metric_rows(out_dir, key):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


# --------------------------------------------------------------------------------------------------------------------
# learning


def test_loss_falls_below_unigram_baseline(data, tmp_path):
    summary = run(data, tmp_path / "out", "--max_iters=40", "--eval_interval=40")
    losses = summary["losses"]
    assert losses[1] > math.log(V) - 0.3  # a random model starts near ln(V)
    assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 1.0
    assert summary["val_loss"] < summary["unigram_baseline"] - 0.5
    rows = metric_rows(tmp_path / "out", "tokens_per_s")
    assert len(rows) == 40 and all(is_timing(r["tokens_per_s"], r["mfu"]) and r["grad_norm"] > 0 for r in rows)


def test_sft_loss_counts_only_mask_one_targets(tmp_path):
    # pairs (prompt, reply): prompts are random (unlearnable, mask 0), replies a function of the prompt (mask 1)
    def pairs(n, seed):
        prompts = np.random.default_rng(seed).integers(0, V // 2, size=n)
        tokens = np.stack([prompts, V // 2 + (prompts * 7) % (V // 2)], axis=1).reshape(-1)
        mask = np.tile([0, 1], n)
        return tokens, mask

    (tr, trm), (va, vam) = pairs(1500, 1), pairs(500, 2)
    data_dir = write_data(tmp_path / "sft", tr, va, trm, vam)
    # the batch's mask is the mask of the targets: only replies count
    split = prepare.TokenSplit(str(data_dir), "train", {"dtype": "uint16"}, 32)
    x, y, mask, _ = train.batch_on(split, [0, 7, 100], torch.device("cpu"))
    assert torch.all((y >= V // 2) == (mask == 1))
    # changing masked targets does not change the loss
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=V, hidden_dim=176, max_seq_len=64))
    y_changed = torch.where(mask == 1, y, (y + 5) % V)
    assert model(x, y, loss_mask=mask)[1].item() == model(x, y_changed, loss_mask=mask)[1].item()
    assert model(x, y)[1].item() != model(x, y_changed)[1].item()
    # training learns the replies: the counted loss goes to ~0, far below the ln(V/2) of the unmasked prompts
    summary = run(data_dir, tmp_path / "out", "--max_iters=60", "--eval_interval=60", "--lr=1e-2")
    assert summary["val_loss"] < 0.5


def test_val_loss_averages_only_batches_with_counted_targets(tmp_path):
    # the val split's first 64 tokens are a prompt (mask 0): a batch inside it has no loss, not a loss of 0
    tokens = markov_tokens(256, 3)
    mask = np.r_[np.zeros(64), np.ones(192)]
    data_dir = write_data(tmp_path / "sft", tokens, tokens, mask, mask)
    val = prepare.TokenSplit(str(data_dir), "val", {"dtype": "uint16"}, 16)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=V, hidden_dim=176, max_seq_len=64))
    cpu, plain = torch.device("cpu"), contextlib.nullcontext()
    counted = train.evaluate(model, val, [[100, 140]], plain, cpu)
    assert train.evaluate(model, val, [[0, 20], [100, 140]], plain, cpu) == counted
    assert math.isnan(train.evaluate(model, val, [[0, 20]], plain, cpu))


def test_packed_rows_are_windows_and_documents_stay_apart(tmp_path):
    # prepare.py --pack: rows of exactly seq_len=32 tokens, each holding whole documents (here 20 + 12 tokens)
    rows = 40
    tokens = markov_tokens(rows * 32, 3)
    doc_starts = np.sort(np.concatenate([np.arange(rows) * 32, np.arange(rows) * 32 + 20]))
    data_dir = write_data(tmp_path / "packed", tokens, tokens[: 8 * 32], np.ones(len(tokens)), np.ones(8 * 32))
    for split, n in (("train", rows * 32), ("val", 8 * 32)):
        np.append(doc_starts[doc_starts < n], n).astype(np.int64).tofile(data_dir / f"{split}.docs.bin")
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, "packed": True, "seq_len": 32}))
    split = prepare.TokenSplit(str(data_dir), "train", {**meta, "packed": True, "seq_len": 32}, 32)
    sampler = train.EpochSampler(len(tokens), 32, 8, seed=0, rows=True)
    starts = [s for _ in range(10) for s in sampler.next_starts(0, 1)]
    assert sorted(starts[:40]) == list(range(0, rows * 32, 32))  # an epoch is every row once
    x, y, mask, doc_ids = train.batch_on(split, starts[:4], torch.device("cpu"))
    assert torch.all(mask[:, -1] == 0) and torch.all(mask[:, :-1] == 1)  # no target from the next row
    assert torch.all(doc_ids[:, 19] != doc_ids[:, 20]) and torch.all(doc_ids[:, :20] == doc_ids[:, :1])
    with pytest.raises(SystemExit, match="packed in rows of 32 tokens; train with --seq_len=32"):
        run(data_dir, tmp_path / "bad", "--seq_len=16")
    summary = run(data_dir, tmp_path / "out", "--max_iters=3")
    assert all(math.isfinite(v) for v in summary["losses"].values())


# --------------------------------------------------------------------------------------------------------------------
# exact resume


def test_resume_is_bitwise_exact(data, tmp_path):
    # grad accumulation 4; step 6 checkpoints in the middle of the second epoch; steps 7-12 cross into the third
    extra = ["--micro_batch_size=2", "--global_batch_size=8", "--max_iters=12", "--eval_interval=6", "--keep_last=1"]
    full = run(data, tmp_path / "full", *extra, "--ckpt_interval=6")
    run(data, tmp_path / "split", *extra, "--ckpt_interval=6", "--max_iters=6")
    state = json.loads((tmp_path / "split" / "step_00000006" / "train_state.json").read_text())
    assert state["data"]["epoch"] == 1 and state["data"]["index"] > 0  # a partly consumed epoch
    resumed = run(data, tmp_path / "split", *extra, "--ckpt_interval=6", "--init_from=resume")
    assert sorted(resumed["losses"]) == list(range(7, 13))
    assert [resumed["losses"][s] for s in range(7, 13)] == [full["losses"][s] for s in range(7, 13)]
    assert resumed["val_loss"] == full["val_loss"]
    # keep_last=1 pruned step 6 once step 12 was written
    assert [p.name for p in train.step_dirs(tmp_path / "split")] == ["step_00000012"]


def test_float16_resume_in_the_middle_of_the_loss_scalers_hysteresis_equals_an_uninterrupted_run(data, tmp_path):
    # 2^30 overflows float16 gradients; hysteresis 3 absorbs the overflows of steps 1 and 2 and the checkpoint of
    # step 2 falls there, with one overflow left before the scale halves: a resume that refilled the hysteresis
    # would keep 2^30 for two more skipped steps
    extra = ["--dtype=float16", "--loss_scale=1073741824.0", "--loss_scale_hysteresis=3", "--max_iters=6",
             "--ckpt_interval=2"]
    run(data, tmp_path / "full", *extra)
    run(data, tmp_path / "split", *extra, "--max_iters=2")
    run(data, tmp_path / "split", *extra, "--init_from=resume")
    scale_of = lambda out: {r["step"]: (r["loss_scale"], r["skipped_steps"], r["loss"])  # noqa: E731
                            for r in metric_rows(out, "loss_scale")}
    full, split = scale_of(tmp_path / "full"), scale_of(tmp_path / "split")
    assert [full[s][:2] for s in (1, 2, 3)] == [(2.0**30, 1), (2.0**30, 2), (2.0**29, 3)]  # resumed mid-hysteresis
    assert split == full


def test_resume_refuses_a_checkpoint_of_another_shape(data, tmp_path):
    run(data, tmp_path / "out", "--max_iters=2")
    with pytest.raises(SystemExit, match="checkpoint of another model: n_layers=2 .config has 3"):
        run(data, tmp_path / "out", "--max_iters=4", "--init_from=resume", "--n_layers=3")


# --------------------------------------------------------------------------------------------------------------------
# precision


def test_float16_loss_scaler_skips_overflow_and_recovers(data, tmp_path):
    # a loss scale of 2^30 overflows float16 gradients: those steps are skipped and the scale halves until it fits
    summary = run(data, tmp_path / "out", "--dtype=float16", "--loss_scale=1073741824.0", "--max_iters=30",
                  "--eval_interval=30")
    rows = metric_rows(tmp_path / "out", "loss_scale")
    skipped = summary["skipped_steps"]
    assert 1 <= skipped < 20
    assert rows[-1]["loss_scale"] == 2.0**30 / 2**skipped
    assert all(math.isfinite(r["loss"]) for r in rows[skipped:])
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[skipped]["loss"] - 0.5  # learning after the skips
    assert summary["val_loss"] < summary["unigram_baseline"]


def test_bfloat16_runs_and_learns(data, tmp_path):
    summary = run(data, tmp_path / "out", "--dtype=bfloat16", "--max_iters=20", "--eval_interval=20")
    losses = list(summary["losses"].values())
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-3:]) < losses[0] - 0.5


# every way a tensor's value comes into Python: on a GPU or an NPU each waits for the device to finish what it was given
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("dtype, reads_per_step", [("float32", 0), ("bfloat16", 0), ("float16", 1)])
def test_a_step_reads_no_value_off_the_device_but_the_float16_skip_decision(dtype, reads_per_step, tmp_path,
                                                                            monkeypatch):
    """The loss and the grad norm stay on the device until the log interval, where every step's are read at once: a
    float32 or bfloat16 step reads no tensor into Python, a float16 step one (whether its gradients overflowed, which
    decides the update). Each step's loss is still recorded, the same as a run that logs every step."""
    data = write_data(tmp_path / "data", markov_tokens(8224, 1), markov_tokens(600, 2))  # 256 windows: one epoch
    reads, counting = [], {"on": False}
    for name in HOST_READS:
        def read(self, *args, _read=getattr(torch.Tensor, name), **kwargs):
            if counting["on"]:
                reads[-1] += 1
            return _read(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    step = train.train_step

    def counted_step(run, autocast):
        reads.append(0)
        counting["on"] = True
        try:
            return step(run, autocast)
        finally:
            counting["on"] = False
    monkeypatch.setattr(train, "train_step", counted_step)
    summary = run(data, tmp_path / "out", f"--dtype={dtype}", "--max_iters=6", "--log_interval=3",
                  "--eval_interval=6")
    assert reads[1:] == [reads_per_step] * 5  # step 1 also draws the epoch's window order (an int of a CPU tensor)
    monkeypatch.setattr(train, "train_step", step)
    every_step = run(data, tmp_path / "every", f"--dtype={dtype}", "--max_iters=6", "--log_interval=1",
                     "--eval_interval=6")
    assert summary["losses"] == every_step["losses"] and sorted(summary["losses"]) == list(range(1, 7))
    logged = {r["step"]: r["grad_norm"] for r in metric_rows(tmp_path / "every", "grad_norm")}
    assert [(r["step"], r["grad_norm"]) for r in metric_rows(tmp_path / "out", "grad_norm")] == \
        [(3, logged[3]), (6, logged[6])]


# --------------------------------------------------------------------------------------------------------------------
# fine-tuning


def test_finetune_from_checkpoint_dir_starts_from_its_loss(data, tmp_path):
    trained = run(data, tmp_path / "pre", "--max_iters=40", "--export")
    export = trained["export_dir"]  # a checkpoint dir written by convert.dcp_to_native from the last step
    assert (export / "config.json").exists() and Transformer.from_checkpoint(export).args.vocab_size == V
    end_loss = np.mean([trained["losses"][s] for s in range(36, 41)])
    for init in (export, trained["last_checkpoint"]):  # a checkpoint dir, and a training step dir directly
        tuned = run(data, tmp_path / f"tune_{init.name}", f"--init_from={init}", "--max_iters=2", "--lr=1e-5")
        assert abs(tuned["losses"][1] - end_loss) < 0.3 < math.log(V) - tuned["losses"][1]


def test_resumed_finetune_takes_its_model_from_its_step_dir(data, tmp_path):
    # the base has another shape than the preset (model='tiny'); --init_from=resume names neither base nor shape
    base = run(data, tmp_path / "pre", "--max_iters=2", "--export", "--n_layers=3", "--hidden_dim=96")["export_dir"]
    extra = [f"--init_from={base}", "--max_iters=6", "--eval_interval=3", "--ckpt_interval=3"]
    full = run(data, tmp_path / "full", *extra)
    run(data, tmp_path / "split", *extra[:-2], "--max_iters=3", "--eval_interval=3", "--ckpt_interval=3")
    resumed = run(data, tmp_path / "split", "--init_from=resume", *extra[1:])
    assert [resumed["losses"][s] for s in range(4, 7)] == [full["losses"][s] for s in range(4, 7)]
    assert resumed["val_loss"] == full["val_loss"]


# --------------------------------------------------------------------------------------------------------------------
# configuration and bad input


def test_config_file_then_overrides(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import math\nlr = 6e-4\nmodel = 'tiny'\nn_layers = 3\n_private = 1\nmax_iters = 7\n")
    cfg, model_overrides = train.parse_config(["--max_iters=9", str(recipe), "--out_dir=out/x", "--overwrite",
                                               "--min_lr=0", "--n_kv_heads=None"])
    assert (cfg.lr, cfg.max_iters, cfg.out_dir, cfg.overwrite, cfg.min_lr) == (6e-4, 9, "out/x", True, 0.0)
    assert model_overrides == {"n_layers": 3, "n_kv_heads": None}


@pytest.mark.parametrize("argv, message", [
    (["--lrr=1e-3"], "unknown config key 'lrr'; did you mean 'lr'"),
    (["--n_layer=4"], "unknown config key 'n_layer'; did you mean 'n_layers'"),
    (["--max_iters=1.5"], "--max_iters=1.5: expected an integer >= 1"),
    (["--lr=fast"], "--lr='fast': expected a finite number >= 0"),
    (["--compile=1"], "--compile=1: expected true or false"),
    (["--dim=big"], "--dim='big': expected an integer in "),
    (["--lr=-0.001"], "--lr=-0.001: expected a finite number >= 0"),
    (["--beta2=1.5"], "--beta2=1.5: expected a finite number in "),
    (["--lr"], "--lr: expected --key=value"),
    (["config/nope.py"], "config/nope.py: config file not found"),
])
def test_config_errors(argv, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.main(argv)


def test_bad_run_settings(data, tmp_path):
    with pytest.raises(SystemExit, match="seq_len=256 is above the model's max_seq_len=128"):
        run(data, tmp_path / "a", "--seq_len=256")
    with pytest.raises(SystemExit, match="model='tiyn': unknown preset; did you mean 'tiny'"):
        run(data, tmp_path / "a", "--model=tiyn")
    with pytest.raises(SystemExit, match="loss_weighting='tokens': expected one of token, micro_batch"):
        run(data, tmp_path / "a", "--loss_weighting=tokens")
    with pytest.raises(SystemExit, match="meta.json: not found"):
        run(tmp_path, tmp_path / "a")
    with pytest.raises(SystemExit, match="global_batch_size=6 is not a multiple of micro_batch_size"):
        run(data, tmp_path / "a", "--global_batch_size=6")
    with pytest.raises(SystemExit, match="ModelArgs.n_kv_heads=3: must be a positive divisor of n_heads=4"):
        run(data, tmp_path / "a", "--n_kv_heads=3")
    no_val = write_data(tmp_path / "no_val", markov_tokens(600, 1), markov_tokens(0, 2))  # --val_fraction=0's
    with pytest.raises(SystemExit, match=r"val.bin: empty \(no tokens\); train.py evaluates on it: prepare the "
                                         r"data with --val_fraction > 0"):
        run(no_val, tmp_path / "a")


def test_existing_out_dir_needs_overwrite(data, tmp_path):
    run(data, tmp_path / "out", "--max_iters=2")
    before = (tmp_path / "out" / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="holds another run .* --overwrite"):
        run(data, tmp_path / "out", "--max_iters=2")
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == before
    run(data, tmp_path / "out", "--max_iters=3", "--overwrite")
    assert [p.name for p in train.step_dirs(tmp_path / "out")] == ["step_00000003"]


@pytest.mark.parametrize("argv, message", [
    (["--data_dir=/nonexistent/data"], "train.py: data_dir=/nonexistent/data: not found"),
    (["--learning_rate=1"], "train.py: --learning_rate=1: unknown config key 'learning_rate'"),
])
def test_cli_errors_are_one_line_without_traceback(argv, message):
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_throughput_counts_only_the_steps_timed_since_an_eval_or_checkpoint(monkeypatch):
    import types

    clock = iter([0.0, 10.0, 12.0])  # start; an eval ends at t=10 (step 3); the log at t=12 (step 4)
    monkeypatch.setattr(metrics_file.time, "perf_counter", lambda: next(clock, 12.0))
    monkeypatch.setattr(metrics_file, "peak_memory_gib", lambda device: 0.0)
    monkeypatch.setattr(metrics_file, "local_state_bytes", lambda model, optimizer: 0)
    cfg = types.SimpleNamespace(global_batch_size=2, seq_len=8, device="cpu")
    records = []
    run = types.SimpleNamespace(cfg=cfg, args=ModelArgs(dim=8, n_layers=1, n_heads=1, hidden_dim=8, vocab_size=16),
                                step=0, d=types.SimpleNamespace(world_size=1), device="cpu", model=None,
                                optimizer=None, scaler=train.LossScaler(False, 1.0, 1), t_start=0.0,
                                record=records.append, log=lambda line: None)
    throughput = metrics_file.Throughput(run, peak=1e9)
    run.step = 3
    throughput.restart()
    run.step = 4
    throughput.log(1.0, 1e-3, 0.5)
    assert records[-1]["tokens_per_s"] == pytest.approx(2 * 8 / 2.0)  # one step of 16 tokens in 2 s
