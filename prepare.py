"""
Data preparation: raw text and instruction data -> memmapped token files that train.py reads.

    python prepare.py                     # embedded default corpus (the Python standard library's sources)
                                          # -> trains a small sentencepiece tokenizer -> data/default/
    python prepare.py --input='data/raw/*.jsonl' --format=sharegpt --tokenizer=ckpt/baichuan2-7b \
                      --template=baichuan2 --seq_len=2048 --out=data/sft --workers=8

Output dir (docs/data.md, docs/formats.md): train.bin / val.bin (token ids, every document ends with eos),
train.docs.bin / val.docs.bin (document start offsets, then the total), train.mask.bin / val.mask.bin (1 = a target
that counts in the loss), meta.json, and the tokenizer.

This file also owns the tokenizer and chat-template API the other scripts import (load_tokenizer, Tokenizer,
TEMPLATES, encode_chat, template_jinja) and the reader train.py trains from (read_meta, TokenSplit). Beside it in
support/: datafiles.py (the input files and records read), records.py (instruction formats), tokenizer_files.py,
jinja_templates.py (a model's own Jinja template), turns.py (per-turn limits), workers.py, datadir.py (a data dir
read without trust), prepare_checks.py (the flags), megatron.py. Problems are DataError (the input) or TemplateError
(a conversation the template refuses); main says them in one line. `import prepare` does not import torch.
"""

import argparse
import io
import itertools
import json
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from support import datadir, datafiles, diskspace, prepare_checks, tokenizer_files
from support.checks import load_json
from support.datafiles import FORMATS, INSTRUCTION_FORMATS, read_items, skip_or_stop, training_lines
from support.jinja_templates import (HF_TEMPLATE, JINJA_PROBE, TemplateError, builtin_jinja, encode_jinja_chat,
                                     is_jinja, reserved_marker)
from support.jinja_templates import check_jinja_template, jinja_turn_end  # noqa: F401 (sample.py's, with the templates)
from support.megatron import write_megatron_index
from support.outputs import replace_dir
from support.records import DataError, normalize_role
from support.tokenizer_files import TOKENIZER_FILES, special_ids_of
from support.tokenizer_files import copy_tokenizer_files  # noqa: F401 (convert.py's and sample.py's, with load_tokenizer)
from support.turns import limit_turns
from support.workers import chunked, ordered_map

# -----------------------------------------------------------------------------
# Tokenizers: sentencepiece (.model) and HF tokenizers (tokenizer.json) behind one small interface


class Tokenizer:
    """encode/decode text; bos_id, eos_id, pad_id (eos when the vocabulary has no pad), vocab_size; the special tokens
    the tokenizer itself puts around a text (`prefix`, `suffix`); its chat template (a built-in name or HF Jinja).

    `path` is the tokenizer file; `config` is the tokenizer_config.json dict found beside it (may be empty).
    Ours holds {"bos_id", "eos_id", "pad_id", "add_bos_token", "add_eos_token", "chat_template"}; HF's holds token
    strings ("bos_token": "<s>" or {"content": "<s>"}); both are understood (support/tokenizer_files.py).
    """

    def __init__(self, path, config=None, chat_template=None, template_file=None):
        self.path = Path(path)
        config = config or {}
        self.template_file = template_file or self.path.parent / "tokenizer_config.json"  # named in errors
        self.chat_template = tokenizer_files.chat_template_of(config, chat_template, TEMPLATES)  # name, Jinja or None
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
        self.bos_id = tokenizer_files.special_id(self, config, "bos")
        self.eos_id = tokenizer_files.special_id(self, config, "eos")
        pad = tokenizer_files.special_id(self, config, "pad")
        self.pad_id = self.eos_id if pad is None else pad  # padding is always masked, so eos is a safe stand-in
        self.prefix, self.suffix = tokenizer_files.framing(self, config)
        if self.sp is not None:
            # The same model without sentencepiece's dummy prefix ("▁" added before the text): template text
            # that continues a prompt must not gain a space. Appending a NormalizerSpec with add_dummy_prefix=false
            # (field 3 of ModelProto, field 3 of NormalizerSpec) works because protobuf merges repeated messages.
            import sentencepiece as spm
            self.sp_continue = spm.SentencePieceProcessor()
            self.sp_continue.load_from_serialized_proto(self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00")
            # how rendered chat text is encoded (support/jinja_templates.py): specials matched as tokens, and where
            # text gets the "▁" prefix
            self.sp_specials, self.sp_added, self.sp_legacy, self.sp_prefix_space = \
                tokenizer_files.sentencepiece_chat_tokens(self.sp, config, self.vocab_size)

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
        tokenizer_files.write_tokenizer_config(self, out_dir / "tokenizer_config.json", template)


def load_tokenizer(path):
    """A sentencepiece .model, an HF tokenizer.json, or a dir holding one (checkpoint dir, data dir).

    tokenizer_config.json beside it gives ids and conventions; a chat_template.jinja beside it (transformers' own
    file for the template) takes precedence over the config's chat_template, as in transformers."""
    path, config, template, template_file = tokenizer_files.read_tokenizer_dir(path)
    try:
        tok = Tokenizer(path, config, template, template_file)
    except DataError:
        raise
    except Exception as e:  # sentencepiece / tokenizers raise RuntimeError or OSError on corrupt files
        raise DataError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})")
    special_ids_of(path.parent / "tokenizer_config.json", tok.vocab_size, config)  # ids of this vocabulary
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
# tokenizer_config.json) is used as transformers uses it: support/jinja_templates.py.

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


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.")


