"""
Data preparation: raw text and instruction data -> memmapped token files that train.py reads.

    python prepare.py                     # embedded default corpus (the Python standard library's sources)
                                          # -> trains a small sentencepiece tokenizer -> data/default/
    python prepare.py --input='data/raw/*.jsonl' --format=sharegpt --tokenizer=ckpt/baichuan2-7b \
                      --template=baichuan2 --seq_len=2048 --out=data/sft --workers=8

Output dir (see DESIGN.md): train.bin / val.bin (uint16 or uint32 token ids, every document ends with eos),
train.docs.bin / val.docs.bin (int64 token offsets of document starts, plus the total: exact document boundaries),
train.mask.bin / val.mask.bin (uint8, instruction data only: 1 = this token is a target that counts in the loss),
meta.json, and the tokenizer (tokenizer.model or tokenizer.json + tokenizer_config.json). `--megatron` adds
train.idx / val.idx so that train.bin / val.bin are also Megatron-LM indexed datasets.

This file also owns the tokenizer and chat-template API that train.py and sample.py import:
load_tokenizer, Tokenizer, TEMPLATES, FAMILY_TEMPLATE, encode_chat.
"""

import argparse
import glob
import json
import os
import re
import shutil
import struct
import sys
import sysconfig
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# -----------------------------------------------------------------------------
# Tokenizers: sentencepiece (.model) and HF tokenizers (tokenizer.json) behind one small interface

