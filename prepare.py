"""
Data preparation: raw text and instruction data -> memmapped token files that train.py reads.

    python prepare.py                     # embedded default corpus (the Python standard library's sources)
                                          # -> trains a small sentencepiece tokenizer -> data/default/
    python prepare.py --input='data/raw/*.jsonl' --format=sharegpt --tokenizer=ckpt/baichuan2-7b \
                      --template=baichuan2 --seq_len=2048 --out=data/sft --workers=8

Output dir: train.bin / val.bin (uint16 or uint32 token ids, every document ends with eos),
train.docs.bin / val.docs.bin (int64 token offsets of document starts, plus the total: exact document boundaries),
train.mask.bin / val.mask.bin (uint8, instruction data only: 1 = this token is a target that counts in the loss),
meta.json, and the tokenizer (tokenizer.model or tokenizer.json + tokenizer_config.json). `--megatron` adds
train.idx / val.idx so that train.bin / val.bin are also Megatron-LM indexed datasets.

This file also owns the tokenizer and chat-template API that train.py and sample.py import: load_tokenizer,
Tokenizer, TEMPLATES, encode_chat (a family's default template: model.FAMILIES), template_jinja (a built-in
template as Hugging Face Jinja, for convert.py); and the reader of its output dir
that train.py trains from: read_meta, TokenSplit.
"""

import argparse
import contextlib
import copy
import glob
import io
import itertools
import json
import re
import shutil
import struct
import sys
import sysconfig
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from support import diskspace
from support.checks import check_json_fields, check_value, json_type, load_json, parse_json
from support.outputs import replace_dir

# -----------------------------------------------------------------------------
# Tokenizers: sentencepiece (.model) and HF tokenizers (tokenizer.json) behind one small interface

# names that HF-style tokenizer_config.json files and common vocabularies use for the special tokens
BOS_NAMES = ("<s>", "<|startoftext|>", "<|begin_of_text|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # LLaMA dirs ship both: sentencepiece is the reference
TOKENIZER_EXTRAS = ("tokenizer_config.json", "chat_template.jinja")  # ids, conventions, the chat template


class Tokenizer:
    """encode/decode text; bos_id, eos_id, pad_id (eos when the vocabulary has no pad), vocab_size; the special tokens
    the tokenizer itself puts around a text (`prefix`, `suffix`); its chat template (a built-in name or HF Jinja).

    `path` is the tokenizer file; `config` is the tokenizer_config.json dict found beside it (may be empty).
    Ours holds {"bos_id", "eos_id", "pad_id", "add_bos_token", "add_eos_token", "chat_template"}; HF's holds token
    strings ("bos_token": "<s>" or {"content": "<s>"}); both are understood.

    Which special tokens a text gets is the tokenizer's own convention, as transformers applies it: a tokenizer.json
    beside the file decides through its post-processor (TemplateProcessing, or none); otherwise add_bos_token /
    add_eos_token in tokenizer_config.json; otherwise sentencepiece's LLaMA default, bos and no eos. (transformers 5
    reads a bare tokenizer.model as no bos; LLaMA's own code and transformers 4 add it, and every published LLaMA
    tokenizer_config.json says add_bos_token explicitly.)
    """

    def __init__(self, path, config=None, chat_template=None, template_file=None):
        self.path = Path(path)
        config = config or {}
        self.template_file = template_file or self.path.parent / "tokenizer_config.json"  # named in errors
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        self.chat_template = template if isinstance(template, str) and (template in TEMPLATES or
                                                                         is_jinja(template)) else None
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer
            self.hf = HFTokenizer.from_file(str(self.path))
            self.sp = None
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self.hf = None
            self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self._special_id(config, "bos", BOS_NAMES)
        self.eos_id = self._special_id(config, "eos", EOS_NAMES)
        pad = self._special_id(config, "pad", PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad  # padding is always masked, so eos is a safe stand-in
        self.prefix, self.suffix = self._framing(config)
        if self.sp is not None:
            # The same model without sentencepiece's dummy prefix ("▁" added before the text): template text
            # that continues a prompt must not gain a space. Appending a NormalizerSpec with add_dummy_prefix=false
            # (field 3 of ModelProto, field 3 of NormalizerSpec) works because protobuf merges repeated messages.
            import sentencepiece as spm
            self.sp_continue = spm.SentencePieceProcessor()
            self.sp_continue.load_from_serialized_proto(self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00")
            # rendered chat text: the control pieces (<s>, </s>, ...) and HF's added tokens are matched as tokens;
            # as transformers' LlamaTokenizer, only text at the very start gets the "▁" prefix unless legacy=true
            added = {t["content"]: int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()
                     if isinstance(t, dict) and isinstance(t.get("content"), str) and str(i).isdigit()
                     and int(i) < self.vocab_size}
            self.sp_specials = {**{self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                                   if self.sp.is_control(i) or self.sp.is_unknown(i)}, **added}
            self.sp_added = added
            self.sp_legacy = config.get("legacy") is True
            self.sp_prefix_space = config.get("add_prefix_space") is not False

    def _special_id(self, config, kind, names):
        if isinstance(config.get(f"{kind}_id"), int) and config[f"{kind}_id"] >= 0:
            return config[f"{kind}_id"]
        token = config.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and self.token_to_id(token) is not None:
            return self.token_to_id(token)
        if self.sp is not None:  # sentencepiece stores its own ids (-1 = none)
            i = {"bos": self.sp.bos_id, "eos": self.sp.eos_id, "pad": self.sp.pad_id}[kind]()
            if i >= 0:
                return i
        for name in names:
            if self.token_to_id(name) is not None:
                return self.token_to_id(name)
        return None

    def _framing(self, config):
        """(prefix, suffix): the ids the tokenizer adds around a text (see the class docstring for who decides)."""
        beside = self.path.parent / "tokenizer.json"
        if beside.is_file():
            hf = self.hf
            if hf is None:
                from tokenizers import Tokenizer as HFTokenizer
                try:
                    hf = HFTokenizer.from_file(str(beside))
                except Exception as e:
                    raise SystemExit(f"prepare.py: {beside}: cannot load tokenizer ({type(e).__name__}: {e})")
            probe = "a"
            plain, framed = hf.encode(probe, add_special_tokens=False).ids, hf.encode(probe).ids
            at = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), None)
            if at is None:
                raise SystemExit(f"prepare.py: {beside}: post_processor: expected special tokens around the text, "
                                 f"got {framed} for {plain}")
            return framed[:at], framed[at + len(plain):]
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if not isinstance(add_bos, bool):
            add_bos = self.sp is not None
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        eos = [self.eos_id] if add_eos is True and self.eos_id is not None else []
        return bos, eos

    def encode(self, text, add_special_tokens=False):
        """Text -> ids; add_special_tokens=True frames them as the tokenizer does (HF's tokenizer(text).input_ids)."""
        ids = self.sp.encode(text) if self.sp is not None else self.hf.encode(text, add_special_tokens=False).ids
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def frame_document(self, ids, first=True, last=True):
        """A pretraining document: framed as the tokenizer frames text, always ending with eos (the separator)."""
        end = self.suffix if self.suffix[-1:] == [self.eos_id] else self.suffix + [self.eos_id]
        return (self.prefix if first else []) + ids + (end if last else [])

    @property
    def dummy_prefix(self) -> bool:
        """Whether the sentencepiece model puts its "▁" before a text (LLaMA's does, Baichuan's does not)."""
        return self.sp is not None and self.encode("a") != self.encode_continuation("a")

    def encode_continuation(self, text):
        """Encode text that continues earlier text (no dummy-prefix space; HF byte-level BPE adds none)."""
        if self.sp is not None:
            return self.sp_continue.encode(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text):
        """Text rendered by a chat template, special-token strings in it ("<s>", "<|im_start|>") becoming their ids,
        as transformers' apply_chat_template(tokenize=True) does -> (ids, [(start, end) character span per id])."""
        if self.hf is not None:
            enc = self.hf.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        ids, spans = [], []
        specials = sorted(self.sp_specials, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        pos = 0
        for m in itertools.chain(pattern.finditer(text) if pattern else (), [None]):
            end = m.start() if m else len(text)
            if end > pos:
                piece = text[pos:end]
                prefix = self.sp_prefix_space and (pos == 0 or self.sp_legacy) and not piece.startswith(" ")
                model = self.sp if prefix else self.sp_continue
                char_at = _byte_to_char(piece)
                for p in model.encode(piece, return_type="proto").pieces:  # begin/end: byte offsets
                    ids.append(p.id)
                    spans.append((pos + char_at[p.begin], pos + char_at[p.end]))
            if m:
                ids.append(self.sp_specials[m.group()])
                spans.append((m.start(), m.end()))
                pos = m.end()
        return ids, spans

    def encode_batch(self, texts):
        """list[str] -> list[list[int]] without special tokens; both backends run this loop in C++."""
        if self.sp is not None:
            return self.sp.encode(texts, num_threads=1)  # parallelism comes from --workers alone
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token):
        if self.sp is not None:
            i = self.sp.piece_to_id(token)
            return i if self.sp.id_to_piece(i) == token else None  # sentencepiece maps unknown pieces to unk
        return self.hf.token_to_id(token)

    @property
    def template_name(self):
        """The tokenizer's own chat template as a --template value: a built-in name, "hf" for Jinja, or None."""
        if self.chat_template is None:
            return None
        return HF_TEMPLATE if is_jinja(self.chat_template) else self.chat_template

    def special_tokens(self):
        """{string: id} of the tokens that text rendered by a chat template names by their strings."""
        if self.sp is not None:
            return self.sp_specials
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def id_to_token(self, i):
        if i is None or not 0 <= i < self.vocab_size:
            return None
        return self.sp.id_to_piece(i) if self.sp is not None else self.hf.id_to_token(i)

    @property
    def filename(self):
        return "tokenizer.model" if self.sp is not None else "tokenizer.json"

    def save(self, out_dir, template=None):
        """Copy the tokenizer file into out_dir and write tokenizer_config.json: ids, whether text gets bos/eos, and
        the chat template (a built-in name, or the model's own Jinja template)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / self.filename).resolve() != self.path.resolve():
            shutil.copyfile(self.path, out_dir / self.filename)
        config = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                  "add_bos_token": bool(self.prefix), "add_eos_token": bool(self.suffix),
                  "chat_template": self.chat_template if template in (None, HF_TEMPLATE) else template}
        if self.sp is not None:
            config["legacy"] = self.sp_legacy
            if self.sp_added:  # HF's added tokens matched in rendered chat text, kept as transformers writes them
                config["added_tokens_decoder"] = {str(i): {"content": t, "special": True}
                                                  for t, i in self.sp_added.items()}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(src, dst):
    """Copy a dir's tokenizer files as they are (the model or json, its config, a chat_template.jinja)."""
    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def _byte_to_char(text):
    """UTF-8 byte offset -> character offset, for every byte offset 0..len(bytes) of text."""
    table = []
    for i, ch in enumerate(text):
        table += [i] * len(ch.encode("utf-8"))
    return table + [len(text)]


@contextlib.contextmanager
def errors_as(script):
    """prepare.py's one-line errors (a tokenizer, a data dir read by another script) said as `script`'s: the command
    the user ran."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("prepare.py: "):
            raise SystemExit(f"{script}: {e.code.removeprefix('prepare.py: ')}") from None
        raise


def load_tokenizer(path):
    """A sentencepiece .model, an HF tokenizer.json, or a dir holding one (checkpoint dir, data dir).

    tokenizer_config.json beside it gives ids and conventions; a chat_template.jinja beside it (transformers' own
    file for the template) takes precedence over the config's chat_template, as in transformers."""
    path = Path(path)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise SystemExit(f"prepare.py: {path}: expected a directory holding tokenizer.model or tokenizer.json")
    if not path.is_file():
        raise SystemExit(f"prepare.py: {path}: tokenizer file not found")
    config_path = path.parent / "tokenizer_config.json"
    config = read_tokenizer_config(config_path) if config_path.is_file() else {}
    template, template_file = None, path.parent / "chat_template.jinja"
    if template_file.is_file():
        try:
            template = template_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"prepare.py: {template_file}: not UTF-8 text ({e})")
    try:
        tok = Tokenizer(path, config, template, template_file if template else config_path)
    except SystemExit:
        raise
    except Exception as e:  # sentencepiece / tokenizers raise RuntimeError or OSError on corrupt files
        raise SystemExit(f"prepare.py: {path}: cannot load tokenizer ({type(e).__name__}: {e})")
    special_ids_of(config_path, tok.vocab_size, config)  # the ids it states are ids of this vocabulary
    return tok