ALPACA_PROMPT = re.compile(r"(Below is an instruction that describes a task.*?)?### Instruction:\n.*### Response:\s*",
                           re.DOTALL)


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


@dataclass(frozen=True)
class Template:
    render: Callable  # (messages, system, add_generation_prompt) -> list of (piece, counts_in_loss)
    source: str       # where the format is published
    stop: tuple = ()  # what ends a reply besides eos when a model writes on: the next turn's text, or its token
                      # (an id, or a Special looked up in the vocabulary)
    input_sep: str = "\n"  # between an alpaca-style record's instruction and input (LLaMA-Efficient-Tuning's)
    system: str = ""  # the default system prompt, where the format has one


TEMPLATES = {  # 195 = Baichuan's user token
    "baichuan": Template(render_baichuan, "Baichuan-13B-Chat generation_utils.py (user 195, assistant 196)", (195,)),
    "baichuan2": Template(render_baichuan, "Baichuan2-Chat generation_utils.py, fine-tune.py (195, 196)", (195,)),
    "vicuna": Template(render_vicuna, "FastChat conversation.py vicuna_v1.1", ("USER:",), system=VICUNA_SYSTEM),
    "alpaca": Template(render_alpaca, "tatsu-lab/stanford_alpaca PROMPT_DICT", ("### Instruction:",),
                       system=ALPACA_SYSTEM),
    "aquila": Template(render_aquila, "FlagAI aquila-chat conversation template", ("###",), system=AQUILA_SYSTEM),
    "llama-2": Template(render_llama2, "meta-llama/llama generation.py chat_completion", ("[INST]",)),
    "chatml": Template(render_chatml, "OpenAI ChatML", (IM_END,)),
    "human-assistant": Template(render_human_assistant, "Baichuan-7B QLoRA recipe", ("Human:",), input_sep=""),
}


def template_jinja(tok, name):
    """Built-in template `name` as a Hugging Face Jinja chat_template for this tokenizer (what native-to-hf writes),
    or None where the Jinja would not give encode_chat's ids: support/jinja_templates.py holds the Jinja bodies."""
    return builtin_jinja(tok, name, TEMPLATES[name].system,
                         lambda messages, gen: encode_chat(tok, name, messages, add_generation_prompt=gen)[0])


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
# Tokenizing workers. Each gets the tokenizer path once (pool initializer) and chunks of Items; results come back
# in input order, so the output does not depend on the number of workers.

_worker = {}


def init_worker(tokenizer_path, template, seq_len, train_on_prompt=False, max_source_len=0, max_target_len=0):
    _worker.update(tok=load_tokenizer(tokenizer_path), template=template, seq_len=seq_len,
                   train_on_prompt=train_on_prompt, limits=(max_source_len, max_target_len))


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


# Reading a data dir back (train.py's input): meta.json checked, each split's tokens memmapped and cut into windows

def read_meta(data_dir) -> dict:
    """meta.json of a data dir, the fields train.py reads of their types and in range."""
    file = datadir.meta_file(data_dir)  # DataError where the dir or its meta.json is missing
    meta = load_json(file, DataError)
    datadir.check_meta(meta, file)
    return meta


