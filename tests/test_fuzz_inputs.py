"""Fuzz: malformed variants of every input format and of every flag, each fed to the reader or command that takes it.

Each variant builds its files in a fresh dir, then calls an entry point in-process (a script's main(argv), or the
reader the scripts use: Transformer.from_checkpoint, prepare.read_meta + TokenSplit, train's resume). For every
variant the test asserts:
  - the outcome is the promised error: SystemExit with a message (what a script's main exits with), or the reader's
    own CheckpointError / DataError; never another exception (that would be a traceback), never success;
  - the message is one line and names the file or the flag;
  - no file that existed before the call changed or disappeared.
Variants are generated: truncation at every header boundary, wrong types for each field, out-of-range numbers,
hostile paths, nesting. One subprocess per format class then checks the real command line (exit code, stderr).

    python -m pytest -q tests/test_fuzz_inputs.py        # FUZZ_REPORT=1 -s: the outcome counts; =all: every message
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import convert
import prepare
import sample
import train
import support.peft
import support.weights
from model import PRESETS, CheckpointError, Transformer, apply_lora, lora_state_dict
from support import datafiles, megatron, runlock

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a model data token chat user reply question answer code small large fast hello world city".split()
TRAIN = ["--model=tiny", "--seq_len=32", "--micro_batch_size=2", "--global_batch_size=2", "--eval_iters=1",
         "--eval_interval=1000", "--log_interval=1000", "--peak_flops=1e12", "--max_iters=1", "--ckpt_interval=1000",
         "--warmup_iters=0"]
TIMEOUT_S = 20  # a variant still running after this long is a hang (a loop over a size read from the file)
TALLY = {}  # format class -> Counter of outcomes (printed with FUZZ_REPORT=1)


# --------------------------------------------------------------------------------------------------------------------
# the valid originals every variant starts from (built once)


@pytest.fixture(scope="module")
def S(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) + "." for i in range(2000)]
    sp = Path(prepare.train_sentencepiece(lines, root / "tok", vocab_size=400))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 20])}) + "\n" for i in range(0, 2000, 20)))
    with quiet():
        prepare.main(["--input", str(corpus), "--tokenizer", str(sp), "--out", str(root / "data")])
    tok = prepare.load_tokenizer(sp)
    args = replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    for name, shard in (("ckpt", None), ("sharded", 60_000)):
        support.weights.write_checkpoint(root / name, model.state_dict(), args, "llama", max_shard_bytes=shard)
        tok.save(root / name)
    convert.native_to_hf(root / "ckpt", root / "hf")
    adapted = Transformer(args)
    apply_lora(adapted, rank=4, alpha=8)
    support.peft.write_peft_adapter(root / "adapter", lora_state_dict(adapted), args, "llama", rank=4, alpha=8,
                                    dropout=0.0)
    meta = root / "meta"  # Meta's layout: params.json + consolidated.00.pth (our tensor names are Meta's)
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "vocab_size": tok.vocab_size, "multiple_of": 16, "norm_eps": 1e-6}))
    torch.save(model.state_dict(), meta / "consolidated.00.pth")
    shutil.copy(sp, meta / "tokenizer.model")
    with quiet():
        train.main(TRAIN + [f"--data_dir={root / 'data'}", f"--out_dir={root / 'run'}", "--ckpt_interval=1"])
    return {"root": root, "sp": sp, "data": root / "data", "ckpt": root / "ckpt", "sharded": root / "sharded",
            "hf": root / "hf", "meta": meta, "run": root / "run", "corpus": corpus, "adapter": root / "adapter"}


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def copy(src, dst):
    shutil.copytree(src, dst) if Path(src).is_dir() else shutil.copy(src, dst)
    return Path(dst)


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def snapshot(root):
    """path -> sha256 of every file under root, but train.py's run lock (out_dir/.train.lock: it names whoever holds
    out_dir now, so a run refused after taking it rewrites it by design; support/runlock.py)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(root).rglob("*")
            if p.is_file() and p.name != ".train.lock"}


# --------------------------------------------------------------------------------------------------------------------
# running one variant


