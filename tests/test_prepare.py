"""Tests for prepare.py: tokenizers, chat templates (exact ids and masks), every input format, Megatron files,
determinism, packing, the val split, truncation, and bad input.

Tokenizers are built here (no hub): a tiny sentencepiece BPE trained with prepare.train_sentencepiece and a
byte-level BPE tokenizer.json trained with the `tokenizers` library. prepare.main(argv) runs in-process on small
files the tests write; two runs go through a subprocess to check what a user sees.

    python -m pytest -q tests/test_prepare.py
"""

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare
from prepare import TEMPLATES, encode_chat, load_tokenizer
from support import datafiles, megatron

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a model data token chat user assistant reply question answer python code function return value list "
         "string number file read write train test small large fast slow good bad hello world capital city "
         "France Paris what is of to and in for with on").split()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory):
    """A 400-piece sentencepiece BPE (ids 195/196 exist, as Baichuan's template needs)."""
    out = tmp_path_factory.mktemp("sp")
    lines = sentences(3000) + [TEMPLATES_TEXT] * 20
    return prepare.train_sentencepiece(lines, out, vocab_size=400)


TEMPLATES_TEXT = (prepare.VICUNA_SYSTEM + " " + prepare.ALPACA_SYSTEM_INPUT + " " + prepare.AQUILA_SYSTEM +
                  " USER: ASSISTANT: ### Instruction: Input: Response: Human: Assistant: [INST] [/INST] <<SYS>>")


@pytest.fixture(scope="session")
def sp(sp_path):
    return load_tokenizer(sp_path)


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json (Aquila-style), with <|im_start|>/<|im_end|> as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(sentences(3000) + [TEMPLATES_TEXT] * 20, trainer)
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tk.save(str(out))
    return out


@pytest.fixture(scope="session")
def bpe(bpe_path):
    return load_tokenizer(bpe_path)


def run(*argv):
    """prepare.main in-process; returns meta.json of the output."""
    prepare.main([str(a) for a in argv])
    out = Path(str(argv[argv.index("--out") + 1]))
    return json.loads((out / "meta.json").read_text())


def load_split(out, split, meta):
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    mask = np.fromfile(out / f"{split}.mask.bin", dtype=np.uint8) if (out / f"{split}.mask.bin").exists() else None
    offsets = np.fromfile(out / f"{split}.docs.bin", dtype=np.int64)
    return tokens, mask, offsets


def documents(out, split, meta):
    tokens, mask, offsets = load_split(out, split, meta)
    return [(tokens[a:b], None if mask is None else mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def fails(*argv):
    """prepare.main must exit with one line naming the problem; returns that line."""
    with pytest.raises(SystemExit) as e:
        prepare.main([str(a) for a in argv])
    message = str(e.value.code)
    assert e.value.code not in (0, None) and message.startswith("prepare.py: ") and "\n" not in message
    return message


# -----------------------------------------------------------------------------
# tokenizers

def test_sentencepiece_round_trip_and_special_ids(sp):
    text = "Hello world.\n    def f(x):  return x  # two  spaces, é and 🙂\n"
    assert sp.decode(sp.encode(text)) == text  # identity normalisation, whitespace kept, byte fallback
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size) == (1, 2, 3, 400)
    assert sp.encode("hi", add_special_tokens=True) == [1] + sp.encode("hi")  # LLaMA: bos, no eos
    assert sp.frame_document(sp.encode("hi")) == [1] + sp.encode("hi") + [2]
    assert sp.token_to_id("<|im_end|>") is not None and sp.token_to_id("no-such-piece") is None


def test_tokenizer_json_ids_from_names_and_hf_config(bpe_path, tmp_path):
    tok = load_tokenizer(bpe_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = "Paris is the capital of France. Ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    # a checkpoint dir with an HF-style tokenizer_config.json naming the tokens
    (tmp_path / "tokenizer.json").write_bytes(bpe_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token":
                                                                "<|im_end|>", "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 5, 3)


def test_save_and_load_checkpoint_dir_keeps_ids_and_template(sp, tmp_path):
    sp.save(tmp_path, template="vicuna")
    tok = load_tokenizer(tmp_path)
    assert tok.filename == "tokenizer.model" and tok.chat_template == "vicuna"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id, sp.eos_id, sp.pad_id)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == "vicuna"


def test_train_sentencepiece_is_deterministic(tmp_path):
    lines = sentences(500, seed=3)
    a = prepare.train_sentencepiece(lines, tmp_path / "a", vocab_size=400)
    b = prepare.train_sentencepiece(lines, tmp_path / "b", vocab_size=400)
    assert a.read_bytes() == b.read_bytes()


# -----------------------------------------------------------------------------
# chat templates: exact ids and masks

CONV = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "And of the world?"},
        {"role": "assistant", "content": "There is no capital of the world."}]


def masked_text(tok, ids, mask):
    return [tok.decode([i for i, m in zip(ids, mask) if m])]


def test_baichuan2_ids_and_mask(sp):
    enc, eos = sp.encode, sp.eos_id
    ids, mask = encode_chat(sp, "baichuan2", CONV, system="Be brief.")
    a1, a2 = enc(CONV[1]["content"]), enc(CONV[3]["content"])
    expected = (enc("Be brief.") + [195] + enc(CONV[0]["content"]) + [196] + a1 + [eos] +
                [195] + enc(CONV[2]["content"]) + [196] + a2 + [eos])
    assert ids == expected
    n_sys, n_u1, n_u2 = len(enc("Be brief.")), len(enc(CONV[0]["content"])), len(enc(CONV[2]["content"]))
    assert mask == ([0] * (n_sys + 1 + n_u1 + 1) + [1] * (len(a1) + 1) + [0] * (1 + n_u2 + 1) + [1] * (len(a2) + 1))
    gen, gen_mask = encode_chat(sp, "baichuan2", CONV[:3], system="Be brief.", add_generation_prompt=True)
    assert gen == expected[:len(gen)] and gen[-1] == 196 and not any(gen_mask[-n_u2 - 2:])
    assert encode_chat(sp, "baichuan", CONV)[0] == expected[n_sys:]  # Baichuan-13B-Chat: same tokens