class TokenSplit:
    """One split's memmapped tokens as (B, T) windows: inputs, next-token targets, loss masks, document ids.

    Text is one stream of documents, read in windows at any offset. Data that was packed (`packed` in meta.json) is
    rows of exactly seq_len tokens holding whole documents: windows are the rows, attention stays within each
    document (doc_ids from {split}.docs.bin), and a row's last target (the next row's first token) does not count.
    """

    def __init__(self, data_dir, split: str, meta: dict, seq_len: int):
        datadir.check_split(data_dir, split, meta, seq_len)  # the files are what meta.json says, or DataError
        self.file = Path(data_dir) / f"{split}.bin"
        self.tokens = np.memmap(self.file, dtype=meta["dtype"], mode="r")
        mask_file = Path(data_dir) / f"{split}.mask.bin"
        self.mask = np.memmap(mask_file, dtype=np.uint8, mode="r") if mask_file.exists() else None
        self.packed = bool(meta.get("packed"))
        self.doc_starts = None
        docs_file = Path(data_dir) / f"{split}.docs.bin"
        if self.packed and docs_file.exists():
            self.doc_starts = datadir.read_doc_starts(docs_file, len(self.tokens))
        self.seq_len = seq_len

    def check_ids(self, vocab_size: int):
        """Raise DataError on a token id the model has no embedding for (data from another tokenizer)."""
        datadir.check_ids(self.tokens, self.file, vocab_size)

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
    try:
        prepare_checks.check_flags(args, TEMPLATES)
    except prepare_checks.FlagError as e:
        parser.exit(2, f"prepare.py: {e}\n")
    return args


def prepare(args):
    """Run the whole pipeline into a temporary dir next to the output; rename it into place at the end."""
    files, fmt, out = datafiles.input_files(args)  # --input (or the default corpus), its --format, the output dir
    source, instruction = [str(p) for p in files], fmt in INSTRUCTION_FORMATS
    inputs = [*files, *(args.input or []), *([args.tokenizer] if args.tokenizer else [])]
    counters, total = {}, sum(f.stat().st_size for f in files)
    total = min(total, args.max_chars) if args.max_chars else total  # about: characters, not bytes

    def need(written):  # a full disk: the output's bytes, from those of the input read so far
        read = counters.get("bytes_read")
        return max(written, counters["bytes_out"] * max(total, read) // read) if read else None

    with replace_dir(out, args.overwrite, "--out", inputs, DataError) as tmp, \
            diskspace.reported(out, tmp, need, DataError, "free space there, or choose another --out"):
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
        raise DataError(f"--vocab_size={args.vocab_size}: cannot train a tokenizer on this input "
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
    for chunk, (tokens, mask, index, chunk_stats, errors) in ordered_map(encode_chunk, chunked(items), args.workers,
                                                                         init_worker, initargs):
        for error in errors:
            skip_or_stop(DataError(error), args.on_error, counters)
        if tokens.size and tokens.max() >= tok.vocab_size:
            raise DataError(f"token id {tokens.max()} >= vocab_size {tok.vocab_size} (Megatron input "
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


def _prepare_into(out_dir, args, files, fmt, source, instruction, counters):
    tok = get_tokenizer(args, files, fmt, out_dir)
    template = args.template or tok.template_name
    prepare_checks.check_template(tok, template, fmt, instruction, TEMPLATES)  # DataError where it cannot be used
    if template in TEMPLATES and (warning := literal_id_warning(tok, template)):
        print(f"prepare.py: {warning}", file=sys.stderr)
    dtype = args.dtype if args.dtype != "auto" else "uint16" if tok.vocab_size <= 65536 else "uint32"
    prepare_checks.check_dtype(tok, dtype)
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
        raise DataError("--input: no documents left to write (all empty, skipped or dropped)")
    if args.val_fraction > 0 and writers["val"].n_docs == 0 and datadir.move_last_to_val(out_dir, writers, dtype):
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
        "megatron": args.megatron, "stats": stats, "layout": datadir.META_LAYOUT,
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
    try:
        out, meta = prepare(args)
    except (DataError, TemplateError) as e:  # every problem with the input, said in one line
        raise SystemExit(f"prepare.py: {e}") from None
    print(f"prepare.py: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