def vocabulary_difference(model_dir, data_dir):
    """None when data_dir's tokenizer has model_dir's pieces at the same ids (or either dir holds no tokenizer file:
    nothing to compare), else the first difference. Pieces, not bytes: a LLaMA dir's tokenizer.model and
    tokenizer.json are one vocabulary."""
    if not all(any((Path(d) / name).is_file() for name in TOKENIZER_FILES) for d in (model_dir, data_dir)):
        return None
    ours, theirs = load_tokenizer(model_dir), load_tokenizer(data_dir)
    if ours.vocab_size != theirs.vocab_size:
        return f"{theirs.vocab_size:,} tokens, not {ours.vocab_size:,}"
    i = next((i for i in range(ours.vocab_size) if ours.id_to_token(i) != theirs.id_to_token(i)), None)
    return None if i is None else f"id {i} is {theirs.id_to_token(i)!r}, not {ours.id_to_token(i)!r}"


# tokenizer_config.json, ours and HF's: what is read of it, and its types (special tokens by id or by string)
TOKENIZER_CONFIG = {**{f"{k}_id": Optional[int] for k in ("bos", "eos", "pad")},
                    **{f"{k}_token": str | dict | None for k in ("bos", "eos", "pad")},
                    **{k: Optional[bool] for k in ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space")},
                    "chat_template": str | list | None, "added_tokens_decoder": Optional[dict]}


def _config_error(msg):
    """prepare.py's one-line exit, for model.py's checks."""
    return SystemExit(f"prepare.py: {msg}")


def read_tokenizer_config(file: Path) -> dict:
    """tokenizer_config.json, each field read of its type: special tokens as {"content": str} or strings, HF's named
    chat templates as [{"name", "template"}], added tokens as {"id": {"content": str}}."""
    config = load_json(file, _config_error)
    check_json_fields(config, TOKENIZER_CONFIG, file, _config_error)
    for kind in ("bos", "eos", "pad"):
        token = config.get(f"{kind}_token")
        if isinstance(token, dict) and not isinstance(token.get("content"), str):
            raise _config_error(f"{file}: {kind}_token: expected a string or an object with a string 'content'")
    templates = config.get("chat_template")
    if isinstance(templates, list) and not all(isinstance(t, dict) and isinstance(t.get("name"), str) and
                                               isinstance(t.get("template"), str) for t in templates):
        raise _config_error(f"{file}: chat_template: expected a string, or a list of {{name, template}} strings")
    for i, t in (config.get("added_tokens_decoder") or {}).items():
        if not (i.isdigit() and isinstance(t, dict) and isinstance(t.get("content"), str)):
            raise _config_error(f"{file}: added_tokens_decoder: {i!r}: expected a token id -> {{\"content\": string}}")
    return config


def special_ids_of(file: Path, vocab_size: int, config: Optional[dict] = None) -> dict:
    """{"bos_id", "eos_id", "pad_id"} stated by our tokenizer_config.json (absent or null: none), each an id below
    vocab_size; {} when there is no such file."""
    if config is None:
        config = read_tokenizer_config(file) if Path(file).is_file() else {}
    ids = {k: config[k] for k in ("bos_id", "eos_id", "pad_id") if config.get(k) is not None}
    for k, v in ids.items():
        if not 0 <= v < vocab_size:
            raise _config_error(f"{file}: {k}={v}: not an id of the vocabulary (vocab_size {vocab_size})")
    return ids


def train_sentencepiece(texts, out_dir, vocab_size=8192, seed=1337):
    """Train a LLaMA-style sentencepiece BPE model on an iterable of lines -> out_dir/tokenizer.model.

    Deterministic: single thread, no sampling or shuffling of the input, fixed seed. Settings follow LLaMA's
    tokenizer (identity normalisation, whitespace kept, digits split, byte fallback) so any text round-trips.
    """
    import sentencepiece as spm
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # not model_prefix: the model would record that (temporary) path and differ run to run
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192, num_threads=1,
        minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return out_dir / "tokenizer.model"


# -----------------------------------------------------------------------------
# Chat templates. A built-in template turns messages into segments: (piece, counts_in_loss), where a piece is text
# (encoded on its own), an int (a literal token id, e.g. Baichuan's 195/196), or a Special (a named token such as
# bos/eos, resolved with the tokenizer). Adjacent prompt text is merged before encoding, as the reference
# implementations encode whole prompt strings. A model's own Hugging Face template (Jinja, in its
# tokenizer_config.json) is used as transformers uses it: see the Jinja section below.

@dataclass(frozen=True)
class Special:
    name: str  # "bos", "eos", or a token string like "<|im_end|>"


BOS, EOS = Special("bos"), Special("eos")
START = Special("start")  # what the tokenizer puts before a text (bos or nothing): for references that tokenize the
                          # whole prompt with the tokenizer's defaults
IM_START, IM_END = Special("<|im_start|>"), Special("<|im_end|>")


def _turns(messages):
    """Yield (role, content, message) for user/assistant messages (roles already normalised)."""
    for m in messages:
        yield m["role"], m["content"], m


def render_baichuan(messages, system, gen):
    # Baichuan-13B-Chat / Baichuan2-Chat build_chat_input: system tokens, then 195 + user, 196 + reply; the reply
    # ends with eos as in Baichuan2's fine-tune.py. Ids 195/196 are inserted directly, never via text.
    segs = [(system, False)] if system else []
    for role, content, _ in _turns(messages):
        if role == "user":
            segs += [(195, False), (content, False)]
        else:
            segs += [(196, False), (content, True), (EOS, True)]
    if gen:
        segs.append((196, False))
    return segs


BAICHUAN_JINJA = (r"{% if system %}{{ system }}{% endif %}{% for m in turns %}"
                  r"{% set gap = space if m.content else '' %}{% if m.role == 'user' %}"
                  r"{{ user_token + gap + m.content }}{% else %}{{ assistant_token + gap + m.content + eos }}"
                  r"{% endif %}{% endfor %}"
                  r"{% if add_generation_prompt %}{{ assistant_token }}{% endif %}")


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def render_vicuna(messages, system, gen):
    # FastChat vicuna_v1.1: "{system} USER: {u} ASSISTANT: {a}</s>USER: {u} ASSISTANT:", tokenized as one string
    # with the tokenizer's defaults (LLaMA's: bos first)
    segs = [(START, False), ((system or VICUNA_SYSTEM) + " ", False)]
    for role, content, _ in _turns(messages):
        if role == "user":
            segs.append((f"USER: {content} ", False))
        else:
            segs += [("ASSISTANT:", False), (" " + content, True), (EOS, True)]
    if gen:
        segs.append(("ASSISTANT:", False))
    return segs


VICUNA_JINJA = (r"{{ start + (system or default) + ' ' }}{% for m in turns %}{% if m.role == 'user' %}"
                r"{{ 'USER: ' + m.content + ' ' }}{% else %}{{ 'ASSISTANT: ' + m.content + eos }}{% endif %}"
                r"{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.")


ALPACA_PROMPT = re.compile(r"(Below is an instruction that describes a task.*?)?### Instruction:\n.*### Response:\s*",
                           re.DOTALL)


class TemplateError(ValueError):
    """The messages do not suit the template (e.g. a prompt already formatted for it): one line, names the fix."""


def render_alpaca(messages, system, gen):
    # Stanford Alpaca prompt (with and without input), tokenized with the tokenizer's defaults (LLaMA's: bos first);
    # later turns repeat the Instruction/Response blocks. The reply starts on the line after "### Response:" as in
    # Alpaca's README and alpaca-lora (its train.py appends the output right after the colon).
    # A user turn that already is a whole alpaca prompt (FastChat's alpaca-data-conversation.json) is used as it is.
    first_input = next((m.get("input") for m in messages if m["role"] == "user"), None)
    header = system or (ALPACA_SYSTEM_INPUT if first_input else ALPACA_SYSTEM)
    segs = [(START, False)]
    for i, (role, content, m) in enumerate(_turns(messages)):
        if role != "user":
            segs += [(content, True), (EOS, True)]
        elif ALPACA_PROMPT.fullmatch(content) and content.startswith(("Below is an instruction", "### Instruction:")):
            segs.append((("\n\n" if i else "") + content.rstrip() + "\n", False))
        elif "### Instruction:" in content or "### Response:" in content:
            raise TemplateError("message %d already holds alpaca markers ('### Instruction:' / '### Response:') but is "
                                "not a whole alpaca prompt: wrapping it again would nest two prompts; use "
                                "--template=vicuna (as FastChat trains on this data) or clean the record" % i)
        else:
            block = ("" if i else header) + f"\n\n### Instruction:\n{content}"
            if m.get("input"):
                block += f"\n\n### Input:\n{m['input']}"
            segs.append((block + "\n\n### Response:\n", False))
    return segs  # the generation prompt already ends every user block


# chat messages carry no alpaca "input" field: the header is the one without input
ALPACA_JINJA = (r"{{ start }}{% for m in turns %}{% if m.role == 'user' %}"
                r"{{ (system or default) if loop.first else '' }}"
                r"{{ '\n\n### Instruction:\n' + m.content + '\n\n### Response:\n' }}"
                r"{% else %}{{ m.content + eos }}{% endif %}{% endfor %}")


AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def render_aquila(messages, system, gen):
    # FlagAI aquila-chat: "{system}###Human: {u}###Assistant: {a}###"; "###" is the stop string, so it counts in
    # the loss after each reply; the conversation ends with eos.
    segs = [((system or AQUILA_SYSTEM) + "###", False)]
    for role, content, _ in _turns(messages):
        if role == "user":
            segs.append((f"Human: {content}###", False))
        else:
            segs += [("Assistant:", False), (" " + content, True), ("###", True)]
    if gen:
        segs.append(("Assistant:", False))
    elif segs[-1][1]:
        segs.append((EOS, True))
    return segs


AQUILA_JINJA = (r"{{ (system or default) + '###' }}{% for m in turns %}{% if m.role == 'user' %}"
                r"{{ 'Human: ' + m.content + '###' }}{% else %}{{ 'Assistant: ' + m.content + '###' }}{% endif %}"
                r"{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}"
                r"{% elif turns and turns[-1].role == 'assistant' %}{{ eos }}{% endif %}")


def render_llama2(messages, system, gen):
    # Meta's llama-2 chat_completion: each exchange is "<s>[INST] {u} [/INST] {a} </s>", the system prompt is
    # wrapped in <<SYS>> inside the first user turn.
    segs, first = [], True
    for role, content, _ in _turns(messages):
        if role == "user":
            if first and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            first = False
            segs += [(BOS, False), (f"[INST] {content.strip()} [/INST]", False)]
        else:
            segs += [(" " + content.strip() + " ", True), (EOS, True)]
    return segs  # a trailing user turn is already the generation prompt


LLAMA2_JINJA = (r"{% set first = namespace(user=true) %}{% for m in turns %}{% if m.role == 'user' %}"
                r"{% set content = m.content %}{% if first.user and system %}"
                r"{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}{% endif %}"
                r"{% set first.user = false %}{{ bos + '[INST] ' + content.strip() + ' [/INST]' }}{% else %}"
                r"{{ ' ' + m.content.strip() + ' ' + eos }}{% endif %}{% endfor %}")


def render_chatml(messages, system, gen):
    # "<|im_start|>role\n{content}<|im_end|>\n"; a tokenizer without <|im_end|> gets eos in its place so that
    # generation stops there.
    segs = [(IM_START, False), (f"system\n{system}", False), (IM_END, False), ("\n", False)] if system else []
    for role, content, _ in _turns(messages):
        segs += [(IM_START, False), (f"{role}\n", False)]
        if role == "user":
            segs += [(content, False), (IM_END, False), ("\n", False)]
        else:
            segs += [(content, True), (IM_END, True), ("\n", False)]
    if gen:
        segs += [(IM_START, False), ("assistant\n", False)]
    return segs


CHATML_JINJA = (r"{% if system %}{{ im_start + 'system\n' + system + im_end + '\n' }}{% endif %}{% for m in turns %}"
                r"{{ im_start + m.role + '\n' + m.content + im_end + '\n' }}{% endfor %}"
                r"{% if add_generation_prompt %}{{ im_start + 'assistant\n' }}{% endif %}")


def render_human_assistant(messages, system, gen):
    # Baichuan-7B QLoRA recipe (wp931120/baichuan_sft_lora): bos + "Human: {u}\n\nAssistant: {a}</s>", turns
    # joined by a blank line; a record's input follows its instruction with nothing between (input_sep)
    segs = [(BOS, False)] + ([(system + "\n\n", False)] if system else [])
    for role, content, _ in _turns(messages):
        if role == "user":
            sep = "\n\n" if segs[-1][0] == EOS else ""
            segs.append((f"{sep}Human: {content}\n\n", False))
        else:
            segs += [("Assistant:", False), (" " + content, True), (EOS, True)]
    if gen:
        segs.append(("Assistant:", False))
    return segs


HUMAN_ASSISTANT_JINJA = (r"{{ bos }}{% if system %}{{ system + '\n\n' }}{% endif %}{% for m in turns %}"
                         r"{% if m.role == 'user' %}{% if loop.previtem and loop.previtem.role == 'assistant' %}"
                         r"{{ '\n\n' }}{% endif %}{{ 'Human: ' + m.content + '\n\n' }}{% else %}"
                         r"{{ 'Assistant: ' + m.content + eos }}{% endif %}{% endfor %}"
                         r"{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@dataclass(frozen=True)
class Template:
    render: Callable  # (messages, system, add_generation_prompt) -> list of (piece, counts_in_loss)
    source: str       # where the format is published
    stop: tuple = ()  # what ends a reply besides eos when a model writes on: the next turn's text, or its token
                      # (an id, or a Special looked up in the vocabulary)
    input_sep: str = "\n"  # between an alpaca-style record's instruction and input (LLaMA-Efficient-Tuning's)
    jinja: str = ""  # the same format as a Hugging Face chat_template body: see template_jinja for its names
    system: str = ""  # the default system prompt, where the format has one


TEMPLATES = {  # 195 = Baichuan's user token
    "baichuan": Template(render_baichuan, "Baichuan-13B-Chat generation_utils.py (user 195, assistant 196)", (195,),
                         jinja=BAICHUAN_JINJA),
    "baichuan2": Template(render_baichuan, "Baichuan2-Chat generation_utils.py, fine-tune.py (195, 196)", (195,),
                          jinja=BAICHUAN_JINJA),
    "vicuna": Template(render_vicuna, "FastChat conversation.py vicuna_v1.1", ("USER:",), jinja=VICUNA_JINJA,
                       system=VICUNA_SYSTEM),
    "alpaca": Template(render_alpaca, "tatsu-lab/stanford_alpaca PROMPT_DICT", ("### Instruction:",),
                       jinja=ALPACA_JINJA, system=ALPACA_SYSTEM),
    "aquila": Template(render_aquila, "FlagAI aquila-chat conversation template", ("###",), jinja=AQUILA_JINJA,
                       system=AQUILA_SYSTEM),
    "llama-2": Template(render_llama2, "meta-llama/llama generation.py chat_completion", ("[INST]",),
                        jinja=LLAMA2_JINJA),
    "chatml": Template(render_chatml, "OpenAI ChatML", (IM_END,), jinja=CHATML_JINJA),
    "human-assistant": Template(render_human_assistant, "Baichuan-7B QLoRA recipe", ("Human:",), input_sep="",
                                jinja=HUMAN_ASSISTANT_JINJA),
}

# A built-in template as a Hugging Face Jinja chat_template (what native-to-hf writes, so that transformers, vLLM and
# TGI render conversations as the model was trained). The body uses `system` (the first system message), `turns`
# (the other messages), `default` (the default system prompt) and the tokenizer's own strings set in a header:
# `start` (what the tokenizer puts before a text), `bos`, `eos`, `im_start`, `im_end`, `user_token`,
# `assistant_token`, and `space`: " " where sentencepiece's dummy prefix begins text that follows a special token
# (transformers adds it only at the very start of the rendered text).
JINJA_MESSAGES = ("{%- set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') "
                  "| first -%}{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}")
JINJA_PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"},
               {"role": "assistant", "content": "A model."}, {"role": "user", "content": "And 2+2?"},
               {"role": "assistant", "content": "It is 4."}]


def template_jinja(tok, name):
    """Built-in template `name` as a Jinja chat_template for this tokenizer, or None where the Jinja would not give
    encode_chat's ids (e.g. where Baichuan's ids 195/196 are ordinary pieces, no string names them). Checked on a
    probe conversation, rendered and tokenized as transformers' apply_chat_template does."""
    template = TEMPLATES[name]
    space = " " if tok.dummy_prefix else ""
    strings = {"default": template.system, "space": space, "im_start": IM_START.name,
               "start": "".join(tok.id_to_token(i) or "" for i in tok.prefix) + (space if tok.prefix else ""),
               "bos": (tok.id_to_token(tok.bos_id) or "") + space if tok.bos_id is not None else "",
               "eos": tok.id_to_token(tok.eos_id) or "",
               "im_end": IM_END.name if tok.token_to_id(IM_END.name) is not None else tok.id_to_token(tok.eos_id),
               "user_token": reserved_marker(tok, 195), "assistant_token": reserved_marker(tok, 196)}
    header = "".join(f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}" for k, v in strings.items()
                     if v is not None)
    probe = copy.copy(tok)
    probe.chat_template = JINJA_MESSAGES + header + template.jinja
    for messages, gen in ((JINJA_PROBE, False), (JINJA_PROBE[:4], True), (JINJA_PROBE[1:4], True)):
        try:
            ids = probe.encode_rendered(render_jinja(probe, messages, gen)[0])[0]
        except TemplateError:  # a name the header could not set
            return None
        if ids != encode_chat(tok, name, messages, add_generation_prompt=gen)[0]:
            return None
    return probe.chat_template


