"""Bad input across the scripts, and untrusted files: one clear line, non-zero exit, no traceback, nothing changed.

Each case of CASES builds its files in tmp_path, runs one script as a subprocess, and checks:
  - exit code is not 0,
  - the last non-empty stderr line matches the case's regex (it names the file / field / flag),
  - no "Traceback" in stderr,
  - every file that existed before (in tmp_path and in the shared fixtures) has the same bytes and mtime after.
The malicious-pickle cases also check that the pickle's payload (creating a marker dir) never ran.

    python -m pytest -q tests/test_bad_inputs.py
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
from support.weights import write_checkpoint
from model import PRESETS, Transformer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a model data token chat user reply question answer code small large fast hello world city".split()


# --------------------------------------------------------------------------------------------------------------------
# shared fixtures: a tiny tokenizer, a prepare.py data dir, a tiny checkpoint dir (all built in-process, once)

@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) + "." for i in range(2000)]
    sp_model = prepare.train_sentencepiece(lines, root / "tok", vocab_size=400)
    corpus = root / "corpus.jsonl"  # one document per line: both splits get documents
    corpus.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 20])}) + "\n" for i in range(0, 2000, 20)))
    data = root / "data"
    prepare.main(["--input", str(corpus), "--tokenizer", str(sp_model), "--out", str(data)])
    tok = prepare.load_tokenizer(sp_model)
    args = replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    ckpt = root / "ckpt"
    write_checkpoint(ckpt, model.state_dict(), args, "llama")
    tok.save(ckpt)
    return {"root": root, "sp": Path(sp_model), "data": data, "ckpt": ckpt}


def snapshot(*roots):
    """path -> (sha256, mtime_ns) of every file under roots."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = Path(dirpath, name)
                if p.is_file():
                    out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


class Evil:
    """A pickle whose loading would run code: os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def evil_save(path, t, names=("model.embed_tokens.weight",)):
    """torch.save a state dict with one plain tensor and one object that runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**{n: torch.zeros(4, 4) for n in names}, "x": Evil(str(t / "PWNED"))}, path)


