"""train.py's training loop against a reference written here, so a bug that changes the numbers of every run alike
(a schedule off by a step, decay on the wrong parameters, clipping left out or done before the float16 loss scale is
removed, a loss scale that grows wrong) fails.

The comparisons in tests/test_train.py and tests/test_distributed.py set train.py against itself (resumed against
uninterrupted, a mesh against one process): they cannot see such a bug. Here the reference is plain PyTorch and the
documented recipe: torch.optim.AdamW with weight decay on matrices only, torch.nn.utils.clip_grad_norm_ (in float16
after torch.amp.GradScaler's unscale), linear warmup then cosine decay to min_lr, on the windows train.py's
EpochSampler hands out and the weights of a checkpoint dir written by the test. train.py is used through
train.main, its metrics.jsonl and export, EpochSampler and LossScaler (for the one case a run cannot show). Also:
an interrupted LoRA run with dropout against an uninterrupted one, the tensor-parallel loss with a loss mask
against the formula kernels.py documents, and a Baichuan2 HF dir converted as the README says, trained against
Baichuan2's own NormHead training.

    python -m pytest -q tests/test_training_reference.py
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from support.weights import write_checkpoint
from model import PRESETS, ModelArgs, Transformer
from support.weights import load_tensors
from test_train import V, first_step_gradients, markov_tokens, uneven_mask, write_data

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny preset on the test data's vocabulary: what a run with --init_from=resume builds before it loads the step
ARGS = replace(PRESETS["tiny"], vocab_size=V)
SEQ_LEN, MICRO, GLOBAL, SEED = 32, 2, 4, 7  # gradient accumulation of 2 micro batches of 2 sequences
# steps 0, 1 warm up; steps 2, 3 decay; steps 4, 5 are at and past lr_decay_iters. A high lr and weight decay make
# a wrong decay visible; a low grad_clip makes every step clip.
RECIPE = dict(lr=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=4, weight_decay=0.5, beta1=0.9, beta2=0.95,
              grad_clip=0.5)
STEPS = 6


def documented_lr(step: int, recipe=RECIPE) -> float:
    """Config's comment: linear warmup from warmup_start_lr (default 0) to lr, then cosine decay to min_lr at
    lr_decay_iters, then min_lr. Warmup step s (0-based) takes start + (lr - start) * (s + 1) / (warmup_iters + 1),
    nanoGPT's convention (no step at the start lr)."""
    lr, min_lr, warmup, decay = recipe["lr"], recipe["min_lr"], recipe["warmup_iters"], recipe["lr_decay_iters"]
    start = recipe.get("warmup_start_lr", 0.0)
    if step < warmup:
        return start + (lr - start) * (step + 1) / (warmup + 1)
    if step >= decay:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup)))