def reserved_marker(tok, i):
    """The string of token id i where it is a marker, not text: a special or added token, or a sentencepiece
    user-defined piece such as Baichuan's "<reserved_102>" (its text encodes to it); else None."""
    piece = tok.id_to_token(i)
    if piece in tok.special_tokens():
        return piece
    if tok.sp is not None and piece and not tok.sp.is_byte(i) and re.fullmatch(r"<[^<>\s]+>", piece):
        return piece
    return None


def literal_id_warning(tok, name):
    """A warning line where built-in template `name` inserts token ids that are ordinary text in this tokenizer
    (Baichuan's user/assistant ids 195/196 in a LLaMA vocabulary are bytes), else None. Baichuan's own vocabularies
    hold reserved markers there ("<reserved_102>": a user-defined piece, or a control or added token)."""
    ids = sorted({p for p, _ in TEMPLATES[name].render(JINJA_PROBE[1:3], None, True) if isinstance(p, int)})
    plain = [i for i in ids if reserved_marker(tok, i) is None]
    if plain:
        pieces = ", ".join(f"{i} = {tok.id_to_token(i)!r}" for i in plain)
        return (f"warning: --template={name} inserts token ids that are ordinary text in {tok.path} ({pieces}), "
                f"not its reserved user/assistant markers: this template expects {name.capitalize()}'s tokenizer")
    return None