def test_vicuna_ids_mask_and_text(bpe, sp):
    # byte-level BPE: every segment is encoded exactly as the reference string would be split at the special tokens
    enc, eos = bpe.encode, bpe.eos_id
    sys_ = prepare.VICUNA_SYSTEM
    ids, mask = encode_chat(bpe, "vicuna", CONV)
    p1 = enc(f"{sys_} USER: {CONV[0]['content']} ASSISTANT:")
    r1 = enc(" " + CONV[1]["content"])
    p2 = enc(f"USER: {CONV[2]['content']} ASSISTANT:")
    r2 = enc(" " + CONV[3]["content"])
    # FastChat tokenizes the prompt with the tokenizer's defaults: this tokenizer.json adds no bos
    assert bpe.prefix == [] and ids == p1 + r1 + [eos] + p2 + r2 + [eos]
    assert mask == [0] * len(p1) + [1] * (len(r1) + 1) + [0] * len(p2) + [1] * (len(r2) + 1)
    # sentencepiece: the text is FastChat's vicuna_v1.1 prompt exactly (decode drops the control tokens)
    ids, mask = encode_chat(sp, "vicuna", CONV)
    assert sp.decode(ids) == (f"{sys_} USER: {CONV[0]['content']} ASSISTANT: {CONV[1]['content']}"
                              f"USER: {CONV[2]['content']} ASSISTANT: {CONV[3]['content']}")
    assert ids[0] == sp.bos_id and [i for i, m in zip(ids, mask) if m].count(sp.eos_id) == 2
    gen, _ = encode_chat(sp, "vicuna", CONV[:3], add_generation_prompt=True)
    assert sp.decode(gen).endswith(f"USER: {CONV[2]['content']} ASSISTANT:") and gen == ids[:len(gen)]


def test_alpaca_ids_and_mask_with_and_without_input(bpe):
    enc, eos = bpe.encode, bpe.eos_id
    ids, mask = encode_chat(bpe, "alpaca", [{"role": "user", "content": "Name a city.", "input": "In France"},
                                            {"role": "assistant", "content": "Paris"}])
    prompt = enc("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n### Instruction:\nName a city."
                 "\n\n### Input:\nIn France\n\n### Response:\n")
    assert ids == prompt + enc("Paris") + [eos] and mask == [0] * len(prompt) + [1] * (len(enc("Paris")) + 1)
    ids, mask = encode_chat(bpe, "alpaca", CONV[:2])
    prompt = enc("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 f"request.\n\n### Instruction:\n{CONV[0]['content']}\n\n### Response:\n")
    reply = enc(CONV[1]["content"])
    assert ids == prompt + reply + [eos] and mask == [0] * len(prompt) + [1] * (len(reply) + 1)


@pytest.mark.parametrize("template,text,replies", [
    ("aquila", "SYS###Human: U1###Assistant: A1###Human: U2###Assistant: A2###", " A1### A2###</s>"),
    ("llama-2", "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU1 [/INST] A1 [INST] U2 [/INST] A2 ", " A1 </s> A2 </s>"),
    ("chatml", "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
               "A1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
     "A1<|im_end|>A2<|im_end|>"),
    ("human-assistant", "SYS\n\nHuman: U1\n\nAssistant: A1\n\nHuman: U2\n\nAssistant: A2", " A1</s> A2</s>"),
])
def test_template_text_and_masked_replies(bpe, template, text, replies):
    conv = [{"role": r, "content": c} for r, c in (("user", "U1"), ("assistant", "A1"), ("user", "U2"),
                                                     ("assistant", "A2"))]
    ids, mask = encode_chat(bpe, template, conv, system="SYS")
    decoded = bpe.hf.decode(ids, skip_special_tokens=False)  # keeps <|im_start|> etc. visible
    assert decoded.replace("<s>", "").replace("</s>", "") == text
    assert bpe.hf.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == replies


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generation_prompt_is_a_prefix_of_the_full_conversation(sp, template):
    full, mask = encode_chat(sp, template, CONV)
    gen, gen_mask = encode_chat(sp, template, CONV[:3], add_generation_prompt=True)
    assert full[:len(gen)] == gen and not any(full_m for full_m in mask[len(gen) - 1:len(gen)])
    assert mask[len(gen)] == 1  # the very next token is the reply


@pytest.mark.parametrize("template", ["vicuna", "alpaca"])
def test_templates_start_as_the_tokenizer_frames_text(sp, template, monkeypatch):
    # their references tokenize the whole prompt with the tokenizer's defaults: LLaMA's sentencepiece adds bos
    ids, mask = encode_chat(sp, template, CONV[:2])
    assert sp.prefix == [sp.bos_id] and ids[0] == sp.bos_id and mask[0] == 0
    monkeypatch.setattr(sp, "prefix", [])  # a tokenizer that adds nothing (e.g. add_bos_token: false)
    without, without_mask = encode_chat(sp, template, CONV[:2])
    assert without == ids[1:] and without_mask == mask[1:]


@pytest.mark.parametrize("template", ["human-assistant", "llama-2"])
def test_templates_start_with_bos_and_a_vocabulary_without_one_gets_none(sp, template, monkeypatch):
    # their references put bos in front explicitly, whatever the tokenizer's own convention
    ids, mask = encode_chat(sp, template, CONV[:2])
    assert ids[0] == sp.bos_id and mask[0] == 0
    monkeypatch.setattr(sp, "bos_id", None)
    without, without_mask = encode_chat(sp, template, CONV[:2])
    assert without == [i for i in ids if i != ids[0]] and len(without_mask) == len(without)  # no "bos" spelled out


def test_roles_are_normalised_and_unknown_roles_rejected(sp):
    a = encode_chat(sp, "vicuna", [{"role": "<|Human|>", "content": "hi"}, {"role": "gpt", "content": "yo"}])
    b = encode_chat(sp, "vicuna", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert a == b
    with pytest.raises(ValueError, match="role"):
        encode_chat(sp, "vicuna", [{"role": "narrator", "content": "hi"}])
    from model import FAMILIES
    assert FAMILIES["baichuan2"].chat_template == "baichuan2"
    assert {f.chat_template for f in FAMILIES.values()} <= set(TEMPLATES)


# -----------------------------------------------------------------------------
# input formats end to end

def mask_runs(tok, ids, mask):
    """The text of each run of mask-1 tokens (one assistant reply and its end token)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tok.decode(ids[a:b]).strip() for a, b in zip(edges[::2], edges[1::2])]


def check_replies(out, meta, tok, replies):
    """Every document's masked tokens are exactly its assistant replies, and masks align with tokens."""
    docs = documents(out, "train", meta) + documents(out, "val", meta)
    assert sorted(mask_runs(tok, ids, mask) for ids, mask in docs) == sorted(replies)


def test_alpaca_json_list(sp_path, sp, tmp_path):
    recs = [{"instruction": f"Question {i}?", "input": "some input" if i % 2 else "", "output": f"Answer {i}."}
            for i in range(10)]
    (tmp_path / "alpaca.json").write_text(json.dumps(recs))
    meta = run("--input", tmp_path / "alpaca.json", "--format", "alpaca", "--tokenizer", sp_path,
               "--template", "alpaca", "--out", tmp_path / "out", "--val_fraction", "0.2")
    assert (meta["train_documents"], meta["val_documents"], meta["has_mask"]) == (8, 2, True)
    assert meta["template"] == "alpaca"
    check_replies(tmp_path / "out", meta, sp, [[f"Answer {i}."] for i in range(10)])
    tokens, mask, _ = load_split(tmp_path / "out", "train", meta)
    assert len(tokens) == len(mask) == meta["train_tokens"]
    assert "### Input:\nsome input" in sp.decode(documents(tmp_path / "out", "train", meta)[1][0])


def test_sharegpt_jsonl_multi_turn_and_alpaca_data_conversation(sp_path, sp, tmp_path):
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"R{i}a"},
                                             {"from": "human", "value": "More?"}, {"from": "gpt", "value": f"R{i}b"}]}
            for i in range(6)]
    write_jsonl(tmp_path / "sg.jsonl", recs)
    meta = run("--input", tmp_path / "sg.jsonl", "--format", "sharegpt", "--tokenizer", sp_path, "--template",
               "baichuan2", "--out", tmp_path / "o1", "--val_fraction", "0.5")
    docs = documents(tmp_path / "o1", "train", meta) + documents(tmp_path / "o1", "val", meta)
    for ids, mask in docs:  # both replies count, neither user turn does
        assert list(ids).count(195) == 2 and all(mask[ids == 195] == 0) and sum(mask[ids == sp.eos_id]) == 2
    check_replies(tmp_path / "o1", meta, sp, [[f"R{i}a", f"R{i}b"] for i in range(6)])
    # alpaca-data-conversation: the same records read as --format alpaca give the same tokens
    meta2 = run("--input", tmp_path / "sg.jsonl", "--format", "alpaca", "--tokenizer", sp_path, "--template",
                "baichuan2", "--out", tmp_path / "o2", "--val_fraction", "0.5")
    assert (tmp_path / "o1" / "train.bin").read_bytes() == (tmp_path / "o2" / "train.bin").read_bytes()
    assert meta2["train_tokens"] == meta["train_tokens"]


