"""convert.py: weights in and out of our checkpoint dir (config.json + safetensors + tokenizer): HF, Meta and delta
weights in, HF out, a train.py step dir out as a checkpoint dir, a LoRA adapter merged in.

    python convert.py hf-to-native   --src hf/Baichuan2-7B-Base --dst ckpt/baichuan2-7b [--dtype bfloat16]
    python convert.py native-to-hf   --src ckpt/baichuan2-7b --dst hf/out
    python convert.py meta-to-native --src llama/llama-2-13b --dst ckpt/llama-2-13b
    python convert.py apply-delta    --src hf/llama-7b --delta hf/vicuna-7b-delta-v1.1 --dst ckpt/vicuna-7b
    python convert.py dcp-to-native  --src out/run/step_00001000 --dst ckpt/run-1000
    python convert.py merge-lora     --src ckpt/baichuan-7b --adapter out/qlora/adapter --dst ckpt/baichuan-7b-sft
    python convert.py native-to-ascendspeed --src ckpt/baichuan2-7b --dst weight --tp 8   # AscendSpeed's ./weight
    python convert.py ascendspeed-to-native --src ckpt --like ckpt/baichuan2-7b --dst ckpt/baichuan2-7b-run
    python convert.py native-to-gguf --src ckpt/baichuan-7b-sft --dst baichuan-7b-sft.gguf --type q4_0  # llama.cpp
    python convert.py gguf-to-native --src model.gguf --dst ckpt/from-gguf
FlagAI's Aquila dirs (config.json with dim/n_heads, pytorch_model.bin) go through hf-to-native as they are.

Every converter streams: source tensors are read one shard at a time (safetensors and .bin are memory-mapped) and the
output is written shard by shard by ShardWriter, so memory holds about one input shard plus one output
shard, never the model twice. Output goes to DST.tmp-PID and is renamed to DST when complete.

Beside it in support/: the command line and its checks (convert_cli.py), the checks of the files read
(convert_checks.py), HF's tensor names for ours (hf_names.py), weight files read and written (weights.py), PEFT's
adapter format (peft.py), train.py's step dirs (stepdir.py), and AscendSpeed, FlagAI and GGUF (their own files).

Layouts. HF LLaMA q/k rows are already in rotate-half order, which is our native order: copied as they are. Meta's
consolidated checkpoints interleave the rotary pairs, so their wq/wk are permuted on import. Baichuan's W_pack is
[wq; wk; wv] stacked on rows. Baichuan2's NormHead is architecture, not a conversion choice: its head is kept raw with
norm_head=true (model.py normalises it in every training forward, sample.py once when loading). LoRA adapter dirs are
PEFT's format, named as the HF export of the base (W_pack's update splits by rows into wq, wk, wv like its weight).

Every function here reports a problem as model.CheckpointError naming the file and the field; only main exits.
"""

import contextlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import prepare
from support import ascendspeed, convert_checks, convert_cli, diskspace, flagai, gguf, stepdir
from model import FAMILIES, CheckpointError, ModelArgs, read_config
from support.convert_checks import detect_family, read_hf_config, read_json, special_ids
from support.hf_names import BAICHUAN, hf_ignored, hf_layout, native_shapes, stacked_shape
from support.outputs import replace_dir
from support.peft import read_adapter
from support.weights import (ShardWriter, Streamed, WeightFiles, check_shapes, load_pickle, load_tensors, parse_size,
                             write_checkpoint)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD = "2GB"


def streamed(items, args: ModelArgs) -> Streamed:
    """(name, tensor) pairs produced on demand, for write_checkpoint, with the model's size for its shard plan."""
    return Streamed(items, sum(math.prod(shape) for shape in native_shapes(args).values()))


def fail(msg):
    """Every converter reports a problem as CheckpointError naming the file and the field; main says it in one line."""
    raise CheckpointError(msg)


def normalise_rows(w: torch.Tensor) -> torch.Tensor:
    """A NormHead as a plain head: L2-normalise each output row once, in fp32, then round once."""
    return F.normalize(w.float(), dim=-1).to(w.dtype)