ROLE_NAMES = {  # every spelling the supported data formats use, lower-cased, <|...|> and ':' stripped
    "user": "user", "human": "user", "prompter": "user", "instruction": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "moss": "assistant",
    "model": "assistant", "ai": "assistant", "answer": "assistant", "system": "system",
}


def normalize_role(role):
    """'human', 'gpt', '<|Human|>', 'MOSS', 'USER' ... -> 'user' | 'assistant' | 'system' | None."""
    key = str(role).strip().strip(":").strip()
    key = key[2:-2] if key.startswith("<|") and key.endswith("|>") else key
    return ROLE_NAMES.get(key.lower())


def _resolve(tok, special):
    """A Special -> its ids ([] where the vocabulary lacks bos/eos), or None: spell the name out as text."""
    if special == START:
        return tok.prefix
    i = tok.bos_id if special == BOS else tok.eos_id if special == EOS else tok.token_to_id(special.name)
    if i is None and special == IM_END:
        i = tok.eos_id
    return [i] if i is not None else [] if special in (BOS, EOS) else None


def chat_messages(messages, template, system=None):
    """Normalise roles; a leading system message is the system prompt unless `system` is given; an alpaca record's
    input joins its instruction except in the alpaca template, which has an Input block -> (turns, system)."""
    turns = []
    for m in messages:
        role = normalize_role(m.get("role"))
        if role is None:
            raise ValueError(f"unknown role {m.get('role')!r}; expected user or assistant")
        if role == "system":
            system = m["content"] if system is None else system
            continue
        if m.get("input") and template != "alpaca":
            sep = TEMPLATES[template].input_sep if template in TEMPLATES else "\n"
            m = {"role": role, "content": f"{m['content']}{sep}{m['input']}"}
        turns.append({**m, "role": role})
    return turns, system


def encode_chat(tok, template, messages, system=None, add_generation_prompt=False, train_on_prompt=False):
    """messages [{"role": "user"|"assistant"|"system", "content": str, ("input": str)}] -> (ids, loss_mask).

    template: a name in TEMPLATES, or "hf" for the tokenizer's own Jinja chat template.
    loss_mask[i] = 1 where ids[i] is part of an assistant reply or the token that ends it (eos, <|im_end|>); with
    train_on_prompt, every token counts. A leading system message is used when `system` is None. With
    add_generation_prompt=True the ids end where the assistant's reply starts.
    """
    if template != HF_TEMPLATE and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)} or {HF_TEMPLATE}")
    turns, system = chat_messages(messages, template, system)
    if template == HF_TEMPLATE:
        ids, mask = encode_jinja_chat(tok, turns, system, add_generation_prompt)
    else:
        ids, mask = _encode_segments(tok, TEMPLATES[template].render(turns, system, add_generation_prompt))
    return ids, [1] * len(ids) if train_on_prompt else mask


def _encode_segments(tok, segs):
    # merge adjacent text of the same kind: reference implementations encode whole prompt strings
    merged = []
    for piece, counts in segs:
        if merged and isinstance(piece, str) and isinstance(merged[-1][0], str) and merged[-1][1] == counts:
            merged[-1] = (merged[-1][0] + piece, counts)
        else:
            merged.append((piece, counts))
    ids, mask = [], []
    fresh = True  # text at the start, after bos or after a literal id (Baichuan encodes each content on its own)
    for piece, counts in merged:
        if isinstance(piece, Special):
            new = _resolve(tok, piece)
            if new is None:  # a special token the vocabulary lacks is spelled out as text
                new = tok.encode_continuation(piece.name)
            fresh = piece in (BOS, START)
        elif isinstance(piece, int):
            new, fresh = [piece], True
        else:
            # text continuing earlier text is encoded without the dummy-prefix space, as if in one string
            new = (tok.encode(piece) if fresh else tok.encode_continuation(piece)) if piece else []
            fresh = False
        ids += new
        mask += [int(counts)] * len(new)
    return ids, mask


# -----------------------------------------------------------------------------
# A model's own chat template: Hugging Face's Jinja `chat_template`, rendered as transformers' apply_chat_template
# renders it (sandboxed Jinja, trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception,
# strftime_now, {% generation %} blocks; bos_token/eos_token/unk_token/pad_token as strings), the text then
# tokenized with special-token strings matched as tokens and no bos/eos added. The loss mask: the span of each
# assistant reply in the rendered text and the special token that closes it. {% generation %} blocks mark the spans
# where the template has them; otherwise they are found by rendering growing prefixes of the conversation: the text
# up to a reply, rendered with the generation prompt, must be a prefix of the text that includes the reply.

HF_TEMPLATE = "hf"
_MARK = ("\ue000", "\ue001")  # private-use characters bracketing {% generation %} output while rendering


def is_jinja(template):
    return "{{" in template or "{%" in template


def _jinja_template(source):
    """Compile once per template string (cached on the function)."""
    cache = _jinja_template.__dict__.setdefault("cache", {})
    if source not in cache:
        from datetime import datetime

        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

            def _mark(self, caller):
                return _MARK[0] + caller() + _MARK[1]

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        cache[source] = env.from_string(source)
    return cache[source]


def check_jinja_template(tok):
    """Compile the tokenizer's template: a syntax error is one line naming where the template came from."""
    import jinja2
    try:
        _jinja_template(tok.chat_template)
    except jinja2.TemplateError as e:
        raise SystemExit(f"prepare.py: {tok.template_file}: chat_template: {type(e).__name__}: {e}")


def render_jinja(tok, messages, add_generation_prompt):
    """-> (text, [(start, end) of each {% generation %} block] or None where the template has none)."""
    import jinja2
    specials = {f"{k}_token": tok.id_to_token(getattr(tok, f"{k}_id")) for k in ("bos", "eos", "pad")}
    specials["unk_token"] = tok.id_to_token(tok.sp.unk_id()) if tok.sp is not None else None
    if tok.pad_id == tok.eos_id:  # our pad falls back to eos; the template sees no pad token, as in transformers
        specials["pad_token"] = None
    try:
        text = _jinja_template(tok.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **{k: v for k, v in specials.items() if v is not None})
    except jinja2.TemplateError as e:
        raise TemplateError(f"{tok.template_file}: chat_template: {e}") from None
    if _MARK[0] not in text:
        return text, None
    spans, out, pos = [], [], 0
    for part in re.split(f"([{_MARK[0]}{_MARK[1]}])", text):
        if part == _MARK[0]:
            start = pos
        elif part == _MARK[1]:
            spans.append((start, pos))
        else:
            out.append(part)
            pos += len(part)
    return "".join(out), spans


