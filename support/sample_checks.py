"""support/sample_checks.py: sample.py's input checks. Used by sample.py (its flags, the checkpoint dir, --prompt_file)
and, through sample.Engine, by support/server.py (the ranges requests' settings are checked against); what it adds: the
range of each generation setting and each checked flag, raised as FlagError with the one line sample.py prints.
"""
import os
import re

from support import checks
from support.tokenizer_files import TOKENIZER_FILES

# The values each generation setting takes (the command line's flags, and any server's requests): kind, range
SETTINGS = {"temperature": (float, "[0, inf)"), "top_k": (int, "[0, inf)"), "top_p": (float, "(0, 1]"),
            "repetition_penalty": (float, "(0, inf)"), "max_new_tokens": (int, "[1, inf)"),
            "num_samples": (int, "[1, inf)"), "seed": (int, "[0, 2**63)")}


class FlagError(ValueError):
    """A flag, or what a flag names (the checkpoint dir, the prompt file), that sample.py cannot use."""


def check_settings(settings: dict):
    """ValueError "name=value: expected ..." for the first setting of SETTINGS that is out of its range (None means
    not set: the default applies); names outside SETTINGS are not looked at."""
    for name, value in settings.items():
        if name in SETTINGS and value is not None:
            checks.check_value(name, value, *SETTINGS[name])


def not_utf8(text):
    """Why text is not UTF-8 text, or "": bytes that are not UTF-8 (a Latin-1 or GBK terminal) reach Python's argv
    and stdin as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as e:
        return f"not UTF-8 text (character {e.start + 1}); set the terminal's encoding to UTF-8"


def check_flags(args):
    """The parsed flags (--stop already unescaped) against their ranges and each other; FlagError for the first
    that is wrong."""
    try:
        check_settings(vars(args))
        if args.group_size is not None:
            checks.check_value("group_size", args.group_size, int, "[1, inf)")
    except ValueError as e:
        raise FlagError(f"--{e}") from None
    if "" in args.stop:  # found at once in any text: nothing would ever be printed
        raise FlagError("--stop: an empty string would stop before the first token; expected a non-empty stop string")
    for flag, text in [("prompt", args.prompt), ("system", args.system)] + [("stop", s) for s in args.stop]:
        if text is not None and (bad := not_utf8(text)):
            raise FlagError(f"--{flag}: {bad}")
    if args.serve and (args.chat or args.prompt is not None or args.prompt_file or args.stop or args.num_samples > 1):
        raise FlagError("--serve: takes prompts from HTTP requests; drop --chat, --prompt, --prompt_file, --stop, "
                        "--num_samples")
    if not 0 <= args.port <= 65535 or args.max_batch < 1:
        raise FlagError(f"--port={args.port} --max_batch={args.max_batch}: expected a port in 0..65535 and a "
                        "batch >= 1")
    if args.max_requests < 1 or not 0 <= args.grace_period < float("inf"):
        raise FlagError(f"--max_requests={args.max_requests} --grace_period={args.grace_period}: expected at least "
                        "1 request and a finite number of seconds >= 0")
    for origin in args.allowed_origins.split(","):  # a browser's Origin: scheme://host[:port], no path, no slash
        if origin.strip() and origin.strip() != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+",
                                                                         origin.strip()):
            raise FlagError(f"--allowed_origins: {origin.strip()!r}: expected origins such as "
                            "http://localhost:3000 (no path, no trailing slash), or *")


def check_checkpoint_dir(ckpt):
    """--ckpt: a dir with config.json and a tokenizer (FlagError otherwise)."""
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise FlagError(f"--ckpt={ckpt}: no config.json there (expected a checkpoint dir from convert.py or train.py)")
    if not any(os.path.isfile(os.path.join(ckpt, f)) for f in TOKENIZER_FILES):
        raise FlagError(f"--ckpt={ckpt}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) in the checkpoint dir")


def read_prompt_file(path) -> list[str]:
    """--prompt_file: its prompts, one a line (blank lines skipped); FlagError where it is missing, not UTF-8 text
    or holds none."""
    if not os.path.isfile(path):
        raise FlagError(f"--prompt_file={path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]  # utf-8-sig: a BOM is no prompt text
    except UnicodeDecodeError as e:
        raise FlagError(f"--prompt_file={path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not prompts:
        raise FlagError(f"--prompt_file={path}: expected one prompt per line, found none")
    return prompts