# --------------------------------------------------------------------------------------------------------------------
# HF config.json -> family and ModelArgs


def hf_args(cfg: dict, family: str, where) -> ModelArgs:
    """ModelArgs from an HF config.json (LLaMA, Aquila, Baichuan and Baichuan2 all use LLaMA's field names)."""
    convert_checks.check_hf_args(cfg, where)  # the fields read, and what our model computes (plain RoPE, no biases)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    dim, n_heads, n_layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    # Baichuan's 13B models use ALiBi: their configs state only model_max_length, the RoPE 7B ones also
    # max_position_embeddings
    alibi = family in BAICHUAN and ("max_position_embeddings" not in cfg or (dim, n_layers) == (5120, 40))
    try:
        return ModelArgs(
            dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads, vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 2048,
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            pos_emb="alibi" if alibi else "rope", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            norm_head=family == "baichuan2",
            z_loss=float(cfg.get("z_loss_weight", 0.0)) if family == "baichuan2" else 0.0)
    except (TypeError, ValueError) as e:
        fail(f"{where}: {e}")


# --------------------------------------------------------------------------------------------------------------------
# output: staged dir, weights, tokenizer


@contextlib.contextmanager
def staged(dst, overwrite: bool, inputs=(), need=None):
    """A temporary dir beside dst (support.outputs.replace_dir): it replaces dst, atomically, once the block
    completes, and is removed on failure; a dst that is one of the inputs, holds one or lies in one is refused. A full
    disk is one CheckpointError naming dst, the bytes it needs (need, or ShardWriter's estimate) and the bytes free."""
    with replace_dir(dst, overwrite, "--dst", inputs, CheckpointError) as tmp, \
            diskspace.reported(dst, tmp, need, CheckpointError):
        yield tmp


def cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def own(t: torch.Tensor, dtype) -> torch.Tensor:
    """A copy in dtype: detached from the input's memory map (so the shard can be unmapped) and from the other
    parts of a split W_pack (safetensors refuses tensors that share storage)."""
    return t.to(dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)


