"""support/convert_checks.py: convert.py's checks of the files it reads. Used by convert.py (HF's config.json and
generation_config.json, Meta's params.json and consolidated.XX.pth, a delta against its base); what it adds: every
field convert.py reads of those files checked for its type and range, the architectures and features the model
cannot compute refused (biases, an activation other than SiLU, scaled RoPE, an odd head_dim). Each problem is one
CheckpointError naming the file and the field, which convert.py's main says in one line.
"""

import re
from pathlib import Path
from typing import Optional

from model import FAMILIES, CheckpointError, ModelArgs
from support.hf_names import family_of_hf_config
from support.checks import check_json_fields, load_json
from support.hf_names import BAICHUAN


def fail(msg):
    raise CheckpointError(msg)


def read_json(file: Path, required=True) -> dict:
    """A JSON object file, checked as support.checks.load_json checks one; {} for an absent one that is not required."""
    if not required and not file.exists():
        return {}
    return load_json(file, CheckpointError)


# --------------------------------------------------------------------------------------------------------------------
# HF config.json

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


def check_hf_args(cfg: dict, where):
    """What convert.hf_args reads of an HF config.json is there and is what our model computes."""
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
    for key in ("num_hidden_layers", "vocab_size", "intermediate_size"):
        need(key)


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


def check_delta(base_args: ModelArgs, args: ModelArgs, base: Path, delta: Path):
    """A delta of the base's architecture; its vocabulary may only grow (added tokens)."""
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim"):
        if getattr(base_args, field) != getattr(args, field):
            fail(f"{delta}: {field}={getattr(args, field)} but the base {base} has {getattr(base_args, field)}")
    if base_args.vocab_size > args.vocab_size:
        fail(f"{delta}: vocab_size={args.vocab_size} is smaller than the base's {base_args.vocab_size}")


def check_hf_exportable(args: ModelArgs, family: str, where):
    """A checkpoint HF's LLaMA (RoPE) or Baichuan (W_pack: multi-head attention) modeling code computes."""
    if family not in BAICHUAN and args.pos_emb != "rope":
        fail(f"{where}: pos_emb={args.pos_emb!r}: a LLaMA-architecture checkpoint needs 'rope'")
    if family in BAICHUAN and args.kv_heads != args.n_heads:
        fail(f"{where}: n_kv_heads={args.n_kv_heads}: Baichuan's W_pack needs multi-head attention")


# --------------------------------------------------------------------------------------------------------------------
# Meta's params.json and consolidated.XX.pth

# Meta's params.json: the fields read, their types and ranges
META_PARAMS = {"dim": (int, "[1, inf)"), "n_layers": (int, "[1, inf)"), "n_heads": (int, "[1, inf)"),
               "n_kv_heads": (Optional[int], "[1, inf)"), "vocab_size": (Optional[int], "[-1, inf)"),
               "multiple_of": (int, "[1, inf)"), "ffn_dim_multiplier": (Optional[float], "(0, inf)"),
               "norm_eps": (float, "(0, 1)"), "rope_theta": (float, "(0, inf)"), "use_scaled_rope": bool}
META_IGNORED = re.compile(r"rope\.freqs")  # LLaMA 1 saved its rotary table


def check_meta_params(params: dict, where):
    check_json_fields(params, META_PARAMS, where, CheckpointError, required=("dim", "n_layers", "n_heads"))
    if params.get("use_scaled_rope"):
        fail(f"{where}: use_scaled_rope (LLaMA 3.1 rope scaling) is not supported")


def check_meta_shards(src: Path, files: list[Path], headers: list[dict]):
    """consolidated.XX.pth files there, the first with a tok_embeddings.weight (its shape says the vocabulary)."""
    if not files:
        fail(f"{src}: no consolidated.XX.pth files")
    if "tok_embeddings.weight" not in headers[0]:
        fail(f"{files[0]}: missing tensor tok_embeddings.weight")


def check_meta_names(files: list[Path], headers: list[dict], shapes: dict):
    """Each shard holds a piece of every tensor of the model and nothing else."""
    for f, names in zip(files, headers):
        missing = sorted(set(shapes) - set(names))
        if missing:
            fail(f"{f}: missing tensor {missing[0]} ({len(missing)} missing)")
        unexpected = sorted(k for k in names if k not in shapes and not META_IGNORED.fullmatch(k))
        if unexpected:
            fail(f"{f}: unexpected tensor {unexpected[0]}")
