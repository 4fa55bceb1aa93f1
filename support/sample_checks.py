"""support/sample_checks.py: sample.py's input checks. Used by sample.py (its flags, the checkpoint dir, --device, the
tokenizer's vocabulary, --prompt_file, the flags that load a checkpoint, --system, prompts longer than the context)
and, through sample.Engine and serve, by support/server.py (the ranges requests' settings are checked against,
--system); what it adds: the range of each generation setting and each checked flag, raised as FlagError or
SampleError with the one line sample.py prints, and log (sample.py's stderr lines).
"""
import os
import re
import sys

import kernels  # kernels.py is a library; it does not import this file
from support.device import check_device
from support import checks
from support.tokenizer_files import TOKENIZER_FILES

# The values each generation setting takes (the command line's flags, and any server's requests): kind, range
SETTINGS = {"temperature": (float, "[0, inf)"), "top_k": (int, "[0, inf)"), "top_p": (float, "(0, 1]"),
            "repetition_penalty": (float, "(0, inf)"), "max_new_tokens": (int, "[1, inf)"),
            "num_samples": (int, "[1, inf)"), "seed": (int, "[0, 2**63)")}


class FlagError(ValueError):
    """A flag, or what a flag names (the checkpoint dir, the prompt file), that sample.py cannot use."""


class SampleError(Exception):
    """A flag, a checkpoint or an input sample.py cannot use: main prints it in one line and exits 1."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


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


def device_flag(flag) -> str:
    """--device, checked (SampleError where this machine has no such device), else kernels.device_type()."""
    try:
        return str(check_device(flag)) if flag else kernels.device_type()
    except ValueError as e:
        raise SampleError(f"--device={flag}: {str(e).split(': ', 1)[-1]}")


def check_vocab(ckpt, tok, model_args):
    """A tokenizer whose ids fit the model's embedding (SampleError otherwise)."""
    if tok.vocab_size > model_args.vocab_size:  # ids past the embedding would crash mid-generation
        raise SampleError(f"--ckpt={ckpt}: the tokenizer has {tok.vocab_size} tokens, the model's "
                          f"vocab_size={model_args.vocab_size} (a tokenizer from another model?)")


def check_load_flags(args, quantized):
    """--adapter, --quantize and --save_quantized against each other and the checkpoint's quantization (config.json's,
    or None): SampleError for a pair that cannot load."""
    if args.adapter and quantized and not (isinstance(quantized, dict) and quantized.get("mode") == "nf4"):
        raise SampleError(f"--adapter: {args.ckpt} is quantised; fold adapters into a full-precision checkpoint "
                          "(or use nf4: "
                          "an adapter runs beside NF4 weights)")
    if args.adapter and args.save_quantized and args.quantize == "nf4":
        raise SampleError("--save_quantized: with --quantize=nf4 the adapter stays apart from the NF4 weights; "
                          "save without "
                          "--adapter, then pass --adapter with the saved dir")
    if args.quantize and quantized:
        raise SampleError(f"--quantize={args.quantize}: {args.ckpt} is already quantised ({quantized})")


def check_system(tok, template, system, encode_turn):
    """--system, refused at start in one line by a chat template without a system role (Mistral's), not at the first
    turn or in every request. encode_turn: sample.py's (the template's rendering)."""
    if template and system:
        try:
            encode_turn(tok, template, [{"role": "user", "content": "Hi"}], system)
        except ValueError as e:
            raise SampleError(f"--system: the chat template refuses a system prompt ({e})")


def fit_prompt(ids, max_new_tokens, max_seq_len, policy, what, bos_id=None):
    """Make prompt + max_new_tokens fit the context: a clear error, or keep the last tokens (and bos) with a
    warning, as --on_long_prompt says."""
    room = max_seq_len - max_new_tokens
    if room < 1:
        raise SampleError(f"--max_new_tokens={max_new_tokens}: leaves no room for a prompt in the model's max_seq_len "
                          f"{max_seq_len}")
    if len(ids) <= room:
        return ids
    if policy == "error":
        raise SampleError(f"{what}: {len(ids)} tokens + --max_new_tokens={max_new_tokens} exceed the model's "
                          "max_seq_len "
                          f"{max_seq_len}; shorten it, lower --max_new_tokens, or pass --on_long_prompt=truncate")
    keep_bos = bos_id is not None and ids[0] == bos_id
    kept = ids[:1] + ids[len(ids) - room + 1:] if keep_bos else ids[len(ids) - room:]
    log(f"sample.py: warning: {what}: {len(ids)} tokens do not fit with --max_new_tokens={max_new_tokens} in "
        f"max_seq_len {max_seq_len}; keeping the last {len(kept)} tokens")
    return kept