def test_moss_003_sft(sp_path, sp, tmp_path):
    rec = {"conversation_id": 1, "meta_instruction": "You are an AI assistant whose name is MOSS.\n", "num_turns": 2,
           "chat": {"turn_2": {"Human": "<|Human|>: And then?<eoh>\n", "MOSS": "<|MOSS|>: Then B.<eom>\n"},
                    "turn_1": {"Human": "<|Human|>: First?<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                               "MOSS": "<|MOSS|>: First A.<eom>\n"}}}
    write_jsonl(tmp_path / "moss.jsonl", [rec, rec])
    meta = run("--input", tmp_path / "moss.jsonl", "--format", "moss", "--tokenizer", sp_path, "--template", "vicuna",
               "--out", tmp_path / "out", "--val_fraction", "0.5")
    ids, mask = documents(tmp_path / "out", "train", meta)[0]
    assert sp.decode(ids) == ("You are an AI assistant whose name is MOSS. USER: First? ASSISTANT: First A."
                              "USER: And then? ASSISTANT: Then B.")
    assert mask_runs(sp, ids, mask) == ["First A.", "Then B."]
    # AscendSpeed's MOSSMultiTurnHandler leaves meta_instruction out: --drop_system
    meta = run("--input", tmp_path / "moss.jsonl", "--format", "moss", "--tokenizer", sp_path, "--template", "vicuna",
               "--drop_system", "--out", tmp_path / "plain", "--val_fraction", "0.5")
    ids, mask = documents(tmp_path / "plain", "train", meta)[0]
    assert sp.decode(ids).startswith("A chat between a curious user")  # the template's own default system
    assert "MOSS" not in sp.decode(ids) and mask_runs(sp, ids, mask) == ["First A.", "Then B."]


def test_belle_single_multi_turn_and_conversations(sp_path, sp, tmp_path):
    recs = [{"instruction": "Translate hello.", "input": "", "output": "Bonjour."},
            {"instruction": "Human: Hi!\nAssistant: Hello.\nHuman: Bye?\nAssistant:", "input": "", "output": "Bye."},
            {"id": "x", "conversations": [{"from": "human", "value": "Q"}, {"from": "assistant", "value": "A."}]}]
    write_jsonl(tmp_path / "belle.jsonl", recs)
    meta = run("--input", tmp_path / "belle.jsonl", "--format", "belle", "--tokenizer", sp_path, "--template",
               "human-assistant", "--out", tmp_path / "out", "--val_fraction", "0")
    docs = documents(tmp_path / "out", "train", meta)
    assert sp.decode(docs[1][0]) == "Human: Hi!\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Bye."
    assert [mask_runs(sp, ids, mask) for ids, mask in docs] == [["Bonjour."], ["Hello.", "Bye."], ["A."]]


def test_human_assistant_joins_instruction_and_input_with_nothing_between(sp_path, sp, tmp_path):
    # baichuan_sft_lora's prompt: "Human: " + instruction + input + "\n\nAssistant: " (other templates: a newline)
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Translate:", "input": "hello", "output": "Bonjour."}])
    for template, joined in (("human-assistant", "Human: Translate:hello\n\nAssistant: Bonjour."),
                             ("vicuna", "USER: Translate:\nhello ASSISTANT: Bonjour.")):
        meta = run("--input", tmp_path / "b.jsonl", "--format", "belle", "--tokenizer", sp_path, "--template",
                   template, "--out", tmp_path / template, "--val_fraction", "0")
        assert joined in sp.decode(documents(tmp_path / template, "train", meta)[0][0])


def test_text_dir_glob_json_field_and_parquet_agree(sp_path, tmp_path):
    docs = ["\n".join(sentences(20, seed=i)) for i in range(4)]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    write_jsonl(tmp_path / "d.jsonl", [{"body": d, "id": i} for i, d in enumerate(docs)])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    common = ["--tokenizer", sp_path, "--val_fraction", "0.25"]
    m1 = run("--input", tmp_path / "txt", "--out", tmp_path / "o1", *common)
    m2 = run("--input", str(tmp_path / "txt" / "*.txt"), "--format", "text", "--out", tmp_path / "o2", *common)
    m3 = run("--input", tmp_path / "d.jsonl", "--text_field", "body", "--out", tmp_path / "o3", *common)
    m4 = run("--input", tmp_path / "d.parquet", "--format", "parquet", "--text_field", "body", "--out",
             tmp_path / "o4", *common)
    tok = load_tokenizer(sp_path)
    for o, m in (("o1", m1), ("o2", m2), ("o3", m3), ("o4", m4)):
        assert (tmp_path / o / "train.bin").read_bytes() == (tmp_path / "o1" / "train.bin").read_bytes()
        assert not (tmp_path / o / "train.mask.bin").exists() and m["has_mask"] is False
    first = documents(tmp_path / "o1", "train", m1)[0][0]
    assert list(first) == [tok.bos_id] + tok.encode(docs[0]) + [tok.eos_id]  # bos + text + eos
    assert (m1["train_documents"], m1["val_documents"]) == (3, 1)


def test_long_text_read_in_pieces_gives_the_same_tokens(sp_path, sp, tmp_path, monkeypatch):
    text = "\n".join(sentences(200, seed=7)) + "\n"
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(datafiles, "TEXT_PIECE_BYTES", 97)  # many pieces, cut after newlines
    meta = run("--input", tmp_path / "big.txt", "--tokenizer", sp_path, "--out", tmp_path / "out",
               "--val_fraction", "0")
    tokens, _, offsets = load_split(tmp_path / "out", "train", meta)
    assert list(offsets) == [0, len(tokens)] and list(tokens) == sp.frame_document(sp.encode(text))


# -----------------------------------------------------------------------------
# Megatron indexed datasets

def test_megatron_round_trip(sp_path, sp, tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(sentences(30, seed=1)))
    (tmp_path / "b.txt").write_text("\n".join(sentences(30, seed=2)))
    meta = run("--input", tmp_path / "a.txt", tmp_path / "b.txt", "--tokenizer", sp_path, "--out", tmp_path / "o1",
               "--val_fraction", "0", "--megatron")
    tokens, _, offsets = load_split(tmp_path / "o1", "train", meta)
    dtype, sizes, pointers, doc_index = megatron.read_megatron_index(tmp_path / "o1" / "train.idx")
    assert dtype == np.uint16 and list(sizes) == list(np.diff(offsets)) and list(doc_index) == [0, 1, 2]
    assert list(pointers) == [0, 2 * sizes[0]]
    docs = list(megatron.read_megatron(tmp_path / "o1" / "train.bin"))
    assert [list(d) for d in docs] == [list(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    # read back as input: the same files again
    run("--input", tmp_path / "o1" / "train.idx", tmp_path / "o1" / "train.bin", "--tokenizer", sp_path,
        "--out", tmp_path / "o2", "--val_fraction", "0")
    assert (tmp_path / "o2" / "train.bin").read_bytes() == (tmp_path / "o1" / "train.bin").read_bytes()
    assert (tmp_path / "o2" / "train.docs.bin").read_bytes() == (tmp_path / "o1" / "train.docs.bin").read_bytes()


def write_idx_by_hand(prefix, seqs, doc_index, code=4, dtype=np.int32):
    """The MMIDIDX layout, written from the spec (not with prepare.py)."""
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in seqs)
    Path(f"{prefix}.bin").write_bytes(data)
    sizes = [len(s) for s in seqs]
    pointers = list(np.cumsum([0] + [n * np.dtype(dtype).itemsize for n in sizes[:-1]]))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_index))
    idx += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    idx += struct.pack(f"<{len(doc_index)}q", *doc_index)
    Path(f"{prefix}.idx").write_bytes(idx)


def test_megatron_idx_built_by_hand_is_read(sp_path, sp, tmp_path):
    # three sequences, two documents: doc 0 = sequences 0 and 1, doc 1 = sequence 2 (already ends with eos)
    seqs = [[10, 11, 12], [13, 14], [20, 21, sp.eos_id]]
    write_idx_by_hand(tmp_path / "hand", seqs, [0, 2, 3])
    docs = list(megatron.read_megatron(tmp_path / "hand.idx"))
    assert [list(d) for d in docs] == [[10, 11, 12, 13, 14], [20, 21, sp.eos_id]]
    meta = run("--input", tmp_path / "hand.idx", "--format", "megatron", "--tokenizer", sp_path,
               "--out", tmp_path / "out", "--val_fraction", "0")
    tokens, _, offsets = load_split(tmp_path / "out", "train", meta)
    assert list(tokens) == [10, 11, 12, 13, 14, sp.eos_id, 20, 21, sp.eos_id] and list(offsets) == [0, 6, 9]
    # uint16 (code 8) too, and a corrupt header is one clear error
    write_idx_by_hand(tmp_path / "h16", [[5, 6]], [0, 1], code=8, dtype=np.uint16)
    assert [list(d) for d in megatron.read_megatron(tmp_path / "h16.bin")] == [[5, 6]]
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 8)
    (tmp_path / "bad.idx").write_bytes(b"NOTMEGA" + b"\x00" * 40)
    msg = fails("--input", tmp_path / "bad.idx", "--tokenizer", sp_path, "--out", tmp_path / "o2")
    assert "bad.idx" in msg and "MMIDIDX" in msg and not (tmp_path / "o2").exists()


# -----------------------------------------------------------------------------
# determinism, packing, val split, truncation

def test_output_is_byte_identical_for_1_and_2_workers(sp_path, tmp_path):
    recs = [{"conversations": [{"from": "human", "value": s}, {"from": "gpt", "value": s[::-1]}]}
            for s in sentences(400, seed=5)]
    write_jsonl(tmp_path / "c.jsonl", recs)
    outs = []
    for w in (1, 2):
        run("--input", tmp_path / "c.jsonl", "--format", "sharegpt", "--tokenizer", sp_path, "--template", "chatml",
            "--out", tmp_path / f"w{w}", "--workers", w)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"w{w}").iterdir())})
    assert outs[0] == outs[1] and "train.mask.bin" in outs[0]


