"""
prepare.py's data dir beyond its idea: the files of a split read back without trust, and a small input's empty val
split filled.

Used by prepare.py (TokenSplit, which train.py reads, and the end of a prepare run). What it adds: each split's
files checked against meta.json before they are memmapped (missing or empty, sizes that are not whole tokens, a
mask of another length, packed rows of another seq_len, fewer tokens than one window), and {split}.docs.bin's
offsets checked, each problem one DataError naming the file; move_last_to_val for an input too small to give val
a document of its own.
"""

from pathlib import Path

import numpy as np

from support.records import DataError


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