# names that HF-style tokenizer_config.json files and common vocabularies use for the special tokens
BOS_NAMES = ("<s>", "<|startoftext|>", "<|begin_of_text|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """encode/decode text; bos_id, eos_id, pad_id (eos when the vocabulary has no pad), vocab_size.

    `path` is the tokenizer file; `config` is the tokenizer_config.json dict found beside it (may be empty).
    Our tokenizer_config.json holds {"bos_id", "eos_id", "pad_id", "chat_template"}; HF's holds token strings
    ("bos_token": "<s>" or {"content": "<s>"}); both are understood.
    """

    def __init__(self, path, config=None):
        self.path = Path(path)
        config = config or {}
        self.chat_template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
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
        if self.sp is not None:
            # The same model without sentencepiece's dummy prefix ("▁" added before the text): template text
            # that continues a prompt must not gain a space. Appending a NormalizerSpec with add_dummy_prefix=false
            # (field 3 of ModelProto, field 3 of NormalizerSpec) works because protobuf merges repeated messages.
            import sentencepiece as spm
            self.sp_continue = spm.SentencePieceProcessor()
            self.sp_continue.load_from_serialized_proto(self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00")

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

    def encode(self, text, bos=False, eos=False):
        ids = self.sp.encode(text) if self.sp is not None else self.hf.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_continuation(self, text):
        """Encode text that continues earlier text (no dummy-prefix space; HF byte-level BPE adds none)."""
        if self.sp is not None:
            return self.sp_continue.encode(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """list[str] -> list[list[int]] without special tokens; both backends run this loop in C++."""
        if self.sp is not None:
            return self.sp.encode(texts)
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

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i) if self.sp is not None else (self.hf.id_to_token(i) or "")

    @property
    def filename(self):
        return "tokenizer.model" if self.sp is not None else "tokenizer.json"

    def save(self, out_dir, template=None):
        """Copy the tokenizer file into out_dir and write tokenizer_config.json (ids and chat template name)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / self.filename).resolve() != self.path.resolve():
            shutil.copyfile(self.path, out_dir / self.filename)
        config = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                  "chat_template": template or self.chat_template}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path):
    """A sentencepiece .model, an HF tokenizer.json, or a dir holding one (checkpoint dir, data dir)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):  # LLaMA dirs ship both: sentencepiece is the reference
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise SystemExit(f"prepare.py: {path}: expected a directory holding tokenizer.model or tokenizer.json")
    if not path.is_file():
        raise SystemExit(f"prepare.py: {path}: tokenizer file not found")
    config = {}
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"prepare.py: {config_path}: not valid JSON ({e})")
    try:
        return Tokenizer(path, config)
    except SystemExit:
        raise
    except Exception as e:  # sentencepiece / tokenizers raise RuntimeError or OSError on corrupt files
        raise SystemExit(f"prepare.py: {path}: cannot load tokenizer ({type(e).__name__}: {e})")


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
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192, num_threads=1,
        minloglevel=2)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir / "tokenizer.model"


# -----------------------------------------------------------------------------
# Chat templates. A template turns messages into segments: (piece, counts_in_loss), where a piece is text
# (encoded on its own), an int (a literal token id, e.g. Baichuan's 195/196), or a Special (a named token such as
# bos/eos, resolved with the tokenizer). Adjacent prompt text is merged before encoding, as the reference
# implementations encode whole prompt strings.

@dataclass(frozen=True)
class Special:
    name: str  # "bos", "eos", or a token string like "<|im_end|>"


BOS, EOS = Special("bos"), Special("eos")
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


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def render_vicuna(messages, system, gen):
    # FastChat vicuna_v1.1: "{system} USER: {u} ASSISTANT: {a}</s>USER: {u} ASSISTANT:"
    segs = [(BOS, False), ((system or VICUNA_SYSTEM) + " ", False)]
    for role, content, _ in _turns(messages):
        if role == "user":
            segs.append((f"USER: {content} ", False))
        else:
            segs += [("ASSISTANT:", False), (" " + content, True), (EOS, True)]
    if gen:
        segs.append(("ASSISTANT:", False))
    return segs


ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.")


def render_alpaca(messages, system, gen):
    # Stanford Alpaca prompt (with and without input); later turns repeat the Instruction/Response blocks.
    first_input = next((m.get("input") for m in messages if m["role"] == "user"), None)
    header = system or (ALPACA_SYSTEM_INPUT if first_input else ALPACA_SYSTEM)
    segs = [(header, False)]
    for role, content, m in _turns(messages):
        if role == "user":
            block = f"\n\n### Instruction:\n{content}"
            if m.get("input"):
                block += f"\n\n### Input:\n{m['input']}"
            segs.append((block + "\n\n### Response:\n", False))
        else:
            segs += [(content, True), (EOS, True)]
    return segs  # the generation prompt already ends every user block


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


def render_human_assistant(messages, system, gen):
    # Baichuan-7B QLoRA recipe: "Human: {u}\n\nAssistant: {a}</s>" (turns joined by a blank line)
    segs = [(system + "\n\n", False)] if system else []
    for role, content, _ in _turns(messages):
        if role == "user":
            sep = "\n\n" if segs and segs[-1][0] == EOS else ""
            segs.append((f"{sep}Human: {content}\n\n", False))
        else:
            segs += [("Assistant:", False), (" " + content, True), (EOS, True)]
    if gen:
        segs.append(("Assistant:", False))
    return segs


@dataclass(frozen=True)
class Template:
    render: Callable  # (messages, system, add_generation_prompt) -> list of (piece, counts_in_loss)
    source: str       # where the format is published


TEMPLATES = {
    "baichuan": Template(render_baichuan, "Baichuan-13B-Chat generation_utils.py (user 195, assistant 196)"),
    "baichuan2": Template(render_baichuan, "Baichuan2-Chat generation_utils.py / fine-tune.py (user 195, assistant 196)"),
    "vicuna": Template(render_vicuna, "FastChat conversation.py vicuna_v1.1"),
    "alpaca": Template(render_alpaca, "tatsu-lab/stanford_alpaca PROMPT_DICT"),
    "aquila": Template(render_aquila, "FlagAI aquila-chat conversation template"),
    "llama-2": Template(render_llama2, "meta-llama/llama generation.py chat_completion"),
    "chatml": Template(render_chatml, "OpenAI ChatML"),
    "human-assistant": Template(render_human_assistant, "Baichuan-7B QLoRA recipe"),
}

FAMILY_TEMPLATE = {"llama": "llama-2", "baichuan": "baichuan", "baichuan2": "baichuan2", "aquila": "aquila"}

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
    if special == BOS:
        return tok.bos_id
    if special == EOS:
        return tok.eos_id
    i = tok.token_to_id(special.name)
    if i is None and special == IM_END:
        return tok.eos_id
    return i  # None: encode the name as text


def encode_chat(tok, template, messages, system=None, add_generation_prompt=False):
    """messages [{"role": "user"|"assistant"|"system", "content": str, ("input": str)}] -> (ids, loss_mask).

    loss_mask[i] = 1 where ids[i] is part of an assistant reply or the token that ends it (eos, <|im_end|>).
    A leading system message is used when `system` is None. With add_generation_prompt=True the ids end where the
    assistant's reply starts.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    turns = []
    for m in messages:
        role = normalize_role(m.get("role"))
        if role is None:
            raise ValueError(f"unknown role {m.get('role')!r}; expected user or assistant")
        if role == "system":
            system = m["content"] if system is None else system
            continue
        turns.append({**m, "role": role})
    segs = TEMPLATES[template].render(turns, system, add_generation_prompt)
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
            i = _resolve(tok, piece)
            new = [i] if i is not None else tok.encode_continuation(piece.name)
            fresh = piece == BOS
        elif isinstance(piece, int):
            new, fresh = [piece], True
        else:
            # text continuing earlier text is encoded without the dummy-prefix space, as if in one string
            new = (tok.encode(piece) if fresh else tok.encode_continuation(piece)) if piece else []
            fresh = False
        ids += new
        mask += [int(counts)] * len(new)
    return ids, mask
