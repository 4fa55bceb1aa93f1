"""Used by convert.py (ascendspeed-to-native, native-to-ascendspeed): AscendSpeed's Megatron-style checkpoints in and
out, so a run moves between AscendSpeed (seed 001's Baichuan2 runs, seed 000's Baichuan-7B) and this project.

Read from Ascend/AscendSpeed at master 64b1937a571849a12bd0ddf30dfae1aa3558d2f8 (2023-12-14, "Add Baichuan2-7B
Model", the code seed 001 names):
- tools/ckpt_convert/llama/convert_weights_from_huggingface.py and ckpt_utils.py, which write the `./weight` the
  scripts load: `<dir>/latest_checkpointed_iteration.txt` holding "release", then one file per model-parallel rank,
  `<dir>/release/mp_rank_{tp:02d}/model_optim_rng.pt` (`mp_rank_{tp:02d}_{pp:03d}` when pipeline parallel), each a
  torch.save'd `{"checkpoint_version": 3.0, "model": {"language_model": {"embedding": {"word_embeddings":
  {"weight"}}, "encoder": {...}, "output_layer": {"weight"}}}}`. Its --deepspeed form writes `latest` and
  `release/mp_rank_{tp:02d}_model_states.pt` with the same dict under "module".
- ascendspeed/checkpointing.py, which the training writes back with: `iter_{N:07d}/` instead of `release/`, the
  tracker holding N, and "args", "iteration", "optimizer", "rng_state"... beside "model" (read here; only the model
  is taken).
- ascendspeed/model/transformer.py, which says what the layout means.

The layout, per tensor-parallel rank r of tp (ckpt_utils.row_split: rows, column_split: columns):
- word_embeddings and output_layer: the vocabulary padded to a multiple of make_vocab_size_divisible_by x tp
  (pad_embed: the padding rows are copies of the last rows), then split by rows.
- query_key_value: [q_r; k_r; v_r] (each rank's heads, in the rotate-half layout of Hugging Face's q_proj/k_proj, which
  the converter copies), then permute_qkv_weight: per head h of the rank, the rows [q_h; k_h; v_h] (the transformer
  views it as (heads, 3 * head_dim) and splits each head's group into q, k, v). Grouped-query attention is refused:
  this commit's converter orders the query heads of a group by a stride, its transformer reads them as consecutive.
- dense (o_proj) and mlp.dense_4h_to_h (down): split by columns.
- mlp.proj = [gate_r; up_r] with --merge-mlp (the scripts' --mlp-layer-fusion), else mlp.gate_proj (gate) and
  mlp.dense_h_to_4h (up), split by rows.
- input_layernorm, post_attention_layernorm, final_layernorm: whole on every rank.
- Baichuan's W_pack is split into q, k, v before all this (--pse), so both families share it. Baichuan2's NormHead is
  the raw output_layer (--lm-norm-weight normalises it in every forward), as our norm_head=true.

Writing follows the converter (a release checkpoint) and adds our config.json and tokenizer beside it, which
AscendSpeed ignores and ascendspeed-to-native reads back. Every problem is a model.CheckpointError naming the file.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from model import CheckpointError, ModelArgs, Transformer
from support.tokenizer_files import TOKENIZER_FILES

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's; DeepSpeed's is "latest"
CHECKPOINT_VERSION = 3.0
MLP_MERGED = "mlp.proj.weight"
MLP_SPLIT = ("mlp.gate_proj.weight", "mlp.dense_h_to_4h.weight")  # gate, up
# the per-layer tensors split by columns (RowParallelLinear); the rest of the matrices by rows
BY_COLUMNS = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
NORMS = {"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}


def fail(msg):
    raise CheckpointError(msg)


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """ckpt_utils.vocab_size_with_padding (and Megatron's own at training): the next multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """ckpt_utils.pad_embed: the padding repeats the last rows."""
    extra = rows - w.shape[0]
    return w if extra == 0 else torch.cat([w, w[w.shape[0] - extra:]])


# --------------------------------------------------------------------------------------------------------------------
# files


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iteration_dir(src: Path) -> Path:
    """The dir holding the rank files: src itself (release/, iter_XXXXXXX/, global_stepN/), or the one its tracker
    names (Megatron's latest_checkpointed_iteration.txt: "release" or N; DeepSpeed's latest: the tag)."""
    if any(src.glob("mp_rank_*")):
        return src
    for tracker, name in ((TRACKER, lambda s: "release" if s == "release" else f"iter_{int(s):07d}"),
                          ("latest", lambda s: s)):
        if (src / tracker).exists():
            text = (src / tracker).read_text().strip()
            try:
                found = src / name(text)
            except ValueError:
                fail(f"{src / tracker}: {text!r}: expected 'release' or an iteration number")
            if not found.is_dir():
                fail(f"{src / tracker}: names {found.name}, which is not a directory of {src}")
            return found
    fail(f"{src}: not an AscendSpeed checkpoint ({TRACKER}, latest or mp_rank_* not found)")


def rank_files(step: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) -> the file holding that rank's model: mp_rank_XX[_YYY]/model_optim_rng.pt, or DeepSpeed's
    mp_rank_XX_model_states.pt."""
    files = {}
    for path in sorted(step.glob("mp_rank_*")):
        parts = path.name.removesuffix("_model_states.pt").split("_")[2:]
        if path.is_dir():
            path = path / "model_optim_rng.pt"
            if not path.exists():
                fail(f"{path}: not found")
        elif not path.name.endswith("_model_states.pt"):
            continue
        if not all(p.isdigit() for p in parts) or len(parts) not in (1, 2):
            fail(f"{path}: not an mp_rank_XX or mp_rank_XX_YYY name")
        files[(int(parts[0]), int(parts[1]) if len(parts) == 2 else 0)] = path
    if not files:
        fail(f"{step}: no mp_rank_* model files")
    tp, pp = 1 + max(t for t, _ in files), 1 + max(p for _, p in files)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        fail(f"{step}: rank file {rank_dir_name(*missing[0], pp)} missing for tp={tp}, pp={pp}")
    return files


# what the training's checkpoint holds beside the model: the args Namespace and the numpy RNG state
SAFE_GLOBALS = [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                (getattr(np, "_core", None) or np.core).multiarray._reconstruct]


def read_rank(file: Path) -> dict:
    """The nested "language_model" dict of one rank file, memory-mapped; never unpickles code (weights_only)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (unpickling errors come as many types)
        fail(f"{file}: cannot read as a weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    model = sd.get("model", sd.get("module")) if isinstance(sd, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("language_model"), dict):
        fail(f"{file}: expected a dict with model (or module) -> language_model, as AscendSpeed saves")
    return model["language_model"]


def flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{"embedding": {"word_embeddings": {"weight": t}}} -> {"embedding.word_embeddings.weight": t}; the encoder's
    own keys already hold dots ("layers.0.self_attention.dense.weight")."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------------------------------
# AscendSpeed -> native


def check_args(args: ModelArgs, where):
    if args.kv_heads != args.n_heads:
        fail(f"{where}: n_kv_heads={args.n_kv_heads}: grouped-query attention is not supported (AscendSpeed's "
             f"converter at 64b1937 lays its query heads out differently from its transformer)")
    if args.tie_embeddings:
        fail(f"{where}: tie_embeddings: AscendSpeed's LLaMA/Baichuan models keep a separate output_layer")


def read_native(src, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Native name -> tensor of an AscendSpeed checkpoint dir (or one of its iteration dirs), for the architecture in
    args (the vocabulary padding is dropped: rows past args.vocab_size)."""
    src = Path(src)
    check_args(args, src)
    step = iteration_dir(src)
    files = rank_files(step)
    tp, pp = 1 + max(t for t, _ in files), 1 + max(p for _, p in files)
    if args.n_heads % tp or args.n_layers % pp:
        fail(f"{step}: tp={tp}, pp={pp} do not divide n_heads={args.n_heads}, n_layers={args.n_layers} of the config")
    ranks = {key: flatten(read_rank(f)) for key, f in files.items()}
    try:
        out = _assemble(ranks, files, step, args, tp, pp)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError) as e:  # pieces whose shapes do not join (torch.cat, reshape)
        fail(f"{step}: the ranks' tensors do not fit together for the config: {str(e).splitlines()[0]}")
    known = {f"encoder.layers.{i}.{n}" for i in range(args.n_layers // pp)
             for n in ("self_attention.query_key_value.weight", "self_attention.dense.weight", MLP_MERGED, *MLP_SPLIT,
                       "mlp.dense_4h_to_h.weight", *NORMS)}
    known |= {"embedding.word_embeddings.weight", "output_layer.weight", "encoder.final_layernorm.weight"}
    for key, flat in ranks.items():
        extra = sorted(set(flat) - known)
        if extra:
            fail(f"{files[key]}: unexpected tensor language_model.{extra[0]} ({len(extra)} unexpected: biases, LoRA or "
                 f"another architecture are not supported)")
    with torch.device("meta"):  # the shapes our model has for args: free to build
        shapes = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
    for name, t in out.items():
        if tuple(t.shape) != shapes[name]:
            fail(f"{step}: {name} joined from {tp} rank(s) is {tuple(t.shape)}, expected {shapes[name]} for the config")
    return out


def _assemble(ranks: dict, files: dict, step: Path, args: ModelArgs, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Native name -> tensor from every rank's flat dict: the inverse of rank_models."""
    per_stage, hd = args.n_layers // pp, args.head_dim
    out = {}

    def take(name, pp_rank, dim=0):
        parts = []
        for t in range(tp):
            if name not in ranks[(t, pp_rank)]:
                fail(f"{files[(t, pp_rank)]}: missing tensor language_model.{name}")
            parts.append(ranks[(t, pp_rank)][name])
        return torch.cat(parts, dim) if dim is not None else parts[0]

    for key, native in (("embedding.word_embeddings.weight", "tok_embeddings.weight"),
                        ("output_layer.weight", "output.weight")):
        w = take(key, 0 if key.startswith("embedding") else pp - 1)
        if w.shape[0] < args.vocab_size or w.shape[1] != args.dim:
            fail(f"{step}: {key} is {tuple(w.shape)} over {tp} rank(s), expected at least ({args.vocab_size}, "
                 f"{args.dim}) for the config")
        out[native] = w[: args.vocab_size]
    out["norm.weight"] = take("encoder.final_layernorm.weight", pp - 1, None)
    for layer in range(args.n_layers):
        p, local = divmod(layer, per_stage)
        at = f"encoder.layers.{local}."
        qkv = []
        for t in range(tp):
            w = ranks[(t, p)].get(at + "self_attention.query_key_value.weight")
            if w is None:
                fail(f"{files[(t, p)]}: missing tensor language_model.{at}self_attention.query_key_value.weight")
            heads = args.n_heads // tp
            if tuple(w.shape) != (3 * heads * hd, args.dim):
                fail(f"{files[(t, p)]}: {at}self_attention.query_key_value.weight is {tuple(w.shape)}, expected "
                     f"{(3 * heads * hd, args.dim)} for the config at tp={tp}")
            # (heads, [q k v], head_dim, dim) -> ([q k v], heads, head_dim, dim): undo permute_qkv_weight
            qkv.append(w.reshape(heads, 3, hd, args.dim).transpose(0, 1).reshape(3, heads * hd, args.dim))
        for i, name in enumerate(("wq", "wk", "wv")):
            out[f"layers.{layer}.attention.{name}.weight"] = torch.cat([part[i] for part in qkv])
        out[f"layers.{layer}.attention.wo.weight"] = take(at + "self_attention.dense.weight", p, 1)
        if at + MLP_MERGED in ranks[(0, p)]:
            halves = [ranks[(t, p)][at + MLP_MERGED].chunk(2) for t in range(tp)]
            gate, up = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
        else:
            gate, up = (take(at + name, p) for name in MLP_SPLIT)
        out[f"layers.{layer}.feed_forward.w1.weight"] = gate
        out[f"layers.{layer}.feed_forward.w3.weight"] = up
        out[f"layers.{layer}.feed_forward.w2.weight"] = take(at + "mlp.dense_4h_to_h.weight", p, 1)
        for theirs, ours in NORMS.items():
            out[f"layers.{layer}.{ours}"] = take(at + theirs, p, None)
    return out


# --------------------------------------------------------------------------------------------------------------------
# native -> AscendSpeed


def rank_models(tensors, args: ModelArgs, tp: int, pp: int = 1, divisible_by: int = 128, merge_mlp: bool = True):
    """Yield ((tp rank, pp rank), the nested "language_model" dict convert_weights_from_huggingface.py would write for
    these weights), one rank at a time (tensors: native name -> tensor, memory-mapped)."""
    check_args(args, "config.json")
    if args.n_heads % tp or args.n_layers % pp:
        fail(f"--tp={tp}, --pp={pp}: must divide n_heads={args.n_heads} and n_layers={args.n_layers}")
    if args.hidden_dim % tp:
        fail(f"--tp={tp}: must divide hidden_dim={args.hidden_dim}")
    rows = padded_vocab(args.vocab_size, divisible_by, tp)
    per_stage, hd, heads = args.n_layers // pp, args.head_dim, args.n_heads // tp

    def split(w, t, dim=0):
        return w.chunk(tp, dim)[t].clone()

    for t in range(tp):
        for p in range(pp):
            encoder = {}
            lm = {"embedding": {"word_embeddings": {"weight": {}}}, "encoder": encoder, "output_layer": {}}
            if p == 0:
                lm["embedding"]["word_embeddings"]["weight"] = split(pad_rows(tensors["tok_embeddings.weight"], rows),
                                                                     t)
            if p == pp - 1:
                encoder["final_layernorm.weight"] = tensors["norm.weight"].clone()
                lm["output_layer"]["weight"] = split(pad_rows(tensors["output.weight"], rows), t)
            for local in range(per_stage):
                layer, at = p * per_stage + local, f"layers.{local}."
                q, k, v = (split(tensors[f"layers.{layer}.attention.{n}.weight"], t) for n in ("wq", "wk", "wv"))
                # permute_qkv_weight: ([q k v], heads, head_dim, dim) -> (heads, [q k v], head_dim, dim)
                qkv = torch.cat([q, k, v]).reshape(3, heads, hd, args.dim).transpose(0, 1)
                encoder[at + "self_attention.query_key_value.weight"] = qkv.reshape(3 * heads * hd, args.dim).clone()
                wo, w2 = tensors[f"layers.{layer}.attention.wo.weight"], tensors[f"layers.{layer}.feed_forward.w2.weight"]
                encoder[at + "self_attention.dense.weight"] = split(wo, t, 1)
                gate = split(tensors[f"layers.{layer}.feed_forward.w1.weight"], t)
                up = split(tensors[f"layers.{layer}.feed_forward.w3.weight"], t)
                if merge_mlp:
                    encoder[at + MLP_MERGED] = torch.cat([gate, up])
                else:
                    encoder[at + MLP_SPLIT[0]], encoder[at + MLP_SPLIT[1]] = gate, up
                encoder[at + "mlp.dense_4h_to_h.weight"] = split(w2, t, 1)
                for theirs, ours in NORMS.items():
                    encoder[at + theirs] = tensors[f"layers.{layer}.{ours}"].clone()
            yield (t, p), lm


def write(dst, models, pp: int = 1, deepspeed: bool = False):
    """A release checkpoint as the converter writes it, one rank at a time (models: rank_models): the tracker, then
    release/mp_rank_*/model_optim_rng.pt; with deepspeed (its --deepspeed, for scripts run under DeepSpeed such as
    seed 000's) the tracker `latest` and release/mp_rank_XX_model_states.pt holding the dict under "module"."""
    dst = Path(dst)
    (dst / "release").mkdir(parents=True, exist_ok=True)
    (dst / ("latest" if deepspeed else TRACKER)).write_text("release\n")
    for (t, p), lm in models:
        if deepspeed:
            if pp > 1:
                fail("--deepspeed: the converter writes DeepSpeed's layout for pp=1 only")
            torch.save({"checkpoint_version": CHECKPOINT_VERSION, "module": {"language_model": lm}, "dp_world_size": 0},
                       dst / "release" / f"mp_rank_{t:02d}_model_states.pt")
            continue
        rank_dir = dst / "release" / rank_dir_name(t, p, pp)
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"checkpoint_version": CHECKPOINT_VERSION, "model": {"language_model": lm}},
                   rank_dir / "model_optim_rng.pt")


def copy_beside(src: Path, dst: Path):
    """Our config.json and the tokenizer files of a checkpoint dir, copied as they are."""
    for f in ("config.json", "tokenizer_config.json", *TOKENIZER_FILES):
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)