def _reply_spans(tok, messages, text):
    """Character spans of every assistant reply in `text` (the whole conversation rendered), each through the special
    token that closes it, found by rendering the conversation up to each reply."""
    specials = sorted(tok.special_tokens(), key=len, reverse=True)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = render_jinja(tok, messages[:i], True)
        upto, _ = render_jinja(tok, messages[:i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise TemplateError(f"{tok.template_file}: chat_template: the conversation rendered up to message {i} "
                                "is not a prefix of the whole, so its reply cannot be located; mark replies with "
                                "{% generation %} or pass a built-in --template")
        content = m["content"].strip()
        at = upto.find(content, len(before)) if content else -1
        end = at + len(content) if at >= 0 else len(upto.rstrip())
        gap = len(upto[end:]) - len(upto[end:].lstrip(" "))  # e.g. llama-2's " </s>"
        closing = next((s for s in specials if upto.startswith(s, end + gap)), None)
        spans.append((len(before), end + gap + len(closing) if closing else end))
    return spans


def encode_jinja_chat(tok, turns, system, add_generation_prompt):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m["role"], "content": m["content"]} for m in turns]
    if any(_MARK[0] in m["content"] or _MARK[1] in m["content"] for m in messages):
        raise TemplateError("a message holds U+E000 or U+E001, which the template renderer reserves")
    text, spans = render_jinja(tok, messages, add_generation_prompt)
    ids, offsets = tok.encode_rendered(text)
    if spans is None:
        spans = _reply_spans(tok, messages, text)
    mask = [int(any(a < e and s < b for s, e in spans)) for a, b in offsets]
    return ids, mask


def jinja_turn_end(tok):
    """The special token that closes an assistant turn in the tokenizer's template (None if it has none)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, _ = render_jinja(tok, probe, False)
    start = text.rfind("Hello") + len("Hello")
    rest = text[start:].lstrip(" ")
    return next((i for s, i in sorted(tok.special_tokens().items(), key=lambda t: -len(t[0]))
                 if rest.startswith(s)), None)


# -----------------------------------------------------------------------------
# Inputs: files, directories and globs -> a stream of work items, in a fixed order

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


class DataError(Exception):
    """A problem with one input record or file: reported as one line, then stop or skip (--on_error)."""


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
            raise SystemExit(f"prepare.py: --input {spec}: no such file, directory or glob match")
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
        raise SystemExit(f"prepare.py: {root}: no standard library sources found for the default corpus")
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


def read_records(path):
    """Yield (where, record, nbytes) from a .json list, .jsonl lines, or .parquet rows; where = 'line N' / 'row N'.

    A malformed JSON line is yielded as a DataError record, so that the caller can skip it and read on.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})")
        row = 0
        per_row = path.stat().st_size / max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield f"row {row}", rec, int(per_row)
        return
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # one JSON list: has to be parsed whole
        records = parse_json(path.read_bytes(), path, DataError, unique_keys=False)
        per_rec = path.stat().st_size // max(len(records), 1)
        for i, rec in enumerate(records, 1):
            yield f"item {i}", rec, per_rec
        return
    with open(path, "rb") as f:  # JSON lines: streamed
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = parse_json(raw, f"{path}: line {n}", DataError, unique_keys=False)
            except DataError as e:
                rec = e
            yield f"line {n}", rec, len(raw)


def _field(rec, name, where, kinds=str, hint=""):
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type(rec)}")
    if name not in rec:
        raise DataError(f"{where}: missing field {name!r}{hint}")
    if not isinstance(rec[name], kinds):
        raise DataError(f"{where}: field {name!r} is {json_type(rec[name])}, expected "
                        f"{'a string' if kinds is str else 'an object'}")
    return _unicode(rec[name], f"{where}: field {name!r}") if kinds is str else rec[name]


SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text, where):
    """text, unless JSON's \\uXXXX escapes left half a surrogate pair in it: no UTF-8 (nor tokenizer) takes that."""
    m = SURROGATE.search(text)
    if m:
        raise DataError(f"{where}: character {m.start()} is an unpaired surrogate {m.group()!a}: not Unicode text")
    return text


def conversation_messages(turns, where):
    """[{from, value}] or [{role, content}] -> messages with normalised roles. Replies with no user turn at all would
    train the model to answer nothing: refused (an empty conversation has nothing to learn and is dropped)."""
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}]: expected an object with 'from' and 'value'")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if normalize_role(role) is None:
            raise DataError(f"{where}: conversations[{i}]: unknown role {role!r} "
                            f"(expected human/user or gpt/assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: conversations[{i}]: expected a string 'value', got {json_type(content)}")
        messages.append({"role": normalize_role(role), "content": _unicode(content, f"{where}: conversations[{i}]")})
    roles = {m["role"] for m in messages}
    if "assistant" in roles and "user" not in roles:
        raise DataError(f"{where}: conversations: only assistant turns: expected a human/user turn for them to answer")
    return messages


BELLE_TURN = re.compile(r"(?:^|\n)(Human|Assistant):\s?")