class Hang(BaseException):
    """Raised by the alarm in a variant that runs too long (BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def alarm(seconds):
    def ring(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(call, needle, t):
    """Run call() in t -> (kind, message). kind: clear | traceback | accepted | unclear | hang | changed."""
    before = snapshot(t)
    err, cwd = io.StringIO(), os.getcwd()
    kind, msg = None, ""
    os.chdir(t)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), alarm(TIMEOUT_S):
            call()
        kind = "accepted"
    except SystemExit as e:
        if e.code in (None, 0):
            kind = "accepted"
        else:  # argparse prints its message and exits 2
            msg = e.code if isinstance(e.code, str) else ([ln for ln in err.getvalue().splitlines() if ln.strip()]
                                                           or [""])[-1]
    except (CheckpointError, prepare.DataError) as e:
        msg = str(e)
    except Hang:
        kind = "hang"
    except Exception as e:  # noqa: BLE001 (anything else is what a user would see as a traceback)
        kind, msg = "traceback", f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        os.chdir(cwd)
    if kind is None:
        kind = "clear" if needle in msg and "\n" not in msg.strip() else "unclear"
    after = snapshot(t)
    if any(after.get(p) != h for p, h in before.items()):
        kind, msg = "changed", f"{msg} [changed: {[p for p, h in before.items() if after.get(p) != h][:3]}]"
    return kind, msg


def fuzz(cls, variants, S, tmp_path):
    """Run every variant of a class; fail listing every variant whose outcome is not a clear error."""
    bad, tally = [], Counter()
    shared = snapshot(S["root"])
    for i, (name, setup) in enumerate(variants):
        t = tmp_path / f"v{i}"
        t.mkdir()
        call, needle = setup(t, S)
        kind, msg = outcome(call, needle, t)
        tally[kind] += 1
        if os.environ.get("FUZZ_REPORT") == "all":
            print(f"{cls} | {name} | {kind} | {msg[:300]}")
        if kind != "clear":
            bad.append(f"{kind:9s} {name}: {msg[:240]!r} (expected to name {needle!r})")
    TALLY[cls] = tally
    now = snapshot(S["root"])
    changed = [p for p, h in shared.items() if now.get(p) != h]
    bad += [f"changed   the shared original {p}" for p in changed]
    if os.environ.get("FUZZ_REPORT"):
        print(f"\nfuzz {cls}: {len(variants)} variants: {dict(tally)}")
        for line in bad:
            print("   ", line)
    assert not bad, f"{len(bad)} of {len(variants)} {cls} variants not a clear error:\n" + "\n".join(bad)


# entry points, as the scripts call them


def load_checkpoint_dir(d):
    return lambda: Transformer.from_checkpoint(d)


def convert_cli(*argv):
    return lambda: convert.main([str(a) for a in argv])


def prepare_cli(*argv):
    return lambda: prepare.main([str(a) for a in argv])


def sample_cli(*argv):
    return lambda: sample.main([str(a) for a in argv], stdin=io.StringIO(), stdout=io.StringIO())


def train_cli(*argv):
    return lambda: train.main([str(a) for a in argv])


def read_data_dir(d, seq_len=32):
    """What train.py does with a data dir before training: meta.json, both splits, their token ids."""
    def call():
        meta = prepare.read_meta(d)
        for split in ("train", "val"):
            prepare.TokenSplit(d, split, meta, seq_len).check_ids(meta["vocab_size"])
    return call


# --------------------------------------------------------------------------------------------------------------------
# JSON files: wrong types per field, out-of-range numbers, and the file-level malformations every JSON file gets

WRONG_TYPES = ("64", [64], {"v": 64}, True, None)  # a string, a list, an object, a bool, null where a number goes
DEEP = "[" * 100_000 + "]" * 100_000


def json_file_level(text_of_valid: str, key: str) -> list:
    """(name, bytes) malformed versions of a JSON object file whose valid text is given (key: one of its keys)."""
    raw, quoted = text_of_valid.encode(), b'"' + key.encode() + b'"'
    first = raw.index(quoted)
    return [("empty", b""), ("truncated", raw[: len(raw) // 2]), ("a list", b"[]"), ("a number", b"5"),
            ("null", b"null"), ("deep nesting", DEEP.encode()),
            ("deep nesting in a field", raw[:first] + b'"deep_field": ' + DEEP.encode() + b", " + raw[first:]),
            ("stray byte", raw[:first] + b"\xff" + raw[first:]), ("utf-16", text_of_valid.encode("utf-16")),
            ("NaN literal", raw[:first] + b'"nan_field": NaN, ' + raw[first:]),
            ("huge integer literal", raw[:first] + b'"big": 1' + b"0" * 5000 + b", " + raw[first:]),
            ("duplicate key", raw[:first] + raw[first:].replace(quoted, quoted + b": 1, " + quoted, 1))]


def field_variants(original: dict, fields: dict) -> list:
    """(name, dict) with one field replaced by each bad value: fields = {field: [bad values]}."""
    out = []
    for field, values in fields.items():
        for v in values:
            out.append((f"{field}={json.dumps(v)[:40]}", {**original, field: v}))
    return out


def as_text(d):
    return json.dumps(d, indent=2).replace("Infinity", "1e999")


def json_variants(file_name, original: dict, fields: dict, key: str):
    """(name, bytes) variants of a JSON object file: every bad field value, then the file-level malformations."""
    return ([(n, as_text(d).encode()) for n, d in field_variants(original, fields)]
            + [(f"{file_name} {n}", b) for n, b in json_file_level(as_text(original), key)])


def in_a_copy(original: str, file_name: str, variants: list, entry) -> list:
    """(name, setup) per (name, bytes) variant: the bytes written as file_name in a copy of the original dir S[original],
    then entry(t, the copy) is the call, and file_name what its error must name."""
    def variant(data):
        def setup(t, S):
            d = copy(S[original], t / "d")
            write(d / file_name, data)
            return entry(t, d), file_name
        return setup
    return [(name, variant(data)) for name, data in variants]


INT_BAD = WRONG_TYPES + (64.5, 0, -1, 2 ** 40, 10 ** 400)
FLOAT_BAD = ("1e-5", [1.0], None, True, 0, -1, float("inf"))


# --------------------------------------------------------------------------------------------------------------------
# checkpoint dirs: config.json


def native_config_variants():
    cfg = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400, "hidden_dim": 176,
           "norm_eps": 1e-6, "max_seq_len": 128, "rope_theta": 10000.0, "pos_emb": "rope", "tie_embeddings": False,
           "norm_head": False, "z_loss": 0.0, "init_std": 0.02, "family": "llama"}
    ints = {k: INT_BAD for k in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "max_seq_len")}
    return json_variants("config.json", cfg, {
        **ints, "n_kv_heads": ("2", [2], True, 2.5, 0, -1, 3, 2 ** 40),
        "norm_eps": FLOAT_BAD, "rope_theta": FLOAT_BAD, "z_loss": ("0", [0], None, -1, float("inf")),
        "init_std": ("0.02", None, -1, float("inf")), "pos_emb": (5, None, "xyz", ["rope"]),
        "tie_embeddings": ("yes", 1, None, [True]), "norm_head": ("no", 0, [False]),
        "family": (5, None, "gpt2", ["llama"])}, "dim")


def fuzz_native_config(entry):
    return in_a_copy("ckpt", "config.json", native_config_variants(), entry)


def test_fuzz_checkpoint_config_json(S, tmp_path):
    fuzz("config.json (from_checkpoint)", fuzz_native_config(lambda t, c: load_checkpoint_dir(c)), S, tmp_path)


def test_fuzz_checkpoint_config_json_convert(S, tmp_path):
    fuzz("config.json (convert)", fuzz_native_config(
        lambda t, c: convert_cli("native-to-hf", "--src", c, "--dst", t / "o")), S, tmp_path)


def test_fuzz_quantized_config_json(S, tmp_path):
    base = json.loads((S["ckpt"] / "config.json").read_text())
    bad = [("quantization", q) for q in ("int8", 5, [1], {"mode": "int3"}, {"mode": 5},
                                         {"mode": "int4", "group_size": 0}, {"mode": "int4", "group_size": "x"})]

    def variant(q):
        def setup(t, S):
            c = copy(S["ckpt"], t / "c")
            write(c / "config.json", json.dumps({**base, "quantization": q}))
            return sample_cli("--ckpt", c, "--prompt", "a", "--max_new_tokens", 2), "config.json"
        return setup
    fuzz("config.json quantization (sample)", [(f"quantization={json.dumps(q)}", variant(q)) for _, q in bad],
         S, tmp_path)


def test_a_model_too_big_for_memory_is_refused_before_loading(S, tmp_path):
    """sample.py counts a checkpoint's planned bytes on the meta device and refuses it before allocating any."""
    c = copy(S["ckpt"], tmp_path / "c")
    config = json.loads((c / "config.json").read_text())
    write(c / "config.json", json.dumps({**config, "dim": 2 ** 16, "n_heads": 64, "n_kv_heads": 64, "n_layers": 4,
                                         "hidden_dim": 2 ** 22}))
    with pytest.raises(SystemExit, match=r"--ckpt=.*: [\d.]+B parameters in float32 need [\d.]+ GiB on cpu, which has "
                                         r"[\d.]+ GiB available"):
        sample_cli("--ckpt", c, "--prompt", "a", "--max_new_tokens", 2)()


