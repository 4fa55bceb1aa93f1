"""
A tokenizer's files: which files a tokenizer is, copying them, and tokenizer_config.json read without trust.

Used by prepare.py (load_tokenizer, which the other scripts call) and convert.py (the special ids a checkpoint's
config states, copying tokenizer files). What it adds: tokenizer_config.json's fields, ours ({"bos_id", ...}) and
Hugging Face's ({"bos_token": "<s>", named chat templates, added tokens}), each checked for its type and, for ids,
against the vocabulary; a problem is one support.records.DataError naming the file and the field.
"""

import shutil
from pathlib import Path
from typing import Optional

from support.checks import check_json_fields, load_json
from support.records import DataError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # LLaMA dirs ship both: sentencepiece is the reference
TOKENIZER_EXTRAS = ("tokenizer_config.json", "chat_template.jinja")  # ids, conventions, the chat template


def copy_tokenizer_files(src, dst):
    """Copy a dir's tokenizer files as they are (the model or json, its config, a chat_template.jinja)."""
    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


# tokenizer_config.json, ours and HF's: what is read of it, and its types (special tokens by id or by string)
TOKENIZER_CONFIG = {**{f"{k}_id": Optional[int] for k in ("bos", "eos", "pad")},
                    **{f"{k}_token": str | dict | None for k in ("bos", "eos", "pad")},
                    **{k: Optional[bool] for k in ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space")},
                    "chat_template": str | list | None, "added_tokens_decoder": Optional[dict]}


def read_tokenizer_config(file: Path) -> dict:
    """tokenizer_config.json, each field read of its type: special tokens as {"content": str} or strings, HF's named
    chat templates as [{"name", "template"}], added tokens as {"id": {"content": str}}."""
    config = load_json(file, DataError)
    check_json_fields(config, TOKENIZER_CONFIG, file, DataError)
    for kind in ("bos", "eos", "pad"):
        token = config.get(f"{kind}_token")
        if isinstance(token, dict) and not isinstance(token.get("content"), str):
            raise DataError(f"{file}: {kind}_token: expected a string or an object with a string 'content'")
    templates = config.get("chat_template")
    if isinstance(templates, list) and not all(isinstance(t, dict) and isinstance(t.get("name"), str) and
                                               isinstance(t.get("template"), str) for t in templates):
        raise DataError(f"{file}: chat_template: expected a string, or a list of {{name, template}} strings")
    for i, t in (config.get("added_tokens_decoder") or {}).items():
        if not (i.isdigit() and isinstance(t, dict) and isinstance(t.get("content"), str)):
            raise DataError(f"{file}: added_tokens_decoder: {i!r}: expected a token id -> {{\"content\": string}}")
    return config


def special_ids_of(file: Path, vocab_size: int, config: Optional[dict] = None) -> dict:
    """{"bos_id", "eos_id", "pad_id"} stated by our tokenizer_config.json (absent or null: none), each an id below
    vocab_size; {} when there is no such file."""
    if config is None:
        config = read_tokenizer_config(file) if Path(file).is_file() else {}
    ids = {k: config[k] for k in ("bos_id", "eos_id", "pad_id") if config.get(k) is not None}
    for k, v in ids.items():
        if not 0 <= v < vocab_size:
            raise DataError(f"{file}: {k}={v}: not an id of the vocabulary (vocab_size {vocab_size})")
    return ids
