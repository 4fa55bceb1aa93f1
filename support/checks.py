"""Untrusted input, checked where it enters: declared ranges and JSON from files and requests.

Used by every script (train.py flags and config files, prepare.py/convert.py/sample.py flags and files) and by
model.py (ModelArgs declares its fields' ranges with `ranged`; check_model_args checks them and how they agree). What
it adds to the reading path: one check of a value's type and range (check_value), so every script says a value is out
of range in the same words, and a JSON parser that refuses what json.loads lets through (NaN, duplicate keys, nesting
deep enough to recurse out).
"""

import functools
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Optional



def ranged(default, interval: str):
    """A dataclass field whose value must lie in `interval`, written as in mathematics: "[0, 1)", "(0, inf)",
    "[0, 2**63)". NaN lies in no interval, and infinity only in one closed at inf. check_fields tests them all."""
    return field(default=default, metadata={"range": interval})


@functools.cache
def _interval(text: str) -> tuple:
    m = re.fullmatch(r"([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])", text.strip())
    power = [re.fullmatch(r"(-?\d+)\*\*(\d+)", b) for b in (m[2], m[3])]
    lo, hi = (int(p[1]) ** int(p[2]) if p else int(b) if re.fullmatch(r"-?\d+", b) else float(b)
              for p, b in zip(power, (m[2], m[3])))
    return m[1] == "(", lo, hi, m[4] == ")"


def _kinds(kind) -> tuple:
    """The types an annotation allows: int -> (int,), Optional[int] and int | None -> (int, NoneType)."""
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def _kind_ok(kind, value) -> bool:
    for k in _kinds(kind):
        if k is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # a bool is no integer here, though Python says it is one
            ok = isinstance(value, k) and (k is bool or not isinstance(value, bool))
        if ok:
            return True
    return False


KIND_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", list: "a list",
              dict: "an object"}


def expected(kind, interval: Optional[str] = None) -> str:
    """What a value of this kind and range is, in words: 'an integer >= 1', 'a finite number in [0, 1)'."""
    kinds = _kinds(kind)
    words = " or ".join(KIND_WORDS.get(k, k.__name__) for k in kinds if k is not type(None))
    if interval:
        lo_open, lo, hi, hi_open = _interval(interval)
        words += (f" {'>' if lo_open else '>='} {lo}" if hi == math.inf and hi_open else f" in {interval}")
    return words + (" or None" if type(None) in kinds else "")


def check_value(name: str, value, kind, interval: Optional[str] = None):
    """ValueError "name=value: expected ..." unless value is of kind (int, float, bool, str, Optional[...]) and lies
    in interval (None: any). The one check behind every config field and flag with a declared range."""
    ok = _kind_ok(kind, value)
    if ok and interval is not None and value is not None and not isinstance(value, (bool, str)):
        lo_open, lo, hi, hi_open = _interval(interval)
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name}={reprlib.repr(value)}: expected {expected(kind, interval)}")


def check_fields(obj, prefix: str = ""):
    """check_value on every field of a dataclass instance, with the range its field declares (see ranged)."""
    for f in fields(obj):
        check_value(prefix + f.name, getattr(obj, f.name), f.type, f.metadata.get("range"))


def check_model_args(args):
    """ModelArgs (model.py) checked as it is made: every field in its declared range, and the fields agreeing."""
    def bad(field, why):
        raise ValueError(f"ModelArgs.{field}={getattr(args, field)!r}: {why}")

    check_fields(args, "ModelArgs.")
    if args.dim % args.n_heads:
        bad("dim", f"must be divisible by n_heads={args.n_heads}")
    if args.n_kv_heads is not None and args.n_heads % args.n_kv_heads:
        bad("n_kv_heads", f"must be a positive divisor of n_heads={args.n_heads}")
    if args.pos_emb not in ("rope", "alibi"):
        bad("pos_emb", "expected 'rope' or 'alibi'")
    if args.pos_emb == "rope" and args.head_dim % 2:
        bad("dim", f"RoPE needs an even head_dim, got {args.head_dim}")
    if args.norm_head and args.tie_embeddings:
        bad("norm_head", "a normalised head cannot be tied to the input embedding")


def check_json_fields(d: dict, table: dict, where, error=ValueError, required=()):
    """check_value on the fields of a JSON object read from a file: table = {key: kind or (kind, interval)}, a dotted
    key reaching into an object ("loss_scaler.scale"); a key absent from d is fine unless it is in required. The
    error names where (the file) and the field."""
    for key, spec in table.items():
        kind, interval = spec if isinstance(spec, tuple) else (spec, None)
        *parents, name = key.split(".")
        obj = d
        for i, part in enumerate(parents):
            obj = obj.get(part)
            if obj is None:  # absent (or null): so is the field
                break
            if not isinstance(obj, dict):
                raise error(f"{where}: {'.'.join(parents[:i + 1])}: expected an object, got {json_type(obj)}")
        if obj is None or name not in obj:
            if key in required:
                raise error(f"{where}: missing field {key!r}")
            continue
        try:
            check_value(key, obj[name], kind, interval)
        except ValueError as e:
            raise error(f"{where}: {e}") from None


MAX_JSON_DEPTH = 100  # deeper than any config, manifest or record of ours or Hugging Face's: refused, not recursed


def _json_depth(value) -> int:
    """How deeply the lists and objects of a parsed JSON value nest (a walk, not a recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a float")
    return value


def _unique_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        raise ValueError(f"key {next(k for k, _ in pairs if k in seen or seen.add(k))!r} appears twice in an object")
    return d


def parse_json(data, where, error=ValueError, unique_keys: bool = True, allow_nan: bool = False):
    """Untrusted JSON (text or bytes) -> Python objects, or error(f"{where}: ...") in one line for bytes that are not
    UTF-8, malformed JSON, nesting deeper than MAX_JSON_DEPTH (never a RecursionError), NaN, Infinity or numbers that
    do not fit (allow_nan: Python's NaN and Infinity, as in a metrics log), and (unique_keys) a key twice in an
    object."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid JSON: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _no_constant,
                           parse_float=None if allow_nan else _finite,
                           object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:  # json's scanner counts its depth against Python's recursion limit
        raise error(f"{where}: JSON nested deeper than the {MAX_JSON_DEPTH} levels allowed") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a number of more than 4300 digits
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    # fewer brackets than the limit cannot nest deeper than it: the common case costs two counts
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _json_depth(value) > MAX_JSON_DEPTH:
        raise error(f"{where}: JSON nested {_json_depth(value)} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    return value


def load_json(file, error=ValueError) -> dict:
    """A JSON file that must hold an object (config.json, an index, a manifest): parse_json's checks, and a missing or
    unreadable file, each as error naming the file."""
    try:
        data = Path(file).read_bytes()
    except FileNotFoundError:
        raise error(f"{file}: not found") from None
    except OSError as e:
        raise error(f"{file}: cannot read it ({e.strerror})") from None
    obj = parse_json(data, file, error)
    if not isinstance(obj, dict):
        raise error(f"{file}: expected a JSON object, got {json_type(obj)}")
    return obj


def json_type(value) -> str:
    """A JSON value's type as the file spells it, for messages."""
    return {bool: "a bool", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)