def test_fuzz_hf_config_json(S, tmp_path):
    hf = json.loads((S["hf"] / "config.json").read_text())
    sizes = (*WRONG_TYPES, 1.5, 0, -1, 2 ** 40)
    fields = {k: sizes for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                 "intermediate_size")}
    fields.update({
        "num_key_value_heads": ("4", [4], True, 1.5, -1, 3), "rms_norm_eps": ("x", [1], True, 0, -1, float("inf")),
        "max_position_embeddings": ("x", [1], True, 1.5, -1), "rope_theta": ("x", [1], 0, -1, float("inf")),
        "rope_scaling": ([1], "x", 5, {"rope_type": 5}), "rope_parameters": ([1], "x", {"rope_theta": "x"}),
        "tie_word_embeddings": ("no", 1, [True]), "head_dim": ("x", 7, -16), "hidden_act": (5, "gelu"),
        "attention_bias": ("false", True), "architectures": ("LlamaForCausalLM", [5], 5),
        "model_type": (5, ["llama"]), "bos_token_id": ("x", -5, 1.5, [[1]], 10 ** 9), "eos_token_id": ([[2]], "x"),
        "pad_token_id": (True, 10 ** 9)})
    fuzz("HF config.json (convert)", in_a_copy("hf", "config.json", json_variants("config.json", hf, fields,
                                                                                  "hidden_size"),
                                               lambda t, d: convert_cli("hf-to-native", "--src", d, "--dst", t / "o")),
         S, tmp_path)


def test_fuzz_meta_params_json(S, tmp_path):
    params = json.loads((S["meta"] / "params.json").read_text())
    fields = {"dim": ("64", None, 0, -64, 2 ** 40), "n_layers": ("2", -1, 2 ** 40), "n_heads": ("4", 0, -4, 3),
              "n_kv_heads": ("2", 0, 3), "multiple_of": ("16", 0, -16, 1.5), "ffn_dim_multiplier": ("x", -1, 0),
              "norm_eps": ("x", -1, 0), "vocab_size": ("x", -5, 0, 2 ** 40), "rope_theta": ("x", 0, -1),
              "use_scaled_rope": ("yes",)}
    fuzz("params.json (convert)", in_a_copy("meta", "params.json", json_variants("params.json", params, fields, "dim"),
                                            lambda t, d: convert_cli("meta-to-native", "--src", d, "--dst", t / "o")),
         S, tmp_path)


def test_fuzz_adapter_config_json(S, tmp_path):
    adapter = json.loads((S["adapter"] / "adapter_config.json").read_text())
    fields = {"r": ("4", 0, -1, 1.5, True), "lora_alpha": ("x", 0, -1, float("inf")), "peft_type": (5, "IA3"),
              "rank_pattern": ([], {"q_proj": "x"}, {"q_proj": 0}, {"(": 4}), "alpha_pattern": ({"q_proj": "x"},),
              "target_modules": (5, [5], "(", []), "exclude_modules": (5, [5], "("),
              "layers_to_transform": ("x", ["x"], [-1]), "layers_pattern": (5, [5], ["("]), "use_rslora": ("yes",),
              "bias": (5, "all")}
    fuzz("adapter_config.json (merge-lora)", in_a_copy(
        "adapter", "adapter_config.json", json_variants("adapter_config.json", adapter, fields, "r"),
        lambda t, d: convert_cli("merge-lora", "--src", S["ckpt"], "--adapter", d, "--dst", t / "o")), S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# safetensors headers


def st_split(file):
    raw = Path(file).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n]), raw[8 + n:]