def write_tokenizer(src: Path, dst: Path, ids: dict, template, default: str):
    """Copy the tokenizer files and write our tokenizer_config.json (prepare.Tokenizer.save: ids, whether text gets
    bos/eos, chat template). The template: --template, else the one the model ships (its Jinja chat_template, kept
    as it is: never replaced by a guess), else `default`, the family's built-in one."""
    if not any((src / f).exists() for f in prepare.TOKENIZER_FILES):
        print(f"convert.py: warning: {src}: no tokenizer.model or tokenizer.json; add one to the output dir before "
              f"sampling", file=sys.stderr)
        config = {"bos_id": ids.get("bos_id"), "eos_id": ids.get("eos_id"),
                  "pad_id": ids.get("pad_id", ids.get("eos_id")), "chat_template": template or default}
        (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return
    tok = prepare.load_tokenizer(src)  # reads HF's tokenizer_config.json (token strings) beside it
    for kind in ("bos", "eos", "pad"):  # ids stated by the model's own config are the authority
        if f"{kind}_id" in ids:
            setattr(tok, f"{kind}_id", ids[f"{kind}_id"])
    tok.save(dst, template=template or (None if tok.chat_template else default))
    for f in prepare.TOKENIZER_FILES:  # LLaMA dirs ship both; tok.save copied the one it reads
        if (src / f).exists() and not (dst / f).exists():
            shutil.copyfile(src / f, dst / f)


def check_template(template):
    """--template, checked (prepare.py owns the templates); None: the model's own, else its family's."""
    if template is not None and template not in prepare.TEMPLATES:
        fail(f"--template={template}: unknown; expected one of {', '.join(prepare.TEMPLATES)}")
    return template


def family_template(family: str) -> str:
    return FAMILIES[family].chat_template


# --------------------------------------------------------------------------------------------------------------------
# hf-to-native


def hf_to_native(src, dst, family=None, dtype=None, template=None, overwrite=False, max_shard_bytes=None):
    src = Path(src)
    if flagai.is_flagai_config(read_json(src / "config.json")):  # FlagAI's own dir: no HF fields to read
        return flagai_to_native(src, dst, dtype, template, overwrite, max_shard_bytes), "aquila"
    cfg = read_hf_config(src)
    family = family or detect_family(cfg, src / "config.json")
    template = check_template(template)
    args = hf_args(cfg, family, src / "config.json")
    source = WeightFiles(src)
    layout = hf_layout(args, family)
    shapes = native_shapes(args)
    expected = {hf: stacked_shape([shapes[n] for n in natives]) for hf, natives in layout.items()}
    check_shapes(source.shapes, expected, source.where, ignored=lambda n: hf_ignored(n, args))

    def to_native(hf_name, t):
        """One HF tensor -> its native tensors (W_pack splits in three), copied out of the memory map."""
        natives = layout[hf_name]
        return [(name, own(part, dtype)) for name, part in zip(natives, t.split([shapes[n][0] for n in natives]))]

    def tensors():
        for _, shard in source.shards():
            for hf_name in [n for n in shard if n in layout]:
                yield from to_native(hf_name, shard[hf_name])
            del shard  # unmap this shard before the next is mapped

    with staged(dst, overwrite, (src,)) as tmp:
        write_checkpoint(tmp, streamed(tensors(), args), args, family, max_shard_bytes=max_shard_bytes)
        ids = special_ids(args.vocab_size, src / "config.json", src / "generation_config.json")
        write_tokenizer(src, tmp, ids, template, family_template(family))
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# native-to-hf


def hf_config(args: ModelArgs, family: str, ids: dict, dtype: str) -> dict:
    """LLaMA's config.json (transformers loads it natively), or Baichuan's for the Baichuan families."""
    common = {"hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
              "num_hidden_layers": args.n_layers, "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
              "hidden_act": "silu", "initializer_range": args.init_std, "tie_word_embeddings": args.tie_embeddings,
              "bos_token_id": ids.get("bos_id"), "eos_token_id": ids.get("eos_id"),
              "pad_token_id": ids.get("pad_id"), "torch_dtype": dtype, "use_cache": True}
    if family in BAICHUAN:
        # 7B configs state max_position_embeddings (RoPE); the ALiBi 13B configs only model_max_length
        arch = "BaiChuanForCausalLM" if family == "baichuan" and args.pos_emb == "rope" else "BaichuanForCausalLM"
        cfg = {"architectures": [arch], "model_type": FAMILIES[family].model_type, **common,
               "model_max_length": args.max_seq_len}
        if args.pos_emb == "rope":
            cfg["max_position_embeddings"] = args.max_seq_len
        if family == "baichuan2":
            cfg["z_loss_weight"] = args.z_loss
        return cfg
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "num_key_value_heads": args.kv_heads, "max_position_embeddings": args.max_seq_len,
            "rope_theta": args.rope_theta,  # transformers < 5 reads this, >= 5 reads rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
            "attention_bias": False, "mlp_bias": False}


def native_to_hf(src, dst, dtype=None, overwrite=False, max_shard_bytes=None):
    src = Path(src)
    args, family, source = open_checkpoint_dir(src)
    convert_checks.check_hf_exportable(args, family, src / "config.json")
    # LLaMA has no NormHead: normalise once so a plain head computes the same logits. Baichuan2 keeps its raw head
    # (its modeling code normalises it, as ours does).
    normalise = args.norm_head and family != "baichuan2"

    def hf_tensors():
        for hf_name, natives in hf_layout(args, family).items():
            t = torch.cat([source.get(n) for n in natives]) if len(natives) > 1 else source.get(natives[0])
            yield hf_name, own(normalise_rows(t) if normalise and hf_name == "lm_head.weight" else t, dtype)

    ids = prepare.special_ids_of(src / "tokenizer_config.json", args.vocab_size)
    out_dtype = str(dtype or source.get("tok_embeddings.weight").dtype).removeprefix("torch.")
    with staged(dst, overwrite, (src,)) as tmp:
        # HF's own file names and index layout
        writer = ShardWriter(tmp, max_shard_bytes, sum(math.prod(s) for s in native_shapes(args).values()))
        for name, t in hf_tensors():
            writer.add(name, t)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(hf_config(args, family, ids, out_dtype), indent=2))
        gen = {k.replace("_id", "_token_id"): v for k, v in ids.items()}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for f in prepare.TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, tmp / f)
        if any((src / f).exists() for f in prepare.TOKENIZER_FILES):
            (tmp / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(src, ids), indent=2))
    return args, family