def test_pack_keeps_documents_whole_in_rows(sp_path, sp, tmp_path):
    recs = [{"instruction": s, "output": " ".join(sentences(i % 4 + 1, seed=i))} for i, s in enumerate(sentences(40))]
    write_jsonl(tmp_path / "a.jsonl", recs)
    L = 256
    meta = run("--input", tmp_path / "a.jsonl", "--format", "alpaca", "--tokenizer", sp_path, "--template", "vicuna",
               "--seq_len", L, "--pack", "--out", tmp_path / "out", "--val_fraction", "0")
    tokens, mask, offsets = load_split(tmp_path / "out", "train", meta)
    assert meta["packed"] and len(tokens) % L == 0 and len(mask) == len(tokens)
    rows = set(range(0, len(tokens) + 1, L))
    starts = [int(o) for o in offsets]
    assert rows <= set(starts)  # every row starts with a document
    for a, b in zip(starts[:-1], starts[1:]):
        assert a // L == (b - 1) // L  # no document crosses a row boundary
        assert tokens[a] == sp.bos_id  # vicuna documents start with bos
    # each document: its sample, then eos, then (last in row) padding with mask 0
    pad = meta["stats"]["train_pad_tokens"]
    assert pad == np.sum((tokens == sp.pad_id) & (mask == 0)) and 0 < pad < len(tokens)
    expected = sorted(sp.decode(encode_chat(sp, "vicuna", [{"role": "user", "content": r["instruction"]},
                                                          {"role": "assistant", "content": r["output"]}])[0])
                      for r in recs)
    got = sorted(sp.decode(tokens[a:b][tokens[a:b] != sp.pad_id]) for a, b in zip(starts[:-1], starts[1:]))
    assert got == expected


