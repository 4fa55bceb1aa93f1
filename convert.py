"""convert.py: every on-disk format of weights: checkpoint dirs (config.json + safetensors + tokenizer) written and
converted in and out, train.py's step dirs (manifest, verification, safe DCP loading), LoRA adapter dirs.

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

Layouts. HF LLaMA q/k rows are already in rotate-half order, which is our native order: copied as they are. Meta's
consolidated checkpoints interleave the rotary pairs, so their wq/wk are permuted on import. Baichuan's W_pack is
[wq; wk; wv] stacked on rows. Baichuan2's NormHead is architecture, not a conversion choice: its head is kept raw with
norm_head=true (model.py normalises it in every training forward, sample.py once when loading). LoRA adapter dirs are
PEFT's format, named as the HF export of the base (W_pack's update splits by rows into wq, wk, wv like its weight).

Every function here reports a problem as model.CheckpointError naming the file and the field; only main exits.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import prepare
from support import ascendspeed, diskspace, flagai
from model import FAMILIES, CheckpointError, ModelArgs, Transformer, family_of_hf_config, read_config
from support.checks import check_json_fields, check_value, load_json
from support.outputs import check_output, replace_dir
from support.weights import load_safetensors, load_tensors, read_weight_map

BAICHUAN = ("baichuan", "baichuan2")  # W_pack, and Baichuan's own config.json
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD = "2GB"


def fail(msg):
    """Every converter reports a problem as CheckpointError naming the file and the field; main says it in one line."""
    raise CheckpointError(msg)


# --------------------------------------------------------------------------------------------------------------------
# name maps: one table, read in both directions

HF_LAYER = {  # HF per-layer suffix -> native per-layer suffix
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
# tensors some HF checkpoints carry that are not weights (old LLaMA .bin files saved the rotary table)
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_ignored(name: str, args: ModelArgs) -> bool:
    """Not weights, or a tied head saved anyway (it is the embedding)."""
    return bool(HF_IGNORED.fullmatch(name)) or (args.tie_embeddings and name == "lm_head.weight")


def native_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Name -> shape of every tensor of our model, from model.py itself (built on the meta device: free)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def hf_layout(args: ModelArgs, family: str) -> dict[str, list[str]]:
    """HF tensor name -> the native tensors it holds, stacked on rows in this order (W_pack holds wq, wk, wv)."""
    layout = {"model.embed_tokens.weight": ["tok_embeddings.weight"]}
    for i in range(args.n_layers):
        for hf, native in HF_LAYER.items():
            if family in BAICHUAN and hf.startswith(("self_attn.q_", "self_attn.k_", "self_attn.v_")):
                continue
            layout[f"model.layers.{i}.{hf}"] = [f"layers.{i}.{native}"]
        if family in BAICHUAN:
            layout[f"model.layers.{i}.self_attn.W_pack.weight"] = [f"layers.{i}.attention.{w}.weight"
                                                                   for w in ("wq", "wk", "wv")]
    layout["model.norm.weight"] = ["norm.weight"]
    if not args.tie_embeddings:
        layout["lm_head.weight"] = ["output.weight"]
    return layout


def stacked_shape(parts: list[tuple]) -> tuple:
    return (sum(p[0] for p in parts), *parts[0][1:])


def check_shapes(found: dict[str, tuple], expected: dict[str, tuple], where, ignored=lambda name: False):
    """Every expected tensor present with its shape and nothing else; the message names the tensor."""
    missing = sorted(set(expected) - set(found))
    if missing:
        fail(f"{where}: missing tensor {missing[0]} ({len(missing)} missing)")
    unexpected = sorted(n for n in set(found) - set(expected) if not ignored(n))
    if unexpected:
        fail(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected for this config)")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            fail(f"{where}: tensor {name} has shape {tuple(found[name])}, expected {tuple(shape)} from the config")


def normalise_rows(w: torch.Tensor) -> torch.Tensor:
    """A NormHead as a plain head: L2-normalise each output row once, in fp32, then round once."""
    return F.normalize(w.float(), dim=-1).to(w.dtype)


# --------------------------------------------------------------------------------------------------------------------
# reading source files: safetensors or pickled .bin/.pth (weights_only), single or sharded with an index


class _DcpMetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint reads .metadata with a bare pickle.load; this one resolves only what DCP writes
    there (its metadata classes, torch dtypes / Size / layouts, paths), so a crafted .metadata cannot run code."""

    def find_class(self, module, name):
        obj = getattr(sys.modules.get(module), name, None) if module in sys.modules else None
        dcp_class = module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)
        torch_value = module == "torch" and (name == "Size" or isinstance(obj, torch.dtype))
        if (dcp_class or torch_value or (module, name) == ("torch.serialization", "_get_layout")
                or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))):
            return obj
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_dcp_metadata(step_dir):
    """CheckpointError for a DCP .metadata that holds anything but DCP's own metadata (SafeDcpReader calls it before
    DCP reads the file)."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401 (registers the classes find_class looks up)
    import torch.distributed.checkpoint.metadata  # noqa: F401

    file = Path(step_dir) / ".metadata"
    try:
        with open(file, "rb") as f:
            _DcpMetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: not a torch.distributed.checkpoint dir ({file.name} not found)") from None
    except Exception as e:  # noqa: BLE001 (a corrupt pickle surfaces as many exception types)
        raise CheckpointError(f"{file}: refused to unpickle: not plain DCP metadata ({type(e).__name__}: {e})") \
            from None


def load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, memory-mapped; weights_only refuses pickles that would run code."""
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        fail(f"{file}: refused to unpickle: it holds more than plain tensors and could run code "
             f"(weights_only=True): {str(e).splitlines()[0]}")
    except (RuntimeError, EOFError, OSError) as e:
        fail(f"{file}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        fail(f"{file}: expected a dict of tensor name -> tensor")
    return sd


def load_file(file: Path) -> dict[str, torch.Tensor]:
    """One weights file, memory-mapped: nothing is read until a tensor is used."""
    if file.suffix == ".safetensors":
        return load_safetensors(file)
    return load_pickle(file)


class WeightFiles:
    """The weight files of a dir, HF's or ours: model.safetensors / pytorch_model.bin, or shards named by an index.

    Only headers are read up front (shapes, which file holds what). Tensors are then read one shard at a time, so
    memory-mapped pages of at most one input shard stay resident (weights.load_tensors maps every shard at once).
    """

    def __init__(self, src: Path):
        self.src, index_map = src, None
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (src / index_name).exists():
                self.where = src / index_name
                index_map = read_weight_map(self.where)  # shards: plain file names in src, present
                self.files = sorted(set(index_map.values()))
                break
        else:
            single = [f for f in ("model.safetensors", "pytorch_model.bin") if (src / f).exists()]
            if not single:
                fail(f"{src}: no model.safetensors, pytorch_model.bin or *.index.json found")
            self.files, self.where = single[:1], src / single[0]
        self.shapes, self.file_of = {}, {}
        for f, tensors in self.shards():
            for name, t in tensors.items():
                if name in self.shapes:
                    fail(f"{src / f}: tensor {name} is also in {self.file_of[name]}")
                self.shapes[name], self.file_of[name] = tuple(t.shape), f
        for name, f in (index_map or {}).items():
            if self.file_of.get(name) != f:
                fail(f"{self.where}: tensor {name} is not in {f}, the shard the index names")
        self._open = (None, None)

    def shards(self):
        """(file name, {name: tensor}) one shard at a time."""
        for f in self.files:
            yield f, load_file(self.src / f)

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name, for random access; only its shard stays mapped."""
        f = self.file_of[name]
        if self._open[0] != f:
            self._open = (None, None)  # unmap the previous shard before mapping the next
            self._open = (f, load_file(self.src / f))
        return self._open[1][name]


# --------------------------------------------------------------------------------------------------------------------
# HF config.json -> family and ModelArgs


def read_json(file: Path, required=True) -> dict:
    """A JSON object file, checked as support.checks.load_json checks one; {} for an absent one that is not required."""
    if not required and not file.exists():
        return {}
    return load_json(file, CheckpointError)


# HF config.json: the fields read, their types and ranges (an absent field takes its default)
HF_CONFIG = {
    **{k: (int, "[1, inf)") for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                      "intermediate_size")},
    **{k: (Optional[int], "[1, inf)") for k in ("num_key_value_heads", "head_dim", "max_position_embeddings",
                                                "model_max_length")},
    "rms_norm_eps": (float, "(0, 1)"), "rope_theta": (float, "(0, inf)"), "z_loss_weight": (float, "[0, inf)"),
    "tie_word_embeddings": bool, "attention_bias": bool, "mlp_bias": bool, "hidden_act": str,
    "model_type": str, "architectures": list, "rope_scaling": Optional[dict], "rope_parameters": Optional[dict],
    **{f"{k}.{f}": str for k in ("rope_scaling", "rope_parameters") for f in ("rope_type", "type")},
    **{f"{k}.rope_theta": (float, "(0, inf)") for k in ("rope_scaling", "rope_parameters")},
}


def read_hf_config(src: Path) -> dict:
    """An HF config.json, every field this file reads of the right type and in range."""
    cfg = read_json(src / "config.json")
    check_json_fields(cfg, HF_CONFIG, src / "config.json", CheckpointError)
    if not all(isinstance(a, str) for a in cfg.get("architectures", [])):
        fail(f"{src / 'config.json'}: architectures={cfg['architectures']!r}: expected a list of strings")
    return cfg


def detect_family(cfg: dict, where) -> str:
    family = family_of_hf_config(cfg)  # model.FAMILIES says which names and marks mean which family
    if family is None:
        supported = dict.fromkeys(a for f in FAMILIES.values() for a in f.architectures)
        fail(f"{where}: architectures {cfg.get('architectures') or []} (model_type {cfg.get('model_type')!r}) is not "
             f"supported; supported: {', '.join(supported)} (or pass --family {{{','.join(FAMILIES)}}})")
    return family


def hf_args(cfg: dict, family: str, where) -> ModelArgs:
    """ModelArgs from an HF config.json (LLaMA, Aquila, Baichuan and Baichuan2 all use LLaMA's field names)."""
    def need(key):
        if not isinstance(cfg.get(key), (int, float)):
            fail(f"{where}: field {key!r} missing or not a number")
        return cfg[key]

    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            fail(f"{where}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # read_hf_config checked them
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        fail(f"{where}: rope type {rope_type!r} is not supported (only plain RoPE)")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    if cfg.get("head_dim") not in (None, dim // n_heads):
        fail(f"{where}: head_dim={cfg['head_dim']} is not hidden_size/num_attention_heads={dim // n_heads}")
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    # Baichuan's 13B models use ALiBi: their configs state only model_max_length, the RoPE 7B ones also
    # max_position_embeddings
    n_layers = need("num_hidden_layers")
    alibi = family in BAICHUAN and ("max_position_embeddings" not in cfg or (dim, n_layers) == (5120, 40))
    try:
        return ModelArgs(
            dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads, vocab_size=need("vocab_size"),
            hidden_dim=need("intermediate_size"), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 2048,
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            pos_emb="alibi" if alibi else "rope", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            norm_head=family == "baichuan2",
            z_loss=float(cfg.get("z_loss_weight", 0.0)) if family == "baichuan2" else 0.0)
    except (TypeError, ValueError) as e:
        fail(f"{where}: {e}")


# --------------------------------------------------------------------------------------------------------------------
# output: staged dir, weights, tokenizer


class ShardWriter:
    """Writes tensors into safetensors shards as they come, so a converter holds at most one shard in memory.

    One shard is named model.safetensors; several get HF's model-0000i-of-0000N.safetensors names and an index.
    expected_elements (of every tensor to come) lets a full disk say how many bytes the whole output needs.
    """

    def __init__(self, path, max_shard_bytes: Optional[int] = None, expected_elements: Optional[int] = None):
        self.path, self.max_shard_bytes = Path(path), max_shard_bytes or 2**62
        self.path.mkdir(parents=True, exist_ok=True)
        self.pending, self.pending_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0
        self.elements, self.expected_elements = 0, expected_elements

    def add(self, name: str, tensor: torch.Tensor):
        check_finite({name: tensor}, self.path)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes
        self.elements += tensor.numel()

    def need(self) -> Optional[int]:
        """Bytes of the whole output, at the bytes per element of the tensors so far."""
        if self.expected_elements and self.elements:
            return round(self.total / self.elements * max(self.expected_elements, self.elements))
        return None

    def _flush(self):
        from safetensors.torch import save_file

        file = self.path / f"shard-{len(self.files):05d}.tmp"
        with diskspace.needing(self.path, self.need):
            save_file(self.pending, str(file), metadata={"format": "pt"})
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.path / "model.safetensors")
            return
        n = len(self.files)
        for i, (file, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(file, self.path / final)
            self.weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_finite(tensors: dict, where):
    """CheckpointError naming the first floating tensor holding a NaN or an infinity: no checkpoint is written from
    weights like that (a diverged run, a damaged source), so every one written can be trained or sampled from."""
    for name, t in tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
        if torch.is_tensor(local) and local.is_floating_point() and not torch.isfinite(local).all():
            fail(f"{where}: tensor {name} holds NaN or infinite values: not writing a checkpoint of it")


def write_checkpoint(path, state_dict, args: ModelArgs, family: str, *, max_shard_bytes=None, extra_config=None):
    """Write config.json and the weights of a checkpoint dir (tokenizer files are the caller's to copy)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**asdict(args), "family": family, **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    elements = (sum(t.numel() for t in state_dict.values()) if isinstance(state_dict, dict)
                else sum(math.prod(shape) for shape in native_shapes(args).values()))  # Streamed: the model's
    writer = ShardWriter(path, max_shard_bytes, elements)
    for name, tensor in state_dict.items():
        writer.add(name, tensor)
    writer.close()




@contextlib.contextmanager
def staged(dst, overwrite: bool, inputs=(), need=None):
    """A temporary dir beside dst (support.outputs.replace_dir): it replaces dst, atomically, once the block
    completes, and is removed on failure; a dst that is one of the inputs, holds one or lies in one is refused. A full
    disk is one CheckpointError naming dst, the bytes it needs (need, or ShardWriter's estimate) and the bytes free."""
    with replace_dir(dst, overwrite, "--dst", inputs, CheckpointError) as tmp, \
            diskspace.reported(dst, tmp, need, CheckpointError):
        yield tmp


class Streamed:
    """A state dict whose items are produced on demand: write_checkpoint only iterates .items(), so converting and
    writing interleave and at most one output shard is held in memory."""

    def __init__(self, items):
        self._items = items

    def items(self):
        return self._items


def cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def own(t: torch.Tensor, dtype) -> torch.Tensor:
    """A copy in dtype: detached from the input's memory map (so the shard can be unmapped) and from the other
    parts of a split W_pack (safetensors refuses tensors that share storage)."""
    return t.to(dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)


def special_ids(vocab_size: int, *files: Path) -> dict:
    """bos/eos/pad ids from HF config.json / generation_config.json (the later one wins; eos may be a list; null or a
    -1 is none, as some LLaMA configs write for pad), each an id of the vocabulary."""
    ids = {}
    for file in files:
        cfg = read_json(file, required=False)
        for kind in ("bos", "eos", "pad"):
            v = cfg.get(f"{kind}_token_id")
            if not (all(type(i) is int for i in v) if isinstance(v, list) else v is None or type(v) is int):
                fail(f"{file}: {kind}_token_id={v!r}: expected a token id, a list of them, or null")
            first = v[0] if isinstance(v, list) and v else None if isinstance(v, list) else v
            if first is not None and not -1 <= first < vocab_size:
                fail(f"{file}: {kind}_token_id={first}: not an id of the vocabulary (vocab_size {vocab_size}) nor -1")
            if first is not None and first >= 0:
                ids[f"{kind}_id"] = first
    return ids


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
        write_checkpoint(tmp, Streamed(tensors()), args, family, max_shard_bytes=max_shard_bytes)
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
    if family not in BAICHUAN and args.pos_emb != "rope":
        fail(f"{src / 'config.json'}: pos_emb={args.pos_emb!r}: a LLaMA-architecture checkpoint needs 'rope'")
    if family in BAICHUAN and args.kv_heads != args.n_heads:
        fail(f"{src / 'config.json'}: n_kv_heads={args.n_kv_heads}: Baichuan's W_pack needs multi-head attention")
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
META_IGNORED = re.compile(r"rope\.freqs")  # LLaMA 1 saved its rotary table


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


# Meta's params.json: the fields read, their types and ranges
META_PARAMS = {"dim": (int, "[1, inf)"), "n_layers": (int, "[1, inf)"), "n_heads": (int, "[1, inf)"),
               "n_kv_heads": (Optional[int], "[1, inf)"), "vocab_size": (Optional[int], "[-1, inf)"),
               "multiple_of": (int, "[1, inf)"), "ffn_dim_multiplier": (Optional[float], "(0, inf)"),
               "norm_eps": (float, "(0, 1)"), "rope_theta": (float, "(0, inf)"), "use_scaled_rope": bool}


def meta_args(params: dict, emb_shape: tuple, n_shards: int, where, max_seq_len: int) -> ModelArgs:
    """ModelArgs from Meta's params.json; vocab_size -1 means "from the tokenizer": read off the embedding, which is
    split on dim 1 (LLaMA 1/2) or dim 0 (LLaMA 3)."""
    check_json_fields(params, META_PARAMS, where, CheckpointError, required=("dim", "n_layers", "n_heads"))
    if params.get("use_scaled_rope"):
        fail(f"{where}: use_scaled_rope (LLaMA 3.1 rope scaling) is not supported")
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
    if not files:
        fail(f"{src}: no consolidated.XX.pth files")
    headers = [{k: tuple(t.shape) for k, t in load_pickle(f).items()} for f in files]  # maps dropped right away
    if "tok_embeddings.weight" not in headers[0]:
        fail(f"{files[0]}: missing tensor tok_embeddings.weight")
    args = meta_args(params, headers[0]["tok_embeddings.weight"], len(files), src / "params.json", max_seq_len)
    shapes = native_shapes(args)
    for f, names in zip(files, headers):
        missing = sorted(set(shapes) - set(names))
        if missing:
            fail(f"{f}: missing tensor {missing[0]} ({len(missing)} missing)")
        unexpected = sorted(k for k in names if k not in shapes and not META_IGNORED.fullmatch(k))
        if unexpected:
            fail(f"{f}: unexpected tensor {unexpected[0]}")

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
        write_checkpoint(tmp, Streamed(tensors()), args, "llama", max_shard_bytes=max_shard_bytes)
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
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim"):
        if getattr(base_args, field) != getattr(args, field):
            fail(f"{delta}: {field}={getattr(args, field)} but the base {base} has {getattr(base_args, field)}")
    if base_args.vocab_size > args.vocab_size:
        fail(f"{delta}: vocab_size={args.vocab_size} is smaller than the base's {base_args.vocab_size}")
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
        write_checkpoint(tmp, Streamed(tensors()), args, family, max_shard_bytes=max_shard_bytes)
        if "family" in read_json(delta / "config.json"):  # native delta: its tokenizer_config.json holds our ids
            ids = prepare.special_ids_of(delta / "tokenizer_config.json", args.vocab_size)
        else:
            ids = special_ids(args.vocab_size, delta / "config.json", delta / "generation_config.json")
        has_tokenizer = any((delta / f).exists() for f in prepare.TOKENIZER_FILES)
        write_tokenizer(delta if has_tokenizer else base, tmp, ids, template, "vicuna")
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# dcp-to-native (train.py imports dcp_to_native for its export)

# prefixes torch.compile, activation checkpointing and FSDP1 add to parameter names
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def dcp_to_native(step_dir, dst, dtype=None, overwrite=False, max_shard_bytes=None):
    """A train.py step dir (torch.distributed.checkpoint, state dict key "model", config.json and tokenizer beside
    it) -> a checkpoint dir. Runs in one process without a process group; reads the model tensors in batches of
    about one output shard, so memory stays near one shard whatever the model size. Read through dcp_load, the
    one safe way step dirs are read, after verify_step_dir (as resume does) when it has a train_state.json."""
    step = Path(step_dir)
    if Path(dst).exists() and not overwrite:
        fail(f"{dst}: exists; pass --overwrite to replace it")
    if (step / TRAIN_STATE).exists():  # a train.py step dir: every file as its manifest recorded it, as resume checks
        verify_step_dir(step)
    try:
        args, cfg = read_config(step)
        metadata = SafeDcpReader(str(step)).read_metadata()
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt .metadata surfaces as many exception types
        fail(f"{step}: not a torch.distributed.checkpoint dir ({type(e).__name__}: {e})")
    family = cfg.get("family", "llama")
    stored = {}  # native name -> (key under "model", size, dtype)
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            name = key[len("model."):]
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            stored[name] = (key[len("model."):], tuple(md.size), md.properties.dtype)
    if any(n.endswith(".lora_a") for n in stored):
        return lora_step_to_native(step, stored, args, family, dst, dtype, overwrite, max_shard_bytes)
    shapes = native_shapes(args)
    check_shapes({n: s for n, (_, s, _) in stored.items()}, shapes, step)
    batch_bytes = max_shard_bytes or parse_size(DEFAULT_SHARD)

    def batches():
        batch, size = [], 0
        for name in shapes:
            nbytes = torch.Size(stored[name][1]).numel() * stored[name][2].itemsize
            if batch and size + nbytes > batch_bytes:
                yield batch
                batch, size = [], 0
            batch.append(name)
            size += nbytes
        if batch:
            yield batch

    def tensors():
        for batch in batches():
            want = {stored[n][0]: torch.empty(stored[n][1], dtype=stored[n][2]) for n in batch}
            dcp_load({"model": want}, step)
            for n in batch:
                yield n, cast(want.pop(stored[n][0]), dtype)

    with staged(dst, overwrite, (step,)) as tmp:
        write_checkpoint(tmp, Streamed(tensors()), args, family, max_shard_bytes=max_shard_bytes,
                         extra_config={k: v for k, v in cfg.items()  # whatever else train.py recorded
                                       if k != "family" and k not in args.__dataclass_fields__})
        prepare.copy_tokenizer_files(step, tmp)
    return args, family


def lora_step_to_native(step: Path, stored: dict, args: ModelArgs, family: str, dst, dtype, overwrite,
                        max_shard_bytes):
    """A LoRA run's step dir (its adapters beside the frozen, maybe NF4, base) -> that step's adapters merged into the
    base checkpoint dir the run started from, as train.py's export does."""
    state = read_train_state(step)
    file = step / TRAIN_STATE
    base, cfg = state.get("lora_base"), state.get("config")
    if not base:
        fail(f"{file}: a LoRA run from scratch: no base checkpoint dir (lora_base) to merge its adapters into")
    if not isinstance(cfg, dict):
        fail(f"{file}: config: expected the run's config (lora_alpha, lora_dropout)")
    check_json_fields(cfg, {"lora_alpha": (float, "(0, inf)"), "lora_dropout": (float, "[0, 1)")}, f"{file}: config",
                      CheckpointError, required=("lora_alpha",))
    if not (Path(base) / "config.json").is_file():
        fail(f"{file}: lora_base={base}: the run's base checkpoint dir is not here (its adapters merge into it)")
    names = [n for n in stored if n.endswith((".lora_a", ".lora_b"))]
    want = {stored[n][0]: torch.empty(stored[n][1], dtype=stored[n][2]) for n in names}
    dcp_load({"model": want}, step)
    adapters = {n: want[stored[n][0]] for n in names}
    rank = next(t.size(0) for n, t in adapters.items() if n.endswith(".lora_a"))
    with tempfile.TemporaryDirectory() as tmp:
        write_peft_adapter(Path(tmp) / "adapter", adapters, args, family, rank=rank, alpha=cfg["lora_alpha"],
                           dropout=cfg.get("lora_dropout", 0.0), base=base)
        return merge_lora(base, Path(tmp) / "adapter", dst, dtype, overwrite, max_shard_bytes)


# --------------------------------------------------------------------------------------------------------------------
# adapter dirs: PEFT's LoRA format (train.py writes it; PeftModel.from_pretrained reads it on the HF export of the base)
# and our older native one (adapter.safetensors with our names, read only)

ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model: then HF's own module names
NATIVE_WEIGHTS = "adapter.safetensors"
# LoraConfig fields that change what an adapter computes beyond W + scale * B A, refused when set
PEFT_UNSUPPORTED = ("use_dora", "use_qalora", "lora_bias", "modules_to_save", "trainable_token_indices",
                    "layer_replication", "target_parameters", "alora_invocation_tokens", "use_bdlora", "arrow_config",
                    "kasa_config", "monteclora_config", "velora_config")
# init_lora_weights that change the base weights at initialisation: the adapter then fits a base we do not have
PEFT_BASE_CHANGING_INIT = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


class LowRank(NamedTuple):
    """The update of one native weight: W + scale * b @ a, a (rank, in), b (rows of this weight, rank)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def hf_linears(args: ModelArgs, family: str) -> dict[str, list[str]]:
    """HF linear module name (model.layers.0.self_attn.W_pack, lm_head) -> the native weights it stacks on rows."""
    shapes = native_shapes(args)
    return {hf[: -len(".weight")]: natives for hf, natives in hf_layout(args, family).items()
            if len(shapes[natives[0]]) == 2 and natives[0] != "tok_embeddings.weight"}


def native_linears(args: ModelArgs) -> dict[str, list[str]]:
    """Our adaptable module names (layers.0.attention.wq, output, the fused layers.0.attention.wqkv) -> weights."""
    out = {n[: -len(".weight")]: [n] for n, shape in native_shapes(args).items()
           if len(shape) == 2 and n != "tok_embeddings.weight"}
    for i in range(args.n_layers):
        out[f"layers.{i}.attention.wqkv"] = [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv")]
    return out


def low_rank_updates(pairs: dict, weights_of: dict[str, list[str]], rank_alpha, shapes, where, name_of) -> dict:
    """{module: {"a": A, "b": B}} -> {native weight: LowRank}, B split by rows over the weights its module stacks.
    rank_alpha(module) -> (rank, scale); name_of(module, kind) names a tensor in messages as the file does."""
    updates = {}
    for module, ab in sorted(pairs.items()):
        if len(ab) != 2:
            fail(f"{where}: {name_of(module, 'b' if 'a' in ab else 'a')} is missing (an adapter needs A and B)")
        rank, scale = rank_alpha(module)
        natives = weights_of[module]
        rows = [shapes[n][0] for n in natives]
        for kind, want in (("a", (rank, shapes[natives[0]][1])), ("b", (sum(rows), rank))):
            if tuple(ab[kind].shape) != want:
                fail(f"{where}: tensor {name_of(module, kind)} has shape {tuple(ab[kind].shape)}, the base needs "
                     f"{want} (rank {rank})")
        for n, b in zip(natives, ab["b"].split(rows)):
            if n in updates:  # e.g. a fused wqkv adapter and a wq adapter in one file
                fail(f"{where}: {n} is adapted twice ({name_of(module, 'a')} and another adapter)")
            updates[n] = LowRank(ab["a"], b, scale)
    return updates


def read_adapter(path, args: ModelArgs, family: str) -> tuple[dict[str, LowRank], dict[str, torch.Tensor]]:
    """A LoRA adapter dir, PEFT's or our older one, as updates of the base's native weights, checked against args:
    ({native weight: LowRank}, {native weight: replacement}). Replacements are full weights PEFT saves beside the
    adapters when it thinks the embedding or head may have changed; loading the adapter puts them in the base."""
    path = Path(path)
    cfg = read_json(path / ADAPTER_CONFIG)
    if "peft_type" in cfg:
        return read_peft_adapter(path, cfg, args, family)
    if "rank" in cfg and "alpha" in cfg:
        return read_native_adapter(path, cfg, args), {}
    fail(f"{path / ADAPTER_CONFIG}: peft_type: missing (expected a PEFT LoRA adapter, peft_type 'LORA')")


def read_native_adapter(path: Path, cfg: dict, args: ModelArgs) -> dict[str, LowRank]:
    """Our older adapter dirs: adapter.safetensors named as lora_state_dict, one rank and alpha."""
    for key in ("rank", "alpha"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            fail(f"{path / ADAPTER_CONFIG}: {key}: expected a positive number")
    file = path / NATIVE_WEIGHTS
    if not file.exists():
        fail(f"{file}: not found")
    weights_of, pairs = native_linears(args), {}
    for name, t in load_file(file).items():
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b") or module not in weights_of:
            fail(f"{file}: tensor {name} adapts no weight of the base")
        pairs.setdefault(module, {})[kind[-1]] = t
    return low_rank_updates(pairs, weights_of, lambda m: (cfg["rank"], cfg["alpha"] / cfg["rank"]),
                            native_shapes(args), file, lambda m, kind: f"{m}.lora_{kind}")


def peft_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in PEFT_WEIGHTS:
        if (path / name).exists():
            return path / name, load_file(path / name)  # .bin: torch.load(weights_only=True)
    fail(f"{path / PEFT_WEIGHTS[0]}: not found (nor {PEFT_WEIGHTS[1]}): the PEFT adapter has no weights")


# adapter_config.json: the fields read to select and scale the adapters, their types and ranges
PEFT_FIELDS = {"r": (int, "[1, inf)"), "lora_alpha": (float, "(0, inf)"), "use_rslora": Optional[bool],
               "target_modules": str | list | None, "exclude_modules": str | list | None,
               "layers_to_transform": int | list | None, "layers_pattern": str | list | None,
               "rank_pattern": Optional[dict], "alpha_pattern": Optional[dict]}


def check_peft_config(cfg: dict, where: Path):
    """Refuse, one field at a time, what is not a plain LoRA update W + scale * B A of linear layers, and fields of
    the wrong type: names where names go, regular expressions that compile, ranks and alphas in range."""
    if cfg.get("peft_type") != "LORA":
        fail(f"{where}: peft_type: {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    check_json_fields(cfg, PEFT_FIELDS, where, CheckpointError, required=("r", "lora_alpha"))
    for key, kind, interval in (("rank_pattern", int, "[1, inf)"), ("alpha_pattern", float, "(0, inf)")):
        for pattern, value in (cfg.get(key) or {}).items():
            regex(pattern, where, key)
            check_json_fields({pattern: value}, {pattern: (kind, interval)}, f"{where}: {key}", CheckpointError)
    for key in ("target_modules", "exclude_modules", "layers_pattern"):  # a string is a regex; a list, names
        value = cfg.get(key)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            fail(f"{where}: {key}: expected a list of module names, got {json.dumps(value)[:80]}")
        for pattern in [value] if isinstance(value, str) else value if key == "layers_pattern" and value else []:
            regex(pattern, where, key)  # layers_pattern's names go into a regex too
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, list) and not all(type(i) is int and i >= 0 for i in layers) or \
            type(layers) is int and layers < 0:
        fail(f"{where}: layers_to_transform: expected layer numbers >= 0, got {json.dumps(layers)[:80]}")
    if cfg.get("bias", "none") != "none":
        fail(f"{where}: bias: {cfg['bias']!r} is not supported (adapters with bias terms; expected 'none')")
    for key in PEFT_UNSUPPORTED:
        if cfg.get(key):
            fail(f"{where}: {key}: {cfg[key]!r} is not supported (only plain LoRA on linear layers)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(PEFT_BASE_CHANGING_INIT):
        fail(f"{where}: init_lora_weights: {init!r} changed the base weights at initialisation; save the adapter "
             f"with PEFT's path_initial_model_for_weight_conversion to get one for the original base")


def regex(pattern: str, where, key: str):
    """CheckpointError unless pattern compiles (adapter configs name modules by regular expressions)."""
    try:
        re.compile(pattern)
    except re.error as e:
        fail(f"{where}: {key}: {pattern!r} is not a regular expression ({e})")


def peft_selected(cfg: dict, modules: list[str], where: Path, family: str) -> set[str]:
    """The HF modules a LoraConfig adapts, decided as PEFT does: target_modules (a list: names or name suffixes; a
    string: a regex the whole module name must match; "all-linear": every linear but the head), exclude_modules,
    layers_to_transform (with layers_pattern)."""
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")

    def in_list(key, names):
        return key in names or any(key.endswith(f".{n}") for n in names)

    if targets == "all-linear":
        selected = {m for m in modules if m != "lm_head"}
    elif isinstance(targets, str):
        selected = {m for m in modules if re.fullmatch(targets, m)}
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        for t in targets:
            if not any(in_list(m, [t]) for m in modules):
                fail(f"{where}: target_modules: {t!r} names no linear layer of a {family} model (its linear layers: "
                     f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))})")
        selected = {m for m in modules if in_list(m, targets)}
    else:
        fail(f"{where}: target_modules: expected a list of module names or a regex string, got {targets!r}")
    if not selected:
        fail(f"{where}: target_modules: {targets!r} matches no linear layer of a {family} model")
    if exclude:
        selected = {m for m in selected if not (re.fullmatch(exclude, m) if isinstance(exclude, str)
                                                 else in_list(m, exclude))}
    layers = cfg.get("layers_to_transform")
    if layers is not None and layers != [] and (targets == "all-linear" or not isinstance(targets, str)):
        layers = [layers] if isinstance(layers, int) else layers
        patterns = cfg.get("layers_pattern") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns

        def index(m):
            found = ([re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", m) for p in patterns]
                     or [re.match(r".*?\.[^.]*\.(\d+)\.", m)])
            return next((int(f[1]) for f in found if f), None)

        # a module named in full (lm_head) is taken whatever its layer, as PEFT does
        selected = {m for m in selected if index(m) in layers or (isinstance(targets, list) and m in targets)}
    return selected


def peft_rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of one module: rank_pattern / alpha_pattern keys are regexes matched against the end of the
    module name, the first that matches wins; scale = alpha / rank, or alpha / sqrt(rank) with use_rslora."""
    def pattern_value(patterns, default):
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        return patterns[key] if key is not None else default

    rank = pattern_value(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
    return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_peft_adapter(path: Path, cfg: dict, args: ModelArgs, family: str) -> tuple[dict, dict]:
    """PEFT's adapter_config.json + adapter_model.safetensors (or .bin): lora_A (r, in) and lora_B (out, r) per HF
    module. Baichuan's W_pack update B A is split by rows into wq, wk, wv. fan_in_fan_out only says the stored base is
    transposed (GPT-2's Conv1D); PEFT turns it off for nn.Linear, which every linear of these families is, so the
    update of the (out, in) weight is B A either way."""
    where = path / ADAPTER_CONFIG
    check_peft_config(cfg, where)
    file, tensors = peft_weights(path)
    linears = hf_linears(args, family)
    pairs = {}
    for name, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", name)
        if m is None:
            if name.startswith(PEFT_PREFIX) and name.endswith(".weight") and "lora_" not in name:
                continue  # a full weight saved beside the adapters: peft_replacements
            fail(f"{file}: tensor {name} is not a LoRA weight (expected {PEFT_PREFIX}<module>.lora_A.weight / "
                 "lora_B.weight)")
        if m[1] not in linears:
            fail(f"{file}: tensor {name} adapts {m[1]}, which is no linear layer of the {family} base "
                 f"({args.n_layers} layers)")
        pairs.setdefault(m[1], {})[m[2].lower()] = t
    selected = peft_selected(cfg, list(linears), where, family)
    if set(pairs) != selected:
        odd = sorted(set(pairs) ^ selected)[0]
        fail(f"{file}: {odd} is {'adapted in the weights but not in' if odd in pairs else 'missing, but selected by'} "
             f"{ADAPTER_CONFIG}'s target_modules")
    updates = low_rank_updates(pairs, linears, lambda m: peft_rank_alpha(cfg, m), native_shapes(args), file,
                               lambda m, kind: f"{PEFT_PREFIX}{m}.lora_{kind.upper()}.weight")
    return updates, peft_replacements(file, tensors, args, family)


def peft_replacements(file: Path, tensors: dict, args: ModelArgs, family: str) -> dict[str, torch.Tensor]:
    """Full weights in a PEFT adapter file (lm_head.base_layer.weight, model.embed_tokens.weight): as loaded by PEFT,
    they replace the base's. Their shapes must be the base's (a resized vocabulary is not supported)."""
    layout, shapes = hf_layout(args, family), native_shapes(args)
    out = {}
    for name, t in tensors.items():
        if "lora_" in name or not name.startswith(PEFT_PREFIX):
            continue
        hf = name[len(PEFT_PREFIX):].replace(".base_layer.", ".")
        if hf not in layout:
            fail(f"{file}: tensor {name} is no weight of the {family} base")
        natives = layout[hf]
        want = stacked_shape([shapes[n] for n in natives])
        if tuple(t.shape) != want:
            fail(f"{file}: tensor {name} has shape {tuple(t.shape)}, the base's {hf} has {want}")
        out.update(zip(natives, t.split([shapes[n][0] for n in natives])))
    return out


def write_peft_adapter(path, tensors: dict[str, torch.Tensor], args: ModelArgs, family: str, *, rank: int,
                       alpha: float, dropout: float, base=None, metadata=None):
    """Our adapters (lora_state_dict's names) as a PEFT LoRA adapter for the HF export of the base (native-to-hf),
    so that PeftModel.from_pretrained(<that export>, path) computes what our model with the adapters computes.

    The update of every native weight goes to the HF module holding it. A fused wqkv adapter becomes Baichuan's
    W_pack adapter as it is, or on a LLaMA-family model q_proj / k_proj / v_proj adapters sharing its A. Separate
    wq / wk / wv adapters of a Baichuan model become one W_pack adapter of rank 3r (r per part adapted): A stacks
    their A, B is block-diagonal, so B A stacks their updates; rank_pattern / alpha_pattern (alpha 3 alpha) keep the
    scale alpha / r. metadata (strings) goes into the safetensors header, where PEFT does not look."""
    from safetensors.torch import save_file

    weights_of, shapes = native_linears(args), native_shapes(args)
    parts, pairs = {}, {}  # native weight -> (A, rows of B, adapter it came from)
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b") or module not in weights_of:
            fail(f"adapter: tensor {name} adapts no weight of the model")
        pairs.setdefault(module, {})[kind[-1]] = t.detach().float().cpu()
    for module, ab in pairs.items():
        natives = weights_of[module]
        for n, b in zip(natives, ab["b"].split([shapes[n][0] for n in natives])):
            parts[n] = (ab["a"], b, module)
    out, ranks = {}, {}
    for hf_module, natives in hf_linears(args, family).items():
        present = [parts.get(n) for n in natives]
        if not any(present):
            continue
        if all(present) and len({p[2] for p in present}) == 1:  # one adapter covers the module: A shared
            a, b = present[0][0], torch.cat([p[1] for p in present])
        else:  # separate adapters on parts of W_pack: stacked A, block-diagonal B
            a = torch.cat([p[0] for p in present if p])
            b = torch.zeros(sum(shapes[n][0] for n in natives), a.size(0))
            row = col = 0
            for n, p in zip(natives, present):
                if p:
                    b[row: row + p[1].size(0), col: col + p[0].size(0)] = p[1]
                    col += p[0].size(0)
                row += shapes[n][0]
        # own copies: safetensors refuses tensors sharing memory (a fused A on three LLaMA modules, B's row blocks)
        out[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = a.clone(memory_format=torch.contiguous_format)
        out[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = b.clone(memory_format=torch.contiguous_format)
        ranks[hf_module] = a.size(0)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base and str(base),
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
              "target_modules": sorted(module_patterns({m: True for m in ranks}, hf_linears(args, family))),
              "rank_pattern": module_patterns({m: r for m, r in ranks.items() if r != rank}, ranks),
              "alpha_pattern": module_patterns({m: alpha * r / rank for m, r in ranks.items() if r != rank}, ranks)}
    with staged(path, True, need=sum(t.numel() * t.element_size() for t in out.values())) as tmp:
        save_file(out, str(tmp / PEFT_WEIGHTS[0]), metadata={"format": "pt", **(metadata or {})})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def module_patterns(values: dict[str, object], modules) -> dict[str, object]:
    """PEFT's module keys for {HF module: value}: the short name (q_proj) where every one of modules with that name
    has the same value, else the full names."""
    by_short, out = {}, {}
    for m in modules:
        by_short.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    for short, group in sorted(by_short.items()):
        got = {values[m] for m in group if m in values}
        if len(got) == 1 and all(m in values for m in group):
            out[short] = got.pop()
        else:
            out.update({m: values[m] for m in group if m in values})
    return out


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
        write_checkpoint(tmp, Streamed(tensors()), args, family, max_shard_bytes=max_shard_bytes)
        prepare.copy_tokenizer_files(src, tmp)
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# step dirs: train.py's checkpoints, out_dir/step_XXXXXXXX
#
#     .metadata, *.distcp     torch.distributed.checkpoint of {"model": ..., "optim": ...} (names as in model.py)
#     rng_rank{r}.json        each rank's torch (and accelerator) RNG state
#     config.json             ModelArgs fields + "family", as in a checkpoint dir (dcp_to_native exports from it)
#     tokenizer files         copied from the data dir
#     train_state.json        written last: step, counters, data position, config, and "files": {name: {"size",
#                             "sha256"}} of every other file; a dir without it is never taken as complete
# Written under .tmp_step_XXXXXXXX and renamed when complete; removed by renaming to .old_step_XXXXXXXX first. Every
# step-dir function takes the processes writing or reading together as a Ranks (one process: the default), so the
# format knows no process group. Errors are CheckpointError.

STEP_DIR = re.compile(r"step_(\d{8})$")
TRAIN_STATE = "train_state.json"
# train_state.json's fields (train.py's checkpoint() writes them), their types and ranges: checked wherever present;
# a resume needs RESUME_FIELDS too
TRAIN_STATE_FIELDS = {"step": (int, "[0, 2**63)"), "files": dict, "best_val_loss": Optional[float],
                      "lora_base": Optional[str], "loss_scaler.scale": (float, "(0, inf)"),
                      "loss_scaler.good_steps": (int, "[0, inf)"), "loss_scaler.skipped": (int, "[0, inf)"),
                      "data.seed": (int, "[0, 2**63)"), "data.epoch": (int, "[0, inf)"),
                      "data.index": (int, "[0, inf)")}
RESUME_FIELDS = ("step", *(k for k in TRAIN_STATE_FIELDS if "." in k))
# what to do when a step dir does not fit: keep_last step dirs stay while the next is written beside them
ROOM_ADVICE = ("free space, or keep fewer step dirs (keep_last={}: a save writes the next beside them before the "
               "oldest goes)")


@dataclass(frozen=True)
class Ranks:
    """The processes that write or read a step dir together: this one's rank, how many, and their collectives
    (train.py passes its process group's barrier and all_gather_object)."""
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    all_gather: Callable[[object], list] = lambda obj: [obj]


def rng_file(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / f"rng_rank{rank}.json"


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns on every save/load without a process group: in one process that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def file_digest(path: Path, sync: bool = False) -> dict:
    """{"size", "sha256"} of a file; sync also fsyncs it, so what the digest describes is on disk."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def fsync_dir(path: Path):
    """Make a rename or a new file in path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(out_dir: Path) -> list[Path]:
    """Complete step dirs, oldest first (temporary names never match)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if STEP_DIR.match(p.name) and (p / TRAIN_STATE).exists()]
    return sorted(found, key=lambda p: p.name)


def remove_step_dir(step_dir: Path):
    """Renamed out of the step_XXXXXXXX namespace first, so a crash halfway through the delete leaves no half dir
    that looks complete (remove_unfinished_step_dirs removes the leftovers)."""
    doomed = step_dir.with_name(f".old_{step_dir.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    step_dir.rename(doomed)
    shutil.rmtree(doomed)


def remove_unfinished_step_dirs(out_dir: Path):
    """What a run killed while saving or pruning left: temporary and half-deleted step dirs."""
    for p in [*Path(out_dir).glob(".tmp_step_*"), *Path(out_dir).glob(".old_step_*")]:
        shutil.rmtree(p, ignore_errors=True)


def write_step_dir(out_dir: Path, step: int, dcp_state: dict, rng: dict, config: dict, train_state: dict, *,
                   tokenizer_dir=None, keep_last: int = 0, ranks: Ranks = Ranks(), on_event=None,
                   need: Optional[int] = None) -> Path:
    """Write out_dir/step_XXXXXXXX: every file into a temporary dir, then the size and sha256 of each into
    train_state.json, which is written last; then one rename, then keep_last pruning (0 keeps all). A crash at any
    point leaves either the previous step dirs alone or this one complete. Every rank calls it with its own DCP
    shards and RNG; rank 0 writes config, tokenizer and manifest. on_event(name, step) is called at "save" (files
    written, not renamed) and "saved" (renamed, not pruned). A full disk or a lost mount: CheckpointError naming
    the last complete step dir (a full disk: with the bytes the step dir needs, `need` or the newest one's, and
    the bytes free)."""
    final, tmp = Path(out_dir) / f"step_{step:08d}", Path(out_dir) / f".tmp_step_{step:08d}"
    bad = [e for e in ranks.all_gather(_finite_or_why(dcp_state.get("model", {}), final)) if e]
    if bad:  # every rank refuses together
        last = last_good_step_dir(out_dir)
        fail(f"{bad[0]}; " + (f"the last good checkpoint is {last}" if last else "no good checkpoint was written"))
    try:
        _write_step_files(tmp, dcp_state, rng, config, tokenizer_dir, ranks)
        if on_event:
            on_event("save", step)
        # each rank hashes (and fsyncs) a share of the files; the manifest goes into train_state.json
        names = sorted(p.name for p in tmp.iterdir())
        mine = {n: file_digest(tmp / n, sync=True) for n in names[ranks.rank::ranks.world_size]}
        manifest = {k: v for part in ranks.all_gather(mine) for k, v in part.items()}
        if ranks.rank == 0:
            _publish_step_dir(tmp, final, {**train_state, "files": manifest})
            if on_event:
                on_event("saved", step)
            shutil.rmtree(final.with_name(f".old_{final.name}"), ignore_errors=True)
            for old in step_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
                remove_step_dir(old)
    except (OSError, dcp.api.CheckpointException) as e:
        full = diskspace.is_full(e, tmp)  # before the partial dir goes: a writer may only have left it no room
        if isinstance(e, dcp.api.CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        shutil.rmtree(tmp, ignore_errors=True)
        last = last_good_step_dir(out_dir)
        newest = step_dirs(out_dir)
        why = (diskspace.message(final, need or (diskspace.tree_bytes(newest[-1]) if newest else None),
                                 diskspace.free_bytes(out_dir), diskspace.mount_of(out_dir),
                                 ROOM_ADVICE.format(keep_last)) if full else
               f"{tmp}: writing the checkpoint failed ({type(e).__name__}: {(str(e) or '?').splitlines()[0]})")
        raise CheckpointError(why + "; " + (f"the last good checkpoint is {last}" if last else
                                            "no good checkpoint was written")) from None
    ranks.barrier()
    return final


def _finite_or_why(model_state: dict, where) -> Optional[str]:
    try:
        check_finite(model_state, where)
    except CheckpointError as e:
        return str(e)
    return None


def last_good_step_dir(out_dir) -> Optional[Path]:
    """The newest step dir of out_dir that verifies against its manifest (its weights were finite when written: no
    other is ever written), or None: what "the last good checkpoint" names."""
    return newest_step_dir(out_dir, verify_step_dir)[0]


def newest_step_dir(out_dir, read) -> tuple[Optional[Path], object]:
    """(the newest step dir of out_dir that read(step_dir) reads without a CheckpointError, what read returned), or
    (None, None)."""
    for step_dir in reversed(step_dirs(out_dir)):
        try:
            return step_dir, read(step_dir)
        except CheckpointError:
            continue
    return None, None


def _write_step_files(tmp: Path, dcp_state: dict, rng: dict, config: dict, tokenizer_dir, ranks: Ranks):
    if ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    with quiet_dcp():
        dcp.save(dcp_state, checkpoint_id=tmp, no_dist=ranks.world_size == 1)
    rng_file(tmp, ranks.rank).write_text(json.dumps(rng))
    if ranks.rank == 0:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_dir:
            prepare.copy_tokenizer_files(tokenizer_dir, tmp)
    ranks.barrier()


def _publish_step_dir(tmp: Path, final: Path, train_state: dict):
    """train_state.json last, then the rename that makes the step dir complete; durable at each step."""
    with open(tmp / TRAIN_STATE, "w") as f:
        f.write(json.dumps(train_state, indent=2))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a rerun of this step (after a resume): the old one goes once the new one is in place
        final.rename(final.with_name(f".old_{final.name}"))
    os.rename(tmp, final)
    fsync_dir(final.parent)


def read_train_state(step_dir: Path, required=("step",)) -> dict:
    """train_state.json of a step dir: a JSON object with the step (and the other fields in required), every field of
    TRAIN_STATE_FIELDS of its type and range, and a manifest whose every entry is a plain file name of the step dir
    (never a path out of it) with its size and sha256. CheckpointError names what is wrong."""
    file = Path(step_dir) / TRAIN_STATE
    state = load_json(file, CheckpointError)
    check_json_fields(state, TRAIN_STATE_FIELDS, file, CheckpointError, required=required)
    named = STEP_DIR.match(Path(step_dir).name)
    if named and int(named[1]) != state["step"]:
        fail(f"{file}: step={state['step']}, but the dir is {Path(step_dir).name}")
    for name, want in state.get("files", {}).items():
        if name in ("", ".", "..") or name != Path(name).name or "\0" in name:
            fail(f"{file}: files: {name!r}: expected a file name in {step_dir} (no directories)")
        if not isinstance(want, dict):
            fail(f"{file}: files: {name}: expected an object with size and sha256, got {json.dumps(want)[:60]}")
        check_json_fields(want, {"size": (int, "[0, inf)"), "sha256": str}, f"{file}: files: {name}",
                          CheckpointError, required=("size", "sha256"))
        if not re.fullmatch(r"[0-9a-f]{64}", want["sha256"]):
            fail(f"{file}: files: {name}: sha256={want['sha256']!r}: expected 64 hex digits")
    return state


def verify_step_dir(step_dir: Path, ranks: Ranks = Ranks(), required=("step",)) -> dict:
    """train_state.json of a step dir (read_train_state) whose files all have the size and sha256 recorded when it
    was written; else CheckpointError naming the file and what is wrong. Each rank hashes a share; every rank gets the
    same verdict."""
    state = read_train_state(step_dir, required)
    manifest = state.get("files", {})  # step dirs written before manifests have none: nothing to check against
    problems = []
    for name in sorted(manifest)[ranks.rank::ranks.world_size]:
        path, want = Path(step_dir) / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {want['size']} (truncated?)")
        elif file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the one recorded when it was written (corrupted)")
    problems = [p for part in ranks.all_gather(problems) for p in part]
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return state


def read_step_dir(step_dir: Path, dcp_state: dict, rank: int = 0, no_dist: bool = True) -> tuple[dict, dict | None]:
    """Load a step dir's DCP entries into dcp_state (in place, resharded by DCP to whatever shards it holds, safely:
    dcp_load) -> (train_state, this rank's RNG state or None when the saving run had no such rank)."""
    dcp_load(dcp_state, step_dir, no_dist=no_dist)
    rng, file = None, rng_file(step_dir, rank)
    if file.exists():  # {"torch": [state bytes], "device": [...]}: lists of bytes
        rng = load_json(file, CheckpointError)
        for key in ("torch", *(["device"] if "device" in rng else [])):
            if not (isinstance(rng.get(key), list) and all(type(b) is int and 0 <= b < 256 for b in rng[key])):
                fail(f"{file}: {key}: expected a list of bytes (integers 0..255), got {json.dumps(rng.get(key))[:60]}")
    return read_train_state(step_dir), rng


class SafeDcpReader(dcp.FileSystemReader):
    """DCP reads .metadata with a bare pickle.load; this reader first reads it with the allow-list unpickler
    (check_dcp_metadata), so a crafted .metadata is refused before anything of it runs."""

    def read_metadata(self, *args, **kwargs):
        check_dcp_metadata(self.path)
        return super().read_metadata(*args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's own planner unpickles a checkpoint's non-tensor entries (optimiser hyper-parameters) with
    weights_only=False, which runs whatever code a crafted file holds; this one reads plain data only."""

    def load_bytes(self, read_item, value):
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"entry {fqn}: refused to unpickle: it holds more than plain data and could run "
                                  f"code (weights_only=True)") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict, step_dir: Path, no_dist: bool = True):
    """dcp.load, safe on untrusted files (SafeDcpReader, SafeLoadPlanner): the one way step dirs are read, by
    train.py and dcp_to_native. CheckpointError says what failed."""
    check_dcp_metadata(step_dir)  # before DCP's collectives: every rank refuses the same file the same way
    try:
        with quiet_dcp():
            dcp.load(state, storage_reader=SafeDcpReader(str(step_dir)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, dcp.api.CheckpointException) as e:  # CheckpointException wraps each rank's error
        if isinstance(e, dcp.api.CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        why = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
        raise CheckpointError(f"{step_dir}: cannot be loaded: {why}") from None



# --------------------------------------------------------------------------------------------------------------------
# other tools' checkpoint formats: the reading and writing live in support/ (ascendspeed.py, flagai.py)


def copy_beside(src: Path, dst: Path):
    """Our config.json and the tokenizer files of a checkpoint dir, copied as they are."""
    for f in ("config.json", "tokenizer_config.json", *prepare.TOKENIZER_FILES):
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)


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
        write_checkpoint(tmp, Streamed((n, own(t, dtype)) for n, t in tensors.items()), args, family,
                         max_shard_bytes=max_shard_bytes)
        copy_beside(like, tmp)
        (tmp / "config.json").write_text(json.dumps({**asdict(args), "family": family}, indent=2))
    return args, family


def flagai_to_native(src: Path, dst, dtype=None, template=None, overwrite=False, max_shard_bytes=None) -> ModelArgs:
    """FlagAI's Aquila dir (support/flagai.py): Meta's tensor names with interleaved rotary pairs; family aquila."""
    args = flagai.flagai_args(read_json(src / "config.json"), src / "config.json")
    sd = flagai.load_weights(src)
    check_shapes({n: t.shape for n, t in sd.items()}, native_shapes(args), src / flagai.WEIGHTS, flagai.ignored)
    tensors = ((n, own(t, dtype)) for n, t in flagai.native_tensors(sd, args, meta_to_rotate_half)
               if not flagai.ignored(n))
    with staged(dst, overwrite, (src,)) as tmp:
        write_checkpoint(tmp, Streamed(tensors), args, "aquila", max_shard_bytes=max_shard_bytes)
        write_tokenizer(src, tmp, {}, template, family_template("aquila"))
    return args


def native_to_ascendspeed(src, dst, tp=1, pp=1, divisible_by=128, merge_mlp=True, deepspeed=False, dtype=None,
                          overwrite=False):
    src = Path(src)
    args, family, _ = open_checkpoint_dir(src)
    tensors = {n: cast(t, dtype) for n, t in load_tensors(src).items()}
    with staged(dst, overwrite, (src,)) as tmp:
        ascendspeed.write(tmp, ascendspeed.rank_models(tensors, args, tp, pp, divisible_by, merge_mlp), pp, deepspeed)
        copy_beside(src, tmp)
    return args, family


# --------------------------------------------------------------------------------------------------------------------
# command line


# --------------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp, ollama): the format is support/gguf.py's


def native_to_gguf(src, dst, qtype="f16", overwrite=False):
    """A checkpoint dir as one GGUF file, written beside dst and renamed to it when complete."""
    from support import gguf

    src, dst = Path(src), Path(dst)
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
    if dst.exists() and not overwrite:
        fail(f"--dst {dst}: exists (--overwrite replaces it)")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    # a full disk says about how much the file needs: bytes per value of its type (blocks of 32 with a 2-byte scale)
    need = sum(math.prod(s) for s in native_shapes(args).values()) * {"f32": 4, "f16": 2, "q8_0": 34 / 32,
                                                                      "q4_0": 18 / 32}.get(qtype, 4)
    try:
        with diskspace.reported(dst, tmp, int(need), CheckpointError):
            gguf.write_gguf(tmp, args, family, native_shapes(args), source.get, fields, qtype)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return args, family


def gguf_to_native(src, dst, dtype=None, overwrite=False, max_shard_bytes=None):
    """A GGUF file of the llama or baichuan architecture (ours, or llama.cpp's converter's) as a checkpoint dir:
    weights dequantised to fp32 (or --dtype), the tokenizer as the file describes it."""
    from support import gguf

    src = Path(src)
    args, family, fields, tensors = gguf.read_gguf(src)
    with staged(dst, overwrite, (src,)) as tmp:
        write_checkpoint(tmp, Streamed((name, cast(t, dtype)) for name, t in tensors), args, family,
                         max_shard_bytes=max_shard_bytes)
        if "tokenizer.ggml.tokens" not in fields:
            print(f"convert.py: warning: {src}: no tokenizer; add one to the output dir before sampling",
                  file=sys.stderr)
            return args, family
        gguf.write_tokenizer(fields, tmp)
        key = lambda name, default=None: fields.get(f"tokenizer.ggml.{name}", default)  # noqa: E731
        template = fields.get("nanollama.chat_template") or fields.get("tokenizer.chat_template")
        config = {"bos_id": key("bos_token_id"), "eos_id": key("eos_token_id"),
                  "pad_id": key("padding_token_id", key("eos_token_id")),
                  "add_bos_token": bool(key("add_bos_token", key("model") == "llama")),
                  "add_eos_token": bool(key("add_eos_token", False)),
                  "chat_template": template or family_template(family)}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return args, family


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", s.upper())
    n = int(float(m[1]) * 1024 ** " KMGT".index(m[2] or " ")) if m else 0
    if n < 1:
        fail(f"--max_shard_size={s}: expected a size of at least one byte, such as 500MB or 2GB")
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dst", required=True, help="output dir (refused if it exists, unless --overwrite)")
    common.add_argument("--dtype", choices=DTYPES, default=None, help="output dtype (default: as stored)")
    common.add_argument("--max_shard_size", default=DEFAULT_SHARD, help="output shard size (default %(default)s)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    template = argparse.ArgumentParser(add_help=False)
    template.add_argument("--template", default=None, help="chat template name for tokenizer_config.json "
                                                           "(default: the model's own Jinja chat_template, else the "
                                                           "family's; e.g. vicuna)")

    s = sub.add_parser("hf-to-native", parents=[common, template], help="Hugging Face dir -> checkpoint dir")
    s.add_argument("--src", required=True, help="HF dir: config.json + safetensors or .bin (sharded or not)")
    s.add_argument("--family", choices=list(FAMILIES), default=None, help="override the family read from config.json")
    s.add_argument("--for_training", action="store_true", help=argparse.SUPPRESS)  # older recipes': does nothing
    s = sub.add_parser("native-to-hf", parents=[common], help="checkpoint dir -> Hugging Face dir")
    s.add_argument("--src", required=True, help="checkpoint dir")
    s = sub.add_parser("meta-to-native", parents=[common, template], help="Meta consolidated.XX.pth -> checkpoint dir")
    s.add_argument("--src", required=True, help="dir with params.json and consolidated.XX.pth")
    s.add_argument("--max_seq_len", type=int, default=2048, help="context length (params.json does not say)")
    s = sub.add_parser("apply-delta", parents=[common, template], help="base + Vicuna-style delta -> checkpoint dir")
    s.add_argument("--src", required=True, help="base weights (HF dir or checkpoint dir)")
    s.add_argument("--delta", required=True, help="delta weights (HF dir or checkpoint dir)")
    s = sub.add_parser("dcp-to-native", parents=[common], help="train.py step dir -> checkpoint dir")
    s.add_argument("--src", required=True, help="out_dir/step_XXXXXXXX")
    s = sub.add_parser("gguf-to-native", parents=[common], help="GGUF file (llama, baichuan) -> checkpoint dir")
    s.add_argument("--src", required=True, help="a .gguf file")
    s = sub.add_parser("native-to-gguf", help="checkpoint dir -> GGUF file (llama.cpp, ollama)")
    s.add_argument("--src", required=True, help="checkpoint dir")
    s.add_argument("--dst", required=True, help="the .gguf file to write (refused if it exists, unless --overwrite)")
    s.add_argument("--type", choices=("f32", "f16", "q8_0", "q4_0"), default="f16",
                   help="weight type (default %(default)s, as llama.cpp's converter); norms stay f32, and q4_0 "
                        "keeps the output layer at q8_0")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    s = sub.add_parser("merge-lora", parents=[common], help="base checkpoint dir + LoRA adapter dir -> checkpoint dir")
    s.add_argument("--src", required=True, help="the base checkpoint dir the adapters were trained on")
    s.add_argument("--adapter", required=True, help="LoRA adapter dir: PEFT's (adapter_config.json + "
                   "adapter_model.safetensors or .bin; train.py writes it) or our older adapter.safetensors")
    s = sub.add_parser("ascendspeed-to-native", parents=[common],
                       help="AscendSpeed (Megatron) checkpoint, any tp/pp -> checkpoint dir")
    s.add_argument("--src", required=True, help="AscendSpeed --save/--load dir, or its release/ or iter_XXXXXXX/")
    s.add_argument("--like", help="checkpoint dir giving the architecture (config.json) and tokenizer (default: the "
                                  "config.json native-to-ascendspeed left in --src)")
    s = sub.add_parser("native-to-ascendspeed", parents=[common],
                       help="checkpoint dir -> AscendSpeed release checkpoint (its converter's layout)")
    s.add_argument("--src", required=True, help="checkpoint dir")
    s.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size of the AscendSpeed run")
    s.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size of the AscendSpeed run")
    s.add_argument("--make_vocab_size_divisible_by", type=int, default=128, help="as the run's flag (default 128)")
    s.add_argument("--no_merge_mlp", action="store_true", help="gate_proj + dense_h_to_4h instead of mlp.proj (for "
                                                               "runs without --mlp-layer-fusion)")
    s.add_argument("--deepspeed", action="store_true", help="DeepSpeed's layout (latest, mp_rank_XX_model_states.pt), "
                                                            "for scripts run with --deepspeed")
    a = p.parse_args(argv)

    try:
        inputs = [getattr(a, flag) for flag in ("src", "delta", "adapter", "like") if getattr(a, flag, None)]
        if a.command == "gguf-to-native" and not Path(a.src).is_file():
            fail(f"--src={a.src}: not a file")
        for flag in ("src", "delta", "adapter", "like"):
            if getattr(a, flag, None) and not Path(getattr(a, flag)).is_dir() and a.command != "gguf-to-native":
                fail(f"--{flag}={getattr(a, flag)}: not a directory")
        if a.command == "native-to-gguf":
            if Path(a.dst).is_dir():
                fail(f"--dst {a.dst}: a directory; name the .gguf file to write")
            if Path(a.src).resolve() in Path(a.dst).resolve().parents:
                fail(f"--dst {a.dst} lies inside the input {a.src}: the output would mix with it")
            args, family = native_to_gguf(a.src, a.dst, a.type, a.overwrite)
            print(f"convert.py: wrote {a.dst} ({family}, {args.n_layers} layers, dim {args.dim}, {a.type})",
                  file=sys.stderr)
            return
        kw = dict(dtype=DTYPES.get(a.dtype), overwrite=a.overwrite, max_shard_bytes=parse_size(a.max_shard_size))
        check_output(a.dst, inputs, "--dst", CheckpointError)  # before any reading: never the input, nor in it
        if a.command == "meta-to-native":
            field = ModelArgs.__dataclass_fields__["max_seq_len"]  # the range ModelArgs declares for it
            try:
                check_value("max_seq_len", a.max_seq_len, int, field.metadata["range"])
            except ValueError as e:
                fail(f"--{e}")
        if a.command == "hf-to-native":
            if a.for_training:
                print("convert.py: --for_training is no longer needed and does nothing: a Baichuan2 checkpoint always "
                      "keeps its raw NormHead (norm_head=true)", file=sys.stderr)
            args, family = hf_to_native(a.src, a.dst, a.family, template=a.template, **kw)
        elif a.command == "native-to-hf":
            args, family = native_to_hf(a.src, a.dst, **kw)
        elif a.command == "meta-to-native":
            args = meta_to_native(a.src, a.dst, max_seq_len=a.max_seq_len, template=a.template, **kw)
            family = "llama"
        elif a.command == "apply-delta":
            args, family = apply_delta(a.src, a.delta, a.dst, template=a.template, **kw)
        elif a.command == "merge-lora":
            args, family = merge_lora(a.src, a.adapter, a.dst, **kw)
        elif a.command == "ascendspeed-to-native":
            args, family = ascendspeed_to_native(a.src, a.dst, a.like, **kw)
        elif a.command == "native-to-ascendspeed":
            for flag in ("tp", "pp", "make_vocab_size_divisible_by"):
                if getattr(a, flag) < 1:
                    fail(f"--{flag}={getattr(a, flag)}: expected a positive integer")
            kw.pop("max_shard_bytes")
            args, family = native_to_ascendspeed(a.src, a.dst, a.tp, a.pp, a.make_vocab_size_divisible_by,
                                                 not a.no_merge_mlp, a.deepspeed, **kw)
        elif a.command == "gguf-to-native":
            args, family = gguf_to_native(a.src, a.dst, **kw)
        else:
            args, family = dcp_to_native(a.src, a.dst, **kw)
    except CheckpointError as e:  # every problem, said in one line
        raise SystemExit(f"convert.py: {e}") from None
    print(f"convert.py: wrote {a.dst} ({family}, {args.n_layers} layers, dim {args.dim}, {args.pos_emb})",
          file=sys.stderr)


if __name__ == "__main__":
    with prepare.errors_as("convert.py"):
        main()