def hf_tokenizer_config(src: Path, ids: dict) -> dict:
    """HF's tokenizer_config.json names special tokens by their strings, and the class that reads the file; it says
    whether text gets bos/eos (transformers reads a bare tokenizer.model as neither) and holds the chat template in
    Jinja: the model's own, or a built-in template's Jinja form where that gives the same ids."""
    tok = prepare.load_tokenizer(src)
    cfg = {"tokenizer_class": "LlamaTokenizer" if tok.sp is not None else "PreTrainedTokenizerFast",
           "add_bos_token": bool(tok.prefix), "add_eos_token": bool(tok.suffix)}
    if tok.sp is not None:
        cfg["legacy"] = tok.sp_legacy
        if not tok.dummy_prefix:  # (Baichuan's): transformers adds the "▁" unless told
            cfg["add_prefix_space"] = False
    for kind in ("bos", "eos", "pad"):
        token = tok.id_to_token(ids.get(f"{kind}_id"))
        if token is not None:
            cfg[f"{kind}_token"] = token
    if tok.chat_template and prepare.is_jinja(tok.chat_template):
        cfg["chat_template"] = tok.chat_template
    elif tok.chat_template in prepare.TEMPLATES:  # a built-in name: its Jinja form, where that is exact
        jinja = prepare.template_jinja(tok, tok.chat_template)
        if jinja is None:
            print(f"convert.py: warning: {src}: chat template {tok.chat_template!r} has no exact Jinja form for this "
                  f"tokenizer; tokenizer_config.json gets no chat_template", file=sys.stderr)
        else:
            cfg["chat_template"] = jinja
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# meta-to-native

