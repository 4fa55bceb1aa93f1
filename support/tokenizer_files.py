"""
A tokenizer's files: which files a tokenizer is, copying them, and tokenizer_config.json read without trust.

Used by prepare.py (load_tokenizer and its Tokenizer, which the other scripts call) and convert.py (the special ids
a checkpoint's config states, copying tokenizer files). What it adds: tokenizer_config.json's fields, ours
({"bos_id", ...}) and Hugging Face's ({"bos_token": "<s>", named chat templates, added tokens}), each checked for its
type and, for ids, against the vocabulary; a problem is one support.records.DataError naming the file and the field.
And the Tokenizer's special tokens found where each kind of tokenizer keeps them: the bos/eos/pad ids, the ids put
around a text (framing), a sentencepiece model's tokens matched in rendered chat text.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

from support.checks import check_json_fields, load_json
from support.jinja_templates import HF_TEMPLATE, is_jinja
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


# names that HF-style tokenizer_config.json files and common vocabularies use for the special tokens
SPECIAL_NAMES = {"bos": ("<s>", "<|startoftext|>", "<|begin_of_text|>", "<|endoftext|>"),
                 "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"),
                 "pad": ("<pad>", "<|pad|>", "[PAD]")}


def special_id(tok, config, kind):
    """The id of special token `kind` (bos, eos, pad), or None: tokenizer_config.json's id, else its token string,
    else sentencepiece's own id, else the first of SPECIAL_NAMES[kind] in the vocabulary."""
    if isinstance(config.get(f"{kind}_id"), int) and config[f"{kind}_id"] >= 0:
        return config[f"{kind}_id"]
    token = config.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and tok.token_to_id(token) is not None:
        return tok.token_to_id(token)
    if tok.sp is not None:  # sentencepiece stores its own ids (-1 = none)
        i = {"bos": tok.sp.bos_id, "eos": tok.sp.eos_id, "pad": tok.sp.pad_id}[kind]()
        if i >= 0:
            return i
    for name in SPECIAL_NAMES[kind]:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return None


def framing(tok, config):
    """(prefix, suffix): the ids the tokenizer adds around a text, its own convention as transformers applies it.

    A tokenizer.json beside the file decides through its post-processor (TemplateProcessing, or none); otherwise
    add_bos_token / add_eos_token in tokenizer_config.json; otherwise sentencepiece's LLaMA default, bos and no eos.
    (transformers 5 reads a bare tokenizer.model as no bos; LLaMA's own code and transformers 4 add it, and every
    published LLaMA tokenizer_config.json says add_bos_token explicitly.)
    """
    beside = tok.path.parent / "tokenizer.json"
    if beside.is_file():
        hf = tok.hf
        if hf is None:
            from tokenizers import Tokenizer as HFTokenizer
            try:
                hf = HFTokenizer.from_file(str(beside))
            except Exception as e:
                raise DataError(f"{beside}: cannot load tokenizer ({type(e).__name__}: {e})")
        probe = "a"
        plain, framed = hf.encode(probe, add_special_tokens=False).ids, hf.encode(probe).ids
        at = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), None)
        if at is None:
            raise DataError(f"{beside}: post_processor: expected special tokens around the text, "
                             f"got {framed} for {plain}")
        return framed[:at], framed[at + len(plain):]
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    if not isinstance(add_bos, bool):
        add_bos = tok.sp is not None
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    eos = [tok.eos_id] if add_eos is True and tok.eos_id is not None else []
    return bos, eos


def sentencepiece_chat_tokens(sp, config, vocab_size):
    """How a sentencepiece model encodes rendered chat text -> ({piece: id} matched as tokens: its control pieces
    (<s>, </s>, ...) and HF's added tokens, {piece: id} of the added tokens alone, legacy, add_prefix_space). As
    transformers' LlamaTokenizer, only text at the very start gets the "▁" prefix unless legacy=true."""
    added = {t["content"]: int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()
             if isinstance(t, dict) and isinstance(t.get("content"), str) and str(i).isdigit()
             and int(i) < vocab_size}
    specials = {**{sp.id_to_piece(i): i for i in range(vocab_size)
                   if sp.is_control(i) or sp.is_unknown(i)}, **added}
    return specials, added, config.get("legacy") is True, config.get("add_prefix_space") is not False


def chat_template_of(config, chat_template, builtin):
    """The chat template a tokenizer states: chat_template.jinja's text, else tokenizer_config.json's (HF's named
    templates: the "default" one) -> a name in builtin, Jinja text, or None."""
    template = chat_template or config.get("chat_template")
    if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": "..."}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and (template in builtin or is_jinja(template)) else None


def write_tokenizer_config(tok, file, template=None):
    """Our tokenizer_config.json for tok: ids, whether text gets bos/eos, and the chat template (template: a built-in
    name; None or hf: the tokenizer's own)."""
    config = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
              "add_bos_token": bool(tok.prefix), "add_eos_token": bool(tok.suffix),
              "chat_template": tok.chat_template if template in (None, HF_TEMPLATE) else template}
    if tok.sp is not None:
        config["legacy"] = tok.sp_legacy
        if tok.sp_added:  # HF's added tokens matched in rendered chat text, kept as transformers writes them
            config["added_tokens_decoder"] = {str(i): {"content": t, "special": True}
                                              for t, i in tok.sp_added.items()}
    Path(file).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def read_tokenizer_dir(path):
    """A tokenizer file, or a dir holding one -> (file, tokenizer_config.json's dict or {}, the chat_template.jinja
    beside it or None, the file that states the template: named in errors)."""
    path = Path(path)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DataError(f"{path}: expected a directory holding tokenizer.model or tokenizer.json")
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    config_path = path.parent / "tokenizer_config.json"
    config = read_tokenizer_config(config_path) if config_path.is_file() else {}
    template, template_file = None, path.parent / "chat_template.jinja"
    if template_file.is_file():
        try:
            template = template_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{template_file}: not UTF-8 text ({e})")
    return path, config, template, template_file if template else config_path
