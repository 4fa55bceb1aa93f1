"""
prepare.py's input files: files, directories and globs, the embedded default corpus, long text files read in pieces,
and every file's records turned into a stream of work Items in a fixed order.

Used by prepare.py (input_files; read_items feeds its tokenizing workers and its tokenizer training). What it adds:
the --format table; each input file checked where it is read (empty files, bad UTF-8, a record format on a file
that holds none, Megatron input without --tokenizer); --on_error: a bad record or file stops the run (one DataError)
or is reported and skipped.
"""

import glob
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from support.megatron import read_megatron
from support.records import DataError, instruction_messages, read_records, record_field

FORMATS = {  # --format: what each record is; the container (txt, json, jsonl, parquet) follows the file
    "auto": "by extension: .json/.jsonl/.parquet -> 'json' records, .bin/.idx -> megatron, anything else -> text",
    "text": "plain UTF-8 text, one document per file",
    "json": "JSON records (a .json list, .jsonl lines or .parquet rows) with the text in --text_field",
    "jsonl": "same as json",
    "parquet": "same as json",
    "megatron": "Megatron-LM indexed dataset (prefix.bin + prefix.idx), already token ids",
    "alpaca": "{instruction, input, output}; also alpaca-data-conversation ({conversations: [...]})",
    "sharegpt": "{conversations: [{from: human|gpt, value}]} (or {messages: [{role, content}]}), multi-turn",
    "conversation": "same as sharegpt",
    "moss": "moss-003-sft: {meta_instruction, chat: {turn_1: {Human: '<|Human|>: ...<eoh>', MOSS: ...}}}",
    "belle": "{instruction, input, output} (multi-turn 'Human:/Assistant:' inside instruction) or {conversations}",
}
INSTRUCTION_FORMATS = ("alpaca", "sharegpt", "conversation", "moss", "belle")
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
TEXT_PIECE_BYTES = 4 << 20  # long text files are read and encoded in pieces of about this size (bounded memory)


@dataclass
class Item:
    """One unit of work for the tokenizer workers."""
    doc: int                       # document number in input order: decides train or val
    text: Optional[str] = None     # text formats
    ids: Optional[np.ndarray] = None  # Megatron input: already tokens
    messages: Optional[list] = None   # instruction formats
    system: Optional[str] = None
    first: bool = True             # a long text document arrives in several pieces
    last: bool = True
    nbytes: int = 0                # input bytes this item consumed (progress bar)
    where: str = ""                # "file: line N", for errors found while encoding


def input_files(args):
    """--input's files (or the default corpus, as text), the --format to read them with, and the output dir."""
    if args.input:
        files, fmt = expand_inputs(args.input), args.format
        out = Path(args.out or Path("data") / Path(args.input[0].rstrip("/*")).stem)
    else:
        files, fmt = default_corpus_files(), "text"
        out = Path(args.out or "data/default")
    if not args.tokenizer and any(f.suffix in (".bin", ".idx") for f in files) and fmt in ("auto", "megatron"):
        raise DataError("--tokenizer: required for Megatron input (its tokens are already ids)")
    return files, fmt, out


def expand_inputs(specs):
    """Files, directories (all files below, sorted) and globs -> a sorted, de-duplicated list of files."""
    files = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"--input {spec}: no such file, directory or glob match")
        files += [p for p in found if p not in files]
    return files