# Meta's model-parallel layers: ColumnParallelLinear shards the output dim (0), RowParallelLinear the input dim (1).
# tok_embeddings is split on dim 1 (ParallelEmbedding, LLaMA 1/2) or dim 0 (VocabParallelEmbedding, LLaMA 3): taken
# from the shapes. Norms are replicated.
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """FeedForward width exactly as Meta's llama/model.py computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs (x0,x1),(x2,x3).. -> rotate-half halves, per head (the inverse of
    transformers' LLaMA conversion permute)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    # (n_heads, head_dim/2, 2, dim) -> (n_heads, 2, head_dim/2, dim)
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_merge(name: str, parts: list[torch.Tensor], shape: tuple) -> torch.Tensor:
    if len(parts) == 1 or len(shape) == 1:
        return parts[0]
    kind = name.split(".")[-2]
    dim = META_SPLIT_DIM.get(kind, 1 if parts[0].shape[0] == shape[0] else 0)
    return torch.cat(parts, dim=dim)


def meta_args(params: dict, emb_shape: tuple, n_shards: int, where, max_seq_len: int) -> ModelArgs:
    """ModelArgs from Meta's params.json; vocab_size -1 means "from the tokenizer": read off the embedding, which is
    split on dim 1 (LLaMA 1/2) or dim 0 (LLaMA 3)."""
    convert_checks.check_meta_params(params, where)
    vocab = params.get("vocab_size", -1)
    if vocab in (-1, None):
        vocab = emb_shape[0] if emb_shape[1] * n_shards == params.get("dim") else emb_shape[0] * n_shards
    try:
        dim = params["dim"]
        return ModelArgs(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
                         n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab,
                         hidden_dim=meta_hidden_dim(dim, params.get("multiple_of", 256),
                                                    params.get("ffn_dim_multiplier")),
                         norm_eps=float(params.get("norm_eps", 1e-6)), max_seq_len=max_seq_len,
                         rope_theta=float(params.get("rope_theta", 10000.0)))
    except (TypeError, ValueError) as e:
        fail(f"{where}: {e}")


def meta_to_native(src, dst, dtype=None, max_seq_len=2048, template=None, overwrite=False, max_shard_bytes=None):
    src = Path(src)
    template = check_template(template)
    params = read_json(src / "params.json")
    files = sorted(src.glob("consolidated.*.pth"))
    headers = [{k: tuple(t.shape) for k, t in load_pickle(f).items()} for f in files]  # maps dropped right away
    convert_checks.check_meta_shards(src, files, headers)
    args = meta_args(params, headers[0]["tok_embeddings.weight"], len(files), src / "params.json", max_seq_len)
    shapes = native_shapes(args)
    convert_checks.check_meta_names(files, headers, shapes)  # each shard: a piece of every tensor, nothing else

    def tensors():
        shards, read = [load_pickle(f) for f in files], 0
        for name, shape in shapes.items():
            # every tensor needs a piece of every shard; remapping the files now and then lets the pages already
            # read go, so resident input stays about one output shard
            if read > (max_shard_bytes or parse_size(DEFAULT_SHARD)):
                shards = None  # unmap before mapping again
                shards, read = [load_pickle(f) for f in files], 0
            t = meta_merge(name, [sd[name] for sd in shards], shape)
            read += t.numel() * t.element_size()
            if tuple(t.shape) != shape:
                fail(f"{src}: tensor {name} merged from {len(files)} shard(s) has shape {tuple(t.shape)}, "
                     f"expected {shape}")
            if name.endswith("attention.wq.weight"):
                t = meta_to_rotate_half(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = meta_to_rotate_half(t, args.kv_heads)
            out = own(t, dtype)
            del t  # may be a view of the mapped file: keep no reference across a remap
            yield name, out

    with staged(dst, overwrite, (src,)) as tmp:
        write_checkpoint(tmp, streamed(tensors(), args), args, "llama", max_shard_bytes=max_shard_bytes)
        tok_dir = src if (src / "tokenizer.model").exists() else src.parent  # Meta ships it beside the model dirs
        write_tokenizer(tok_dir, tmp, {}, template, family_template("llama"))
    return args


# --------------------------------------------------------------------------------------------------------------------
# apply-delta


def open_checkpoint_dir(path: Path):
    """(args, family, WeightFiles) of one of our checkpoint dirs, its tensors checked against its config.json."""
    args, cfg = read_config(path)  # checks the family too
    family = cfg.get("family", "llama")
    source = WeightFiles(path)
    check_shapes(source.shapes, native_shapes(args), source.where)
    return args, family, source


def open_native(path: Path):
    """(args, family, native name -> tensor) for one of our checkpoint dirs or an HF dir, read on demand."""
    if "family" in read_json(path / "config.json"):
        args, family, source = open_checkpoint_dir(path)
        return args, family, source.get
    cfg = read_hf_config(path)
    family = detect_family(cfg, path / "config.json")
    args = hf_args(cfg, family, path / "config.json")
    source = WeightFiles(path)
    layout = hf_layout(args, family)
    shapes = native_shapes(args)
    expected = {hf: stacked_shape([shapes[n] for n in natives]) for hf, natives in layout.items()}
    check_shapes(source.shapes, expected, source.where, ignored=lambda n: hf_ignored(n, args))
    where = {}  # native name -> (HF name, first row, rows)
    for hf_name, natives in layout.items():
        offset = 0
        for n in natives:
            where[n] = (hf_name, offset, shapes[n][0])
            offset += shapes[n][0]

    def get(name):
        hf_name, offset, rows = where[name]
        return source.get(hf_name)[offset: offset + rows]

    return args, family, get


def apply_delta(base, delta, dst, dtype=None, template=None, overwrite=False, max_shard_bytes=None):
    """target = base + delta. A delta with a larger vocabulary (added tokens) keeps its extra rows as they are.
    Chat template: --template, else the delta's own, else vicuna (the deltas this exists for are Vicuna's)."""
    base, delta = Path(base), Path(delta)
    template = check_template(template)
    if Path(dst).exists() and not overwrite:
        fail(f"{dst}: exists; pass --overwrite to replace it")
    base_args, _, base_get = open_native(base)
    args, family, delta_get = open_native(delta)
    convert_checks.check_delta(base_args, args, base, delta)
    base_names = native_shapes(base_args)

    def tensors():
        for name in native_shapes(args):
            d = delta_get(name)
            out = d.float().clone()
            if name in base_names:
                b = base_get(name)
                out[: b.shape[0]] += b.float()  # rows past the base's vocabulary come from the delta alone
            elif name == "output.weight":  # base tied, delta untied: the base's head is its embedding
                b = base_get("tok_embeddings.weight")
                out[: b.shape[0]] += b.float()
            yield name, out.to(dtype or d.dtype)

    with staged(dst, overwrite, (base, delta)) as tmp:
        write_checkpoint(tmp, streamed(tensors(), args), args, family, max_shard_bytes=max_shard_bytes)
        if "family" in read_json(delta / "config.json"):  # native delta: its tokenizer_config.json holds our ids
            ids = prepare.special_ids_of(delta / "tokenizer_config.json", args.vocab_size)
        else:
            ids = special_ids(args.vocab_size, delta / "config.json", delta / "generation_config.json")
        has_tokenizer = any((delta / f).exists() for f in prepare.TOKENIZER_FILES)
        write_tokenizer(delta if has_tokenizer else base, tmp, ids, template, "vicuna")
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# dcp-to-native (train.py imports dcp_to_native for its export)


def dcp_to_native(step_dir, dst, dtype=None, overwrite=False, max_shard_bytes=None):
    """A train.py step dir (torch.distributed.checkpoint, state dict key "model", config.json and tokenizer beside
    it) -> a checkpoint dir; a LoRA run's -> that step's adapters merged into the base checkpoint dir the run started
    from, as train.py's export does. support/stepdir.py reads it: verified first, in one process without a process
    group, the model tensors in batches of about one output shard (memory stays near one shard)."""
    step = Path(step_dir)
    if Path(dst).exists() and not overwrite:
        fail(f"{dst}: exists; pass --overwrite to replace it")
    args, cfg, stored = stepdir.read_model_index(step)
    family = cfg.get("family", "llama")
    if any(n.endswith(".lora_a") for n in stored):
        with tempfile.TemporaryDirectory() as tmp:
            base = stepdir.write_lora_adapter(step, stored, args, family, Path(tmp) / "adapter")
            return merge_lora(base, Path(tmp) / "adapter", dst, dtype, overwrite, max_shard_bytes)
    tensors = stepdir.read_model(step, stored, native_shapes(args), max_shard_bytes or parse_size(DEFAULT_SHARD))
    with staged(dst, overwrite, (step,)) as tmp:
        write_checkpoint(tmp, streamed(((n, cast(t, dtype)) for n, t in tensors), args), args, family,
                         max_shard_bytes=max_shard_bytes,
                         extra_config={k: v for k, v in cfg.items()  # whatever else train.py recorded
                                       if k != "family" and k not in args.__dataclass_fields__})
        prepare.copy_tokenizer_files(step, tmp)
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# merge-lora: fold a LoRA adapter (train.py's, or any PEFT LoRA adapter of the base's HF export) into the base


def merge_lora(src, adapter, dst, dtype=None, overwrite=False, max_shard_bytes=None):
    """W + scale * B A for every adapted weight, streamed tensor by tensor like the other converters.

    The adapters are folded into the base checkpoint's own weights (for QLoRA too: the NF4 copy was only the
    training-time store of those same weights)."""
    if Path(dst).exists() and not overwrite:
        fail(f"{dst}: exists; pass --overwrite to replace it")
    args, family, source = open_checkpoint_dir(Path(src))
    updates, replaced = read_adapter(adapter, args, family)

    def tensors():
        for name in native_shapes(args):
            w = source.get(name)
            if name in replaced:  # in the base's dtype, as PEFT loads it into the base layer
                w = replaced[name].to(w.dtype)
            if name in updates:
                u = updates[name]
                yield name, (w.float() + u.scale * (u.b.float() @ u.a.float())).to(dtype or w.dtype)
            else:
                yield name, own(w, dtype)

    with staged(dst, overwrite, (src, adapter)) as tmp:
        write_checkpoint(tmp, streamed(tensors(), args), args, family, max_shard_bytes=max_shard_bytes)
        prepare.copy_tokenizer_files(src, tmp)
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# other tools' checkpoint formats: the reading and writing live in support/ (ascendspeed.py, flagai.py)


def ascendspeed_to_native(src, dst, like=None, dtype=None, overwrite=False, max_shard_bytes=None):
    """The architecture and tokenizer come from `like` (a checkpoint dir), else from src's own config.json, which
    native-to-ascendspeed writes there. Baichuan2's head is raw there (--lm-norm-weight): norm_head=true."""
    src, like = Path(src), Path(like or src)
    args, config = read_config(like)
    family = config.get("family", "llama")
    if family == "baichuan2":
        args = replace(args, norm_head=True)
    tensors = ascendspeed.read_native(src, args)  # checked against args' shapes
    with staged(dst, overwrite, (src, like)) as tmp:
        write_checkpoint(tmp, streamed(((n, own(t, dtype)) for n, t in tensors.items()), args), args, family,
                         max_shard_bytes=max_shard_bytes)
        ascendspeed.copy_beside(like, tmp)
        (tmp / "config.json").write_text(json.dumps({**asdict(args), "family": family}, indent=2))
    return args, family