def test_pack_a_document_that_exactly_fills_a_rows_remainder_goes_in_that_row(sp_path, sp, tmp_path):
    # the boundaries: documents a and b (a + b == seq_len) share a row with no padding, and c (== seq_len) fills
    # the next row alone, whole; off by one, b would start a row of its own (two rows padded) or c be cut in two
    lengths = {}
    for text in sentences(300, seed=12):
        lengths.setdefault(len(sp.frame_document(sp.encode(text))), text)
    L, c = max(lengths.items())
    a, b = next((lengths[n], lengths[L - n]) for n in sorted(lengths) if L - n in lengths and n <= L - n)
    write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in (a, b, c)])
    meta = run("--input", tmp_path / "t.jsonl", "--tokenizer", sp_path, "--seq_len", L, "--pack", "--out",
               tmp_path / "out", "--val_fraction", "0")
    tokens, mask, offsets = load_split(tmp_path / "out", "train", meta)
    n_a = len(sp.frame_document(sp.encode(a)))
    assert offsets.tolist() == [0, n_a, L, 2 * L] and len(tokens) == 2 * L  # rows [a b] [c]
    assert "train_pad_tokens" not in meta["stats"] and "train_docs_split" not in meta["stats"] and mask.all()
    assert [sp.decode(tokens[i:j]) for i, j in zip(offsets[:-1], offsets[1:])] == [a, b, c]


def test_one_per_row_pads_every_document_to_a_row_of_its_own(sp_path, sp, tmp_path):
    recs = [{"instruction": s, "output": " ".join(sentences(i % 4 + 1, seed=i))} for i, s in enumerate(sentences(12))]
    write_jsonl(tmp_path / "a.jsonl", recs)
    L = 512
    meta = run("--input", tmp_path / "a.jsonl", "--format", "alpaca", "--tokenizer", sp_path, "--template", "vicuna",
               "--seq_len", L, "--pack", "--one_per_row", "--out", tmp_path / "out", "--val_fraction", "0")
    tokens, mask, offsets = load_split(tmp_path / "out", "train", meta)
    assert meta["one_per_row"] and meta["train_documents"] == 12 and len(tokens) == 12 * L
    assert [int(o) for o in offsets] == list(range(0, 12 * L + 1, L))  # a document starts every row
    packed = run("--input", tmp_path / "a.jsonl", "--format", "alpaca", "--tokenizer", sp_path, "--template",
                 "vicuna", "--seq_len", L, "--pack", "--out", tmp_path / "packed", "--val_fraction", "0")
    assert packed["train_tokens"] < meta["train_tokens"]  # the same documents share rows without the flag


def test_val_split_is_by_whole_documents(sp_path, sp, tmp_path):
    docs = sentences(50, seed=11)
    write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    meta = run("--input", tmp_path / "t.jsonl", "--tokenizer", sp_path, "--out", tmp_path / "out",
               "--val_fraction", "0.1")
    assert (meta["train_documents"], meta["val_documents"]) == (45, 5)
    val = [sp.decode(ids) for ids, _ in documents(tmp_path / "out", "val", meta)]
    train = [sp.decode(ids) for ids, _ in documents(tmp_path / "out", "train", meta)]
    assert val == [docs[i] for i in (9, 19, 29, 39, 49)] and sorted(train + val) == sorted(docs)


def test_seq_len_drops_trailing_turns_before_cutting_a_reply(sp_path, sp, tmp_path):
    short = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]
    long_reply = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " ".join(sentences(20))}]
    long_prompt = [{"from": "human", "value": " ".join(sentences(20))}, {"from": "gpt", "value": "Ok."}]
    recs = [{"conversations": short + short + long_reply}, {"conversations": long_reply},
            {"conversations": long_prompt}, {"conversations": short}]
    write_jsonl(tmp_path / "c.jsonl", recs)
    L = 64
    meta = run("--input", tmp_path / "c.jsonl", "--format", "sharegpt", "--tokenizer", sp_path, "--template",
               "baichuan2", "--seq_len", L, "--out", tmp_path / "out", "--val_fraction", "0")
    s = meta["stats"]
    assert (s["samples_shortened"], s["turns_dropped"], s["replies_cut"], s["dropped_too_long"]) == (1, 2, 1, 1)
    docs = documents(tmp_path / "out", "train", meta)
    assert len(docs) == 3 and all(len(ids) <= L for ids, _ in docs)
    assert mask_runs(sp, *docs[0]) == ["Hello there.", "Hello there."]  # whole turns kept, none cut
    assert len(docs[1][0]) == L and docs[1][1][-1] == 1  # the cut reply fills seq_len


