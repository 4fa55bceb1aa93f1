"""support/gguf.py: GGUF, the one-file format of llama.cpp and ollama. convert.py uses it for `native-to-gguf` and
`gguf-to-native`; what it adds: a checkpoint dir written as a .gguf file (weights in f32, f16, q8_0 or q4_0, the
model's numbers, the tokenizer, the chat template; whole or not at all) and read back, in llama.cpp's names and
layouts, through the `gguf` package (llama.cpp's own reader and writer of the format).

The layout is the one llama.cpp's convert_hf_to_gguf.py writes:
- LLaMA and Aquila as architecture "llama"; Baichuan and Baichuan2 as "baichuan". llama.cpp's baichuan has no key
  for its position encoding: it runs 32 layers as the 7B (RoPE) and 40 as the 13B (ALiBi, max bias 8), so only
  those two depths are written (anything else would load and compute something else, or abort).
- Tensors: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
  ffn_down}, output_norm, output (absent when the embedding is tied). llama.cpp rotates consecutive pairs of a
  head's values (Meta's layout), ours rotate halves (Hugging Face's): q and k rows are permuted per head on the way
  out and back on the way in.
- Types: norms stay F32 in every file. q8_0 and q4_0 are llama.cpp's blocks of 32 (a scale and 32 int8 or 4-bit
  codes); q4_0 keeps the output layer (the embedding when tied) at Q8_0, as llama.cpp keeps it above 4 bits. A
  matrix whose rows are not whole blocks is F16, as llama.cpp's converter falls back.
- Tokenizer: a sentencepiece model as "llama" (pieces, scores, piece types, whether text gets the "▁" prefix); a
  byte-level BPE tokenizer.json as "gpt2" (tokens, merges, GPT-2's pre-tokenizer "default"). bos, eos, unk and pad
  ids, whether text gets bos and eos, and the chat template (Jinja). A model vocabulary larger than the
  tokenizer's gets unused "[PADi]" tokens, as llama.cpp's converter pads.
- Ours, ignored by llama.cpp: nanollama.family (LLaMA and Aquila share an architecture) and
  nanollama.chat_template (a built-in template's name), so that a file read back is the checkpoint it came from.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import CheckpointError, ModelArgs, Transformer
from support import diskspace

TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCHITECTURE = {"llama": "llama", "aquila": "llama", "baichuan": "baichuan", "baichuan2": "baichuan"}
BAICHUAN_DEPTH = {"rope": 32, "alibi": 40}  # what llama.cpp's baichuan reads from block_count
BLOCK = 32  # values per Q8_0 / Q4_0 block

LAYER = {  # GGUF per-block name -> native per-layer name
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}
SP_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}  # sentencepiece's
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ... and GGUF's token types: the same


def fail(msg):
    raise CheckpointError(msg)


def tensor_names(args: ModelArgs) -> dict[str, str]:
    """GGUF name -> native name of every tensor, in llama.cpp's order."""
    names = {"token_embd.weight": "tok_embeddings.weight"}
    for i in range(args.n_layers):
        names.update({f"blk.{i}.{g}": f"layers.{i}.{n}" for g, n in LAYER.items()})
    names["output_norm.weight"] = "norm.weight"
    if not args.tie_embeddings:
        names["output.weight"] = "output.weight"
    return names


def rotary_rows(w: torch.Tensor, heads: int, to_pairs: bool) -> torch.Tensor:
    """q or k rows, per head: rotate-half halves (ours) -> consecutive pairs (llama.cpp's), or back."""
    rows, cols = w.shape
    half = rows // heads // 2
    shape = (heads, 2, half, cols) if to_pairs else (heads, half, 2, cols)
    return w.reshape(shape).transpose(1, 2).reshape(rows, cols)


def ggml_type(qtype: str, name: str, shape: tuple, tied: bool):
    """The GGML type a tensor is stored in, for the file's --type."""
    from gguf import GGMLQuantizationType as T
    if len(shape) == 1 or qtype == "f32":
        return T.F32
    if qtype == "f16" or shape[-1] % BLOCK:
        return T.F16
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    return T.Q8_0 if qtype == "q8_0" or head else T.Q4_0