def flagai_to_native(src: Path, dst, dtype=None, template=None, overwrite=False, max_shard_bytes=None) -> ModelArgs:
    """FlagAI's Aquila dir (support/flagai.py): Meta's tensor names with interleaved rotary pairs; family aquila."""
    args, tensors = flagai.read_native(src, meta_to_rotate_half)
    with staged(dst, overwrite, (src,)) as tmp:
        write_checkpoint(tmp, streamed(((n, own(t, dtype)) for n, t in tensors), args), args, "aquila",
                         max_shard_bytes=max_shard_bytes)
        write_tokenizer(src, tmp, {}, template, family_template("aquila"))
    return args


def native_to_ascendspeed(src, dst, tp=1, pp=1, divisible_by=128, merge_mlp=True, deepspeed=False, dtype=None,
                          overwrite=False):
    src = Path(src)
    args, family, _ = open_checkpoint_dir(src)
    tensors = {n: cast(t, dtype) for n, t in load_tensors(src).items()}
    with staged(dst, overwrite, (src,)) as tmp:
        ascendspeed.write(tmp, ascendspeed.rank_models(tensors, args, tp, pp, divisible_by, merge_mlp), pp, deepspeed)
        ascendspeed.copy_beside(src, tmp)
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp, ollama): the format is support/gguf.py's


