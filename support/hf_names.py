"""Used by convert.py (hf-to-native, native-to-hf, apply-delta), support/peft.py (PEFT names its adapters after HF's
modules) and bench.py (--compare loads our weights into transformers' LLaMA): Hugging Face's tensor names for ours,
one table read in both directions.

What it adds: which HF tensor holds which of our tensors, per family (Baichuan's W_pack stacks wq, wk, wv on rows),
the shape of every tensor of our model, read off model.py itself, and which family an HF config.json describes
(family_of_hf_config, by model.FAMILIES; convert.py hf-to-native).
"""

import re
from typing import Optional

import torch

from model import FAMILIES, ModelArgs, Transformer

BAICHUAN = ("baichuan", "baichuan2")  # W_pack, and Baichuan's own config.json

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


def family_of_hf_config(cfg: dict) -> Optional[str]:
    """The family an HF config.json describes (by its architectures, else model_type), or None."""
    archs = cfg.get("architectures") or []
    archs = archs if isinstance(archs, list) else []
    found = [name for name, f in FAMILIES.items() if set(archs) & set(f.architectures)] or \
            [name for name, f in FAMILIES.items() if cfg.get("model_type") == f.model_type]
    marked = [name for name in found if FAMILIES[name].vocab_size == cfg.get("vocab_size") or
              any(k in cfg for k in FAMILIES[name].config_keys)]
    unmarked = [name for name in found if FAMILIES[name].vocab_size is None and not FAMILIES[name].config_keys]
    return (marked or unmarked or [None])[0]


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