def instruction_messages(rec, fmt, where):
    """One record of an instruction format -> (messages, system)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type(rec)}")
    system = _unicode(rec["system"], f"{where}: field 'system'") if isinstance(rec.get("system"), str) else None
    if fmt == "moss":
        system = (_unicode(rec["meta_instruction"].strip(), f"{where}: field 'meta_instruction'")
                  if isinstance(rec.get("meta_instruction"), str) else None)
        chat = _field(rec, "chat", where, dict, " (moss-003-sft: {chat: {turn_1: {Human, MOSS}}})")
        messages = []
        for key in sorted(chat, key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else 0):
            turn = chat[key]
            for field, role, tag, end in (("Human", "user", "<|Human|>:", "<eoh>"),
                                          ("MOSS", "assistant", "<|MOSS|>:", "<eom>")):
                text = _field(turn, field, f"{where}: chat.{key}")
                text = text.strip()
                text = text[len(tag):] if text.startswith(tag) else text
                text = text[:-len(end)] if text.endswith(end) else text
                messages.append({"role": role, "content": text.strip()})
        return messages, system
    if "conversations" in rec or (fmt in ("sharegpt", "conversation") and "messages" in rec):
        turns = rec.get("conversations", rec.get("messages"))
        if not isinstance(turns, list):
            raise DataError(f"{where}: field 'conversations' is {json_type(turns)}, expected a list")
        return conversation_messages(turns, where), system
    if fmt in ("sharegpt", "conversation"):
        raise DataError(f"{where}: missing field 'conversations' (a list of {{from, value}})")
    instruction = _field(rec, "instruction", where)
    output = _field(rec, "output", where)
    inp = "" if rec.get("input") is None else rec["input"]  # absent or null: no input
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' is {json_type(inp)}, expected a string")
    _unicode(inp, f"{where}: field 'input'")
    if fmt == "belle" and instruction.lstrip().startswith("Human:"):
        # BELLE multiturn_chat: "Human: ...\nAssistant: ...\nHuman: ...\nAssistant:" with the last reply in output
        parts = BELLE_TURN.split(instruction.strip())[1:]
        messages = [{"role": normalize_role(r), "content": c.strip()} for r, c in zip(parts[::2], parts[1::2])]
        if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages.pop()
        return messages + [{"role": "assistant", "content": output}], system
    user = {"role": "user", "content": instruction}
    if inp:
        user["input"] = inp  # the alpaca template has a with-input variant; others join it to the instruction
    return [user, {"role": "assistant", "content": output}], system


def read_items(files, fmt, text_field, max_chars, on_error, counters):
    """Yield Items for all input files in order. Bad records/files: stop (SystemExit) or skip (warn, count)."""
    doc, chars, megatron_seen = 0, 0, set()
    for path in files:
        if path.stat().st_size == 0:
            _bad(DataError(f"{path}: file is empty"), on_error, counters)
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
                            text = _field(rec, text_field, f"{path}: {where}",
                                          hint=" (set --text_field, or --format for instruction data)")
                            chars += len(text)
                            yield Item(doc, text=text, nbytes=nbytes)
                        doc += 1
                    except DataError as e:
                        _bad(e, on_error, counters)
        except DataError as e:
            _bad(e, on_error, counters)


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


def _bad(error, on_error, counters):
    if on_error == "stop":
        raise SystemExit(f"prepare.py: {error} (use --on_error=skip to skip bad records)")
    counters["skipped"] = counters.get("skipped", 0) + 1
    if counters["skipped"] <= 10 and not counters.get("quiet"):
        print(f"prepare.py: skipped: {error}", file=sys.stderr)


# -----------------------------------------------------------------------------
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
        raise SystemExit(f"prepare.py: --megatron: dtype {np.dtype(dtype).name} has no Megatron code (use uint16)")
    if sizes.size and sizes.max() > np.iinfo(np.int32).max:
        raise SystemExit(f"prepare.py: {idx_path}: a document longer than 2^31 tokens does not fit Megatron's "
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


# -----------------------------------------------------------------------------
# Tokenizing workers. Each gets the tokenizer path once (pool initializer) and chunks of Items; results come back
# in input order, so the output does not depend on the number of workers.

_worker = {}


def init_worker(tokenizer_path, template, seq_len, train_on_prompt=False, max_source_len=0, max_target_len=0):
    _worker.update(tok=load_tokenizer(tokenizer_path), template=template, seq_len=seq_len,
                   train_on_prompt=train_on_prompt, limits=(max_source_len, max_target_len))


def split_turns(ids, mask):
    """A conversation's (ids, reply mask) -> [(prompt ids, reply ids)]: each turn is a run of prompt tokens (mask 0,
    the system prompt and bos go with the first) and the run of reply tokens after it (mask 1, its end token last)."""
    turns, i, n = [], 0, len(ids)
    while i < n:
        j = i
        while j < n and not mask[j]:
            j += 1
        k = j
        while k < n and mask[k]:
            k += 1
        turns.append((ids[i:j], ids[j:k]))
        i = k
    return turns


def limit_turns(ids, mask, max_source, max_target, stats):
    """Cut each turn's prompt and reply separately, as LLaMA-Efficient-Tuning's preprocess_supervised_dataset (July
    2023) does with max_source_length / max_target_length: a prompt keeps its first max_source tokens (bos counts,
    the tail goes, its assistant marker too); a reply keeps its first max_target - 1 tokens and its end token (eos);
    with both limits, the turn that would take the conversation past max_source + max_target is dropped, and every
    turn after it. 0 = no limit."""
    out_ids, out_mask = [], []
    turns = split_turns(ids, mask)
    for n, (source, target) in enumerate(turns):
        if max_source and len(source) > max_source:
            source = source[:max_source]
            stats["max_source_len_cuts"] += 1
        if max_target and len(target) > max_target:
            target = target[:max_target - 1] + target[-1:]
            stats["max_target_len_cuts"] += 1
        if max_source and max_target and len(out_ids) + len(source) + len(target) > max_source + max_target:
            stats["max_len_turns_dropped"] += len(turns) - n
            break
        out_ids += source + target
        out_mask += [0] * len(source) + [1] * len(target)
    return out_ids, out_mask


def encode_sample(tok, template, messages, system, seq_len, stats, train_on_prompt=False, limits=(0, 0)):
    """One conversation -> (ids, mask) ending with eos, at most seq_len tokens; None when nothing is left to learn.

    limits (max_source_len, max_target_len): each turn's prompt and reply are cut first (limit_turns). Then, too
    long for seq_len: trailing exchanges are dropped first, so that no reply is cut; only when the first exchange
    alone does not fit is it truncated (counted as a cut reply), or dropped if its prompt already fills seq_len.
    """
    def encode(msgs, cuts):
        ids, mask = encode_chat(tok, template, msgs, system)
        if any(limits):
            ids, mask = limit_turns(ids, mask, *limits, cuts)
        if not ids or ids[-1] != tok.eos_id:  # every document ends with eos (a boundary marker, a target only
            ids, mask = ids + [tok.eos_id], mask + [0]  # with train_on_prompt)
        return ids, [1] * len(ids) if train_on_prompt else mask

    cuts = {"max_source_len_cuts": 0, "max_target_len_cuts": 0, "max_len_turns_dropped": 0}
    ids, mask = encode(messages, cuts)
    if seq_len and len(ids) > seq_len:
        ends = [i + 1 for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"]  # shorter prefixes
        for end in reversed(ends):
            cuts = dict.fromkeys(cuts, 0)  # what the limits cut of the prefix that is kept
            ids, mask = encode(messages[:end], cuts)
            if len(ids) <= seq_len:
                stats["samples_shortened"] += 1
                stats["turns_dropped"] += len(messages) - end
                break
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats["replies_cut" if any(mask) else "dropped_too_long"] += 1
            if not any(mask):
                return None
    for k, v in cuts.items():
        stats[k] = stats.get(k, 0) + v
    if not any(mask):
        stats["no_reply"] += 1
        return None
    return ids, mask


def encode_chunk(items):
    """Items -> (tokens, mask or None, [(doc, n_tokens, last)], stats, errors). Runs in a worker process; a record the
    template cannot render is left out and reported in errors (the main process stops or skips, per --on_error)."""
    tok, template, seq_len = _worker["tok"], _worker["template"], _worker["seq_len"]
    stats = {"samples_shortened": 0, "turns_dropped": 0, "replies_cut": 0, "dropped_too_long": 0, "no_reply": 0}
    pieces, masks, index, errors = [], [], [], []
    if items[0].messages is not None:
        for item in items:
            try:
                sample = encode_sample(tok, template, item.messages, item.system, seq_len, stats,
                                       _worker["train_on_prompt"], _worker["limits"])
            except TemplateError as e:
                errors.append(f"{item.where}: --template={template}: {e}")
                continue
            if sample is not None:
                pieces.append(sample[0])
                masks.append(sample[1])
                index.append((item.doc, len(sample[0]), True))
    else:
        texts = [it.text for it in items if it.text is not None and it.first]
        encoded = iter(tok.encode_batch(texts))  # one call: the loop runs in C++
        for item in items:
            if item.ids is not None:
                ids = item.ids.tolist()
                if not ids or ids[-1] != tok.eos_id:
                    ids.append(tok.eos_id)
            else:
                # a continuation piece starts mid-document: no dummy-prefix space; framing is for the whole document
                ids = next(encoded) if item.first else tok.encode_continuation(item.text)
                ids = tok.frame_document(ids, item.first, item.last)
            pieces.append(ids)
            index.append((item.doc, len(ids), item.last))
    tokens = np.array(list(itertools.chain.from_iterable(pieces)), dtype=np.int64)
    mask = np.array(list(itertools.chain.from_iterable(masks)), dtype=np.uint8) if masks else None
    return tokens, mask, index, stats, errors


def chunked(items, max_chars=1 << 20, max_items=1024):
    """Group items into chunks of about max_chars characters (one chunk is one task for a worker)."""
    chunk, chars = [], 0
    for item in items:
        chunk.append(item)
        chars += len(item.text) if item.text is not None else item.nbytes
        if chars >= max_chars or len(chunk) >= max_items:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def ordered_map(fn, chunks, workers, initargs):
    """fn over chunks in order, with at most 2 * workers chunks in flight (Pool.imap would read ahead unbounded)."""
    if workers <= 1:
        init_worker(*initargs)
        for chunk in chunks:
            yield chunk, fn(chunk)
        return
    import multiprocessing as mp
    with mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=initargs) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(fn, (chunk,))))
            if len(pending) >= 2 * workers:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()


# -----------------------------------------------------------------------------
# Writing one split: tokens, masks and document offsets are appended as they come (memory stays bounded)

class SplitWriter:
    """{split}.bin tokens, {split}.mask.bin masks, {split}.docs.bin int64 document start offsets (+ the total).

    With seq_len, a text document longer than seq_len is cut into seq_len-token documents (no tokens lost). With
    pack, documents are placed whole into rows of exactly seq_len tokens (one_per_row: one to a row); a row's free
    tail is padding (pad_id, mask 0) that belongs to the row's last document.
    """

    def __init__(self, out_dir, split, dtype, with_mask, seq_len, pack, pad_id, one_per_row=False):
        self.split, self.dtype, self.seq_len, self.pack, self.pad_id = split, dtype, seq_len, pack, pad_id
        self.one_per_row = one_per_row  # pack: each document (or seq_len piece of one) in a row of its own
        self.tokens_file = open(out_dir / f"{split}.bin", "wb")
        self.mask_file = open(out_dir / f"{split}.mask.bin", "wb") if with_mask else None
        self.docs_file = open(out_dir / f"{split}.docs.bin", "wb")
        self.docs_file.write(np.zeros(1, np.int64).tobytes())
        self.n_tokens = self.n_docs = self.docs_split = self.pad_tokens = 0
        self.doc_len = 0       # tokens of the document being written
        self.pending = []      # pack: pieces of the current document
        self.row = []          # pack: documents of the current row

    def add(self, ids, mask, last):
        """Append a piece of the current document; last=True ends the document."""
        if mask is None and self.mask_file is not None:
            mask = np.ones(len(ids), np.uint8)  # packed text: everything but padding counts
        if self.pack:
            self.pending.append((ids, mask))
            if last or sum(len(p[0]) for p in self.pending) > self.seq_len:
                ids = np.concatenate([p[0] for p in self.pending])
                mask = np.concatenate([p[1] for p in self.pending])
                while len(ids) > self.seq_len:  # a long document: cut off full rows as they come (bounded memory)
                    self._pack(ids[:self.seq_len], mask[:self.seq_len])
                    self.docs_split += 1
                    ids, mask = ids[self.seq_len:], mask[self.seq_len:]
                self.pending = [] if last else [(ids, mask)]
                if last:
                    self._pack(ids, mask)
            return
        while self.seq_len and self.doc_len + len(ids) > self.seq_len:
            k = self.seq_len - self.doc_len
            self._write(ids[:k], None if mask is None else mask[:k])
            self._end_doc()
            self.docs_split += 1
            ids, mask = ids[k:], None if mask is None else mask[k:]
        self._write(ids, mask)
        if last and self.doc_len:
            self._end_doc()

    def _pack(self, ids, mask):
        if self.one_per_row or sum(len(d[0]) for d in self.row) + len(ids) > self.seq_len:
            self._flush_row()
        self.row.append((ids, mask))

    def _flush_row(self):
        if not self.row:
            return
        n_pad = self.seq_len - sum(len(d[0]) for d in self.row)
        for i, (ids, mask) in enumerate(self.row):
            if i == len(self.row) - 1 and n_pad:
                ids = np.concatenate([ids, np.full(n_pad, self.pad_id)])
                mask = np.concatenate([mask, np.zeros(n_pad, np.uint8)])
            self._write(ids, mask)
            self._end_doc()
        self.pad_tokens += n_pad
        self.row = []

    def _write(self, ids, mask):
        self.tokens_file.write(np.asarray(ids).astype(self.dtype).tobytes())
        if self.mask_file is not None:
            self.mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.n_tokens += len(ids)
        self.doc_len += len(ids)

    def _end_doc(self):
        self.docs_file.write(struct.pack("<q", self.n_tokens))
        self.n_docs += 1
        self.doc_len = 0

    def close(self):
        if self.pack:
            self._flush_row()
        for f in (self.tokens_file, self.mask_file, self.docs_file):
            if f is not None:
                f.close()


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


# -----------------------------------------------------------------------------
# Reading a data dir back (train.py's input): meta.json checked, each split's tokens memmapped and cut into windows


META_FIELDS = {"dtype": str, "vocab_size": (int, "[1, 2**32]"), "packed": bool, "seq_len": (int, "[0, inf)")}


def read_meta(data_dir) -> dict:
    """meta.json of a data dir, the fields train.py reads of their types and in range."""
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"data_dir={data_dir}: not found (run `python prepare.py` first, or set --data_dir)")
    file = path / "meta.json"
    if not file.exists():
        raise DataError(f"{file}: not found (is {data_dir} a prepare.py output dir?)")
    meta = load_json(file, DataError)
    check_json_fields(meta, META_FIELDS, file, DataError, required=("dtype", "vocab_size"))
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{file}: dtype={meta['dtype']!r}, expected 'uint16' or 'uint32'")
    if meta.get("packed") and not meta.get("seq_len"):
        raise DataError(f"{file}: packed data needs its row length, seq_len >= 1 (got {meta.get('seq_len')!r})")
    return meta


class TokenSplit:
    """One split's memmapped tokens as (B, T) windows: inputs, next-token targets, loss masks, document ids.

    Text is one stream of documents, read in windows at any offset. Data that was packed (`packed` in meta.json) is
    rows of exactly seq_len tokens holding whole documents: windows are the rows, attention stays within each
    document (doc_ids from {split}.docs.bin), and a row's last target (the next row's first token) does not count.
    """

    def __init__(self, data_dir, split: str, meta: dict, seq_len: int):
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
        self.tokens = np.memmap(file, dtype=meta["dtype"], mode="r")
        mask_file = Path(data_dir) / f"{split}.mask.bin"
        self.mask = None
        if mask_file.exists():
            if mask_file.stat().st_size != len(self.tokens):  # one uint8 per token
                raise DataError(f"{mask_file}: {mask_file.stat().st_size} entries for {len(self.tokens)} tokens in "
                                f"{file.name}")
            self.mask = np.memmap(mask_file, dtype=np.uint8, mode="r")
        self.packed = bool(meta.get("packed"))
        self.doc_starts = None
        if self.packed:
            if meta.get("seq_len") != seq_len:
                raise DataError(f"{Path(data_dir) / 'meta.json'}: the data is packed in rows of {meta.get('seq_len')} "
                                f"tokens; train with --seq_len={meta.get('seq_len')}")
            if len(self.tokens) % seq_len:
                raise DataError(f"{file}: {len(self.tokens)} tokens are not whole rows of seq_len={seq_len} "
                                "(meta.json says packed)")
            docs_file = Path(data_dir) / f"{split}.docs.bin"
            if docs_file.exists():
                self.doc_starts = read_doc_starts(docs_file, len(self.tokens))
        self.seq_len, self.file = seq_len, file
        if len(self.tokens) < seq_len + (0 if self.packed else 1):
            raise DataError(f"{file}: {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}")

    def check_ids(self, vocab_size: int, chunk: int = 1 << 24):
        """Raise on a token id the model has no embedding for (data from another tokenizer): one chunked pass."""
        for start in range(0, len(self.tokens), chunk):
            piece = np.asarray(self.tokens[start : start + chunk])
            if piece.max() >= vocab_size:
                i = start + int(np.argmax(piece >= vocab_size))
                raise DataError(f"{self.file}: token id {int(self.tokens[i])} at position {i} is not below the "
                                f"model's vocab_size={vocab_size} (prepared with another tokenizer?)")

    def _rows(self, array, starts, length, pad):
        out = np.full((len(starts), length), pad, dtype=np.int64)
        for i, s in enumerate(starts):
            piece = array[s : s + length]  # the last packed row has no next token to read
            out[i, : len(piece)] = piece
        return out

    def windows(self, starts):
        """Windows starting at `starts` -> int64 arrays x (B, T), y (B, T) shifted by one, loss_mask (B, T) or None,
        doc_ids (B, T) or None."""
        T = self.seq_len
        rows = self._rows(self.tokens, starts, T + 1, 0)  # (B, T + 1)
        x, y = rows[:, :-1], rows[:, 1:]
        mask = doc_ids = None
        if self.mask is not None:  # the mask marks tokens that count as targets
            mask = self._rows(self.mask, [s + 1 for s in starts], T, 0)
        if self.packed:
            mask = np.ones_like(y) if mask is None else mask
            mask[:, -1] = 0  # the next row's first token belongs to another row
            if self.doc_starts is not None:
                positions = np.asarray(starts)[:, None] + np.arange(T)  # (B, T)
                doc_ids = np.searchsorted(self.doc_starts, positions, side="right")
        return x, y, mask, doc_ids


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


def unigram_entropy(split: TokenSplit, vocab_size: int, max_tokens: int = 20_000_000) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context. Learning means beating it."""
    tokens = np.asarray(split.tokens[:max_tokens]).astype(np.int64)
    if split.mask is not None:
        tokens = tokens[np.asarray(split.mask[:max_tokens]) == 1]
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# main