def test_seq_len_cuts_text_documents_without_losing_tokens(sp_path, sp, tmp_path):
    text = " ".join(sentences(40))
    (tmp_path / "t.txt").write_text(text)
    meta = run("--input", tmp_path / "t.txt", "--tokenizer", sp_path, "--seq_len", 50, "--out", tmp_path / "out",
               "--val_fraction", "0")
    tokens, _, offsets = load_split(tmp_path / "out", "train", meta)
    assert list(tokens) == sp.frame_document(sp.encode(text))
    assert all(np.diff(offsets) <= 50) and meta["stats"]["train_docs_split"] == len(offsets) - 2


# -----------------------------------------------------------------------------
# --max_source_len / --max_target_len: LLaMA-Efficient-Tuning's max_source_length / max_target_length

IGNORE = -100


def upstream_supervised(pairs, max_source, max_target, eos):
    """LLaMA-Efficient-Tuning's preprocess_supervised_dataset (src/llmtuner/dsets/preprocess.py, July 2023) for one
    conversation, written out from its source: pairs are each turn's (source_ids, target_ids) as its template and
    tokenizer give them (bos, where added, in the first source; no eos) -> (input_ids, labels)."""
    max_length = max_source + max_target
    input_ids, labels = [], []
    for source_ids, target_ids in pairs:
        if len(source_ids) > max_source:
            source_ids = source_ids[:max_source]
        if len(target_ids) > max_target - 1:  # eos token
            target_ids = target_ids[:max_target - 1]
        if len(input_ids) + len(source_ids) + len(target_ids) + 1 > max_length:
            break
        input_ids += source_ids + target_ids + [eos]
        labels += [IGNORE] * len(source_ids) + target_ids + [eos]
    return input_ids, labels


def baichuan_pairs(sp_path, record):
    """Upstream's baichuan template ("<reserved_102>{query}<reserved_103>", ids 195 / 196, no bos, no separator)
    for an alpaca record or its conversations, tokenized with sentencepiece itself: [(source_ids, target_ids)]."""
    import sentencepiece as spm
    enc = spm.SentencePieceProcessor(model_file=str(sp_path)).encode
    if "conversations" in record:
        c = record["conversations"]
        turns = [(q["value"], a["value"]) for q, a in zip(c[::2], c[1::2])]
    else:
        query = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        turns = [(query, record["output"])]
    system = enc(record["system"]) if record.get("system") else []
    return [((system if i == 0 else []) + [195] + enc(q) + [196], enc(a)) for i, (q, a) in enumerate(turns)]


S, T = 32, 48  # source and target limits of the tests below (the document's 256 / 512, at the size of these records)


@pytest.fixture(scope="module")
def limit_records(tmp_path_factory):
    """An alpaca file: short, long prompt (with input), long reply, both long, and multi-turn conversations."""
    long_text = " ".join(sentences(8, seed=3))
    chat = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."},
            {"from": "human", "value": "And more?"}, {"from": "gpt", "value": long_text},
            {"from": "human", "value": "Last one?"}, {"from": "gpt", "value": "Yes."}]
    recs = [{"instruction": "Hi", "output": "Hello there."},
            {"instruction": long_text, "input": "some input", "output": "Ok."},
            {"instruction": "Tell me more.", "output": long_text},
            {"instruction": long_text, "output": " ".join(sentences(8, seed=4))},
            {"conversations": chat},
            {"system": "Be brief.", "conversations": chat[:2] + [{"from": "human", "value": long_text},
                                                                  {"from": "gpt", "value": "Short."}]}]
    path = tmp_path_factory.mktemp("limits") / "alpaca.json"
    path.write_text(json.dumps(recs))
    return path, recs


def test_source_and_target_limits_cut_each_turn_as_llama_efficient_tuning(sp_path, sp, limit_records, tmp_path):
    path, recs = limit_records
    pairs = [baichuan_pairs(sp_path, r) for r in recs]
    # the records reach every branch of upstream's loop
    assert len(pairs[1][0][0]) > S and len(pairs[2][0][1]) > T - 1 and len(pairs[3][0][0]) > S and len(pairs[3][0][1]) > T
    turns_kept = [[k for k in range(len(p) + 1) if upstream_supervised(p[:k], S, T, sp.eos_id) ==
                   upstream_supervised(p, S, T, sp.eos_id)][0] for p in pairs]
    assert turns_kept[4:] == [2, 2] and len(pairs[4][1][1]) > T and len(pairs[5][1][0]) > S  # cut and kept; dropped
    meta = run("--input", path, "--format", "alpaca", "--tokenizer", sp_path, "--template", "baichuan",
               "--max_source_len", S, "--max_target_len", T, "--out", tmp_path / "out", "--val_fraction", "0")
    docs = documents(tmp_path / "out", "train", meta)
    assert len(docs) == len(recs)
    for (ids, mask), p in zip(docs, pairs):
        want_ids, labels = upstream_supervised(p, S, T, sp.eos_id)
        assert list(ids) == want_ids and list(mask) == [int(label != IGNORE) for label in labels]
        assert len(ids) <= S + T
    assert 196 not in docs[1][0] and docs[1][1][S - 1:S + 1].tolist() == [0, 1]  # the prompt's tail went, 196 too
    s = meta["stats"]
    assert (s["max_source_len_cuts"], s["max_target_len_cuts"], s["max_len_turns_dropped"]) == (3, 3, 1)
    assert (meta["max_source_len"], meta["max_target_len"]) == (S, T)
    # train_on_prompt: the same tokens, every one counts
    meta = run("--input", path, "--format", "alpaca", "--tokenizer", sp_path, "--template", "baichuan",
               "--max_source_len", S, "--max_target_len", T, "--train_on_prompt", "--out", tmp_path / "all",
               "--val_fraction", "0")
    assert [list(i) for i, _ in documents(tmp_path / "all", "train", meta)] == [list(i) for i, _ in docs]
    assert all(m.all() for _, m in documents(tmp_path / "all", "train", meta))