def flags(**recipe):
    return [f"--{k}={v}" for k, v in {**RECIPE, **recipe}.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Markov tokens with a loss mask (as prepare.py writes for instruction data): about a third of them are not
    counted as targets, so the comparison covers train.py handing the mask to the loss."""
    masks = [(np.random.default_rng(seed).random(n) > 0.3).astype(np.uint8) for seed, n in ((3, 1200), (4, 600))]
    return write_data(tmp_path_factory.mktemp("ref") / "markov", markov_tokens(1200, 1), markov_tokens(600, 2),
                      *masks)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A checkpoint dir with weights drawn here: both loops start from it."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    path = tmp_path_factory.mktemp("init") / "ckpt"
    write_checkpoint(path, model.state_dict(), ARGS, "llama")
    return path


def reference_run(data_dir: Path, init: Path, recipe=RECIPE, loss_scale=None, weighting="token"):
    """The documented training loop in plain PyTorch: per-step losses and the final state dict. The step's loss is
    the mean over every counted target of its micro batches (weighting 'token', train.py's default), or the mean of
    each micro batch's own mean (--loss_weighting=micro_batch).

    loss_scale: float16 as PyTorch's AMP recipe has it, around the model's own loss under autocast (its fused loss
    rounds in float16 otherwise than logits then F.cross_entropy, and Adam magnifies that within a few steps): the
    loss times the scale (torch.amp.GradScaler), the gradients unscaled, then clipped, then the step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale or 1.0, enabled=loss_scale is not None)
    model = Transformer.from_checkpoint(init)
    model.train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # embeddings and linear weights
    gains = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": recipe["weight_decay"]},
                                   {"params": gains, "weight_decay": 0.0}],
                                  lr=recipe["lr"], betas=(recipe["beta1"], recipe["beta2"]),
                                  eps=recipe.get("adam_eps", 1e-8))
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    counts = np.fromfile(data_dir / "train.mask.bin", dtype=np.uint8).astype(bool)  # token i counts as a target
    sampler = train.EpochSampler(len(tokens), SEQ_LEN, MICRO, SEED)
    losses = []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = documented_lr(step, recipe)
        step_loss = 0.0
        micro_batches = [sampler.next_starts(0, 1) for _ in range(GLOBAL // MICRO)]
        n_step = sum(int(counts[s + 1 : s + SEQ_LEN + 1].sum()) for starts in micro_batches for s in starts)
        for starts in micro_batches:
            windows = torch.tensor(np.stack([tokens[s : s + SEQ_LEN + 1] for s in starts]))
            x, y = windows[:, :-1], windows[:, 1:]  # (B, T) inputs and next-token targets
            counted = torch.tensor(np.stack([counts[s + 1 : s + SEQ_LEN + 1] for s in starts]))  # (B, T)
            if loss_scale is None:
                logits, _ = model(x)
                if weighting == "token":  # every counted target of the step weighs the same
                    loss = F.cross_entropy(logits[counted], y[counted], reduction="sum") / n_step
                else:  # the mean over this micro batch's counted targets; the step's loss the mean over micro batches
                    loss = F.cross_entropy(logits[counted], y[counted]) / (GLOBAL // MICRO)
            else:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = model(x, y, loss_mask=counted)[1].float()  # the mean over its counted targets
                loss = loss * counted.sum() / n_step if weighting == "token" else loss / (GLOBAL // MICRO)
            scaler.scale(loss).backward()
            step_loss += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def train_run(data_dir: Path, out_dir: Path, *extra):
    return train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--seq_len={SEQ_LEN}",
                       f"--micro_batch_size={MICRO}", f"--global_batch_size={GLOBAL}", f"--seed={SEED}",
                       "--log_interval=1", "--eval_interval=1000", "--eval_iters=1", "--ckpt_interval=1000",
                       "--peak_flops=1e9", *extra])


def metric_rows(out_dir, key):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


@pytest.fixture(scope="module")
def runs(data, init_dir, tmp_path_factory):
    """train.py and the reference on the same data and initial weights."""
    out = tmp_path_factory.mktemp("train") / "out"
    summary = train_run(data, out, f"--init_from={init_dir}", f"--max_iters={STEPS}", "--export", *flags())
    trained = {k: v.clone() for k, v in load_tensors(summary["export_dir"]).items()}
    ref_losses, ref_weights = reference_run(data, init_dir)
    return summary, out, trained, ref_losses, ref_weights


# --------------------------------------------------------------------------------------------------------------------
# a few steps of train.py equal the reference loop


def test_losses_equal_the_reference_loop(runs):
    summary, _, _, ref_losses, _ = runs
    assert sorted(summary["losses"]) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([summary["losses"][s + 1] for s in range(STEPS)], ref_losses, rtol=1e-5)


def test_micro_batch_loss_weighting_equals_the_reference_loop_of_micro_batch_means(runs, data, init_dir, tmp_path):
    summary = train_run(data, tmp_path / "out", f"--init_from={init_dir}", f"--max_iters={STEPS}", "--export",
                        "--loss_weighting=micro_batch", *flags())
    ref_losses, ref_weights = reference_run(data, init_dir, weighting="micro_batch")
    np.testing.assert_allclose([summary["losses"][s + 1] for s in range(STEPS)], ref_losses, rtol=1e-5)
    assert_updates_equal(load_tensors(summary["export_dir"]), ref_weights, load_tensors(init_dir), list(ref_weights))
    token_losses = runs[3]  # the data's micro batches count different numbers of targets: the two weightings differ
    assert ref_losses[0] != pytest.approx(token_losses[0], rel=1e-4)


def test_every_step_clips_so_the_comparison_covers_clipping(runs):
    _, out, _, _, _ = runs
    assert all(r["grad_norm"] > 2 * RECIPE["grad_clip"] for r in metric_rows(out, "grad_norm"))


def test_lr_of_each_step_is_the_documented_schedule(runs):
    _, out, _, _, _ = runs
    logged = [r["lr"] for r in metric_rows(out, "lr")]
    np.testing.assert_allclose(logged, [documented_lr(s) for s in range(STEPS)], rtol=1e-12)


def test_warmup_start_lr_and_adam_eps_equal_the_reference(data, init_dir, tmp_path):
    # DeepSpeed WarmupLR's warmup_min_lr and Adam's eps as config keys; an eps this large changes every update
    recipe = {**RECIPE, "warmup_start_lr": 4e-3, "adam_eps": 1e-3}
    summary = train_run(data, tmp_path / "out", f"--init_from={init_dir}", f"--max_iters={STEPS}", *flags(**recipe))
    ref_losses, _ = reference_run(data, init_dir, recipe)
    default_losses, _ = reference_run(data, init_dir)
    for step, loss in summary["losses"].items():
        assert loss == pytest.approx(ref_losses[step - 1], rel=1e-5), step
    assert summary["losses"][STEPS] != pytest.approx(default_losses[-1], rel=1e-4)  # the keys change the run
    lrs = [r["lr"] for r in metric_rows(tmp_path / "out", "lr")]
    assert lrs == pytest.approx([documented_lr(s, recipe) for s in range(STEPS)])
    assert lrs[0] == pytest.approx(4e-3 + 6e-3 / 3)  # a third of the way from the start lr


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_without_warmup_equals_transformers_schedules(decay):
    # the schedules of the Hugging Face Trainer runs the recipes reproduce (lr_scheduler_type cosine / linear)
    transformers = pytest.importorskip("transformers")
    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}[decay]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5)
    schedule = make(optimizer, num_warmup_steps=0, num_training_steps=40)
    theirs = []
    for _ in range(40):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    cfg = train.Config(lr=5e-5, min_lr=0.0, warmup_iters=0, lr_decay_iters=40, lr_decay=decay)
    assert [train.get_lr(step, cfg) for step in range(40)] == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def assert_updates_equal(trained: dict, ref: dict, init: dict, names):
    """Each tensor's change over the run equals the reference's to 0.1% (as a vector norm): the two loops compute
    the loss gradient in different ways, and Adam magnifies rounding in near-zero gradient entries elementwise."""
    for name in names:
        update = (ref[name] - init[name]).norm()
        assert update > 0 and (trained[name] - ref[name]).norm() <= 1e-3 * update, name


