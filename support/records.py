"""
Instruction and text records read without trust: JSON lists, JSON lines, parquet rows, and the record formats of
the instruction data sets (alpaca, sharegpt/conversation, moss, belle) turned into chat messages.

Used by prepare.py through support/datafiles.py (its reader of --input files), and by the other support files
(the error type). What it adds: every field checked where the data enters (types, unpaired surrogates, unknown
roles), each problem one DataError that names the file, the line or row, and the field; a malformed JSON line is
handed on as a DataError record so that --on_error=skip can read on.
"""

import re

from support.checks import json_type, parse_json

class DataError(Exception):
    """A problem with one input record or file: reported as one line, then stop or skip (--on_error)."""


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


def record_field(rec, name, where, kinds=str, hint=""):
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
        chat = record_field(rec, "chat", where, dict, " (moss-003-sft: {chat: {turn_1: {Human, MOSS}}})")
        messages = []
        for key in sorted(chat, key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else 0):
            turn = chat[key]
            for field, role, tag, end in (("Human", "user", "<|Human|>:", "<eoh>"),
                                          ("MOSS", "assistant", "<|MOSS|>:", "<eom>")):
                text = record_field(turn, field, f"{where}: chat.{key}")
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
    instruction = record_field(rec, "instruction", where)
    output = record_field(rec, "output", where)
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
