"""bench.py: JSON fields of train/generate runs, --compare against transformers, --plot and its relative difference.

Tiny models and one or two steps: these check that the numbers are there and sane, never how fast anything is.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from conftest import is_timing

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["--preset=tiny", "--mode=train", "--batch_size=2", "--seq_len=32", "--steps=1", "--rounds=1",
              "--warmup=0"]
TINY_GENERATE = ["--preset=tiny", "--mode=generate", "--prompt_len=4", "--new_tokens=6", "--rounds=1", "--warmup=0"]


def check_speed(row):
    assert is_timing(row["tokens_per_s"], *row["tokens_per_s_runs"], row["mfu"]) and len(row["tokens_per_s_runs"]) >= 1


def test_train_prints_one_json_line_with_sane_fields():
    out = subprocess.run([sys.executable, "bench.py", *TINY_TRAIN], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    check_speed(result)
    assert result["mode"] == "train" and result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["mm_peak_flops"] > 0 and result["mm_size"] == 128  # tiny's FFN width 176 -> 128
    assert result["peak_mem_gib"] > 0.05
    # random tokens: the loss after one step is close to ln(vocab)
    assert abs(result["last_loss"] - math.log(512)) < 0.5
    expected = 6 * (bench.n_params_flops(bench.PRESETS["tiny"])) + 12 * 2 * 32 * 64
    assert result["mfu_flops_per_token"] == expected


def test_generate_counts_2n_flops_per_token():
    result = bench.main(TINY_GENERATE)
    check_speed(result)
    args = bench.PRESETS["tiny"]
    n = sum(p for p in [args.n_layers * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64), 64, 512 * 64])
    assert result["mfu_flops_per_token"] == 2 * n
    assert result["new_tokens"] == 6 and result["batch_size"] == 1
    # the weight-streaming bound: the same N weights, 4 bytes each in fp32, and the fraction of it reached
    assert result["bytes_per_token"] == 4 * n - 4 * (2 * args.n_layers + 1) * 64  # norm gains (1-D) not counted
    assert is_timing(result["stream_peak_bytes_per_s"])
    assert result["mbu"] == pytest.approx(result["bytes_per_token"] * result["tokens_per_s"]
                                          / result["stream_peak_bytes_per_s"], rel=0.01)


def test_serve_times_concurrent_and_sequential_clients():
    result = bench.main(["--preset=tiny", "--mode=serve", "--prompt_len=4", "--new_tokens=6", "--rounds=1",
                         "--warmup=0", "--batch_size=3"])
    assert result["clients"] == 3 and is_timing(result["concurrent_tokens_per_s"], result["sequential_tokens_per_s"])
    assert result["ratio"] == pytest.approx(result["concurrent_tokens_per_s"] / result["sequential_tokens_per_s"],
                                            rel=0.01)
    assert 1 <= result["largest_batch"] <= 3  # the server never batches more than --batch_size clients
    assert is_timing(result["short_alone_s"], result["short_during_long_s"])
    assert list(result["streams"]) == ["1_clients", "4_clients", "8_clients"]
    for figures in result["streams"].values():  # what each streaming client sees: first token, then its speed
        assert is_timing(figures["ttft_s"], figures["tokens_per_s_per_client"], figures["cpu_ms_per_token"])


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_generate_quantized_reports_the_bytes_decoding_reads(mode):
    result = bench.main([*TINY_GENERATE, f"--quantize={mode}", "--group_size=16", "--new_tokens=4", "--warmup=1"])
    check_speed(result)
    args = bench.PRESETS["tiny"]
    kv = args.kv_heads * args.head_dim  # 32
    shapes = [(64, 64), (kv, 64), (kv, 64), (64, 64), (176, 64), (64, 176), (176, 64)] * args.n_layers + [(512, 64)]
    if mode == "int8":  # a byte per weight and an fp32 scale per row
        want = sum(rows * cols + 4 * rows for rows, cols in shapes)
    elif mode == "int4":  # half a byte per weight, an fp32 scale and zero per 16
        want = sum(rows * cols // 2 + 8 * rows * cols // 16 for rows, cols in shapes)
    else:  # QLoRA's base: half a byte per weight, an int8 absmax per 64 (rows of 256) and an fp32 scale per 256
        blocks = [rows * cols // 64 for rows, cols in shapes[:-1]]  # the output layer stays fp32
        want = sum(32 * b + 256 * -(-b // 256) + 4 * -(-b // 256) for b in blocks) + 4 * 512 * 64
    assert result["quantize"] == mode and result["bytes_per_token"] == want
    assert result["params"] == sum(r * c for r, c in shapes) + 512 * 64 + (2 * args.n_layers + 1) * 64
    assert result["kernel"] in ("c", "dequantised") and is_timing(result["kernel_build_s"], result["build_s"])
    assert is_timing(result["decode_tokens_per_s"], result["first_call_s"]) and result["peak_mem_gib"] > 0.05
    assert result["decode_mbu"] == pytest.approx(result["bytes_per_token"] * result["decode_tokens_per_s"]
                                                 / result["stream_peak_bytes_per_s"], rel=0.01)


@pytest.mark.slow  # torch.compile builds two kernels
def test_matvec_times_every_candidate_and_each_computes_the_product(monkeypatch):
    import torch

    w, x = torch.randn(64, 256), torch.randn(1, 256)
    want = x @ w.T
    candidates = bench.matvec_candidates(w, x, 32)
    for name, (fn, nbytes) in candidates.items():
        error = (fn().view(1, -1) - want).norm() / want.norm()
        assert error < (1e-5 if name.startswith("fp32") else 0.02 if name.startswith("int8") else 0.15), name
    monkeypatch.setattr(bench, "MATVEC_SHAPES", [(64, 256)])
    result = bench.main(["--mode=matvec", "--rounds=1", "--group_size=32"])
    row = result["64x256"]
    assert set(row) == {"fp32 stream (sum)", *candidates} and is_timing(row["fp32 stream (sum)"]["GB_per_s"])
    assert all(is_timing(row[name]["ms"], row[name]["G_weights_per_s"]) for name in candidates)
    assert is_timing(row["int8 torch.compile dequantise-and-dot"]["compile_s"]) and result["kernel"] in ("c", "dequantised")


def test_bfloat16_train_reports_both_peaks():
    result = bench.main([*TINY_TRAIN, "--dtype=bfloat16"])
    check_speed(result)
    assert result["mm_peak_flops"] > 0 and result["mm_peak_flops_fp32"] > 0
    assert result["mfu_vs_fp32_peak"] == pytest.approx(result["mfu"] * result["mm_peak_flops"]
                                                       / result["mm_peak_flops_fp32"], rel=0.01)


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_train_counts_adapter_flops(qlora):
    result = bench.main([*TINY_TRAIN, "--lora_rank=4", *(["--qlora"] if qlora else [])])
    check_speed(result)
    args = bench.PRESETS["tiny"]  # rank 4 on every block linear: (in + out) * 4 weights each
    adapters = args.n_layers * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 176))  # wq wo, wk wv, w1 w2 w3
    assert result["trainable_params"] == adapters and result["qlora"] == qlora
    assert result["mfu_flops_per_token"] == 4 * bench.n_params_flops(args) + 6 * adapters + 12 * 2 * 32 * 64
    assert abs(result["last_loss"] - math.log(512)) < 0.5


@pytest.mark.slow
def test_compare_train_runs_the_same_workload_as_transformers():
    pytest.importorskip("transformers")
    result = bench.main([*TINY_TRAIN, "--compare", "--rounds=2", "--steps=2"])
    for name in ("ours", "transformers"):
        check_speed(result[name])
        assert len(result[name]["tokens_per_s_runs"]) == 2
    assert result["ratio"] == pytest.approx(result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"],
                                            rel=1e-2)
    losses = result["first_round_last_loss"]  # same weights, data and optimiser: the same loss after two steps
    assert losses["ours"] == pytest.approx(losses["transformers"], abs=1e-3)


@pytest.mark.slow
def test_compare_generate_gives_the_same_greedy_tokens():
    pytest.importorskip("transformers")
    result = bench.main([*TINY_GENERATE, "--compare"])
    assert result["greedy_tokens_agree"] == 1.0
    assert result["ratio"] > 0
    assert result["ratio_bound"] == pytest.approx(1 / result["transformers"]["mbu"], rel=0.01)


def test_cpu_peak_memory_is_the_runs_own_not_that_of_the_process_that_started_it():
    """getrusage's ru_maxrss of a process started by vfork + exec (as subprocess starts one) also holds its parent's
    peak: bench.py run from a process holding 768 MiB reports its own peak, well below."""
    import torch

    held = torch.ones(768 * 2**20 // 4)  # written: resident
    parent = bench.peak_memory_gib(torch.device("cpu"))
    out = subprocess.run([sys.executable, "bench.py", *TINY_GENERATE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["peak_mem_gib"] < parent - 0.7, parent
    del held


@pytest.mark.slow
def test_generate_peak_memory_of_a_long_prefill_falls_by_the_full_logits():
    """A 1,024-token prompt on a 65,536-word vocabulary: the prefill builds the last position's logits only, so
    bench.py's peak memory is below that of a prefill that builds every position's (the forward without last_only,
    as before) by about those logits, 1024 x 65536 x 4 bytes = 0.25 GiB; the KV cache (one small layer) is ~1 MB.
    Each run is a process of its own: on a CPU the figure is the process's peak resident memory."""
    argv = ["--mode=generate", "--prompt_len=1024", "--new_tokens=2", "--rounds=1", "--warmup=0",
            '--model_args={"vocab_size": 65536, "n_layers": 1, "dim": 64, "n_heads": 4, "hidden_dim": 128, '
            '"max_seq_len": 1040}']
    full_prefill = ("import sys, model; forward = model.Transformer.forward; "
                    "model.Transformer.forward = lambda self, *a, last_only=False, **k: forward(self, *a, **k); "
                    "import bench; bench.main(sys.argv[1:])")
    peaks = []
    for command in ([sys.executable, "bench.py"], [sys.executable, "-c", full_prefill]):
        out = subprocess.run([*command, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peaks.append(json.loads(out.stdout)["peak_mem_gib"])
    logits_gib = 1024 * 65536 * 4 / 2**30
    assert peaks[1] - peaks[0] == pytest.approx(logits_gib, rel=0.25), peaks


def write_metrics(path, losses, start_step=1):
    rows = [{"unigram_baseline": 6.0, "n_params": 1, "peak_flops": 1.0, "start_step": 0}]
    for i, loss in enumerate(losses):
        rows.append({"step": start_step + i, "loss": loss, "lr": 1e-3, "tokens_per_s": 1.0, "mfu": 0.1})
        rows.append({"step": start_step + i, "val_loss": 99.0, "unigram_baseline": 6.0})  # not a training loss
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plot_writes_png_and_relative_difference(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", [4.0, 3.0, 2.0, 1.0])
    b = write_metrics(tmp_path / "b.jsonl", [4.04, 2.97, 2.0, 1.01, 0.5])  # step 5 exists only in b
    out = tmp_path / "loss.png"
    result = bench.main(["--plot", a, b, f"--out={out}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rel = [0.01, 0.01, 0.0, 0.01]  # |b - a| / a on the four common steps
    assert result["steps_compared"] == 4
    assert result["rel_diff_max"] == pytest.approx(0.01)
    assert result["rel_diff_mean"] == pytest.approx(sum(rel) / 4)
    assert result["reference"] == a


def test_plot_criterion_exits_non_zero_above_it_and_reports_both_errors(tmp_path, capsys):
    a = write_metrics(tmp_path / "a.jsonl", [4.0, 3.0, 2.0, 1.0])
    b = write_metrics(tmp_path / "b.jsonl", [4.04, 2.97, 2.05, 1.01])  # relative 0.01, 0.01, 0.025, 0.01
    ok = bench.main(["--plot", a, b, f"--out={tmp_path / 'ok.png'}", "--max_rel_err=0.03", "--max_abs_err=0.06"])
    assert ok["within_criterion"] is True and ok["abs_diff_max"] == pytest.approx(0.05) and ok["worst_abs_step"] == 3
    assert "The maximum relative error is 0.0250 (step 3), and the maximum absolute error is 0.0500 (step 3)" in \
        capsys.readouterr().err
    run = subprocess.run([sys.executable, "bench.py", "--plot", a, b, f"--out={tmp_path / 'bad.png'}",
                          "--max_rel_err=0.02"], capture_output=True, text=True, cwd=ROOT)  # AscendSpeed's 2%
    assert run.returncode == 1 and "NOT within relative <= 0.02" in run.stderr, run.stderr
    assert json.loads(run.stdout)["within_criterion"] is False
    for i, flags in enumerate((["--max_abs_err=0.04"], ["--max_rel_err=0.03", "--max_abs_err=0.04"])):
        with pytest.raises(SystemExit) as e:
            bench.main(["--plot", a, b, f"--out={tmp_path / f'{i}.png'}", *flags])
        assert e.value.code == 1 and "NOT within" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--max_rel_err=0.02: expected a value >= 0 with --plot REFERENCE RUN"):
        bench.main(["--plot", a, f"--out={tmp_path / 'one.png'}", "--max_rel_err=0.02"])


def test_plot_one_run_has_no_difference(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", [4.0, 3.0])
    result = bench.main(["--plot", a, f"--out={tmp_path / 'one.png'}"])
    assert (tmp_path / "one.png").exists() and "rel_diff_max" not in result


def test_plot_bad_input_names_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit, match="nope.jsonl: no such file"):
        bench.main(["--plot", str(missing), f"--out={tmp_path / 'x.png'}"])
    empty = tmp_path / "val_only.jsonl"
    empty.write_text(json.dumps({"step": 1, "val_loss": 3.0}) + "\n")
    with pytest.raises(SystemExit, match="val_only.jsonl: no rows with 'step' and 'loss'"):
        bench.main(["--plot", str(empty), f"--out={tmp_path / 'x.png'}"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 2.0}\n{not json\n')
    with pytest.raises(SystemExit, match="broken.jsonl: line 2"):
        bench.main(["--plot", str(broken), f"--out={tmp_path / 'x.png'}"])


def test_plot_does_not_overwrite_without_flag(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", [4.0, 3.0])
    out = tmp_path / "loss.png"
    out.write_bytes(b"keep")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        bench.main(["--plot", a, f"--out={out}"])
    assert out.read_bytes() == b"keep"
    bench.main(["--plot", a, f"--out={out}", "--overwrite"])
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bad_flags_are_one_line_errors():
    with pytest.raises(SystemExit, match="--preset='nope': unknown"):
        bench.main(["--preset=nope"])
    with pytest.raises(SystemExit, match="--steps=0: expected a positive integer"):
        bench.main(["--steps=0"])
    with pytest.raises(SystemExit, match="--seq_len=999 is above the preset's max_seq_len=128"):
        bench.main(["--preset=tiny", "--seq_len=999"])
    with pytest.raises(SystemExit, match="--lora_rank=0: expected a positive rank with --qlora"):
        bench.main(["--qlora"])
    with pytest.raises(SystemExit, match="--lora_rank: fine-tuning speed is measured in --mode=train"):
        bench.main(["--mode=generate", "--lora_rank=8"])
    with pytest.raises(SystemExit, match="--quantize=int8: measured in --mode=generate, without --compare"):
        bench.main(["--mode=train", "--quantize=int8"])
    with pytest.raises(SystemExit, match="--group_size=48 does not suit layer layers.0.attention.wq"):
        bench.main([*TINY_GENERATE, "--quantize=int4", "--group_size=48"])


def test_cpu_bf16_matmul_on_fp32_units_matches_torch_bf16(monkeypatch):
    """The speed path for bf16 on CPUs without bf16 units gives torch's bf16 autocast numbers (loss and grads)."""
    import torch

    from model import Transformer
    from support import cpu_linear

    torch.manual_seed(0)
    model = Transformer(bench.PRESETS["tiny"])
    x, y = torch.randint(512, (2, 32)), torch.randint(512, (2, 32))

    def loss_and_grads(fp32_units: bool):
        monkeypatch.setattr(cpu_linear, "CPU_HAS_BF16_UNITS", not fp32_units)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_fast, grads_fast = loss_and_grads(True)
    loss_ref, grads_ref = loss_and_grads(False)
    assert loss_fast == pytest.approx(loss_ref, rel=1e-3)
    for name, g in grads_ref.items():  # bf16 rounding noise only
        assert (grads_fast[name] - g).norm() <= 0.03 * g.norm(), name


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_block_is_one_graph_without_recompiles(autocast):
    """kernels asks the CPU about bf16 units once at import: a per-call query broke every compiled graph."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from model import Transformer

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Transformer(bench.PRESETS["tiny"])
    for layer in model.layers:
        layer.compile(backend="eager")  # dynamo alone decides graphs and recompiles; no C++ build needed
    x = torch.randint(512, (2, 16))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x, x)
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1  # both blocks share one graph, never rebuilt
    assert not counters["graph_break"]
    torch._dynamo.reset()
