"""
prepare.py's flags checked: each flag's range, the names --format and --template take, and the flags that need
another or apply to one kind of data only; then, once the tokenizer is known, the template and --dtype against it.

Used by prepare.py (parse_args, which says a FlagError as the one line "prepare.py: ..." with exit status 2; the
tokenizer checks raise DataError, which main says in one line).
"""

import numpy as np

from support.checks import check_value
from support.datafiles import FORMATS, INSTRUCTION_FORMATS
from support.jinja_templates import HF_TEMPLATE, check_jinja_template
from support.records import DataError

# the flags with a range: kind and interval (support.checks.check_value's words when one is out of it)
FLAG_RANGES = {"workers": (int, "[1, inf)"), "vocab_size": (int, "[260, 2**31)"), "seq_len": (int, "[0, 2**24]"),
               "max_chars": (int, "[0, inf)"), "tokenizer_chars": (int, "[1, inf)"), "val_fraction": (float, "[0, 1)"),
               "max_source_len": (int, "[0, 2**24]"), "max_target_len": (int, "[0, 2**24]")}


class FlagError(ValueError):
    """A flag prepare.py cannot use: its value, or its combination with the others."""


def check_flags(args, templates):
    """Raise FlagError for the first flag of args that is out of its range or does not fit the others; templates:
    the built-in template names --template takes (besides hf)."""
    if args.format not in FORMATS:
        raise FlagError(f"--format={args.format}: unknown format; expected one of {', '.join(FORMATS)}")
    if args.template is not None and args.template not in (*templates, HF_TEMPLATE):
        raise FlagError(f"--template={args.template}: unknown template; expected one of "
                        f"{', '.join(templates)} or {HF_TEMPLATE}")
    for name, (kind, interval) in FLAG_RANGES.items():
        try:
            check_value(name, getattr(args, name), kind, interval)
        except ValueError as e:
            raise FlagError(f"--{e}") from None
    for name in ("max_source_len", "max_target_len"):
        if getattr(args, name) and args.format not in INSTRUCTION_FORMATS:
            raise FlagError(f"--{name}: applies to instruction data (--format one of "
                            f"{', '.join(INSTRUCTION_FORMATS)}), not to --format={args.format}")
    if args.pack and not args.seq_len:
        raise FlagError("--pack: needs --seq_len (the row length)")
    if args.one_per_row and not args.pack:
        raise FlagError("--one_per_row: needs --pack (and --seq_len, the row length)")


def check_template(tok, template, fmt, instruction, templates):
    """Raise DataError where instruction data has no template, or --template=hf meets a tokenizer without a usable
    Jinja chat template."""
    if instruction and template is None:
        raise DataError(f"--template: required for {fmt} data (one of {', '.join(templates)})")
    if template == HF_TEMPLATE:
        if tok.template_name != HF_TEMPLATE:
            raise DataError(f"--template=hf: {tok.template_file} holds no Jinja chat_template")
        check_jinja_template(tok)


def check_dtype(tok, dtype):
    """Raise DataError where the token dtype cannot hold every id of the vocabulary."""
    if tok.vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"--dtype={dtype}: vocab_size {tok.vocab_size} does not fit "
                         f"(ids up to {np.iinfo(dtype).max}); use --dtype=uint32")