def native_to_gguf(src, dst, qtype="f16", overwrite=False):
    """A checkpoint dir as one GGUF file, written beside dst and renamed to it when complete."""
    src = Path(src)
    args, family, source = open_checkpoint_dir(src)
    gguf.check_exportable(args, family, src / "config.json")
    if not any((src / f).exists() for f in prepare.TOKENIZER_FILES):
        fail(f"{src}: no tokenizer.model or tokenizer.json: a GGUF file carries its tokenizer")
    tok = prepare.load_tokenizer(src)
    ids = prepare.special_ids_of(src / "tokenizer_config.json", args.vocab_size)
    fields = {**gguf.model_fields(args, family, qtype, src.resolve().name),
              **gguf.tokenizer_fields(tok, args.vocab_size, hf_tokenizer_config(src, ids).get("chat_template"))}
    if tok.chat_template in prepare.TEMPLATES:
        fields["nanollama.chat_template"] = tok.chat_template
    gguf.write_file(Path(dst), overwrite, args, family, native_shapes(args), source.get, fields, qtype)
    return args, family


def gguf_to_native(src, dst, dtype=None, overwrite=False, max_shard_bytes=None):
    """A GGUF file of the llama or baichuan architecture (ours, or llama.cpp's converter's) as a checkpoint dir:
    weights dequantised to fp32 (or --dtype), the tokenizer as the file describes it."""
    src = Path(src)
    args, family, fields, tensors = gguf.read_gguf(src)
    with staged(dst, overwrite, (src,)) as tmp:
        write_checkpoint(tmp, streamed(((name, cast(t, dtype)) for name, t in tensors), args), args, family,
                         max_shard_bytes=max_shard_bytes)
        if "tokenizer.ggml.tokens" not in fields:
            print(f"convert.py: warning: {src}: no tokenizer; add one to the output dir before sampling",
                  file=sys.stderr)
            return args, family
        gguf.write_tokenizer(fields, tmp)
        gguf.write_tokenizer_config(fields, tmp, family_template(family))
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# command line