def st_join(header, data, length=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def safetensors_variants(file):
    raw, n, header, data = st_split(file)
    names = [k for k in header if k != "__metadata__"]
    q, k = "layers.0.attention.wq.weight", "layers.0.attention.wk.weight"
    s, e = header[q]["data_offsets"]
    out = [(f"truncated at byte {cut}", raw[:cut]) for cut in (0, 4, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n,
                                                             8 + n + len(data) // 2, len(raw) - 1)]
    out += [(f"header length {v}", st_join(json.dumps(header).encode(), data, v))
            for v in (0, n - 1, n + 1, len(raw), 2 ** 63, 2 ** 64 - 1)]
    out += [(f"header is {h}", st_join(h.encode(), data)) for h in ("[]", "[1, 2]", "1", '"x"', "null", "{}")]
    out += [("deep nesting", st_join(('{"x": ' + DEEP + "}").encode(), data)),
            ("stray byte in a name", st_join(json.dumps(header).encode().replace(q.encode(), q.encode() + b"\xff"),
                                             data)),
            ("duplicate tensor name", st_join(json.dumps(header).encode().replace(
                f'"{q}": '.encode(), f'"{q}": {json.dumps(header[names[0]])}, "{q}": '.encode(), 1), data))]

    def edit(name, field, value):
        return {**header, name: {**header[name], field: value}}
    for field, values in (("dtype", (5, "Q99", None, "", ["F32"], "f32", "F64")),
                          ("shape", ("64", [-1, 64], [64.5, 64], [None, 64], {"a": 1}, [2 ** 64, 1], [1, 1], [],
                                     [True, 64], [[64], 64])),
                          ("data_offsets", ([s], [s, e, 0], [-1, e], [e, s], [s, 10 ** 20], f"{s},{e}",
                                            [float(s), float(e)], [s, e + 4], [s + 2, e + 2]))):
        out += [(f"{q} {field}={json.dumps(v)[:30]}", st_join(edit(q, field, v), data)) for v in values]
    out += [(f"{q} entry is {json.dumps(v)}", st_join({**header, q: v}, data)) for v in (5, [], "x", None, {})]
    k_bytes = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
    out += [("wk inside wq's bytes", st_join(edit(k, "data_offsets", [s, s + k_bytes]), data)),
            ("wk is wq", st_join({**header, k: header[q]}, data)),
            ("bytes after the last tensor", st_join(header, data + b"\0" * 64))]
    out += [(f"__metadata__={json.dumps(m)}", st_join({**header, "__metadata__": m}, data))
            for m in ([], "x", {"format": 5}, {"format": {"a": "b"}})]
    return out


def test_fuzz_safetensors_header(S, tmp_path):
    fuzz("safetensors", in_a_copy("ckpt", "model.safetensors", safetensors_variants(S["ckpt"] / "model.safetensors"),
                                  lambda t, d: load_checkpoint_dir(d)), S, tmp_path)


@pytest.mark.parametrize("how", ["wk is wq", "wk inside wq's bytes"])
def test_tensors_sharing_bytes_are_named(S, tmp_path, how):
    """Two tensors claiming the same bytes (wk == wq once loaded): the error names the pair, not a tensor after them."""
    raw, n, header, data = st_split(S["ckpt"] / "model.safetensors")
    q, k = "layers.0.attention.wq.weight", "layers.0.attention.wk.weight"
    s, e = header[q]["data_offsets"]
    size = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
    entry, shared = (header[q], e) if how == "wk is wq" else ({**header[k], "data_offsets": [s, s + size]}, s + size)
    c = copy(S["ckpt"], tmp_path / "c")
    write(c / "model.safetensors", st_join({**header, k: entry}, data))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensors {re.escape(k)} and {re.escape(q)} share "
                                              rf"bytes \(data offsets {s} to {shared}\)"):
        Transformer.from_checkpoint(c)


# --------------------------------------------------------------------------------------------------------------------
# HF index.json of a sharded checkpoint dir: names of shards are plain file names inside the dir


def index_variants(S):
    index = json.loads((S["sharded"] / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    name = "tok_embeddings.weight"
    shard = wm[name]
    other = next(f for f in wm.values() if f != shard)
    out = [(f"{name} -> {json.dumps(v)}", {**index, "weight_map": {**wm, name: v}}, None)
           for v in (5, None, [shard], {"a": shard}, "", ".", "..", "x\u0000y", "missing.safetensors", other)]
    out += [("shard in ../outside", {**index, "weight_map": {**wm, name: f"../outside/{shard}"}}, "../outside"),
            ("shard by absolute path", {**index, "weight_map": {**wm, name: "ABS/" + shard}}, "abs"),
            ("shard in a subdir", {**index, "weight_map": {**wm, name: f"sub/{shard}"}}, "sub"),
            ("shard is a dir", {**index, "weight_map": {**wm, name: "adir"}}, "adir"),
            ("index names a tensor no shard holds", {**index, "weight_map": {**wm, "bogus.weight": shard}}, None)]
    out += [(f"weight_map={json.dumps(v)}", {**index, "weight_map": v}, None) for v in ([], "x", 5, None)]
    out += [("no weight_map", {"metadata": {}}, None)]
    text = json.dumps(index, indent=2)
    return [(n, json.dumps(d).encode(), place) for n, d, place in out] + \
        [(f"index {n}", b, None) for n, b in json_file_level(text, "weight_map")]


def fuzz_index(entry, S):
    def variant(data, place):
        def setup(t, S, data=data):
            c = copy(S["sharded"], t / "c")
            shard = json.loads((S["sharded"] / "model.safetensors.index.json").read_text())["weight_map"][
                "tok_embeddings.weight"]
            if place == "../outside":
                (t / "outside").mkdir()
                copy(c / shard, t / "outside" / shard)
            elif place == "abs":
                copy(c / shard, t / "abs_shard.safetensors")
                data = data.replace(b"ABS/" + shard.encode(), str(t / "abs_shard.safetensors").encode())
            elif place == "sub":
                (c / "sub").mkdir()
                copy(c / shard, c / "sub" / shard)
            elif place == "adir":
                (c / "adir").mkdir()
            write(c / "model.safetensors.index.json", data)
            return entry(t, c), "model.safetensors.index.json"
        return setup
    return [(n, variant(d, p)) for n, d, p in index_variants(S)]


def test_fuzz_index_json(S, tmp_path):
    fuzz("index.json (from_checkpoint)", fuzz_index(lambda t, c: load_checkpoint_dir(c), S), S, tmp_path)


def test_fuzz_index_json_convert(S, tmp_path):
    fuzz("index.json (convert)", fuzz_index(lambda t, c: convert_cli("native-to-hf", "--src", c, "--dst", t / "o"),
                                            S), S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# tokenizer_config.json (ours and HF's fields)


def test_fuzz_tokenizer_config_json(S, tmp_path):
    tc = json.loads((S["ckpt"] / "tokenizer_config.json").read_text())
    ids = ("1", 1.5, True, [1], -5, 400, 10 ** 9)
    fields = {"bos_id": ids, "eos_id": ids, "pad_id": ids, "add_bos_token": ("yes", 1, [True]),
              "add_eos_token": ("no", 0), "legacy": ("x", 5), "add_prefix_space": ("x",),
              "chat_template": (5, [1], {"a": 1}, [{"name": "default", "template": 5}]),
              "added_tokens_decoder": ([], "x", {"abc": {"content": "<x>"}}, {"5": "str"}, {"5": {"content": 5}},
                                       {"-1": {"content": "<x>"}}),
              "bos_token": (5, {"content": 5}, ["<s>"])}

    variants = json_variants("tokenizer_config.json", tc, fields, "bos_id")
    fuzz("tokenizer_config.json",
         in_a_copy("ckpt", "tokenizer_config.json", variants, lambda t, d: lambda: prepare.load_tokenizer(d))
         + in_a_copy("ckpt", "tokenizer_config.json", [(f"{n} (sample)", b) for n, b in variants[:6]],
                     lambda t, d: sample_cli("--ckpt", d, "--prompt", "a", "--max_new_tokens", 2)), S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# data dirs: meta.json and the token files train.py memory-maps


def test_fuzz_data_dir(S, tmp_path):
    meta = json.loads((S["data"] / "meta.json").read_text())
    fields = {"dtype": (5, "float32", "int64", "uint8", None, ["uint16"]),
              "vocab_size": ("400", 0, -1, 1.5, True, None, 10 ** 12), "packed": ("yes", [True]),
              "seq_len": ("32", [32])}
    variants = [(n, {"meta.json": d}, "meta.json") for n, d in json_variants("meta.json", meta, fields, "dtype")]
    packed = {**meta, "packed": True, "seq_len": 32}
    tokens = (S["data"] / "train.bin").read_bytes()
    docs = {"meta.json": json.dumps(packed), "train.bin": tokens[:64 * 10]}
    variants += [
        ("packed, seq_len -1", {"meta.json": json.dumps({**packed, "seq_len": -1})}, "meta.json"),
        ("packed, rows not seq_len long", {"meta.json": json.dumps(packed), "train.bin": tokens[:2 * 33 * 5]},
         "train.bin"),
        ("packed, docs.bin not int64s", {**docs, "train.docs.bin": b"\0" * 12}, "train.docs.bin"),
        ("packed, docs.bin falls", {**docs, "train.docs.bin": np.array([0, 100, 50, 320], np.int64).tobytes()},
         "train.docs.bin"),
        ("packed, docs.bin past the end", {**docs, "train.docs.bin": np.array([0, 100, 10 ** 9, 320],
                                                                                np.int64).tobytes()}, "train.docs.bin"),
        ("packed, docs.bin negative", {**docs, "train.docs.bin": np.array([-5, 100, 200, 320], np.int64).tobytes()},
         "train.docs.bin"),
        ("packed, docs.bin total wrong", {**docs, "train.docs.bin": np.array([0, 100, 200, 999], np.int64).tobytes()},
         "train.docs.bin"),
        ("train.bin odd size", {"train.bin": tokens + b"x"}, "train.bin"),
        ("val.bin empty", {"val.bin": b""}, "val.bin"),
        ("train.mask.bin short", {"train.mask.bin": b"\1" * 7}, "train.mask.bin"),
        ("train.bin missing", {"train.bin": None}, "train.bin"),
    ]

    def variant(files, needle):
        def setup(t, S):
            d = copy(S["data"], t / "d")
            for f, content in files.items():
                (d / f).unlink() if content is None else write(d / f, content)
            return read_data_dir(d), needle
        return setup
    fuzz("data dir", [(n, variant(f, needle)) for n, f, needle in variants], S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# step dirs: train_state.json, rng files, the manifest; resume and dcp-to-native


@pytest.fixture(scope="module")
def resume(S):
    """train.py's resume on a run built once: restore(run) from another out_dir per variant."""
    argv = TRAIN + [f"--data_dir={S['data']}", f"--out_dir={S['run']}", "--init_from=resume"]
    cfg, overrides = train.parse_config(argv)
    with quiet(), runlock.OutDirLock() as lock:  # released at once: restore() below takes no lock
        run = train.setup(cfg, overrides, lock)

    def call(out_dir):
        def go():
            run.out_dir = Path(out_dir)
            try:
                train.restore(run)
            except (CheckpointError, train.TrainError) as e:  # as train.main reports it
                raise SystemExit(f"train.py: {e}")
        return go
    return call


def step_variants(S):
    step = S["run"] / "step_00000001"
    state = json.loads((step / "train_state.json").read_text())
    files = state["files"]
    one = next(iter(files))
    fields = {"step": ("1", -1, 1.5, None, 2 ** 70), "files": ([], "x", {one: 5}, {one: {"size": "x", "sha256": 5}},
                                                                {"../../outside.txt": files[one]},
                                                                {"/etc/hostname": files[one]}),
              "loss_scaler": (None, "x", {"scale": "x", "good_steps": 0, "skipped": 0},
                              {"scale": 0.0, "good_steps": 0, "skipped": 0},
                              {"scale": -1.0, "good_steps": 0, "skipped": 0}, {"scale": 1.0}),
              "data": (None, "x", {"seed": "x", "epoch": 0, "index": 0}, {"seed": 1, "epoch": -1, "index": 0},
                       {"seed": 1, "epoch": 0, "index": -5}, {"seed": 1337}),
              "best_val_loss": ("x", [1]), "lora_base": (5, ["x"])}
    out = [(n, {"train_state.json": d}) for n, d in json_variants("train_state.json", state, fields, "step")]
    out += [(f"no {key}", {"train_state.json": as_text({k: v for k, v in state.items() if k != key}).encode()})
            for key in ("step", "loss_scaler", "data")]
    rng = json.loads((step / "rng_rank0.json").read_text())
    for name, value in (("not JSON", b"{"), ("a list", b"[]"), ("torch is a string", b'{"torch": "x"}'),
                        ("torch bytes out of range", json.dumps({"torch": [300] * len(rng["torch"])}).encode()),
                        ("torch state too short", b'{"torch": [1, 2, 3]}'), ("no torch", b'{"device": []}'),
                        ("deep nesting", ('{"torch": ' + DEEP + "}").encode())):
        # a rewritten rng file with a manifest that matches it: only the content can be wrong
        digest = {"size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
        out.append((f"rng_rank0.json {name}", {"rng_rank0.json": value, "train_state.json": as_text(
            {**state, "files": {**files, "rng_rank0.json": digest}}).encode()}))
    return out


def test_fuzz_step_dir_resume(S, tmp_path, resume):
    def variant(files):
        def setup(t, S):
            out = copy(S["run"], t / "out")
            for f, content in files.items():
                write(out / "step_00000001" / f, content)
            if "../../outside.txt" in files.get("train_state.json", b"").decode(errors="replace"):
                write(t / "outside.txt", "not part of the checkpoint")
            return resume(out), next(iter(files))
        return setup
    fuzz("step dir (resume)", [(n, variant(f)) for n, f in step_variants(S)], S, tmp_path)


def test_fuzz_step_dir_export(S, tmp_path):
    """dcp-to-native reads a step dir as resume does: a file that no longer matches the manifest is refused."""
    step = S["run"] / "step_00000001"
    distcp = next(p.name for p in step.iterdir() if p.suffix == ".distcp")
    size = (step / distcp).stat().st_size

    def variant(mutate):
        def setup(t, S):
            s = copy(step, t / "step_00000001")
            mutate(s)
            return convert_cli("dcp-to-native", "--src", s, "--dst", t / "o"), distcp
        return setup

    def flip(s):
        with open(s / distcp, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
    variants = [("a flipped byte in the weights", variant(flip)),
                ("weights truncated", variant(lambda s: write(s / distcp, (step / distcp).read_bytes()[:size - 8]))),
                ("weights missing", variant(lambda s: (s / distcp).unlink()))]
    fuzz("step dir (dcp-to-native)", variants, S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Megatron .idx/.bin: header fields, truncation at every boundary, sizes and pointers against the .bin


def megatron_variants():
    lengths = [5, 7, 3]
    tokens = np.arange(sum(lengths), dtype=np.uint16) + 10
    sizes = np.array(lengths, np.int32)
    pointers = np.array([0, 10, 24], np.int64)
    doc_index = np.arange(4, dtype=np.int64)

    def idx(magic=megatron.MEGATRON_MAGIC, version=1, code=8, n_seq=3, n_doc=4, sizes=sizes, pointers=pointers,
            doc_index=doc_index):
        return (magic + struct.pack("<QBQQ", version, code, n_seq, n_doc) + np.asarray(sizes, np.int32).tobytes()
                + np.asarray(pointers, np.int64).tobytes() + np.asarray(doc_index, np.int64).tobytes())
    good, bin_ = idx(), tokens.tobytes()
    out = [(f"idx truncated at byte {c}", good[:c], bin_) for c in (0, 5, 9, 17, 18, 26, 33, 34, 40, 46, 58, 70,
                                                                   len(good) - 1)]
    out += [("wrong magic", idx(magic=b"MMIDIDX\x00\x01"), bin_)]
    out += [(f"version {v}", idx(version=v), bin_) for v in (0, 2, 2 ** 64 - 1)]
    out += [(f"dtype code {c}", idx(code=c), bin_) for c in (0, 9, 6, 7, 255)]
    out += [(f"sequence count {n}", idx(n_seq=n), bin_) for n in (4, 2 ** 63, 2 ** 64 - 1)]
    out += [(f"document count {n}", idx(n_doc=n), bin_) for n in (0, 2 ** 62)]
    out += [(f"sizes {s}", idx(sizes=s), bin_) for s in ([-1, 7, 3], [5, 2 ** 31 - 1, 3], [5, 7, 100])]
    out += [(f"pointers {p}", idx(pointers=p), bin_) for p in ([-2, 10, 24], [0, 11, 24], [0, 10, 10 ** 6],
                                                               [0, 10, 2 ** 62])]
    out += [(f"document index {d}", idx(doc_index=d), bin_) for d in ([0, 2, 1, 3], [1, 1, 2, 3], [0, 1, 2, 5],
                                                                      [-1, 1, 2, 3])]
    out += [("bin one byte short", good, bin_[:-1]), ("bin odd size", good, bin_ + b"x"), ("bin empty", good, b""),
            ("int16 with a negative token", idx(code=3), np.array([5, -5] + [6] * 13, np.int16).tobytes())]
    return out


def test_fuzz_megatron(S, tmp_path):
    def variant(idx, bin_):
        def setup(t, S):
            write(t / "m.idx", idx)
            write(t / "m.bin", bin_)
            return prepare_cli("--input", t / "m.bin", "--tokenizer", S["sp"], "--out", t / "o"), "m."
        return setup
    fuzz("Megatron .idx/.bin", [(n, variant(i, b)) for n, i, b in megatron_variants()], S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# JSON / JSONL / parquet records


def record_variants():
    text = [("deep nesting", DEEP), ("deep nesting in the text", '{"text": ' + DEEP + "}"),
            ("huge integer", '{"text": 1' + "0" * 5000 + "}"), ("NaN", '{"text": NaN}'),
            ("Infinity", '{"text": Infinity}'),
            ("lone surrogate", '{"text": "a \\ud800 b"}'), ("a number", "5"), ("a string", '"text"'), ("null", "null"),
            ("a list", "[1, 2]"), ("text is a number", '{"text": 5}'), ("text is null", '{"text": null}'),
            ("text is a list", '{"text": ["a"]}'), ("text is an object", '{"text": {"a": "b"}}'),
            ("text is true", '{"text": true}'), ("no text", "{}")]
    out = [(f"jsonl {n}", "x.jsonl", "jsonl", ('{"text": "fine"}\n' + v + "\n").encode()) for n, v in text]
    out += [("jsonl BOM", "x.jsonl", "jsonl", b'\xef\xbb\xbf{"text": "a"}\n'),
            ("jsonl latin-1", "x.jsonl", "jsonl", b'{"text": "caf\xe9"}\n'),
            ("json deep list", "x.json", "json", ("[" + DEEP + "]").encode()),
            ("json item a number", "x.json", "json", b'[{"text": "a"}, 5]'),
            ("json lone surrogate", "x.json", "json", b'[{"text": "\\udc00"}]'),
            ("json huge integer", "x.json", "json", b'[{"text": 1' + b"0" * 5000 + b"}]")]
    alpaca = [("instruction a number", {"instruction": 5, "output": "x"}),
              ("output null", {"instruction": "x", "output": None}),
              ("input an object", {"instruction": "x", "input": {"a": 1}, "output": "y"}),
              ("input a list", {"instruction": "x", "input": ["a"], "output": "y"}),
              ("no instruction", {"output": "y"}), ("lone surrogate", {"instruction": "\ud800", "output": "y"})]
    out += [(f"alpaca {n}", "a.json", "alpaca", json.dumps([{"instruction": "i", "output": "o"}, r]).encode())
            for n, r in alpaca]
    convs = [("a string", "x"), ("an object", {}), ("items numbers", [5]),
             ("from a number", [{"from": 5, "value": "x"}]),
             ("value a number", [{"from": "human", "value": 5}]), ("unknown role", [{"from": "alien", "value": "x"}]),
             ("no value", [{"from": "human"}]), ("content a list", [{"role": "user", "content": [{"type": "text"}]}]),
             ("deep", json.loads("[" * 500 + "]" * 500))]
    out += [(f"sharegpt conversations {n}", "s.jsonl", "sharegpt", (json.dumps({"conversations": c}) + "\n").encode())
            for n, c in convs]
    moss = [("chat a list", []), ("turn a number", {"turn_1": 5}), ("Human a number", {"turn_1": {"Human": 5,
                                                                                                   "MOSS": "x"}})]
    out += [(f"moss {n}", "m.jsonl", "moss", (json.dumps({"chat": c}) + "\n").encode()) for n, c in moss]
    out += [("parquet junk", "p.parquet", "jsonl", b"PAR1 not really")]
    return out


def test_fuzz_records(S, tmp_path):
    def variant(name, fmt, data):
        def setup(t, S):
            f = write(t / name, data)
            extra = ["--template", "alpaca"] if fmt in datafiles.INSTRUCTION_FORMATS else []
            return prepare_cli("--input", f, "--format", fmt, "--tokenizer", S["sp"], "--out", t / "o",
                               *extra), name
        return setup
    fuzz("records", [(n, variant(f, fmt, d)) for n, f, fmt, d in record_variants()], S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# flags and config keys: out-of-range numbers for every one


TRAIN_BAD = {
    "lr": (-0.001, 1e999), "min_lr": (-1.0, 1e999), "warmup_iters": (-1,), "lr_decay_iters": (-1,),
    "weight_decay": (-0.1, 1e999), "beta1": (-0.1, 1.0, 1.5), "beta2": (1.5, 1.0, -0.5), "grad_clip": (-1.0, 1e999),
    "seed": (-1, 2 ** 64), "loss_scale": (0.0, -1.0, 1e999), "loss_scale_window": (0, -1), "dp": (-1,), "tp": (0,),
    "dist_timeout_s": (0, -5), "eval_interval": (0,), "eval_iters": (0, -1), "log_interval": (0,),
    "ckpt_interval": (0,), "keep_last": (-1,), "peak_flops": (-1.0, 1e999), "lora_rank": (-1,),
    "lora_alpha": (0.0, -1.0, 1e999), "lora_dropout": (1.0, -0.1), "devices": (-1,), "device_memory_gib": (0.0, -1.0),
    "mfu": (0.0, 1.5), "max_iters": (-1, 0), "micro_batch_size": (0,), "global_batch_size": (0,),
    "seq_len": (0, 2 ** 40),
    # model fields
    "dim": (0, -64, 63), "n_layers": (0, -1, 10 ** 7), "n_heads": (0, 3), "n_kv_heads": (0, 3),
    "vocab_size": (0, -1), "hidden_dim": (0, -1, 2 ** 40), "norm_eps": (0.0, -1.0, 1e999), "max_seq_len": (0,),
    "rope_theta": (0.0, -1.0, 1e999), "pos_emb": ("xyz",), "z_loss": (-1.0, 1e999), "init_std": (-1.0, 1e999),
}


def test_fuzz_train_flags(S, tmp_path):
    def variant(key, value):
        def setup(t, S):
            return train_cli(*TRAIN, f"--data_dir={S['data']}", f"--out_dir={t / 'out'}", f"--{key}={value}"), \
                f"{key}="
        return setup

    def literal(v):  # as a user types it: 1e999 for infinity
        return "1e999" if v == float("inf") else repr(v)
    variants = [(f"--{k}={literal(v)}", variant(k, literal(v))) for k, values in TRAIN_BAD.items() for v in values]
    variants.append(("--dim=2**20 (memory)", lambda t, S: (train_cli(
        *TRAIN, f"--data_dir={S['data']}", f"--out_dir={t / 'out'}", "--dim=1048576", "--n_heads=16",
        "--n_kv_heads=16"), "dim=")))
    fuzz("train.py keys", variants, S, tmp_path)


def test_fuzz_train_config_file(S, tmp_path):
    files = [("raises at line 3", "a = 1\nb = 2\n1 / 0\n", "cfg.py: line 3"),
             ("exits 0", "import sys\nsys.exit(0)\n", "cfg.py: line 2"),
             ("raises SystemExit", "raise SystemExit('bye')\n", "cfg.py: line 1"),
             ("recursion", "def f():\n    return f()\nf()\n", "cfg.py: line"),
             ("name error", "max_iters = 1\nlr = undefined_name\n", "cfg.py: line 2"),
             ("memory", "x = [0] * (10 ** 12)\n", "cfg.py: line 1"),
             ("lr inf", "lr = 1e999\n", "lr="), ("lr nan", "lr = float('nan')\n", "lr="),
             ("a set", "max_iters = {1, 2}\n", "max_iters=")]

    def variant(text, needle):
        def setup(t, S):
            f = write(t / "cfg.py", text)
            return train_cli(f, *TRAIN, f"--data_dir={S['data']}", f"--out_dir={t / 'out'}"), needle
        return setup
    fuzz("train.py config file", [(n, variant(text, needle)) for n, text, needle in files], S, tmp_path)


SAMPLE_BAD = {"temperature": ("nan", "-1", "inf", "-inf"), "top_p": ("0", "1.5", "nan", "-0.5"), "top_k": ("-1",),
              "repetition_penalty": ("0", "-1", "nan", "inf"), "max_new_tokens": ("0", "-5", str(10 ** 12)),
              "num_samples": ("0", "-1"), "seed": ("-1", str(2 ** 64)), "device": ("bogus", "cuda:7", "npu", "mps",
                                                                                     "meta", "cpu:99"),
              "group_size": ("0", "-128", "7")}


def test_fuzz_sample_flags(S, tmp_path):
    def variant(flag, value):
        def setup(t, S):
            extra = ["--quantize", "int4"] if flag == "group_size" else []
            return sample_cli("--ckpt", S["ckpt"], "--prompt", "a", "--max_new_tokens", 2, *extra,
                              f"--{flag}={value}"), f"--{flag}"
        return setup
    fuzz("sample.py flags", [(f"--{k}={v}", variant(k, v)) for k, vs in SAMPLE_BAD.items() for v in vs], S, tmp_path)


PREPARE_BAD = {"workers": ("0", "-1"), "vocab_size": ("0", "-5"), "val_fraction": ("nan", "1.0", "-0.1", "inf"),
               "seq_len": ("-1",), "max_chars": ("-1",), "tokenizer_chars": ("0",), "max_source_len": ("-1",),
               "max_target_len": ("-1", "16777217")}


def test_fuzz_prepare_flags(S, tmp_path):
    def variant(flag, value):
        def setup(t, S):
            return prepare_cli("--input", S["corpus"], "--tokenizer", S["sp"], "--out", t / "o",
                               f"--{flag}={value}"), f"--{flag}"
        return setup
    fuzz("prepare.py flags", [(f"--{k}={v}", variant(k, v)) for k, vs in PREPARE_BAD.items() for v in vs],
         S, tmp_path)


def test_fuzz_convert_flags(S, tmp_path):
    def variant(argv, needle):
        def setup(t, S):
            src = S["meta"] if argv[0] == "meta-to-native" else S["ckpt"]
            return convert_cli(argv[0], "--src", src, "--dst", t / "o", *argv[1:]), needle
        return setup
    cases = [(["native-to-hf", "--max_shard_size", s], "--max_shard_size") for s in ("0", "0GB", "0.0001KB", "-1GB")]
    cases += [(["meta-to-native", "--max_seq_len", s], "--max_seq_len") for s in ("0", "-1", str(2 ** 40))]
    fuzz("convert.py flags", [(" ".join(a), variant(a, n)) for a, n in cases], S, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# hostile output paths: the input, inside it, around it, '.', an existing file; nothing of them may change


def test_fuzz_output_paths(S, tmp_path):
    def prep(make):  # make(t) -> (input, out)
        def setup(t, S):
            inp, out = make(t)
            return prepare_cli("--input", inp, "--tokenizer", S["sp"], "--out", out, "--overwrite"), "--out"
        return setup

    def conv(make, cmd="native-to-hf"):  # make(t) -> (src, dst)
        def setup(t, S):
            src, dst = make(t)
            return convert_cli(cmd, "--src", src, "--dst", dst, "--overwrite"), "--dst"
        return setup

    def corpus(t, sub="in"):
        (t / sub).mkdir(parents=True, exist_ok=True)
        return copy(S["corpus"], t / sub / "corpus.jsonl")

    def ckpt(t):
        return copy(S["ckpt"], t / "c")
    variants = [
        ("prepare --out is the input file", prep(lambda t: (corpus(t), corpus(t)))),
        ("prepare --out is the input dir", prep(lambda t: (corpus(t).parent, t / "in"))),
        ("prepare --out contains the input", prep(lambda t: (corpus(t, "in/deeper"), t / "in"))),
        ("prepare --out inside the input dir", prep(lambda t: (corpus(t).parent, t / "in" / "o"))),
        ("prepare --out .", prep(lambda t: (corpus(t), "."))),
        ("prepare --out an existing file", prep(lambda t: (corpus(t), write(t / "notes.txt", "mine")))),
        ("prepare --out the tokenizer's dir", lambda t, S: (prepare_cli(
            "--input", corpus(t), "--tokenizer", copy(S["sp"].parent, t / "tok") / S["sp"].name, "--out", t / "tok",
            "--overwrite"), "--out")),
        ("convert --dst is --src", conv(lambda t: (ckpt(t), t / "c"))),
        ("convert --dst contains --src", conv(lambda t: (copy(S["ckpt"], t / "outer" / "c"), t / "outer"))),
        ("convert --dst inside --src", conv(lambda t: (ckpt(t), t / "c" / "o"))),
        ("convert --dst .", conv(lambda t: (ckpt(t), "."))),
        ("convert --dst an existing file", conv(lambda t: (ckpt(t), write(t / "notes.txt", "mine")))),
        ("convert dcp-to-native --dst is the step dir", conv(
            lambda t: (copy(S["run"] / "step_00000001", t / "s"), t / "s"), "dcp-to-native")),
        ("apply-delta --dst is --delta", lambda t, S: (convert_cli(
            "apply-delta", "--src", ckpt(t), "--delta", copy(S["ckpt"], t / "d"), "--dst", t / "d", "--overwrite"),
            "--dst")),
        ("sample --save_quantized an existing file", lambda t, S: (sample_cli(
            "--ckpt", S["ckpt"], "--quantize", "int8", "--save_quantized", write(t / "notes.txt", "mine")),
            "--save_quantized")),
        ("train --overwrite with init_from inside out_dir", lambda t, S: (train_cli(
            *TRAIN, f"--data_dir={S['data']}", f"--out_dir={t / 'run'}", "--overwrite",
            f"--init_from={copy(S['ckpt'], t / 'run' / 'export')}"), "out_dir")),
        ("train out_dir is data_dir", train_out(lambda t, data: data)),
        ("train out_dir inside data_dir", train_out(lambda t, data: data / "run")),
        ("train out_dir holds data_dir", train_out(lambda t, data: t)),
        ("train out_dir .", train_out(lambda t, data: ".")),
        ("train out_dir is init_from", lambda t, S: (train_cli(
            *TRAIN, f"--data_dir={S['data']}", f"--out_dir={copy(S['ckpt'], t / 'c')}", f"--init_from={t / 'c'}"),
            "out_dir")),
    ]
    fuzz("output paths", variants, S, tmp_path)


def train_out(make):  # make(t, data dir) -> out_dir
    def setup(t, S):
        data = copy(S["data"], t / "data")
        return train_cli(*TRAIN, f"--data_dir={data}", f"--out_dir={make(t, data)}", "--overwrite"), "out_dir"
    return setup


# --------------------------------------------------------------------------------------------------------------------
# the command line itself: one subprocess per format class (exit code, stderr's last line, no traceback)


def cli_cases(t, S):
    """(script argv, regex for stderr's last line) per format class, files built in t."""
    c = copy(S["ckpt"], t / "st")
    raw, n, header, data = st_split(c / "model.safetensors")
    write(c / "model.safetensors", st_join({**header, "layers.0.attention.wk.weight": 5}, data))
    sh = copy(S["sharded"], t / "sh")
    index = json.loads((sh / "model.safetensors.index.json").read_text())
    index["weight_map"]["tok_embeddings.weight"] = "../x.safetensors"
    write(sh / "model.safetensors.index.json", json.dumps(index))
    hf = copy(S["hf"], t / "hf")
    write(hf / "config.json", json.dumps({**json.loads((hf / "config.json").read_text()), "num_attention_heads": 0}))
    tk = copy(S["ckpt"], t / "tk")
    write(tk / "tokenizer_config.json", b'{"bos_id": \xff1}')
    run = copy(S["run"], t / "run")
    state = json.loads((run / "step_00000001" / "train_state.json").read_text())
    write(run / "step_00000001" / "train_state.json", json.dumps({k: v for k, v in state.items() if k != "data"}))
    write(t / "deep.jsonl", DEEP + "\n")
    write(t / "m.idx", megatron_variants()[-1][1][:20])
    write(t / "m.bin", b"\0" * 8)
    d = copy(S["data"], t / "data")
    write(d / "meta.json", json.dumps({**json.loads((d / "meta.json").read_text()), "vocab_size": -1}))
    base = TRAIN + [f"--out_dir={t / 'out'}"]
    return [
        (["convert.py", "native-to-hf", "--src", c, "--dst", t / "o1"], r"model\.safetensors"),
        (["convert.py", "native-to-hf", "--src", sh, "--dst", t / "o2"], r"index\.json"),
        (["convert.py", "hf-to-native", "--src", hf, "--dst", t / "o3"], r"config\.json.*num_attention_heads"),
        (["sample.py", "--ckpt", tk, "--prompt", "a", "--max_new_tokens", "2"], r"tokenizer_config\.json"),
        (["train.py", *TRAIN, f"--data_dir={S['data']}", f"--out_dir={run}", "--init_from=resume"],
         r"train_state\.json"),
        (["train.py", *base, f"--data_dir={d}"], r"meta\.json.*vocab_size"),
        (["train.py", *base, f"--data_dir={S['data']}", "--lr=-0.001"], r"lr=-0\.001"),
        (["prepare.py", "--input", t / "deep.jsonl", "--tokenizer", S["sp"], "--out", t / "o4"], r"deep\.jsonl"),
        (["prepare.py", "--input", t / "m.bin", "--tokenizer", S["sp"], "--out", t / "o5"], r"m\.idx"),
        (["sample.py", "--ckpt", S["ckpt"], "--temperature", "nan"], r"--temperature"),
    ]


def test_each_format_class_fails_cleanly_on_the_command_line(S, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    cases = cli_cases(tmp_path, S)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def launch(argv):
        return subprocess.run([sys.executable, str(ROOT / argv[0]), *map(str, argv[1:])], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=300)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(launch, [argv for argv, _ in cases]))
    problems = []
    for (argv, regex), r in zip(cases, results):
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        if (r.returncode == 0 or "Traceback" in r.stderr or not lines or not re.search(regex, lines[-1])
                or not lines[-1].startswith(f"{argv[0]}: ")):  # said as the command the user ran
            problems.append(f"{argv[:2]} rc={r.returncode}: {r.stderr[-600:]}")
    after = snapshot(tmp_path)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not problems and not changed, "\n".join(problems) + f"\nchanged: {changed}"