def test_source_limit_counts_bos_and_one_limit_alone(sp_path, sp, limit_records, tmp_path):
    path, recs = limit_records
    meta = run("--input", path, "--format", "alpaca", "--tokenizer", sp_path, "--template", "alpaca",
               "--max_source_len", 6, "--out", tmp_path / "out", "--val_fraction", "0")
    ids, mask = documents(tmp_path / "out", "train", meta)[0]
    full, full_mask = encode_chat(sp, "alpaca", [{"role": "user", "content": recs[0]["instruction"]},
                                                 {"role": "assistant", "content": recs[0]["output"]}])
    reply = full[full_mask.index(1):]
    assert ids[0] == sp.bos_id and list(ids) == full[:6] + reply and list(mask) == [0] * 6 + [1] * len(reply)
    # a reply limit alone: no turn is dropped, each reply keeps T - 1 tokens and its eos
    meta = run("--input", path, "--format", "alpaca", "--tokenizer", sp_path, "--template", "baichuan",
               "--max_target_len", T, "--out", tmp_path / "t", "--val_fraction", "0")
    docs = documents(tmp_path / "t", "train", meta)
    for (ids, mask), p in zip(docs, (baichuan_pairs(sp_path, r) for r in recs)):
        want = [t for src, tgt in p for t in src + (tgt if len(tgt) < T else tgt[:T - 1]) + [sp.eos_id]]
        assert list(ids) == want
    assert "max_len_turns_dropped" not in meta["stats"]