def copy_ckpt(shared, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in shared["ckpt"].iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def hf_dir(t, name="hf"):
    """A minimal HF LLaMA dir config (weights added by the case)."""
    d = t / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
        "vocab_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False}))
    return d


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def fake_step_dir(t, shared, out_dir):
    """out_dir/step_00000001 whose DCP .metadata is a malicious pickle (DCP reads .metadata with pickle.load)."""
    step = out_dir / "step_00000001"
    copy_ckpt(shared, step)
    import pickle
    write(step / ".metadata", pickle.dumps(Evil(str(t / "PWNED"))))
    state = {"step": 1, "loss_scaler": {"scale": 1.0, "good_steps": 0, "skipped": 0},
             "data": {"seed": 1, "epoch": 0, "index": 0}}  # all the fields resume reads: only .metadata is bad
    write(step / "train_state.json", json.dumps(state))
    return step


# --------------------------------------------------------------------------------------------------------------------
# the table: (id, script, setup(t, shared) -> argv, regex for stderr's last line, xfail reason or None)

def P(*a):
    return ["prepare.py", *a]


def T(*a):
    return ["train.py", *a]


def C(*a):
    return ["convert.py", *a]


def S(*a):
    return ["sample.py", *a]


def B(*a):
    return ["bench.py", *a]


def _train_small(t, s, *extra):
    return T(f"--data_dir={s['data']}", f"--out_dir={t / 'out'}", "--max_iters=1", "--eval_interval=1000",
             *extra)


def _data_copy(t, s):
    d = t / "data"
    d.mkdir()
    for f in s["data"].iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _train_data_with(t, s, name, data):
    """train.py on a copy of the shared data dir whose file `name` is replaced by data."""
    return T(f"--data_dir={write(_data_copy(t, s) / name, data).parent}", f"--out_dir={t / 'out'}", "--max_iters=1")


CASES = [
    # ---------------------------------------------------------------- prepare.py
    ("prepare-malformed-jsonl", lambda t, s: P("--input", write(t / "bad.jsonl", '{"text": "a b"}\n{"text": '),
                                              "--format", "jsonl", "--tokenizer", s["sp"], "--out", t / "o"),
     r"bad\.jsonl.*line 2", None),
    ("prepare-truncated-json", lambda t, s: P("--input", write(t / "bad.json", '[{"text": "a b"}, {"te'),
                                             "--tokenizer", s["sp"], "--out", t / "o"),
     r"bad\.json", None),
    ("prepare-binary-junk", lambda t, s: P("--input", write(t / "junk.jsonl", bytes(range(256)) * 8),
                                          "--tokenizer", s["sp"], "--out", t / "o"),
     r"junk\.jsonl", None),
    ("prepare-latin1-jsonl", lambda t, s: P("--input", write(t / "latin.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1")),
                                           "--tokenizer", s["sp"], "--out", t / "o"),
     r"latin\.jsonl.*(line 1|UTF-8|utf-8)", None),
    ("prepare-empty-file", lambda t, s: P("--input", write(t / "empty.jsonl", ""), "--tokenizer", s["sp"],
                                         "--out", t / "o"),
     r"empty\.jsonl", None),
    ("prepare-wrong-field-type", lambda t, s: P("--input", write(t / "num.jsonl", '{"text": 5}\n'),
                                               "--tokenizer", s["sp"], "--out", t / "o"),
     r"num\.jsonl.*line 1.*text", None),
    ("prepare-alpaca-missing-field", lambda t, s: P("--input", write(t / "a.json", '[{"output": "x"}]'),
                                                   "--format", "alpaca", "--template", "alpaca", "--tokenizer", s["sp"],
                                                   "--out", t / "o"),
     r"a\.json.*instruction", None),
    ("prepare-alpaca-input-not-text", lambda t, s: P("--input", write(t / "a.json", '[{"instruction": "x", "input": 0, '
                                                                   '"output": "y"}]'), "--format", "alpaca",
                                                    "--template", "alpaca", "--tokenizer", s["sp"], "--out", t / "o"),
     r"a\.json: item 1: field 'input' is an integer, expected a string", None),  # 0 is no empty input
    ("prepare-sharegpt-all-empty", lambda t, s: P("--input", write(t / "e.jsonl", '{"conversations": []}\n' * 3),
                                                 "--format", "sharegpt", "--template", "vicuna", "--tokenizer",
                                                 s["sp"], "--out", t / "o"),
     r"--input: no documents left to write", None),
    ("prepare-sharegpt-assistant-only", lambda t, s: P("--input", write(t / "g.jsonl", json.dumps(
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "gpt", "value": "again"}]}) + "\n"),
        "--format", "sharegpt", "--template", "vicuna", "--tokenizer", s["sp"], "--out", t / "o"),
     r"g\.jsonl: line 1: conversations: only assistant turns: expected a human/user turn", None),
    ("prepare-unknown-flag", lambda t, s: P("--bogus_flag", "1"), r"--bogus_flag", None),
    ("prepare-wrong-value-type", lambda t, s: P("--workers", "two"), r"--workers", None),
    ("prepare-unknown-format", lambda t, s: P("--input", write(t / "x.txt", "hello world\n"), "--format", "yaml",
                                             "--tokenizer", s["sp"], "--out", t / "o"),
     r"--format|yaml", None),
    ("prepare-missing-input", lambda t, s: P("--input", t / "missing.txt", "--tokenizer", s["sp"], "--out", t / "o"),
     r"missing\.txt", None),
    ("prepare-missing-tokenizer", lambda t, s: P("--input", write(t / "x.txt", "hello world\n"),
                                                "--tokenizer", t / "nope.model", "--out", t / "o"),
     r"nope\.model", None),
    ("prepare-junk-tokenizer", lambda t, s: P("--input", write(t / "x.txt", "hello world\n"),
                                             "--tokenizer", write(t / "junk.model", b"\x00\xffnot a model" * 10),
                                             "--out", t / "o"),
     r"junk\.model", None),
    ("prepare-out-under-a-file", lambda t, s: P("--input", write(t / "x.txt", "hello world\n"),
                                               "--tokenizer", s["sp"], "--out", write(t / "afile", "x") / "sub"),
     r"afile", None),
    ("prepare-out-read-only", lambda t, s: P("--input", write(t / "x.txt", "hello world\n"), "--tokenizer", s["sp"],
                                            "--out", read_only_dir(t) / "o"),
     r"--out .*o: cannot create it", None),
    ("prepare-out-exists", lambda t, s: P("--input", write(t / "x.txt", "hello world\n"), "--tokenizer", s["sp"],
                                         "--out", write(t / "o" / "meta.json", "{}").parent),
     r"--overwrite", None),
    ("prepare-megatron-junk-idx", lambda t, s: P("--input", write(t / "m.idx", b"MMIDIDX\x00\x00junk"),
                                                "--tokenizer", s["sp"], "--out", t / "o"),
     r"m\.(idx|bin)", None),
    # ---------------------------------------------------------------- train.py
    ("train-unknown-key", lambda t, s: _train_small(t, s, "--min_lrr=0.1"), r"min_lrr.*did you mean 'min_lr'",
     None),
    ("train-empty-val-split", lambda t, s: T(f"--data_dir={write(_data_copy(t, s) / 'val.bin', b'').parent}",
                                             f"--out_dir={t / 'out'}", "--max_iters=1"),
     r"val\.bin: empty", None),
    ("train-wrong-value-type", lambda t, s: _train_small(t, s, "--max_iters='ten'"), r"max_iters.*int", None),
    ("train-bare-flag", lambda t, s: _train_small(t, s, "--max_iters"), r"--max_iters", None),
    ("train-missing-config-file", lambda t, s: T(str(t / "nope.py")), r"nope\.py", None),
    ("train-config-syntax-error", lambda t, s: T(str(write(t / "bad.py", "max_iters = = 3\n"))),
     r"bad\.py.*line 1", None),
    ("train-config-unknown-key", lambda t, s: T(str(write(t / "cfg.py", "batch_sise = 3\n"))),
     r"cfg\.py.*batch_sise", None),
    ("train-missing-data-dir", lambda t, s: T(f"--data_dir={t / 'nodata'}", f"--out_dir={t / 'out'}"),
     r"data_dir.*nodata", None),
    ("train-malformed-meta", lambda t, s: T(f"--data_dir={write(t / 'd' / 'meta.json', '{oops').parent}",
                                            f"--out_dir={t / 'out'}"),
     r"meta\.json", None),
    ("train-meta-wrong-field-type", lambda t, s: T(
        f"--data_dir={write(t / 'd' / 'meta.json', json.dumps({'dtype': 'uint16', 'vocab_size': '200'})).parent}",
        f"--out_dir={t / 'out'}"),
     r"meta\.json.*vocab_size", None),
    ("train-token-file-size", lambda t, s: T(f"--data_dir={write(_data_copy(t, s) / 'train.bin', b'x' * 1001).parent}",
                                             f"--out_dir={t / 'out'}", "--max_iters=1"),
     r"train\.bin", None),
    ("train-vocab-mismatch", lambda t, s: _train_small(t, s, "--vocab_size=50"), r"vocab_size", None),
    ("train-init-from-missing", lambda t, s: _train_small(t, s, f"--init_from={t / 'nockpt'}"),
     r"init_from|nockpt", None),
    ("train-out-dir-under-file", lambda t, s: T(f"--data_dir={s['data']}",
                                                f"--out_dir={write(t / 'afile', 'x') / 'run'}", "--max_iters=1"),
     r"out_dir.*afile", None),
    ("train-out-dir-read-only", lambda t, s: T(f"--data_dir={s['data']}", f"--out_dir={read_only_dir(t) / 'run'}",
                                               "--max_iters=1"),
     r"out_dir=.*run: cannot write there", None),
    ("train-token-ids-past-vocab", lambda t, s: _train_data_with(
        t, s, "train.bin", np.array([5] * 3000 + [60000] + [5] * 10, dtype=np.uint16).tobytes()),
     r"train\.bin: token id 60000 at position 3000 is not below the model's vocab_size=400", None),
    ("train-mask-size-mismatch", lambda t, s: _train_data_with(t, s, "val.mask.bin", b"\x01" * 7),
     r"val\.mask\.bin: 7 entries for \d+ tokens", None),
    ("train-meta-utf16", lambda t, s: _train_data_with(
        t, s, "meta.json", (s["data"] / "meta.json").read_text().encode("utf-16")),
     r"meta\.json: not valid JSON", None),
    ("train-config-latin1", lambda t, s: T(str(write(t / "latin.py", "# caf\xe9\nmax_iters = 2\n".encode("latin-1")))),
     r"latin\.py", None),
    ("train-resume-without-checkpoint", lambda t, s: _train_small(t, s, "--init_from=resume"),
     r"init_from=resume: no complete step_XXXXXXXX dir", None),
    ("train-out-dir-holds-a-run", lambda t, s: (write(t / "out" / "metrics.jsonl", '{"step": 1}\n'),
                                                 _train_small(t, s))[1],
     r"out_dir.*--overwrite", None),
    # ---------------------------------------------------------------- convert.py
    ("convert-unknown-command", lambda t, s: C("hf-to-gguf", "--src", t, "--dst", t / "o"), r"hf-to-gguf", None),
    ("convert-unknown-flag", lambda t, s: C("hf-to-native", "--src", t, "--dst", t / "o", "--bogus"), r"--bogus",
     None),
    ("convert-missing-src", lambda t, s: C("hf-to-native", "--src", t / "nohf", "--dst", t / "o"), r"nohf", None),
    ("convert-malformed-config", lambda t, s: C("hf-to-native", "--src", write(t / "hf" / "config.json", "{").parent,
                                                "--dst", t / "o"),
     r"config\.json", None),
    ("convert-junk-safetensors", lambda t, s: C("hf-to-native", "--src",
                                                write(hf_dir(t) / "model.safetensors", b"\x10" * 64).parent,
                                                "--dst", t / "o"),
     r"model\.safetensors", None),
    ("convert-dst-exists", lambda t, s: C("native-to-hf", "--src", s["ckpt"], "--dst",
                                          write(t / "o" / "keep.txt", "mine").parent),
     r"--overwrite", None),
    ("convert-dst-under-file", lambda t, s: C("native-to-hf", "--src", s["ckpt"], "--dst",
                                              write(t / "afile", "x") / "sub"),
     r"afile", None),
    ("convert-dst-read-only", lambda t, s: C("native-to-hf", "--src", s["ckpt"], "--dst", read_only_dir(t) / "o"),
     r"--dst .*o: cannot create it", None),
    ("convert-bad-max-shard-size", lambda t, s: C("native-to-hf", "--src", s["ckpt"], "--dst", t / "o",
                                                  "--max_shard_size", "lots"),
     r"max_shard_size|lots", None),
    ("convert-wrong-value-type", lambda t, s: C("meta-to-native", "--src", t, "--dst", t / "o",
                                                "--max_seq_len", "long"),
     r"--max_seq_len", None),
    # ---------------------------------------------------------------- sample.py
    ("sample-missing-ckpt", lambda t, s: S("--ckpt", t / "nockpt", "--max_new_tokens", "2"), r"nockpt", None),
    ("sample-malformed-config", lambda t, s: S("--ckpt", write(copy_ckpt(s, t / "c") / "config.json", "{").parent,
                                               "--max_new_tokens", "2"),
     r"config\.json", None),
    ("sample-truncated-safetensors", lambda t, s: S("--ckpt", write(
        copy_ckpt(s, t / "c") / "model.safetensors", (s["ckpt"] / "model.safetensors").read_bytes()[:5000]).parent,
        "--max_new_tokens", "2"),
     r"model\.safetensors", None),
    ("sample-missing-tokenizer", lambda t, s: S("--ckpt", _without(copy_ckpt(s, t / "c"), "tokenizer.model"),
                                                "--max_new_tokens", "2"),
     r"tokenizer", None),
    ("sample-wrong-value-type", lambda t, s: S("--ckpt", s["ckpt"], "--max_new_tokens", "many"),
     r"--max_new_tokens", None),
    ("sample-bad-choice", lambda t, s: S("--ckpt", s["ckpt"], "--quantize", "int3"), r"--quantize", None),
    ("sample-empty-stop", lambda t, s: S("--ckpt", s["ckpt"], "--prompt", "the", "--stop", ""),
     r"--stop: an empty string would stop before the first token", None),
    ("sample-unknown-flag", lambda t, s: S("--ckpt", s["ckpt"], "--topk", "3"), r"--topk", None),
    ("sample-missing-prompt-file", lambda t, s: S("--ckpt", s["ckpt"], "--prompt_file", t / "prompts.txt",
                                                  "--max_new_tokens", "2"),
     r"prompts\.txt", None),
    ("sample-prompt-file-latin1", lambda t, s: S("--ckpt", s["ckpt"], "--prompt_file",
                                                 write(t / "p.txt", "caf\xe9\n".encode("latin-1")),
                                                 "--max_new_tokens", "2"),
     r"p\.txt.*UTF-8", None),
    ("sample-junk-tokenizer", lambda t, s: S("--ckpt", write(copy_ckpt(s, t / "c") / "tokenizer.model",
                                                           b"\x00\xffjunk" * 50).parent, "--max_new_tokens", "2"),
     r"tokenizer\.model", None),
    ("sample-tokenizer-larger-than-model", lambda t, s: S("--ckpt", small_vocab_ckpt(t, s), "--max_new_tokens", "2"),
     r"tokenizer.*400.*vocab_size=100", None),
    ("sample-save-quantized-read-only", lambda t, s: S("--ckpt", s["ckpt"], "--quantize", "int8", "--save_quantized",
                                                       read_only_dir(t) / "q", "--max_new_tokens", "1"),
     r"--save_quantized .*q: cannot create it", None),
    ("sample-save-quantized-exists", lambda t, s: S("--ckpt", s["ckpt"], "--quantize", "int8", "--save_quantized",
                                                    write(t / "q" / "keep.txt", "mine").parent,
                                                    "--max_new_tokens", "1"),
     r"save_quantized", None),
    # ---------------------------------------------------------------- bench.py
    ("bench-unknown-preset", lambda t, s: B("--preset", "llama-70b"), r"preset.*llama-70b|llama-70b", None),
    ("bench-malformed-model-args", lambda t, s: B("--preset", "tiny", "--model_args", "{n_layers: 2"),
     r"--model_args", None),
    ("bench-model-args-wrong-type", lambda t, s: B("--preset", "tiny", "--model_args", '{"n_layers": "two"}'),
     r"n_layers", None),
    ("bench-model-args-unknown-field", lambda t, s: B("--preset", "tiny", "--model_args", '{"n_layyers": 2}'),
     r"n_layyers", None),
    ("bench-bad-dtype", lambda t, s: B("--dtype", "float8"), r"--dtype", None),
    ("bench-plot-missing-file", lambda t, s: B("--plot", t / "nometrics.jsonl", "--out", t / "loss.png"),
     r"nometrics\.jsonl", None),
    ("bench-plot-malformed-jsonl", lambda t, s: B("--plot", write(t / "m.jsonl", '{"step": 1, "loss": 2.0}\n{"st'),
                                                  "--out", t / "loss.png"),
     r"m\.jsonl.*line 2", None),
    ("bench-plot-out-read-only", lambda t, s: B("--plot", write(t / "m.jsonl", '{"step": 1, "loss": 2.0}\n'),
                                                "--out", read_only_dir(t) / "loss.png"),
     r"--out.*loss\.png", None),
    ("bench-plot-out-exists", lambda t, s: B("--plot", write(t / "m.jsonl", '{"step": 1, "loss": 2.0}\n'),
                                             "--out", write(t / "loss.png", b"png")),
     r"--overwrite|loss\.png", None),
]


