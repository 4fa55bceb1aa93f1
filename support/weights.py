"""Weight files read without trust: safetensors headers checked, shards of an index kept in their own dir.

Used by model.py (read_config checks a checkpoint dir's config.json here, including old Baichuan2 dirs whose head was
normalised once; Transformer.from_checkpoint loads it through load_tensors and checks the tensors against the config)
and by convert.py and sample.py. What it adds: every way a weight file can be truncated, corrupted or point outside
its dir becomes a CheckpointError naming the file and the tensor, and nothing is read before it is needed (memory
maps). Written:
checkpoint dirs' weights in safetensors shards of a bounded size (ShardWriter, write_checkpoint), never a NaN or an
infinity; read: HF's and our weight dirs one shard at a time (WeightFiles), pickles only with weights_only.
"""

import json
import os
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from support import diskspace
from support.checks import json_type, load_json, parse_json


def fail(msg):
    raise CheckpointError(msg)


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


def read_checkpoint_config(path, families) -> dict:
    """config.json of a checkpoint dir (model.read_config), checked: there, a JSON object, not a Hugging Face config,
    its family one of `families`; a Baichuan2 dir of an older convert.py read as its head was written."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file}: not found (is {path} a checkpoint dir?)")
    config = load_json(file, CheckpointError)
    if "dim" not in config and ("model_type" in config or "architectures" in config):
        raise CheckpointError(f"{file}: a Hugging Face config (model_type {config.get('model_type')!r}), not a "
                              f"checkpoint dir's: convert it first: python convert.py hf-to-native --src {path} "
                              f"--dst <checkpoint dir>")
    family = config.get("family", "llama")
    if not isinstance(family, str) or family not in families:
        raise CheckpointError(f"{file}: family={family!r}: expected one of {', '.join(families)}")
    if family == "baichuan2" and config.get("norm_head", False) is False and "quantization" not in config:
        config = {**config, "norm_head": _normalised_once(path)}
    return config


def _normalised_once(path) -> bool:
    """Whether a Baichuan2 checkpoint dir with norm_head=false holds NormHead rows normalised once (every row within 1%
    of unit length: bf16 moves a normalised row's length by under 0.2%), as convert.py hf-to-native wrote them before
    the head was kept raw: Baichuan2, with the same logits under NormHead, so it loads as such. Other rows were trained
    without NormHead and load as written, as do step dirs (no safetensors: a resume continues as it ran). Said once
    on stderr."""
    path = Path(path)
    if not any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        return False
    head = load_tensors(path).get("output.weight")
    if head is None:
        return False
    once = all(((torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32) - 1).abs() <= 1e-2).all()
               for rows in head.split(8192))  # a slice of rows at a time: never the whole head in fp32
    warnings.warn(f"{path / 'config.json'}: family baichuan2 with norm_head=false: " + (
        "its head rows are normalised once (convert.py before Baichuan2's head was kept raw), loaded as NormHead "
        "(norm_head=true): the same logits, and training normalises them as Baichuan2 does" if once else
        "its head rows are not unit length (trained without NormHead), loaded as written (norm_head=false)"))
    return once


def check_checkpoint_tensors(path, tensors: dict, expected: dict):
    """The tensors of a checkpoint dir are those its config.json implies (model.Transformer.from_checkpoint): every
    name there and no other, each of its shape; the message names the first that is not."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise CheckpointError(f"{path}: {what} for this config.json ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected)")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(expected[name].shape)}")


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


class Streamed:
    """A state dict whose items are produced on demand: write_checkpoint only iterates .items(), so converting and
    writing interleave and at most one output shard is held in memory."""

    def __init__(self, items, elements: int):
        self._items, self.elements = items, elements  # elements: how many the items hold, for the shard plan

    def items(self):
        return self._items


def write_checkpoint(path, state_dict, args, family: str, *, max_shard_bytes=None, extra_config=None):
    """Write config.json and the weights of a checkpoint dir (tokenizer files are the caller's to copy)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**asdict(args), "family": family, **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    elements = state_dict.elements if isinstance(state_dict, Streamed) else sum(t.numel() for t in state_dict.values())
    writer = ShardWriter(path, max_shard_bytes, elements)
    for name, tensor in state_dict.items():
        writer.add(name, tensor)
    writer.close()


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", s.upper())
    n = int(float(m[1]) * 1024 ** " KMGT".index(m[2] or " ")) if m else 0
    if n < 1:
        fail(f"--max_shard_size={s}: expected a size of at least one byte, such as 500MB or 2GB")
    return n
