"""
Megatron-LM's indexed dataset (.bin + .idx), read and written.

Used by prepare.py: `--format=megatron` (or a .bin/.idx input; support/datafiles.py) reads documents that are
already token ids, and `--megatron` writes an .idx beside each split so that train.bin / val.bin are also
Megatron-LM datasets. What it adds: the MMIDIDX index layout, and every field of an untrusted index checked
against the layout and its .bin (errors are support.records.DataError, one line naming the file).
"""

import struct
from pathlib import Path

import numpy as np

from support.records import DataError

# Megatron-LM indexed dataset (MMIDIDX): prefix.bin holds the tokens of all sequences back to back; prefix.idx:
#   b"MMIDIDX\x00\x00", <Q version (1), <B dtype code, <Q sequence count, <Q document count (= len(document_index)),
#   int32 sizes[sequence count], int64 pointers[sequence count] (byte offsets into .bin),
#   int64 document_index[document count] (first sequence of each document, then the total).

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                   8: np.uint16}


def write_megatron_index(idx_path, doc_lengths, dtype):
    """Write an .idx for a .bin holding documents of these lengths back to back (one sequence per document)."""
    sizes = np.asarray(doc_lengths, dtype=np.int64)
    code = {np.dtype(v): k for k, v in MEGATRON_DTYPES.items()}.get(np.dtype(dtype))
    if code is None:
        raise DataError(f"--megatron: dtype {np.dtype(dtype).name} has no Megatron code (use uint16)")
    if sizes.size and sizes.max() > np.iinfo(np.int32).max:
        raise DataError(f"{idx_path}: a document longer than 2^31 tokens does not fit Megatron's "
                         f"int32 sizes")
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    document_index = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(MEGATRON_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(document_index)))
        f.write(sizes.astype(np.int32).tobytes() + pointers.tobytes() + document_index.tobytes())


def read_megatron_index(idx_path):
    """-> (dtype, sizes int32, pointers int64, document_index int64), checked against the layout and the .bin."""
    idx_path = Path(idx_path)
    data = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
    head = 9 + 8 + 1 + 8 + 8
    if len(data) < head or bytes(data[:9]) != MEGATRON_MAGIC:
        raise DataError(f"{idx_path}: expected a Megatron index starting with {MEGATRON_MAGIC!r}")
    version, = struct.unpack("<Q", bytes(data[9:17]))
    code, = struct.unpack("<B", bytes(data[17:18]))
    n_seq, n_doc = struct.unpack("<QQ", bytes(data[18:34]))
    if version != 1:
        raise DataError(f"{idx_path}: Megatron index version {version}, expected 1")
    if code not in MEGATRON_DTYPES:
        raise DataError(f"{idx_path}: unknown Megatron dtype code {code} (expected 1-8)")
    if len(data) != head + n_seq * 4 + n_seq * 8 + n_doc * 8:
        raise DataError(f"{idx_path}: {len(data)} bytes, expected {head + n_seq * 12 + n_doc * 8} for "
                        f"{n_seq} sequences and {n_doc} document index entries")
    sizes = np.frombuffer(data, np.int32, n_seq, head)
    pointers = np.frombuffer(data, np.int64, n_seq, head + 4 * n_seq)
    document_index = np.frombuffer(data, np.int64, n_doc, head + 12 * n_seq)
    return np.dtype(MEGATRON_DTYPES[code]), sizes, pointers, document_index


def read_megatron(path):
    """Yield each document of a Megatron dataset (path: prefix, prefix.bin or prefix.idx) as a token array."""
    prefix = Path(path).with_suffix("") if Path(path).suffix in (".bin", ".idx") else Path(path)
    idx_path, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise DataError(f"{p}: not found (a Megatron dataset needs both {prefix.name}.bin and .idx)")
    dtype, sizes, pointers, document_index = read_megatron_index(idx_path)
    if dtype.kind not in "ui":
        raise DataError(f"{idx_path}: dtype {dtype.name} is not a token id type")
    size = bin_path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{bin_path}: {size} bytes, not a whole number of {dtype.name} tokens")
    tokens = np.memmap(bin_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    if len(sizes) and sizes.min() < 0:
        raise DataError(f"{idx_path}: sequence {int(np.argmax(sizes < 0))} has a negative size {sizes.min()}")
    if len(sizes) and (pointers.min() < 0 or np.any(pointers % dtype.itemsize)):
        raise DataError(f"{idx_path}: sequence pointers must be non-negative multiples of {dtype.name}'s "
                        f"{dtype.itemsize} bytes")
    if len(sizes) and (pointers.max() > len(tokens) or
                       (pointers + sizes.astype(np.int64) * dtype.itemsize).max() > len(tokens)):
        raise DataError(f"{idx_path}: sequence pointers run past the end of {bin_path} ({len(tokens)} bytes)")
    if len(document_index) == 0 or document_index[0] != 0 or document_index[-1] != len(sizes) or \
            np.any(np.diff(document_index) < 0):
        raise DataError(f"{idx_path}: document index must rise from 0 to the sequence count {len(sizes)}")
    for d in range(len(document_index) - 1):
        seqs = range(document_index[d], document_index[d + 1])
        doc = np.concatenate([np.frombuffer(tokens, dtype, sizes[s], pointers[s]) for s in seqs] or
                             [np.zeros(0, dtype)])
        if dtype.kind == "i" and doc.size and doc.min() < 0:
            raise DataError(f"{bin_path}: document {d} holds a negative token id {doc.min()}")
        yield doc
