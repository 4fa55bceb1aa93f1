"""
prepare.py's data dir beyond its idea: what each file holds (meta.json's layout), the files read back without
trust, and a small input's empty val split filled.

Used by prepare.py (read_meta and TokenSplit, which train.py reads, and the end of a prepare run). What it adds:
meta.json's fields checked; each split's files checked against meta.json before they are memmapped (missing or
empty, sizes that are not whole tokens, a mask of another length, packed rows of another seq_len, fewer tokens than
one window); {split}.docs.bin's offsets and the token ids (against a model's vocabulary) checked; each problem one
DataError naming the file. And move_last_to_val, for an input too small to give val a document of its own.
"""

from pathlib import Path

import numpy as np

from support.checks import check_json_fields
from support.records import DataError

# what each file holds, written into meta.json (prepare.py) for whoever reads the data dir
META_LAYOUT = {
    "tokens": "{split}.bin: token ids of all documents back to back; text documents are the text framed as the "
              "tokenizer frames it (LLaMA's: bos first) and end with eos, instruction documents are one "
              "chat-templated conversation ending with eos",
    "documents": "{split}.docs.bin: int64 start offset of every document, then the total token count",
    "mask": "{split}.mask.bin: uint8 per token, 1 = the token is a target that counts in the loss "
            "(assistant replies and their end token; every token with train_on_prompt)",
    "packed": "rows of exactly seq_len tokens, each holding whole documents; a row's tail is pad_id with "
              "mask 0 and belongs to its last document",
}

META_FIELDS = {"dtype": str, "vocab_size": (int, "[1, 2**32]"), "packed": bool, "seq_len": (int, "[0, inf)")}


def meta_file(data_dir) -> Path:
    """data_dir/meta.json, or DataError where the dir or the file is missing."""
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"data_dir={data_dir}: not found (run `python prepare.py` first, or set --data_dir)")
    file = path / "meta.json"
    if not file.exists():
        raise DataError(f"{file}: not found (is {data_dir} a prepare.py output dir?)")
    return file


def check_meta(meta, file):
    """Raise DataError unless meta.json's fields that train.py reads are of their types and in range."""
    check_json_fields(meta, META_FIELDS, file, DataError, required=("dtype", "vocab_size"))
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{file}: dtype={meta['dtype']!r}, expected 'uint16' or 'uint32'")
    if meta.get("packed") and not meta.get("seq_len"):
        raise DataError(f"{file}: packed data needs its row length, seq_len >= 1 (got {meta.get('seq_len')!r})")


def check_split(data_dir, split: str, meta: dict, seq_len: int):
    """Raise DataError where {split}.bin and {split}.mask.bin cannot be read as meta.json says."""
    file = Path(data_dir) / f"{split}.bin"
    if not file.exists():
        raise DataError(f"{file}: not found")
    if file.stat().st_size == 0:
        raise DataError(f"{file}: empty (no tokens)" + ("; train.py evaluates on it: prepare the data with "
                                                       "--val_fraction > 0" if split == "val" else ""))
    itemsize = np.dtype(meta["dtype"]).itemsize
    if file.stat().st_size % itemsize:
        raise DataError(f"{file}: size {file.stat().st_size} is not a multiple of {meta['dtype']}'s "
                        f"{itemsize} bytes")
    n_tokens = file.stat().st_size // itemsize
    mask_file = Path(data_dir) / f"{split}.mask.bin"
    if mask_file.exists() and mask_file.stat().st_size != n_tokens:  # one uint8 per token
        raise DataError(f"{mask_file}: {mask_file.stat().st_size} entries for {n_tokens} tokens in "
                        f"{file.name}")
    packed = bool(meta.get("packed"))
    if packed:
        if meta.get("seq_len") != seq_len:
            raise DataError(f"{Path(data_dir) / 'meta.json'}: the data is packed in rows of {meta.get('seq_len')} "
                            f"tokens; train with --seq_len={meta.get('seq_len')}")
        if n_tokens % seq_len:
            raise DataError(f"{file}: {n_tokens} tokens are not whole rows of seq_len={seq_len} "
                            "(meta.json says packed)")
    if n_tokens < seq_len + (0 if packed else 1):
        raise DataError(f"{file}: {n_tokens} tokens, fewer than one window of seq_len + 1 = "
                        f"{seq_len + 1}")


def read_doc_starts(docs_file: Path, n_tokens: int) -> np.ndarray:
    """{split}.docs.bin: int64 start offsets of the documents, then the total, rising from 0 to n_tokens."""
    if docs_file.stat().st_size % 8 or docs_file.stat().st_size < 16:
        raise DataError(f"{docs_file}: {docs_file.stat().st_size} bytes, expected int64 offsets (a multiple of 8, "
                        "at least a start and the total)")
    offsets = np.fromfile(docs_file, dtype=np.int64)
    falls = bool(np.any(np.diff(offsets) < 0))
    if offsets[0] != 0 or offsets[-1] != n_tokens or falls:
        raise DataError(f"{docs_file}: document offsets must rise from 0 to the {n_tokens} tokens of its .bin (found "
                        f"{offsets[0]} .. {offsets[-1]}{', falling on the way' if falls else ''})")
    return offsets[:-1]




def move_last_to_val(out_dir, writers, dtype):
    """An empty val split (a small input) takes the train split's last document, or last row when packed."""
    train, val = writers["train"], writers["val"]
    offsets = np.fromfile(out_dir / "train.docs.bin", dtype=np.int64)
    start = train.n_tokens - train.seq_len if train.pack else offsets[-2]
    if start <= 0:
        return False
    k = int(np.searchsorted(offsets, start))  # first moved document
    for name, itemsize in (("bin", np.dtype(dtype).itemsize), ("mask.bin", 1)):
        if not (out_dir / f"train.{name}").exists():
            continue
        with open(out_dir / f"train.{name}", "r+b") as f:
            f.seek(start * itemsize)
            (out_dir / f"val.{name}").write_bytes(f.read())
            f.truncate(start * itemsize)
    (out_dir / "train.docs.bin").write_bytes(offsets[:k + 1].tobytes())
    (out_dir / "val.docs.bin").write_bytes((offsets[k:] - start).tobytes())
    val.n_tokens, val.n_docs = train.n_tokens - int(start), len(offsets) - 1 - k
    train.n_tokens, train.n_docs = int(start), k
    return True


def check_ids(tokens, file, vocab_size: int, chunk: int = 1 << 24):
    """Raise on a token id the model has no embedding for (data from another tokenizer): one chunked pass."""
    for start in range(0, len(tokens), chunk):
        piece = np.asarray(tokens[start : start + chunk])
        if piece.max() >= vocab_size:
            i = start + int(np.argmax(piece >= vocab_size))
            raise DataError(f"{file}: token id {int(tokens[i])} at position {i} is not below the "
                            f"model's vocab_size={vocab_size} (prepared with another tokenizer?)")