def read_only_dir(t):
    """A dir nothing can be created in: chmod 555, or for root (whom modes do not stop) sysfs."""
    d = t / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").touch()
    except OSError:
        return d
    (d / "probe").unlink()
    return Path("/sys")


def small_vocab_ckpt(t, s):
    """The shared checkpoint's 400-piece tokenizer beside a model of vocab 100: ids past 99 have no embedding."""
    args = replace(PRESETS["tiny"], vocab_size=100)
    model = Transformer(args)
    model.init_weights()
    d = t / "c"
    write_checkpoint(d, model.state_dict(), args, "llama")
    for f in s["ckpt"].iterdir():
        if f.name.startswith("tokenizer"):
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _without(d, name):
    (d / name).unlink()
    return d


# --------------------------------------------------------------------------------------------------------------------
# untrusted files: a pickle that would run code, fed to every loader that could meet one

UNTRUSTED = [
    ("convert-hf-bin-pickle", lambda t, s: C("hf-to-native", "--src", _evil_hf(t), "--dst", t / "o"),
     r"pytorch_model\.bin.*refused", None),
    ("convert-hf-sharded-bin-pickle", lambda t, s: C("hf-to-native", "--src", _evil_hf(t, sharded=True),
                                                     "--dst", t / "o"),
     r"pytorch_model-00001-of-00002\.bin.*refused", None),
    ("convert-meta-pth-pickle", lambda t, s: C("meta-to-native", "--src", _evil_meta(t), "--dst", t / "o"),
     r"consolidated\.00\.pth.*refused", None),
    ("convert-apply-delta-pickle", lambda t, s: C("apply-delta", "--src", s["ckpt"], "--delta", _evil_ckpt(t, s),
                                                  "--dst", t / "o"),
     r"pytorch_model\.bin.*refused", None),
    ("convert-dcp-metadata-pickle", lambda t, s: C("dcp-to-native", "--src", fake_step_dir(t, s, t / "run"),
                                                   "--dst", t / "o"),
     r"\.metadata.*refused", None),
    ("train-init-from-bin-pickle", lambda t, s: _train_small(t, s, f"--init_from={_evil_ckpt(t, s)}"),
     r"init_from|model\.safetensors", None),
    ("train-init-from-step-dir-pickle", lambda t, s: _train_small(
        t, s, f"--init_from={fake_step_dir(t, s, t / 'other')}"),
     r"\.metadata.*refused", None),
    ("train-resume-pickle", lambda t, s: (fake_step_dir(t, s, t / "out"), _train_small(t, s, "--init_from=resume"))[1],
     r"\.metadata.*refused", None),
    ("sample-ckpt-bin-pickle", lambda t, s: S("--ckpt", _evil_ckpt(t, s), "--max_new_tokens", "2"),
     r"model\.safetensors|c\b", None),
]