def file_type(qtype: str):
    from gguf import LlamaFileType as F
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[qtype]


def encode(w: torch.Tensor, t) -> np.ndarray:
    """An fp32 tensor in GGML type t: the bytes the file holds (a float array for F32 and F16)."""
    from gguf import GGMLQuantizationType as T, quants
    a = w.detach().float().contiguous().numpy()
    if t == T.F32:
        return a
    if t == T.F16:
        return a.astype(np.float16)
    return quants.quantize(a, t)


# --------------------------------------------------------------------------------------------------------------------
# the tokenizer


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _proto_fields(data: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            n = {1: 8, 5: 4}[wire]
            value, i = data[i:i + n], i + n
        yield field, wire, value


def sentencepiece_types(proto: bytes) -> list[int]:
    """Each piece's type (SP_TYPES) from a serialised sentencepiece ModelProto (pieces: field 1; a piece's type:
    its field 3, NORMAL when absent). sentencepiece's Python API does not say which pieces are user-defined."""
    types = []
    for field, _, piece in _proto_fields(proto):
        if field == 1:
            types.append(next((v for f, _, v in _proto_fields(piece) if f == 3), NORMAL))
    return types


def _proto(*fields) -> bytes:
    """A protobuf message from (field, value): int -> varint, float -> fixed32, str/bytes -> length-delimited."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    out = bytearray()
    for field, value in fields:
        if isinstance(value, bool) or isinstance(value, int):
            out += varint(field << 3) + varint(int(value))
        elif isinstance(value, float):
            out += varint(field << 3 | 5) + np.float32(value).tobytes()
        else:
            value = value.encode() if isinstance(value, str) else value
            out += varint(field << 3 | 2) + varint(len(value)) + value
    return bytes(out)


def tokenizer_fields(tok, vocab_size: int, template) -> dict:
    """The tokenizer.* keys of a GGUF file for prepare.Tokenizer tok and a model of vocab_size rows."""
    if tok.vocab_size > vocab_size:
        fail(f"{tok.path}: {tok.vocab_size} tokens, more than the model's {vocab_size} embedding rows")
    fields = {}
    if tok.sp is not None:
        sp = tok.sp
        tokens = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
        scores = [sp.get_score(i) for i in range(tok.vocab_size)]
        types = sentencepiece_types(sp.serialized_model_proto())
        for token, i in tok.sp_added.items():  # Hugging Face's added tokens, special in our tokenizer_config.json
            tokens[i], scores[i], types[i] = token, -1000.0, CONTROL
        fields["tokenizer.ggml.model"] = "llama"
        fields["tokenizer.ggml.pre"] = "default"
        fields["tokenizer.ggml.add_space_prefix"] = tok.dummy_prefix
    else:
        tokens, types, merges = byte_level_bpe(tok)
        scores = None
        fields["tokenizer.ggml.model"] = "gpt2"
        fields["tokenizer.ggml.pre"] = "default"  # GPT-2's split: what ByteLevel(use_regex=True) does
    pad = range(len(tokens), vocab_size)
    fields["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in pad]
    if scores is not None:
        fields["tokenizer.ggml.scores"] = scores + [-1000.0 for _ in pad]
    fields["tokenizer.ggml.token_type"] = types + [UNUSED for _ in pad]
    if tok.sp is None:
        fields["tokenizer.ggml.merges"] = merges
    unk = tok.sp.unk_id() if tok.sp is not None else None
    for key, i in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("unknown_token_id", unk),
                   ("padding_token_id", tok.pad_id)):
        if i is not None and i >= 0:
            fields[f"tokenizer.ggml.{key}"] = i
    fields["tokenizer.ggml.add_bos_token"] = bool(tok.prefix)
    fields["tokenizer.ggml.add_eos_token"] = bool(tok.suffix)
    if template:
        fields["tokenizer.chat_template"] = template
    return fields


def byte_level_bpe(tok) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their types, merges "a b") of a byte-level BPE tokenizer.json; anything else is refused, as
    llama.cpp's "gpt2" tokenizer would split its text differently."""
    import json
    spec = json.loads(Path(tok.path).read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or pre.get("use_regex", True) is not True:
        fail(f"{tok.path}: model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r}: GGUF export takes a "
             f"sentencepiece tokenizer.model or a byte-level BPE tokenizer.json (model BPE, pre_tokenizer ByteLevel)")
    added = {t.content: t.special for t in tok.hf.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        t = tok.hf.id_to_token(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(UNUSED if t is None else (CONTROL if added[t] else USER_DEFINED) if t in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_tokenizer(fields: dict, dst: Path) -> str:
    """The tokenizer a GGUF file describes, written into dst as the file llama.cpp's tokenizer is equivalent to
    (a sentencepiece BPE tokenizer.model, or a byte-level BPE tokenizer.json); the file's name."""
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type")
    types = types or [NORMAL] * len(tokens)
    while tokens and types[-1] == UNUSED and tokens[-1] == f"[PAD{len(tokens) - 1}]":  # the export's padding
        tokens, types = tokens[:-1], types[:-1]
    kind = fields.get("tokenizer.ggml.model")
    ids = {k: fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    if kind == "llama":
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pieces = [_proto((1, p), (2, float(s)), (3, t)) for p, s, t in zip(tokens, scores, types)]
        special = {40: ids["unknown"], 41: ids["bos"], 42: ids["eos"], 43: ids["padding"]}
        trainer = _proto((3, 2), (35, BYTE in types),  # model_type BPE, byte_fallback where it has byte pieces
                         *((f, -1 if i is None else i) for f, i in special.items()))
        normalizer = _proto((1, "identity"), (3, fields.get("tokenizer.ggml.add_space_prefix", True)), (4, False),
                            (5, True))  # llama.cpp's SPM: spaces to "▁", nothing else normalised
        (dst / "tokenizer.model").write_bytes(b"".join(_proto((1, p)) for p in pieces) +
                                              _proto((2, trainer), (3, normalizer)))
        return "tokenizer.model"
    if kind == "gpt2":
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                       for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
        framing = [(k, ids[k]) for k, add in (("bos", "add_bos_token"), ("eos", "add_eos_token"))
                   if fields.get(f"tokenizer.ggml.{add}") and ids[k] is not None]
        if framing:  # a tokenizer.json says through its post-processor which special tokens a text gets
            single = " ".join([tokens[i] for k, i in framing if k == "bos"] + ["$A"] +
                              [tokens[i] for k, i in framing if k == "eos"])
            hf.post_processor = processors.TemplateProcessing(single=single,
                                                              special_tokens=[(tokens[i], i) for _, i in framing])
        hf.save(str(dst / "tokenizer.json"))
        return "tokenizer.json"
    fail(f"tokenizer.ggml.model={kind!r}: expected 'llama' (sentencepiece) or 'gpt2' (byte-level BPE)")


def write_tokenizer_config(fields: dict, dst: Path, default_template: str):
    """Our tokenizer_config.json for the tokenizer a GGUF file describes (beside the file write_tokenizer writes):
    its ids, whether text gets bos/eos, and the chat template: ours by name, else the file's Jinja, else
    default_template (the family's)."""
    key = lambda name, default=None: fields.get(f"tokenizer.ggml.{name}", default)  # noqa: E731
    template = fields.get("nanollama.chat_template") or fields.get("tokenizer.chat_template")
    config = {"bos_id": key("bos_token_id"), "eos_id": key("eos_token_id"),
              "pad_id": key("padding_token_id", key("eos_token_id")),
              "add_bos_token": bool(key("add_bos_token", key("model") == "llama")),
              "add_eos_token": bool(key("add_eos_token", False)),
              "chat_template": template or default_template}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# writing


def check_exportable(args: ModelArgs, family: str, where):
    """CheckpointError where llama.cpp would not run this model as it is."""
    if ARCHITECTURE[family] == "baichuan":
        depth = BAICHUAN_DEPTH[args.pos_emb]
        if args.n_layers != depth:
            fail(f"{where}: n_layers={args.n_layers} with pos_emb={args.pos_emb!r}: llama.cpp's baichuan architecture "
                 f"runs {depth} layers with {args.pos_emb} (it reads RoPE or ALiBi from the depth: 32 or 40)")
        if args.tie_embeddings:
            fail(f"{where}: tie_embeddings=true: llama.cpp's baichuan architecture needs an output layer of its own")
    elif args.pos_emb != "rope":
        fail(f"{where}: pos_emb={args.pos_emb!r}: llama.cpp's llama architecture needs 'rope'")


def model_fields(args: ModelArgs, family: str, qtype: str, name: str) -> dict:
    """general.* and <architecture>.* keys."""
    arch = ARCHITECTURE[family]
    fields = {"general.name": name, "general.file_type": int(file_type(qtype)),
              f"{arch}.context_length": args.max_seq_len, f"{arch}.embedding_length": args.dim,
              f"{arch}.block_count": args.n_layers, f"{arch}.feed_forward_length": args.hidden_dim,
              f"{arch}.rope.dimension_count": args.head_dim, f"{arch}.attention.head_count": args.n_heads,
              f"{arch}.attention.head_count_kv": args.kv_heads,
              f"{arch}.attention.layer_norm_rms_epsilon": args.norm_eps, "nanollama.family": family}
    if qtype in ("q8_0", "q4_0"):
        fields["general.quantization_version"] = 2  # GGML_QNT_VERSION
    if args.pos_emb == "rope":
        fields[f"{arch}.rope.freq_base"] = args.rope_theta
    if arch == "llama":
        fields["llama.vocab_size"] = args.vocab_size
    else:
        fields["baichuan.tensor_data_layout"] = "Meta AI original pth"  # as llama.cpp's converter says it
    return fields


def _add_field(writer, key: str, value):
    from gguf import GGUFValueType as V
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], str):
        writer.add_array(key, value)
    else:  # ints and floats: GGUF's arrays of int32 and float32, as llama.cpp writes token types and scores
        writer.add_key_value(key, list(value), V.ARRAY, V.FLOAT32 if isinstance(value[0], float) else V.INT32)


def write_gguf(path, args: ModelArgs, family: str, shapes: dict, get, fields: dict, qtype: str):
    """path: a GGUF file of the model whose native tensors (of shapes {name: shape}) get(name) returns, one at a
    time: each is converted, written and freed before the next is read (memory holds one tensor, whatever the
    model's size)."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter
    arch = ARCHITECTURE[family]
    writer = GGUFWriter(str(path), arch)
    for key, value in fields.items():
        _add_field(writer, key, value)
    names, types = tensor_names(args), {}
    for gname, native in names.items():
        shape = tuple(shapes[native])
        t = types[gname] = ggml_type(qtype, gname, shape, args.tie_embeddings)
        block, nbytes = GGML_QUANT_SIZES[t]
        writer.add_tensor_info(gname, shape, np.float32, int(np.prod(shape)) // block * nbytes, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gname, native in names.items():
        w = get(native).float()
        if native == "output.weight" and args.norm_head:  # Baichuan2's NormHead, normalised once as for inference
            w = F.normalize(w, dim=-1)
        if gname.endswith("attn_q.weight"):
            w = rotary_rows(w, args.n_heads, to_pairs=True)
        elif gname.endswith("attn_k.weight"):
            w = rotary_rows(w, args.kv_heads, to_pairs=True)
        writer.write_tensor_data(encode(w, types[gname]))
    writer.close()


def write_file(dst: Path, overwrite: bool, args: ModelArgs, family: str, shapes: dict, get, fields: dict, qtype: str):
    """write_gguf into a file beside dst, renamed to dst when complete (removed on failure); an existing dst is
    refused unless overwrite. A full disk is one CheckpointError saying about how much the file needs."""
    if dst.exists() and not overwrite:
        fail(f"--dst {dst}: exists (--overwrite replaces it)")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    # a full disk says about how much the file needs: bytes per value of its type (blocks of 32 with a 2-byte scale)
    need = sum(math.prod(s) for s in shapes.values()) * {"f32": 4, "f16": 2, "q8_0": 34 / 32,
                                                         "q4_0": 18 / 32}.get(qtype, 4)
    try:
        with diskspace.reported(dst, tmp, int(need), CheckpointError):
            write_gguf(tmp, args, family, shapes, get, fields, qtype)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# reading


def read_fields(reader) -> dict:
    """Every key of a GGUF file with its value: numbers, strings, and lists of them."""
    from gguf import GGUFValueType as V
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == V.ARRAY:
            if field.types[-1] == V.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
            else:
                out[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif field.types and field.types[0] == V.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        elif field.types and field.types[0] == V.FLOAT32:  # the shortest decimal of that float32: 1e-05, not 9.99e-06
            out[key] = float(str(field.parts[field.data[0]][0]))
        else:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out


def read_gguf(path):
    """(ModelArgs, family, {key: value}, (native name, fp32 tensor) one at a time) of a GGUF file of the llama or
    baichuan architecture: each tensor dequantised by gguf's own code, q/k rows back in rotate-half order."""
    from gguf import GGUFReader, quants
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        fail(f"{path}: not a GGUF file ({e})")
    fields = read_fields(reader)
    arch = fields.get("general.architecture")
    if arch not in ("llama", "baichuan"):
        fail(f"{path}: general.architecture={arch!r}: expected 'llama' or 'baichuan'")
    family = fields.get("nanollama.family", arch)
    if ARCHITECTURE.get(family) != arch:
        fail(f"{path}: nanollama.family={family!r} is not of architecture {arch!r}")
    tensors = {t.name: t for t in reader.tensors}

    def need(key):
        if f"{arch}.{key}" not in fields:
            fail(f"{path}: key {arch}.{key} missing")
        return fields[f"{arch}.{key}"]

    if "token_embd.weight" not in tensors:
        fail(f"{path}: tensor token_embd.weight missing")
    n_heads, n_kv = need("attention.head_count"), need("attention.head_count_kv")
    n_layers = need("block_count")
    alibi = arch == "baichuan" and n_layers == BAICHUAN_DEPTH["alibi"]
    try:
        args = ModelArgs(dim=need("embedding_length"), n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=None if n_kv == n_heads else n_kv,
                         vocab_size=int(tensors["token_embd.weight"].shape[1]), hidden_dim=need("feed_forward_length"),
                         norm_eps=float(need("attention.layer_norm_rms_epsilon")), max_seq_len=need("context_length"),
                         rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
                         pos_emb="alibi" if alibi else "rope", tie_embeddings="output.weight" not in tensors)
    except (TypeError, ValueError) as e:
        fail(f"{path}: {e}")
    names = tensor_names(args)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
    for gname, native in names.items():
        if gname not in tensors:
            fail(f"{path}: tensor {gname} missing")
        shape = tuple(int(n) for n in reversed(tensors[gname].shape.tolist()))
        if shape != expected[native]:
            fail(f"{path}: tensor {gname} has shape {shape}, the file's keys imply {expected[native]}")

    def native_tensors():
        for gname, native in names.items():
            t = tensors[gname]
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            w = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
            if gname.endswith("attn_q.weight"):
                w = rotary_rows(w, args.n_heads, to_pairs=False)
            elif gname.endswith("attn_k.weight"):
                w = rotary_rows(w, args.kv_heads, to_pairs=False)
            yield native, w.contiguous()
    return args, family, fields, native_tensors()