def default_corpus_files():
    """The Python standard library's .py files (sorted): the embedded default corpus, present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib",
            "turtledemo", "ensurepip", "tkinter"}  # tests and GUI code are mostly noise
    files = sorted(p for p in root.rglob("*.py")
                   if not set(p.relative_to(root).parts[:-1]) & skip and p.stat().st_size > 0)
    if not files:
        raise DataError(f"{root}: no standard library sources found for the default corpus")
    return files


def read_text_pieces(path):
    """Yield (text, nbytes) pieces of a text file of about TEXT_PIECE_BYTES, cut where tokens would split anyway."""
    with open(path, "rb") as f:
        rest, offset = b"", 0
        while True:
            block = f.read(TEXT_PIECE_BYTES)
            data = rest + block
            # cut after a newline, else before a space (tokenizers split words there), else between characters
            cut = len(data) if not block else data.rfind(b"\n") + 1 or max(data.rfind(b" "), 0) or len(data)
            while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut -= 1
            piece, rest = data[:cut], data[cut:]
            if piece:
                try:
                    yield piece.decode("utf-8"), len(piece)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: byte {offset + e.start}: expected UTF-8 text")
                offset += len(piece)
            if not block:
                return


def read_items(files, fmt, text_field, max_chars, on_error, counters):
    """Yield Items for all input files in order. Bad records/files: stop (DataError) or skip (warn, count)."""
    doc, chars, megatron_seen = 0, 0, set()
    for path in files:
        if path.stat().st_size == 0:
            skip_or_stop(DataError(f"{path}: file is empty"), on_error, counters)
            continue
        kind = fmt
        if fmt == "auto":
            kind = ("megatron" if path.suffix in (".bin", ".idx") else
                    "json" if path.suffix in RECORD_SUFFIXES else "text")
        try:
            if kind == "text":
                if max_chars and chars >= max_chars:  # the cap applies between documents
                    return
                pieces = 0
                try:
                    for last, (text, nbytes) in _mark_last(read_text_pieces(path)):
                        chars += len(text)
                        yield Item(doc, text=text, first=pieces == 0, last=last, nbytes=nbytes)
                        pieces += 1
                except DataError:
                    if pieces:  # bad bytes further in: end the document already begun, then report the file
                        yield Item(doc, text="", first=False, last=True)
                        doc += 1
                    raise
                doc += 1
            elif kind == "megatron":
                if path.with_suffix("") in megatron_seen:  # prefix.bin and prefix.idx are one dataset
                    continue
                megatron_seen.add(path.with_suffix(""))
                for ids in read_megatron(path):
                    yield Item(doc, ids=ids, nbytes=ids.nbytes)
                    doc += 1
            else:
                if path.suffix not in RECORD_SUFFIXES:
                    raise DataError(f"{path}: format {kind!r} expects a .json, .jsonl or .parquet file")
                for where, rec, nbytes in read_records(path):
                    if max_chars and chars >= max_chars:
                        return
                    try:
                        if isinstance(rec, DataError):  # a malformed line: the rest of the file is still read
                            raise rec
                        if kind in INSTRUCTION_FORMATS:
                            messages, system = instruction_messages(rec, kind, f"{path}: {where}")
                            chars += sum(len(m["content"]) for m in messages)
                            yield Item(doc, messages=messages, system=system, nbytes=nbytes,
                                       where=f"{path}: {where}")
                        else:
                            text = record_field(rec, text_field, f"{path}: {where}",
                                          hint=" (set --text_field, or --format for instruction data)")
                            chars += len(text)
                            yield Item(doc, text=text, nbytes=nbytes)
                        doc += 1
                    except DataError as e:
                        skip_or_stop(e, on_error, counters)
        except DataError as e:
            skip_or_stop(e, on_error, counters)


def _mark_last(iterable):
    """Yield (is_last, x) for each x."""
    it = iter(iterable)
    try:
        prev = next(it)
    except StopIteration:
        return
    for x in it:
        yield False, prev
        prev = x
    yield True, prev


def skip_or_stop(error, on_error, counters):
    """--on_error=stop: raise the problem as one DataError; skip: count it, and say the first ten."""
    if on_error == "stop":
        raise DataError(f"{error} (use --on_error=skip to skip bad records)")
    counters["skipped"] = counters.get("skipped", 0) + 1
    if counters["skipped"] <= 10 and not counters.get("quiet"):
        print(f"prepare.py: skipped: {error}", file=sys.stderr)


def training_lines(items, max_chars):
    """Lines of text for tokenizer training, up to max_chars characters."""
    n = 0
    for item in items:
        texts = [item.text] if item.text is not None else \
            [item.system or ""] + [m["content"] + "\n" + m.get("input", "") for m in item.messages or []]
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line
                    n += len(line)
                    if n >= max_chars:
                        return