def test_final_matrices_equal_the_reference_with_weight_decay(runs, init_dir):
    _, _, trained, _, ref = runs
    assert_updates_equal(trained, ref, load_tensors(init_dir), [name for name, w in ref.items() if w.dim() >= 2])


def test_final_norm_gains_equal_the_reference_without_weight_decay(runs, init_dir):
    _, _, trained, _, ref = runs
    assert_updates_equal(trained, ref, load_tensors(init_dir), [name for name, w in ref.items() if w.dim() < 2])


# --------------------------------------------------------------------------------------------------------------------
# the step's loss over micro batches of different counted targets (SFT masks)


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("uneven") / "sft", markov_tokens(1200, 1), markov_tokens(600, 2),
                      uneven_mask(1200, 5), uneven_mask(600, 6))


def step_one(data_dir, out_dir, *extra) -> tuple[float, dict]:
    """train.py's loss and gradients of its first step (as the optimiser gets them, with clipping off)."""
    with first_step_gradients() as grads:
        summary = train_run(data_dir, out_dir, "--max_iters=1", "--grad_clip=0", *extra)
    return summary["losses"][1], grads


def step_windows(data_dir, n, per_micro_batch):
    """The data of the first step's micro batches as EpochSampler hands them out: (x, y, loss_mask, doc_ids) each."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    split = train.TokenSplit(str(data_dir), "train", meta, SEQ_LEN)
    sampler = train.EpochSampler(len(split.tokens), SEQ_LEN, per_micro_batch, SEED)
    return [train.batch_on(split, sampler.next_starts(0, 1), torch.device("cpu")) for _ in range(n)]


def test_token_weighting_gives_the_same_gradient_whatever_the_micro_batch_size(uneven_data, init_dir, tmp_path):
    """The step's 4 sequences count different numbers of targets. By default every counted target weighs the same:
    4 micro batches of 1 give the gradient of 1 micro batch of 4 (and of dp=2 x 2: tests/test_distributed.py). The
    mean of micro-batch means (--loss_weighting=micro_batch, the seeds' frameworks) weighs a target of a short reply
    more, and depends on how the step is cut."""
    counted = [int(mask.sum()) for _, _, mask, _ in step_windows(uneven_data, 4, 1)]
    assert len(set(counted)) > 1, counted

    def step(micro, *weighting):  # 4 sequences in micro batches of `micro`
        return step_one(uneven_data, tmp_path / f"{micro}{weighting}", f"--init_from={init_dir}",
                        f"--micro_batch_size={micro}", "--global_batch_size=4", *weighting)

    (loss_1, grads_1), (loss_4, grads_4) = step(1), step(4)
    assert loss_1 == pytest.approx(loss_4, rel=1e-6)
    for name, grad in grads_4.items():
        torch.testing.assert_close(grads_1[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    (loss_1, grads_1), (loss_4, grads_4) = (step(micro, "--loss_weighting=micro_batch") for micro in (1, 4))
    assert loss_1 != pytest.approx(loss_4, rel=1e-3)
    assert not all(torch.allclose(grads_1[name], grad, rtol=1e-3, atol=1e-5) for name, grad in grads_4.items())


def test_micro_batch_weighting_is_the_step_before_token_weighting_bit_for_bit(uneven_data, init_dir, tmp_path):
    """--loss_weighting=micro_batch is train.py's step as it was: each micro batch's loss (the model's mean over its
    counted targets) divided by the accumulation steps, then backward; the same numbers to the last bit."""
    loss, grads = step_one(uneven_data, tmp_path / "out", f"--init_from={init_dir}",
                           "--micro_batch_size=1", "--global_batch_size=3", "--loss_weighting=micro_batch")
    model = Transformer.from_checkpoint(init_dir)
    model.train()
    step_loss = torch.zeros(())
    for x, y, mask, doc_ids in step_windows(uneven_data, 3, 1):
        micro_loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)[1].float() / 3
        micro_loss.backward()
        step_loss += micro_loss.detach()
    assert loss == step_loss.item()
    assert all(torch.equal(grads[name], p.grad) for name, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------------------------
# float16: the dynamic loss scale


def test_float16_clips_the_unscaled_gradients_as_torch_amp_does(data, init_dir, runs, tmp_path):
    # grad_clip bounds the true gradients' norm: clipped while they still carry the loss scale (2^16 here), every
    # step would be clipped 65,536 times too hard, and the logged norm be the scaled one; float32 runs cannot see it
    scale = 2.0**16  # train.py's (and DeepSpeed's) initial dynamic scale
    summary = train_run(data, tmp_path / "out", f"--init_from={init_dir}", "--dtype=float16",
                        f"--loss_scale={scale}", f"--max_iters={STEPS}", "--export", *flags())
    assert summary["skipped_steps"] == 0  # no overflow: every step updates, as in the reference
    ref_losses, ref = reference_run(data, init_dir, loss_scale=scale)
    np.testing.assert_allclose([summary["losses"][s + 1] for s in range(STEPS)], ref_losses, rtol=1e-4)
    trained, init = load_tensors(summary["export_dir"]), load_tensors(init_dir)
    assert_updates_equal(trained, ref, init, list(ref))
    # the logged grad norm is the unscaled one too: step 1's (same weights, same batches) is float32's to rounding
    fp32_norm = metric_rows(runs[1], "grad_norm")[0]["grad_norm"]
    norms = [r["grad_norm"] for r in metric_rows(tmp_path / "out", "grad_norm")]
    assert norms[0] == pytest.approx(fp32_norm, rel=1e-2) and all(n > 2 * RECIPE["grad_clip"] for n in norms)


def documented_scales(initial: float, window: int, skipped: list[bool]) -> list[float]:
    """Config's comments and LossScaler's docstring: a skipped (overflowing) step halves the scale and starts the
    count of good steps again; window good steps in a row double it."""
    scale, good, out = initial, 0, []
    for overflow in skipped:
        if overflow:
            scale, good = scale / 2, 0
        else:
            good += 1
            if good == window:
                scale, good = scale * 2, 0
        out.append(scale)
    return out


def test_float16_loss_scale_halves_on_overflow_and_doubles_after_window_good_steps(data, init_dir, tmp_path):
    # 2^24 overflows float16 gradients at first; a window of 2 lets the scale grow back to overflow within the run
    initial, window = 2.0**24, 2
    train_run(data, tmp_path / "out", f"--init_from={init_dir}", "--dtype=float16", f"--loss_scale={initial}",
              f"--loss_scale_window={window}", "--max_iters=12", *flags())
    rows = metric_rows(tmp_path / "out", "loss_scale")
    skipped = [r["skipped_steps"] > (rows[i - 1]["skipped_steps"] if i else 0) for i, r in enumerate(rows)]
    assert any(skipped) and not all(skipped)
    expected = documented_scales(initial, window, skipped)
    assert [r["loss_scale"] for r in rows] == expected
    assert max(expected) > min(expected[skipped.index(False):])  # the run saw the scale grow, not only shrink


def test_loss_scaler_restarts_its_count_of_good_steps_after_an_overflow():
    # an overflow in the middle of a window: in a training run overflows come right after the scale grew, when
    # the count is 0 anyway, so the run above cannot see a count that is not restarted
    overflows = [False, True, False, False, False, True, False, True, False, False, False, False, False]
    scaler = train.LossScaler(enabled=True, scale=1024.0, window=3)
    scales = []
    for overflow in overflows:
        scaler.update(finite=not overflow)
        scales.append(scaler.scale)
    assert scales == documented_scales(1024.0, 3, overflows)


# --------------------------------------------------------------------------------------------------------------------
# resume: the RNG that LoRA dropout draws from


def deepspeed_scales(initial, window, hysteresis, min_scale, overflows):
    """DeepSpeed's DynamicLossScaler.update_scale (deepspeed/runtime/fp16/loss_scaler.py, v0.9.2), step by step:
    an overflow halves the scale (not below min_scale) only when the hysteresis is down to 1, else uses one up; the
    scale doubles when (iteration - last overflow iteration) is a multiple of the window, refilling the hysteresis."""
    scale, left, last_overflow, out = initial, hysteresis, -1, []
    for it, overflow in enumerate(overflows):
        if overflow:
            if hysteresis == 1 or left == 1:
                scale = max(scale / 2, min_scale)
            else:
                left -= 1
            last_overflow = it
        elif (it - last_overflow) % window == 0:
            scale, left = scale * 2, hysteresis
        out.append(scale)
    return out


def test_loss_scaler_hysteresis_and_floor_follow_deepspeed():
    overflows = [True, True, False, False, False, True, False, True, True, True, False, False]
    scaler = train.LossScaler(enabled=True, scale=64.0, window=3, hysteresis=2, min_scale=16.0)
    scales, floors = [], []
    for overflow in overflows:
        floors.append(scaler.at_floor())
        scaler.update(finite=not overflow)
        scales.append(scaler.scale)
    assert scales == deepspeed_scales(64.0, 3, 2, 16.0, overflows)
    assert scales[:5] == [64.0, 32.0, 32.0, 32.0, 64.0]  # the first overflow is absorbed, the second halves
    # DeepSpeed stops when an overflow would need a scale below min_loss_scale: here before the 10th step
    assert floors.index(True) == 9 and scales[8] == 16.0 and overflows[9]
    assert scaler.skipped == sum(overflows)


def test_static_loss_scale_stays_and_skips_overflowing_steps(data, init_dir, tmp_path):
    # DeepSpeed's fp16 "loss_scale" > 0: fixed, whatever overflows; an overflowing step is still skipped
    scaler = train.LossScaler(enabled=True, scale=64.0, window=1, static=8192.0, hysteresis=2, min_scale=1.0)
    for overflow in (True, True, True, False, False):
        scaler.update(finite=not overflow)
        assert scaler.scale == 8192.0 and not scaler.at_floor()
    assert scaler.skipped == 3
    train_run(data, tmp_path / "big", f"--init_from={init_dir}", "--dtype=float16", "--static_loss_scale=16777216.0",
              "--max_iters=3", *flags())  # 2^24 overflows float16 gradients at every step
    rows = metric_rows(tmp_path / "big", "loss_scale")
    assert [(r["loss_scale"], r["skipped_steps"]) for r in rows] == [(2.0**24, 1), (2.0**24, 2), (2.0**24, 3)]
    train_run(data, tmp_path / "ok", f"--init_from={init_dir}", "--dtype=float16", "--static_loss_scale=1024.0",
              "--loss_scale_window=1", "--max_iters=3", *flags())
    rows = metric_rows(tmp_path / "ok", "loss_scale")
    assert [(r["loss_scale"], r["skipped_steps"]) for r in rows] == [(1024.0, 0)] * 3  # a window of 1 changes nothing


def test_overflow_at_min_loss_scale_stops_the_run(data, init_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"step 1: float16 overflow at min_loss_scale=1.67772e\+07: no lower scale"):
        train_run(data, tmp_path / "out", f"--init_from={init_dir}", "--dtype=float16", "--loss_scale=16777216.0",
                  "--min_loss_scale=16777216.0", "--max_iters=3", *flags())


def test_interrupted_lora_run_with_dropout_equals_an_uninterrupted_one(data, init_dir, tmp_path):
    # peak_flops=0: the run measures a torch.mm peak at start, as by default, which must not disturb the RNG either
    lora = [f"--init_from={init_dir}", "--lora_rank=4", "--lora_alpha=8", "--lora_dropout=0.5", "--ckpt_interval=2",
            "--peak_flops=0", *flags()]
    straight = train_run(data, tmp_path / "straight", *lora, "--max_iters=4")
    train_run(data, tmp_path / "split", *lora, "--max_iters=2")
    resumed = train_run(data, tmp_path / "split", *lora, "--max_iters=4", "--init_from=resume")
    assert [resumed["losses"][s] for s in (3, 4)] == [straight["losses"][s] for s in (3, 4)]
    adapters = [load_file(run["adapter_dir"] / "adapter_model.safetensors") for run in (straight, resumed)]
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


# --------------------------------------------------------------------------------------------------------------------
# tensor parallel loss: the max-z term counts the loss-masked positions only


def documented_loss(logits, targets, loss_mask, z_loss):
    """kernels.cross_entropy's docstring: mean cross-entropy over the counted tokens (loss_mask 1) plus
    z_loss * mean over the same tokens of max(logits)^2."""
    counted = loss_mask.flatten() == 1
    rows, targets = logits.flatten(0, 1)[counted].double(), targets.flatten()[counted]
    return F.cross_entropy(rows, targets) + z_loss * rows.max(dim=-1).values.pow(2).mean()


@pytest.fixture
def one_rank_mesh():
    """A process group of this process alone and a 1-D mesh on it: tensor parallel code runs on one rank, its
    logits a DTensor sharded (here: not split) on the vocabulary."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def masked_batch(batch=2, seq=8, vocab=V):
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    loss_mask = torch.zeros(batch, seq, dtype=torch.long)
    loss_mask[:, seq // 2 :] = 1  # prompt positions (first half) do not count
    return targets, loss_mask


def test_vocab_parallel_loss_counts_only_masked_positions_in_cross_entropy_and_max_z(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import kernels

    targets, loss_mask = masked_batch()
    # the largest logits sit on the uncounted positions: a max-z term over every position is far off
    logits = torch.randn(*targets.shape, V, generator=torch.Generator().manual_seed(4)) * 2
    logits[:, : targets.shape[1] // 2] *= 4
    sharded = distribute_tensor(logits, one_rank_mesh, [Shard(-1)])
    with loss_parallel():
        loss = kernels.cross_entropy(sharded, targets, loss_mask, z_loss=0.1)
    torch.testing.assert_close(loss.double(), documented_loss(logits, targets, loss_mask, 0.1), rtol=1e-5, atol=0)


def test_tensor_parallel_model_passes_the_loss_mask_to_the_vocab_sharded_loss(one_rank_mesh):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    torch.manual_seed(5)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=V, max_seq_len=16,
                                  z_loss=0.1, init_std=0.5))  # large weights: logits whose max-z term matters
    targets, loss_mask = masked_batch()
    idx = torch.roll(targets, 1, dims=1)
    with torch.no_grad():
        logits = model(idx)[0]
    expected = documented_loss(logits, targets, loss_mask, 0.1)
    # the output layer split by vocabulary columns, as train.py's tensor parallel plan does
    parallelize_module(model, one_rank_mesh, {"output": ColwiseParallel(output_layouts=Shard(-1),
                                                                        use_local_output=False)})
    with loss_parallel():
        sharded_logits, loss = model(idx, targets, loss_mask=loss_mask)
    assert type(sharded_logits).__name__ == "DTensor"  # the vocab-sharded path, not the plain one
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# Baichuan2 as the README converts it: NormHead in training


def baichuan2_reference_losses(sd: dict, data_dir: Path, steps: int, batch: int, recipe=RECIPE) -> list[float]:
    """Baichuan2's own training in plain PyTorch on its HF weights: the forward of its modeling code (W_pack, ALiBi,
    the NormHead normalising the raw head rows in every training forward: test_convert.baichuan13b_reference), mean
    cross-entropy over the counted targets (z_loss_weight 0), the documented AdamW / schedule / clipping on the
    windows train.py's sampler hands out. One micro batch per step."""
    from test_convert import baichuan13b_reference

    params = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    matrices = [p for p in params.values() if p.dim() >= 2]
    gains = [p for p in params.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": recipe["weight_decay"]},
                                   {"params": gains, "weight_decay": 0.0}],
                                  lr=recipe["lr"], betas=(recipe["beta1"], recipe["beta2"]), eps=1e-8)
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    counts = np.fromfile(data_dir / "train.mask.bin", dtype=np.uint8).astype(bool)  # token i counts as a target
    sampler = train.EpochSampler(len(tokens), SEQ_LEN, batch, SEED)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = documented_lr(step, recipe)
        starts = sampler.next_starts(0, 1)
        windows = torch.tensor(np.stack([tokens[s : s + SEQ_LEN + 1] for s in starts]))
        counted = torch.tensor(np.stack([counts[s + 1 : s + SEQ_LEN + 1] for s in starts]))  # (B, T)
        logits = baichuan13b_reference(params, windows[:, :-1], n_heads=4, norm_head=True)
        loss = F.cross_entropy(logits[counted], windows[:, 1:][counted])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), recipe["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_baichuan2_converted_as_the_readme_says_trains_with_normhead_as_its_own_code(data, tmp_path):
    """README's "convert in" line (hf-to-native, no flags) on a Baichuan2 (ALiBi) HF dir whose head rows have very
    different lengths, then train.py from it: every step's loss equals Baichuan2's own code with its NormHead. The
    first step's loss is the same either way (a head normalised once computes NormHead's logits); the later ones
    differ where training runs a plain head on rows normalised once (its gradient is not NormHead's)."""
    from test_convert import baichuan_config, random_sd, save_hf, to_w_pack

    import convert

    sd = to_w_pack(random_sd())
    sd["lm_head.weight"] = sd["lm_head.weight"] * (torch.rand(sd["lm_head.weight"].size(0), 1) * 5 + 0.2)
    save_hf(tmp_path / "hf", sd, baichuan_config(alibi=True, baichuan2=True))
    convert.main(["hf-to-native", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'ckpt'}"])
    steps, batch = 4, 2  # one micro batch a step: the comparison does not depend on how micro batches are weighed
    summary = train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={tmp_path / 'ckpt'}",
                          f"--seq_len={SEQ_LEN}", f"--micro_batch_size={batch}", f"--global_batch_size={batch}",
                          f"--seed={SEED}", f"--max_iters={steps}", "--log_interval=1", "--eval_interval=1000",
                          "--eval_iters=1", "--ckpt_interval=1000", "--peak_flops=1e9", *flags()])
    ref = baichuan2_reference_losses(sd, data, steps, batch)
    np.testing.assert_allclose([summary["losses"][s + 1] for s in range(steps)], ref, rtol=1e-5)