def _evil_hf(t, sharded=False, name="hf"):
    d = hf_dir(t, name)
    if sharded:
        evil_save(d / "pytorch_model-00001-of-00002.bin", t)
        torch.save({"lm_head.weight": torch.zeros(128, 64)}, d / "pytorch_model-00002-of-00002.bin")
        write(d / "pytorch_model.bin.index.json", json.dumps({"weight_map": {
            "model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin",
            "x": "pytorch_model-00001-of-00002.bin", "lm_head.weight": "pytorch_model-00002-of-00002.bin"}}))
    else:
        evil_save(d / "pytorch_model.bin", t)
    return d


def _evil_meta(t):
    d = t / "meta"
    write(d / "params.json", json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32,
                                         "norm_eps": 1e-5, "vocab_size": 128}))
    evil_save(d / "consolidated.00.pth", t, names=("tok_embeddings.weight",))
    return d


def _evil_ckpt(t, s):
    """A checkpoint dir whose weights are a malicious pytorch_model.bin instead of safetensors."""
    d = _without(copy_ckpt(s, t / "c"), "model.safetensors")
    evil_save(d / "pytorch_model.bin", t, names=("tok_embeddings.weight",))
    return d


def launch(setup, t, shared):
    """Build the case's files in t, snapshot, run the script; returns (argv, before, CompletedProcess)."""
    t.mkdir(parents=True, exist_ok=True)
    argv = [str(a) for a in setup(t, shared)]
    before = snapshot(t, shared["root"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=t, capture_output=True, text=True,
                       env=env, timeout=300)
    return argv, before, r


@pytest.fixture(scope="session")
def results(shared, tmp_path_factory):
    """Every case run once, a few subprocesses at a time (each spends most of its ~3 s importing torch)."""
    from concurrent.futures import ThreadPoolExecutor
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 2) as pool:
        futures = {name: pool.submit(launch, setup, root / name, shared) for name, setup, _, _ in CASES + UNTRUSTED}
    return {name: (root / name, *f.result()) for name, f in futures.items()}


def check(name, regex, results, shared):
    t, argv, before, r = results[name]
    assert not (t / "PWNED").exists(), "a pickle's payload ran"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"exit 0 for {argv}\nstderr:\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and re.search(regex, lines[-1]), f"last stderr line does not match {regex!r}:\n{r.stderr[-2000:]}"
    after = snapshot(t, shared["root"])
    changed = [p for p, v in before.items() if after.get(p) != v]
    assert not changed, f"files changed or removed: {changed}"
    return lines[-1]


def params(cases):
    return [pytest.param(name, regex, id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=why)] if why else [])
            for name, setup, regex, why in cases]


@pytest.mark.parametrize("name,regex", params(CASES))
def test_bad_input_gets_one_clear_line(name, regex, results, shared):
    check(name, regex, results, shared)


@pytest.mark.parametrize("name,regex", params(UNTRUSTED))
def test_malicious_pickle_is_refused(name, regex, results, shared):
    check(name, regex, results, shared)


def test_at_least_30_cases_over_every_script():
    prefixes = {name.split("-")[0] for name, *_ in CASES + UNTRUSTED}
    assert len(CASES) + len(UNTRUSTED) >= 30 and prefixes == {"prepare", "train", "convert", "sample", "bench"}