# subcommand -> its converter, called with the parsed flags and the output options; each returns (args, family)
COMMANDS = {
    "hf-to-native": lambda a, **kw: hf_to_native(a.src, a.dst, a.family, template=a.template, **kw),
    "native-to-hf": lambda a, **kw: native_to_hf(a.src, a.dst, **kw),
    "meta-to-native": lambda a, **kw: (meta_to_native(a.src, a.dst, max_seq_len=a.max_seq_len, template=a.template,
                                                      **kw), "llama"),
    "apply-delta": lambda a, **kw: apply_delta(a.src, a.delta, a.dst, template=a.template, **kw),
    "dcp-to-native": lambda a, **kw: dcp_to_native(a.src, a.dst, **kw),
    "merge-lora": lambda a, **kw: merge_lora(a.src, a.adapter, a.dst, **kw),
    "ascendspeed-to-native": lambda a, **kw: ascendspeed_to_native(a.src, a.dst, a.like, **kw),
    "native-to-ascendspeed": lambda a, max_shard_bytes, **kw: native_to_ascendspeed(
        a.src, a.dst, a.tp, a.pp, a.make_vocab_size_divisible_by, not a.no_merge_mlp, a.deepspeed, **kw),
    "gguf-to-native": lambda a, **kw: gguf_to_native(a.src, a.dst, **kw),
    "native-to-gguf": lambda a, overwrite: native_to_gguf(a.src, a.dst, a.type, overwrite),
}


def main(argv=None):
    a = convert_cli.parse_args(argv, __doc__.split("\n")[0], DTYPES, DEFAULT_SHARD)
    try:
        max_shard_bytes = convert_cli.check_flags(a)  # the flags and the paths they name, before any reading
        kw = {} if a.command == "native-to-gguf" else dict(dtype=DTYPES.get(a.dtype), max_shard_bytes=max_shard_bytes)
        args, family = COMMANDS[a.command](a, overwrite=a.overwrite, **kw)
    except CheckpointError as e:  # every problem, said in one line
        raise SystemExit(f"convert.py: {e}") from None
    detail = a.type if a.command == "native-to-gguf" else args.pos_emb
    print(f"convert.py: wrote {a.dst} ({family}, {args.n_layers} layers, dim {args.dim}, {detail})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (prepare.DataError, prepare.TemplateError) as e:  # a tokenizer or data dir read through prepare.py
        raise SystemExit(f"convert.py: {e}") from None