def is_val(doc, val_fraction):
    """Documents go to val evenly spread through the input: exactly floor(n * val_fraction) of the first n."""
    return int((doc + 1) * val_fraction) > int(doc * val_fraction)


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


# the flags with a range: kind and interval (support.checks.check_value's words when one is out of it)
FLAG_RANGES = {"workers": (int, "[1, inf)"), "vocab_size": (int, "[260, 2**31)"), "seq_len": (int, "[0, 2**24]"),
               "max_chars": (int, "[0, inf)"), "tokenizer_chars": (int, "[1, inf)"), "val_fraction": (float, "[0, 1)"),
               "max_source_len": (int, "[0, 2**24]"), "max_target_len": (int, "[0, 2**24]")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Tokenize text or instruction data into memmapped token files for train.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="formats:\n" + "\n".join(f"  {k:13s} {v}" for k, v in FORMATS.items()) +
               "\ntemplates:\n" + "\n".join(f"  {k:16s} {t.source}" for k, t in TEMPLATES.items()))
    parser.add_argument("--input", nargs="+", help="files, directories or globs (default: the embedded corpus, "
                                                   "the Python standard library's sources)")
    parser.add_argument("--format", default="auto", help="record format, see below (default: auto)")
    parser.add_argument("--text_field", default="text", help="JSON/parquet field holding the text (json formats)")
    parser.add_argument("--tokenizer", help="a .model, a tokenizer.json, or a dir holding one (checkpoint or data "
                                            "dir); default: train a sentencepiece BPE on the input")
    parser.add_argument("--vocab_size", type=int, default=8192, help="when training a tokenizer")
    parser.add_argument("--tokenizer_chars", type=int, default=20_000_000,
                        help="characters of input used to train a tokenizer")
    parser.add_argument("--template", help="chat template for instruction data: a name below, or hf for the "
                                           "tokenizer's own Jinja chat_template (default: the tokenizer's)")
    parser.add_argument("--train_on_prompt", action="store_true", help="instruction data: every token of a "
                        "conversation counts in the loss, prompts too (default: the assistant replies only)")
    parser.add_argument("--out", help="output dir (default: data/default, or data/<first input's name>)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="fraction of documents for val.bin")
    parser.add_argument("--seq_len", type=int, default=0, help="max tokens per document: conversations are "
                        "shortened (whole trailing turns first), text documents are cut; 0 = no limit")
    parser.add_argument("--max_source_len", type=int, default=0, help="instruction data: cut each turn's prompt to "
                        "its first N tokens (LLaMA-Efficient-Tuning's max_source_length); 0 = no limit")
    parser.add_argument("--max_target_len", type=int, default=0, help="instruction data: cut each reply to N tokens, "
                        "its end token kept (max_target_length); with both, a turn past their sum is dropped "
                        "with the turns after it; 0 = no limit")
    parser.add_argument("--pack", action="store_true", help="place whole documents into rows of exactly seq_len "
                                                            "tokens, padding each row's tail (mask 0)")
    parser.add_argument("--one_per_row", action="store_true", help="with --pack: one document per row, as trainers "
                        "that pad every example (FastChat, LLaMA-Efficient-Tuning, Megatron's instruction data) do")
    parser.add_argument("--drop_system", action="store_true", help="instruction data: leave out the records' system "
                        "prompts (moss's meta_instruction), as AscendSpeed's MOSSMultiTurnHandler does")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                        help="token dtype (auto: uint16 if the vocab fits, else uint32)")
    parser.add_argument("--megatron", action="store_true", help="also write Megatron-LM .idx files")
    parser.add_argument("--on_error", default="stop", choices=["stop", "skip"],
                        help="on a bad record or file: stop, or report it and skip it")
    parser.add_argument("--max_chars", type=int, default=0, help="stop reading new documents after this many "
                                                                 "characters (0 = all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        parser.exit(2, f"prepare.py: --format={args.format}: unknown format; expected one of {', '.join(FORMATS)}\n")
    if args.template is not None and args.template not in (*TEMPLATES, HF_TEMPLATE):
        parser.exit(2, f"prepare.py: --template={args.template}: unknown template; expected one of "
                       f"{', '.join(TEMPLATES)} or {HF_TEMPLATE}\n")
    for name, (kind, interval) in FLAG_RANGES.items():
        try:
            check_value(name, getattr(args, name), kind, interval)
        except ValueError as e:
            parser.exit(2, f"prepare.py: --{e}\n")
    for name in ("max_source_len", "max_target_len"):
        if getattr(args, name) and args.format not in INSTRUCTION_FORMATS:
            parser.exit(2, f"prepare.py: --{name}: applies to instruction data (--format one of "
                           f"{', '.join(INSTRUCTION_FORMATS)}), not to --format={args.format}\n")
    if args.pack and not args.seq_len:
        parser.exit(2, "prepare.py: --pack: needs --seq_len (the row length)\n")
    if args.one_per_row and not args.pack:
        parser.exit(2, "prepare.py: --one_per_row: needs --pack (and --seq_len, the row length)\n")
    return args


def prepare(args):
    """Run the whole pipeline into a temporary dir next to the output; rename it into place at the end."""
    if args.input:
        files, fmt, source = expand_inputs(args.input), args.format, [str(p) for p in expand_inputs(args.input)]
        out = Path(args.out or Path("data") / Path(args.input[0].rstrip("/*")).stem)
    else:
        files, fmt = default_corpus_files(), "text"
        source = [str(p) for p in files]
        out = Path(args.out or "data/default")
    instruction = fmt in INSTRUCTION_FORMATS
    if not args.tokenizer and any(f.suffix in (".bin", ".idx") for f in files) and fmt in ("auto", "megatron"):
        raise SystemExit("prepare.py: --tokenizer: required for Megatron input (its tokens are already ids)")
    inputs = [*files, *(args.input or []), *([args.tokenizer] if args.tokenizer else [])]
    counters, total = {}, sum(f.stat().st_size for f in files)
    total = min(total, args.max_chars) if args.max_chars else total  # about: characters, not bytes

    def need(written):  # a full disk: the output's bytes, from those of the input read so far
        read = counters.get("bytes_read")
        return max(written, counters["bytes_out"] * max(total, read) // read) if read else None

    with replace_dir(out, args.overwrite, "--out", inputs, _config_error) as tmp, \
            diskspace.reported(out, tmp, need, _config_error, "free space there, or choose another --out"):
        meta = _prepare_into(tmp, args, files, fmt, source, instruction, counters)
    return out, meta


def get_tokenizer(args, files, fmt, out_dir):
    """--tokenizer, or a sentencepiece BPE trained on the input (deterministically) into out_dir."""
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    t0 = time.time()
    # a list, not a generator: an input error raised inside sentencepiece's C++ loop would lose its message
    lines = list(training_lines(read_items(files, fmt, args.text_field, args.max_chars, args.on_error,
                                           {"quiet": True}), args.tokenizer_chars))
    try:
        path = train_sentencepiece(lines, out_dir, args.vocab_size)
    except RuntimeError as e:  # e.g. "Vocabulary size too high" on a small input
        raise SystemExit(f"prepare.py: --vocab_size={args.vocab_size}: cannot train a tokenizer on this input "
                         f"({str(e).strip().splitlines()[-1]})")
    tok = load_tokenizer(path)
    print(f"prepare.py: trained a {tok.vocab_size}-token sentencepiece BPE in {time.time() - t0:.1f}s",
          file=sys.stderr)
    return tok


def tokenize_into(writers, items, tok, template, args, seq_len, total_bytes, counters):
    """Encode items with --workers processes and append them, in input order, to the train/val writers."""
    from tqdm import tqdm
    stats = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None)
    initargs = (str(tok.path), template, seq_len, args.train_on_prompt, args.max_source_len, args.max_target_len)
    if args.drop_system:
        items = (replace(item, system=None) for item in items)
    for chunk, (tokens, mask, index, chunk_stats, errors) in ordered_map(encode_chunk, chunked(items),
                                                                         args.workers, initargs):
        for error in errors:
            _bad(DataError(error), args.on_error, counters)
        if tokens.size and tokens.max() >= tok.vocab_size:
            raise SystemExit(f"prepare.py: token id {tokens.max()} >= vocab_size {tok.vocab_size} (Megatron input "
                             f"prepared with another tokenizer?)")
        for k, v in chunk_stats.items():
            stats[k] = stats.get(k, 0) + v
        n_bytes = sum(it.nbytes for it in chunk)  # input read, and the bytes its tokens take (a full disk's message)
        counters["bytes_read"] = counters.get("bytes_read", 0) + n_bytes
        counters["bytes_out"] = counters.get("bytes_out", 0) + tokens.size * (
            np.dtype(writers["train"].dtype).itemsize + (mask is not None)) + 8 * len(index)
        offset = 0
        for doc, n, last in index:  # (document number, tokens, ends the document)
            split = "val" if is_val(doc, args.val_fraction) else "train"
            writers[split].add(tokens[offset:offset + n], None if mask is None else mask[offset:offset + n], last)
            offset += n
        bar.update(n_bytes)
        bar.set_postfix(tokens=writers["train"].n_tokens + writers["val"].n_tokens, refresh=False)
    bar.close()
    return stats


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


def _prepare_into(out_dir, args, files, fmt, source, instruction, counters):
    tok = get_tokenizer(args, files, fmt, out_dir)
    own = tok.template_name
    template = args.template or own
    if instruction and template is None:
        raise SystemExit(f"prepare.py: --template: required for {fmt} data (one of {', '.join(TEMPLATES)})")
    if template == HF_TEMPLATE:
        if own != HF_TEMPLATE:
            raise SystemExit(f"prepare.py: --template=hf: {tok.template_file} holds no Jinja chat_template")
        check_jinja_template(tok)
    elif template in TEMPLATES and (warning := literal_id_warning(tok, template)):
        print(f"prepare.py: {warning}", file=sys.stderr)
    dtype = args.dtype if args.dtype != "auto" else "uint16" if tok.vocab_size <= 65536 else "uint32"
    if tok.vocab_size > np.iinfo(dtype).max + 1:
        raise SystemExit(f"prepare.py: --dtype={dtype}: vocab_size {tok.vocab_size} does not fit "
                         f"(ids up to {np.iinfo(dtype).max}); use --dtype=uint32")
    with_mask = instruction or args.pack
    writers = {s: SplitWriter(out_dir, s, dtype, with_mask, args.seq_len, args.pack, tok.pad_id, args.one_per_row)
               for s in ("train", "val")}
    t0 = time.time()
    items = read_items(files, fmt, args.text_field, args.max_chars, args.on_error, counters)
    try:
        stats = tokenize_into(writers, items, tok, template, args, args.seq_len if instruction else 0,
                              sum(f.stat().st_size for f in files), counters)
    finally:  # also on errors: the temporary dir is removed with closed files
        for w in writers.values():
            w.close()
    n_tokens = sum(w.n_tokens for w in writers.values())
    if n_tokens == 0:
        raise SystemExit("prepare.py: --input: no documents left to write (all empty, skipped or dropped)")
    if args.val_fraction > 0 and writers["val"].n_docs == 0 and move_last_to_val(out_dir, writers, dtype):
        print("prepare.py: the val split was empty: it holds the last train document instead", file=sys.stderr)
    elapsed = time.time() - t0
    if args.megatron:
        for s in writers:
            offsets = np.fromfile(out_dir / f"{s}.docs.bin", dtype=np.int64)
            write_megatron_index(out_dir / f"{s}.idx", np.diff(offsets), dtype)
    tok.save(out_dir, template)

    stats = {k: v for k, v in stats.items() if v}
    stats.update({f"{s}_docs_split": w.docs_split for s, w in writers.items() if w.docs_split})
    stats.update({f"{s}_pad_tokens": w.pad_tokens for s, w in writers.items() if w.pad_tokens})
    if counters.get("skipped"):
        stats["skipped_records"] = counters["skipped"]
    meta = {  # deterministic: no times or temporary paths, so the same input gives the same bytes
        "dtype": dtype, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "template": template, "train_on_prompt": args.train_on_prompt and instruction, "tokenizer": tok.filename,
        "format": fmt, "source_files": source,
        "train_tokens": writers["train"].n_tokens, "val_tokens": writers["val"].n_tokens,
        "train_documents": writers["train"].n_docs, "val_documents": writers["val"].n_docs,
        "has_mask": with_mask, "seq_len": args.seq_len, "packed": args.pack, "one_per_row": args.one_per_row,
        "max_source_len": args.max_source_len, "max_target_len": args.max_target_len,
        "val_fraction": args.val_fraction,
        "megatron": args.megatron, "stats": stats, "layout": META_LAYOUT,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    tag = "".join(f", {k}={v}" for k, v in stats.items())
    print(f"prepare.py: {n_tokens:,} tokens ({meta['train_documents']} train / {meta['val_documents']} val docs) in "
          f"{elapsed:.1f}s = {n_tokens / max(elapsed, 1e-9):,.0f} tokens/s with {args.workers} worker(s){tag}",
          file=sys.stderr)
    if meta["val_documents"] == 0 and args.val_fraction > 0:
        print(f"prepare.py: warning: val split is empty ({meta['train_documents']} documents, --val_fraction="
              f"{args.val_fraction})", file=sys.stderr)
    return meta


def main(argv=None):
    args = parse_args(argv)
    out, meta = prepare(args)
    print(f"prepare.py: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
