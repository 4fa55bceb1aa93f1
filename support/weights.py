"""Weight files read without trust: safetensors headers checked, shards of an index kept in their own dir.

Used by model.py (Transformer.from_checkpoint loads a checkpoint dir through load_tensors) and by convert.py and
sample.py. What it adds: every way a weight file can be truncated, corrupted or point outside its dir becomes a
CheckpointError naming the file and the tensor, and nothing is read before it is needed (memory maps).
"""

import os
from pathlib import Path
from typing import Optional

import torch

from support.checks import json_type, load_json, parse_json



class CheckpointError(ValueError):
    """A checkpoint dir that is missing, truncated or does not match its config; the message names file and tensor."""


def load_safetensors(file) -> dict[str, torch.Tensor]:
    """Tensors of one .safetensors file, memory-mapped by the safetensors library: nothing is read until a tensor is
    used, and writes to a tensor never reach the file. The library checks the header before mapping anything (a JSON
    object of known dtypes and non-negative shapes, each tensor's bytes the size its shape needs, inside the file, in
    order with no overlap and no gap); its complaint comes back as a CheckpointError naming the file. A name twice in
    the header, which the library reads as its last entry and another reader might not, is refused here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as st, open(file, "rb") as f:  # the library checked the length
            parse_json(f.read(int.from_bytes(f.read(8), "little")), f"{file}: header", CheckpointError)
            return {name: st.get_tensor(name) for name in st.keys()}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror})") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        why = _shared_bytes(file) or f"truncated or corrupted safetensors file ({str(e).splitlines()[0]})"
        raise CheckpointError(f"{file}: {why}") from None


def _shared_bytes(file) -> Optional[str]:
    """'tensors A and B share bytes ...' where two entries of a safetensors header claim the same bytes, else None: the
    library refuses such a file, but names the tensor after the pair."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(100 << 20, os.fstat(f.fileno()).st_size - 8):  # the library's own limit on a header
                return None
            header = parse_json(f.read(n), file)
        spans = sorted((*v["data_offsets"], name) for name, v in header.items() if name != "__metadata__")
        for (_, end_a, a), (start, end_b, b) in zip(spans, spans[1:]):
            if start < end_a:
                return (f"tensors {a} and {b} share bytes (data offsets {start} to {min(end_a, end_b)}); each needs "
                        "its own")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # malformed otherwise: the library's words
        pass
    return None


def read_weight_map(index) -> dict[str, str]:
    """{tensor: shard file} of an HF index (model.safetensors.index.json, pytorch_model.bin.index.json), each shard a
    plain file name in the index's own dir: never a path out of it. CheckpointError names the index and the entry."""
    index = Path(index)
    weight_map = load_json(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file, got "
                              f"{json_type(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or shard != Path(shard).name or "\0" in shard \
                or "\\" in shard:
            raise CheckpointError(f"{index}: weight_map: tensor {name!r} -> {shard!r}: expected a file name in "
                                  f"{index.parent} (no directories)")
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index.parent / shard}: shard named in {index.name} is missing")
    return weight_map


def load_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir, memory-mapped: model.safetensors, or the shards its index names."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_weight_map(index)
        tensors, file_of = {}, {}
        for shard in sorted(set(weight_map.values())):
            for name, t in load_safetensors(path / shard).items():
                if name in tensors:
                    raise CheckpointError(f"{path / shard}: tensor {name} is also in {file_of[name]}")
                tensors[name], file_of[name] = t, shard
        wrong = sorted(name for name, shard in weight_map.items() if file_of.get(name) != shard)
        if wrong:
            raise CheckpointError(f"{index}: tensor {wrong[0]} is not in the shard the index names")
        return tensors
    if not (path / "model.safetensors").exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return load_safetensors(path / "model.safetensors")
