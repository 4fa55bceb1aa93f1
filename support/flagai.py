"""Used by convert.py (hf-to-native, for a dir whose config.json is FlagAI's) and config/aquila_7b_pretrain.py: FlagAI's
Aquila checkpoint format, and how FlagAI counts a run's training steps.

Read from FlagAI-Open/FlagAI at commit 0b487694a8fa2eafe744b30c12f2a7785e60533a (the one seed 002 names):
- examples/Aquila/Aquila-pretrain/aquila_pretrain.py: the model is `checkpoints_in/<model_name>/config.json` read by
  AQUILAModel.init_from_json and `pytorch_model.bin` read by AQUILAModel.load_weights (torch.load; a DeepSpeed
  checkpoint's "module" dict is unwrapped; strict=False), the dir FlagAI's AutoLoader downloads.
- flagai/model/aquila_model.py (AQUILAConfig, AQUILAModel), flagai/model/blocks/aquila_block.py,
  flagai/model/layers/attentions.py and feedforward.py: config.json holds dim, n_layers, n_heads, multiple_of,
  norm_eps, vocab_size, max_seq_len, initializer_range and training switches (flash_atten, checkpoint_activations,
  ckpoint_layer, use_triangle_attn, ...). The tensors carry Meta's names, which are ours: tok_embeddings,
  layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.feed_forward.{w1,w2,w3} (AQUILAForward: w2(silu(w1 x) * w3 x), its
  width multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)), attention_norm, ffn_norm, norm, output (untied).
  Rotary embedding is torch.view_as_complex over adjacent pairs, Meta's interleaved layout: wq and wk are permuted to
  our rotate-half layout on reading (the caller's meta_to_rotate_half), as for Meta's own checkpoints. rope_theta is
  precompute_freqs_cis's 10000.
- flagai/data/dataset/indexed_dataset/build_index_mappings.py (GPTDataset) and flagai/env_trainer_v1.py: the step
  count of a run (`gpt_dataset_len`, `steps_per_epoch`).
"""

from pathlib import Path
from typing import Optional

import torch

from model import CheckpointError, ModelArgs
from support.checks import check_json_fields, load_json
from support.hf_names import native_shapes
from support.weights import check_shapes

FLAGAI_CONFIG = {  # the fields read, their types and ranges (an absent one takes AQUILAConfig's default)
    **{k: (int, "[1, inf)") for k in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len")},
    "multiple_of": (Optional[int], "[1, inf)"), "norm_eps": (float, "(0, 1)"),
    "initializer_range": (float, "[0, inf)"),
}
# AQUILAConfig's defaults for the fields config.json may leave out (multiple_of None would fail in FlagAI itself)
FLAGAI_DEFAULTS = {"vocab_size": 32000, "max_seq_len": 2048, "norm_eps": 1e-6, "initializer_range": 0.02}
WEIGHTS = "pytorch_model.bin"
INTERLEAVED = ("attention.wq.weight", "attention.wk.weight")  # Meta's rotary pairs: permute to rotate-half


def is_flagai_config(cfg: dict) -> bool:
    """FlagAI's config.json names the model Meta's way (dim, n_heads), an HF one hidden_size; ours adds "family"."""
    return "dim" in cfg and "n_heads" in cfg and "hidden_size" not in cfg and "family" not in cfg


def hidden_dim(dim: int, multiple_of: int) -> int:
    """AQUILAForward's width for hidden_dim=4 * dim."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def flagai_args(cfg: dict, where) -> ModelArgs:
    """ModelArgs of a FlagAI config.json; the training switches in it (flash_atten, checkpoint_activations,
    ckpoint_layer, use_triangle_attn) are a run's settings, not the architecture: a recipe carries them."""
    check_json_fields(cfg, FLAGAI_CONFIG, where, CheckpointError, required=("dim", "n_layers", "n_heads",
                                                                             "multiple_of"))
    cfg = {**FLAGAI_DEFAULTS, **cfg}
    try:
        return ModelArgs(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                         vocab_size=cfg["vocab_size"], hidden_dim=hidden_dim(cfg["dim"], cfg["multiple_of"]),
                         norm_eps=float(cfg["norm_eps"]), max_seq_len=cfg["max_seq_len"],
                         init_std=float(cfg["initializer_range"]), init_scaled_residual=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_weights(src: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin as AQUILAModel.load_weights reads it (a "module" dict unwrapped), memory-mapped, never
    unpickling code (weights_only)."""
    file = Path(src) / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{file}: not found (FlagAI's checkpoints_in/<model>/ holds config.json and {WEIGHTS})")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (unpickling errors come as many types)
        raise CheckpointError(f"{file}: cannot read as a weights-only checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(sd, dict) and isinstance(sd.get("module"), dict):
        sd = sd["module"]
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise CheckpointError(f"{file}: expected a dict of tensor name -> tensor (or one under 'module')")
    return sd


def native_tensors(sd: dict, args: ModelArgs, to_rotate_half):
    """Yield (native name, tensor) of FlagAI's state dict: the same names; wq and wk through to_rotate_half(w, heads).
    rotary tables FlagAI may have saved (freqs_cis, cache_k/v buffers) are not weights and are left out."""
    for name, t in sd.items():
        if name.endswith(INTERLEAVED):
            t = to_rotate_half(t, args.n_heads)
        yield name, t


def ignored(name: str) -> bool:
    return name.endswith(("freqs_cis", "cache_k", "cache_v"))


def read_native(src: Path, to_rotate_half):
    """(args, (native name, tensor) of its weights) of FlagAI's Aquila dir, the tensors checked against args' shapes
    first (native_tensors, without what ignored names)."""
    args = flagai_args(load_json(src / "config.json", CheckpointError), src / "config.json")
    sd = load_weights(src)
    check_shapes({n: t.shape for n, t in sd.items()}, native_shapes(args), src / WEIGHTS, ignored)
    return args, ((n, t) for n, t in native_tensors(sd, args, to_rotate_half) if not ignored(n))


# --------------------------------------------------------------------------------------------------------------------
# how FlagAI counts a run's steps (aquila_pretrain.py builds the data, EnvTrainer walks it)


def gpt_dataset_len(tokens: int, seq_len: int, num_samples: int) -> int:
    """len(GPTDataset): every window of seq_len + 1 tokens (one shared with the next) over as many whole epochs of the
    documents as num_samples needs (Megatron's _num_epochs); num_samples ([90, 10] in aquila_pretrain.py) is a
    lower bound, not the count."""
    epochs = 1
    while (epochs * tokens - 1) // seq_len < num_samples:
        epochs += 1
    return (epochs * tokens - 1) // seq_len


def steps_per_epoch(samples: int, batch_size: int, world_size: int) -> int:
    """EnvTrainer's len(train_dataloader): a DistributedSampler (each rank ceil(samples / world_size), padded by
    repeats) and a DataLoader of batch_size with drop_last=True."""
    return -(-samples // world_size) // batch_size