def test_source_and_target_limits_then_seq_len_pack_and_one_per_row(sp_path, sp, limit_records, tmp_path):
    path, recs = limit_records
    expected = [upstream_supervised(baichuan_pairs(sp_path, r), S, T, sp.eos_id) for r in recs]
    expected = [(ids, [int(label != IGNORE) for label in labels]) for ids, labels in expected]
    base = ["--input", path, "--format", "alpaca", "--tokenizer", sp_path, "--template", "baichuan",
            "--max_source_len", S, "--max_target_len", T, "--val_fraction", "0"]
    # the document's layout: one example a row of source + target tokens, padded (mask 0)
    meta = run(*base, "--seq_len", S + T, "--pack", "--one_per_row", "--out", tmp_path / "rows")
    tokens, mask, offsets = load_split(tmp_path / "rows", "train", meta)
    assert len(tokens) == len(recs) * (S + T) and list(offsets) == list(range(0, len(tokens) + 1, S + T))
    for row, (ids, m) in enumerate(expected):
        a, n = row * (S + T), len(ids)
        assert list(tokens[a:a + n]) == ids and list(mask[a:a + n]) == m
        assert (tokens[a + n:a + S + T] == sp.pad_id).all() and not mask[a + n:a + S + T].any()
    # packed: the same documents share rows
    meta = run(*base, "--seq_len", S + T, "--pack", "--out", tmp_path / "packed")
    tokens, mask, offsets = load_split(tmp_path / "packed", "train", meta)
    docs = [(list(tokens[a:b]), list(mask[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
    unpadded = [(ids[:len(e[0])], m[:len(e[0])]) for (ids, m), e in zip(docs, expected)]
    assert unpadded == expected and len(tokens) < len(recs) * (S + T)
    # a shorter seq_len acts on what the limits left: trailing turns first, then the first turn is cut
    L = 48
    meta = run(*base, "--seq_len", L, "--out", tmp_path / "short")
    docs = documents(tmp_path / "short", "train", meta)
    for (ids, mask), r in zip(docs, recs):
        p = baichuan_pairs(sp_path, r)
        fits = [k for k in range(len(p), 0, -1) if len(upstream_supervised(p[:k], S, T, sp.eos_id)[0]) <= L]
        want, labels = upstream_supervised(p[:fits[0]] if fits else p[:1], S, T, sp.eos_id)
        assert list(ids) == want[:L] and list(mask) == [int(label != IGNORE) for label in labels][:L]
    assert meta["stats"]["samples_shortened"] >= 1 and meta["stats"]["replies_cut"] >= 1


def test_source_and_target_limits_are_checked_and_refused_for_text(sp_path, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text\n")
    for argv, needle in ((["--max_source_len", "-1"], "--max_source_len=-1: expected"),
                         (["--max_target_len", str(2 ** 24 + 1)], "--max_target_len=16777217: expected"),
                         (["--max_source_len", "256"], "--max_source_len: applies to instruction data"),
                         (["--format", "json", "--max_target_len", "512"], "not to --format=json")):
        with pytest.raises(SystemExit) as e:
            prepare.main([str(a) for a in ["--input", tmp_path / "t.txt", "--tokenizer", sp_path,
                                           "--out", tmp_path / "o", *argv]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("prepare.py: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# bad input: one line naming the problem, non-zero exit, no output left behind

def test_missing_and_empty_inputs(sp_path, tmp_path):
    assert "nope.txt" in fails("--input", tmp_path / "nope.txt", "--tokenizer", sp_path, "--out", tmp_path / "o")
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl: file is empty" in fails("--input", tmp_path / "empty.jsonl", "--tokenizer", sp_path,
                                                 "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_malformed_json_line_stops_or_is_skipped(sp_path, tmp_path):
    good = json.dumps({"instruction": "Q", "output": "A."})
    (tmp_path / "a.jsonl").write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    args = ["--input", tmp_path / "a.jsonl", "--format", "alpaca", "--tokenizer", sp_path, "--template", "alpaca",
            "--out", tmp_path / "o", "--val_fraction", "0"]
    msg = fails(*args)
    assert "a.jsonl: line 3: not valid JSON" in msg and "--on_error=skip" in msg
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # no half-written dir left
    meta = run(*args, "--on_error", "skip")
    assert meta["train_documents"] == 3 and meta["stats"]["skipped_records"] == 1


def test_missing_field(sp_path, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "A"}, {"instruction": "Q"}])
    msg = fails("--input", tmp_path / "a.jsonl", "--format", "alpaca", "--tokenizer", sp_path,
                "--template", "alpaca", "--out", tmp_path / "o")
    assert "a.jsonl: line 2: missing field 'output'" in msg
    write_jsonl(tmp_path / "t.jsonl", [{"content": "x"}])
    assert "missing field 'text'" in fails("--input", tmp_path / "t.jsonl", "--tokenizer", sp_path,
                                           "--out", tmp_path / "o")


def test_unknown_format_template_and_missing_template(sp_path, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "A"}])
    base = ["--input", tmp_path / "a.jsonl", "--tokenizer", sp_path, "--out", tmp_path / "o"]
    with pytest.raises(SystemExit) as e:
        prepare.main([str(a) for a in base + ["--format", "xml"]])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        prepare.main([str(a) for a in base + ["--format", "alpaca", "--template", "nope"]])
    assert e.value.code == 2
    assert "--template: required" in fails(*base, "--format", "alpaca")


def test_vocab_too_large_for_dtype(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70000)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w1 w2 w69999")
    base = ["--input", tmp_path / "a.txt", "--tokenizer", tmp_path / "tokenizer.json", "--val_fraction", "0"]
    assert "vocab_size 70003 does not fit" in fails(*base, "--dtype", "uint16", "--out", tmp_path / "o")
    meta = run(*base, "--out", tmp_path / "o2")  # auto picks uint32
    assert meta["dtype"] == "uint32"
    # no post-processor in this tokenizer.json: the text gets no bos; eos still ends the document
    assert list(np.fromfile(tmp_path / "o2" / "train.bin", np.uint32)) == [4, 5, 70002, 2]


def test_existing_output_needs_overwrite(sp_path, tmp_path):
    (tmp_path / "a.txt").write_text("Hello world.")
    base = ["--input", tmp_path / "a.txt", "--tokenizer", sp_path, "--out", tmp_path / "o", "--val_fraction", "0"]
    run(*base)
    (tmp_path / "o" / "marker").write_text("x")
    assert "exists; pass --overwrite" in fails(*base)
    assert (tmp_path / "o" / "marker").exists()  # untouched
    run(*base, "--overwrite")
    assert not (tmp_path / "o" / "marker").exists() and (tmp_path / "o" / "meta.json").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "prepare.py", "--input", str(tmp_path / "missing.jsonl"), "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"prepare.py: --input {tmp_path / 'missing.jsonl'}: no such file, "
                                             "directory or glob match"]


# -----------------------------------------------------------------------------
# the embedded default corpus

@pytest.mark.slow
def test_default_corpus_mini_build_is_deterministic(tmp_path):
    """`python prepare.py` (capped by --max_chars): stdlib sources -> tokenizer -> train/val; twice, identical."""
    args = ["--max_chars", "400000", "--vocab_size", "1000"]
    meta = run(*args, "--out", tmp_path / "a")
    run(*args, "--out", tmp_path / "b", "--workers", "2")
    for name in ("train.bin", "val.bin", "train.docs.bin", "tokenizer.model", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert meta["vocab_size"] == 1000 and meta["train_tokens"] > 50_000 and meta["val_documents"] >= 1
    assert meta["source_files"][0].endswith(".py") and meta["tokenizer"] == "tokenizer.model"
    tok = load_tokenizer(tmp_path / "a")
    tokens, _, offsets = load_split(tmp_path / "a", "train", meta)
    first = Path(meta["source_files"][0]).read_text()
    assert tok.decode(tokens[offsets[0]:offsets[1]]) == first  # lossless: code keeps its whitespace


def test_help_lists_formats_and_templates():
    r = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for name in list(TEMPLATES) + list(datafiles.FORMATS):
        assert name in r.stdout


def test_invalid_utf8_text_file_is_reported_and_can_be_skipped(sp_path, sp, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"Good line.\n" * 30 + b"bad \xff byte\n")
    (tmp_path / "b.txt").write_text("Next document.")
    monkeypatch.setattr(datafiles, "TEXT_PIECE_BYTES", 64)  # the bad bytes come after pieces already written
    base = ["--input", tmp_path / "a.txt", tmp_path / "b.txt", "--tokenizer", sp_path, "--val_fraction", "0"]
    assert "a.txt: byte 334: expected UTF-8" in fails(*base, "--out", tmp_path / "o1")
    meta = run(*base, "--out", tmp_path / "o2", "--on_error", "skip")
    docs = documents(tmp_path / "o2", "train", meta)
    assert meta["stats"]["skipped_records"] == 1 and len(docs) == 2  # the partial document is closed, not merged
    assert sp.decode(docs[1][0]) == "Next document." and docs[0][0][-1] == sp.eos_id


def test_text_without_newlines_is_cut_between_characters(tmp_path, monkeypatch):
    text = "é🙂x" * 50  # multi-byte characters and no newline to cut after
    (tmp_path / "u.txt").write_text(text)
    monkeypatch.setattr(datafiles, "TEXT_PIECE_BYTES", 7)
    pieces = [t for t, _ in datafiles.read_text_pieces(tmp_path / "u.txt")]
    assert len(pieces) > 10 and "".join(pieces) == text


def test_small_input_still_gets_a_val_document(sp_path, sp, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in sentences(5, seed=4)])
    meta = run("--input", tmp_path / "t.jsonl", "--tokenizer", sp_path, "--out", tmp_path / "out")  # 2% of 5 docs
    assert (meta["train_documents"], meta["val_documents"]) == (4, 1)
    assert sp.decode(documents(tmp_path / "out", "val", meta)[0][0]) == sentences(5, seed=4)[-1]
    tokens, _, offsets = load_split(tmp_path / "out", "train", meta)
    assert offsets[-1] == len(tokens) == meta["train_tokens"] and len(offsets) == 5


def test_pack_text_cuts_long_documents_and_masks_only_padding(sp_path, sp, tmp_path, monkeypatch):
    texts = [" ".join(sentences(n, seed=n)) for n in (1, 2, 9)]  # the last is longer than a row
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text.replace(". ", ".\n"))
    L = 64
    args = ["--input", str(tmp_path / "*.txt"), "--tokenizer", sp_path, "--seq_len", L, "--pack", "--val_fraction", "0"]
    meta = run(*args, "--out", tmp_path / "out")
    tokens, mask, offsets = load_split(tmp_path / "out", "train", meta)
    assert meta["has_mask"] and len(tokens) % L == 0 and meta["stats"]["train_docs_split"] > 0
    assert np.sum(mask == 0) == meta["stats"]["train_pad_tokens"] and np.all(tokens[mask == 0] == sp.pad_id)
    real = np.concatenate([tokens[a:b][mask[a:b] == 1] for a, b in zip(offsets[:-1], offsets[1:])])
    expected = [t for text in texts for t in sp.frame_document(sp.encode(text.replace(". ", ".\n")))]
    assert list(real) == expected  # nothing lost
    monkeypatch.setattr(datafiles, "TEXT_PIECE_BYTES", 50)  # documents arriving in pieces pack the same way
    run(*args, "--out", tmp_path / "pieces")
    for name in ("train.bin", "train.mask.bin", "train.docs.bin"):
        assert (tmp_path / "pieces" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_import_prepare_leaves_torch_out():
    # the data pipeline needs no torch: importing it (and the support files it uses) must not load it; a fresh
    # interpreter, since this test process has torch loaded already
    code = ("import sys, prepare; import support.jinja_templates, support.megatron, support.records, "
            "support.tokenizer_files; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
