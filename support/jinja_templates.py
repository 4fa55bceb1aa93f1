"""
Hugging Face Jinja chat templates: a model's own `chat_template` rendered, tokenized and masked as transformers'
apply_chat_template does, and prepare.py's built-in templates written as Jinja.

Used by prepare.py (encode_chat with --template=hf; template_jinja, which convert.py calls when it exports a
checkpoint for transformers, vLLM and TGI) and sample.py (the stop token of a Jinja template). What it adds: the
sandboxed Jinja environment with transformers' extensions, the loss mask of a rendered conversation (its
{% generation %} blocks, or the replies located by rendering growing prefixes), and the Jinja body of each built-in
template, checked to give the built-in's exact ids. A template that cannot render is one TemplateError line.
"""

import copy
import itertools
import json
import re

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TemplateError(ValueError):
    """The messages do not suit the template (e.g. a prompt already formatted for it): one line, names the fix."""


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
        raise TemplateError(f"{tok.template_file}: chat_template: {type(e).__name__}: {e}") from None


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
    ids, offsets = encode_rendered(tok, text)
    if spans is None:
        spans = _reply_spans(tok, messages, text)
    mask = [int(any(a < e and s < b for s, e in spans)) for a, b in offsets]
    return ids, mask


def encode_rendered(tok, text):
    """Text rendered by a chat template, special-token strings in it ("<s>", "<|im_start|>") becoming their ids,
    as transformers' apply_chat_template(tokenize=True) does -> (ids, [(start, end) character span per id])."""
    if tok.hf is not None:
        enc = tok.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    ids, spans = [], []
    specials = sorted(tok.sp_specials, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    pos = 0
    for m in itertools.chain(pattern.finditer(text) if pattern else (), [None]):
        end = m.start() if m else len(text)
        if end > pos:
            piece = text[pos:end]
            prefix = tok.sp_prefix_space and (pos == 0 or tok.sp_legacy) and not piece.startswith(" ")
            model = tok.sp if prefix else tok.sp_continue
            char_at = _byte_to_char(piece)
            for p in model.encode(piece, return_type="proto").pieces:  # begin/end: byte offsets
                ids.append(p.id)
                spans.append((pos + char_at[p.begin], pos + char_at[p.end]))
        if m:
            ids.append(tok.sp_specials[m.group()])
            spans.append((m.start(), m.end()))
            pos = m.end()
    return ids, spans


def _byte_to_char(text):
    """UTF-8 byte offset -> character offset, for every byte offset 0..len(bytes) of text."""
    table = []
    for i, ch in enumerate(text):
        table += [i] * len(ch.encode("utf-8"))
    return table + [len(text)]


def jinja_turn_end(tok):
    """The special token that closes an assistant turn in the tokenizer's template (None if it has none)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, _ = render_jinja(tok, probe, False)
    start = text.rfind("Hello") + len("Hello")
    rest = text[start:].lstrip(" ")
    return next((i for s, i in sorted(tok.special_tokens().items(), key=lambda t: -len(t[0]))
                 if rest.startswith(s)), None)


# -----------------------------------------------------------------------------
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


BAICHUAN_JINJA = (r"{% if system %}{{ system }}{% endif %}{% for m in turns %}"
                  r"{% set gap = space if m.content else '' %}{% if m.role == 'user' %}"
                  r"{{ user_token + gap + m.content }}{% else %}{{ assistant_token + gap + m.content + eos }}"
                  r"{% endif %}{% endfor %}"
                  r"{% if add_generation_prompt %}{{ assistant_token }}{% endif %}")


VICUNA_JINJA = (r"{{ start + (system or default) + ' ' }}{% for m in turns %}{% if m.role == 'user' %}"
                r"{{ 'USER: ' + m.content + ' ' }}{% else %}{{ 'ASSISTANT: ' + m.content + eos }}{% endif %}"
                r"{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


# chat messages carry no alpaca "input" field: the header is the one without input
ALPACA_JINJA = (r"{{ start }}{% for m in turns %}{% if m.role == 'user' %}"
                r"{{ (system or default) if loop.first else '' }}"
                r"{{ '\n\n### Instruction:\n' + m.content + '\n\n### Response:\n' }}"
                r"{% else %}{{ m.content + eos }}{% endif %}{% endfor %}")


AQUILA_JINJA = (r"{{ (system or default) + '###' }}{% for m in turns %}{% if m.role == 'user' %}"
                r"{{ 'Human: ' + m.content + '###' }}{% else %}{{ 'Assistant: ' + m.content + '###' }}{% endif %}"
                r"{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}"
                r"{% elif turns and turns[-1].role == 'assistant' %}{{ eos }}{% endif %}")


LLAMA2_JINJA = (r"{% set first = namespace(user=true) %}{% for m in turns %}{% if m.role == 'user' %}"
                r"{% set content = m.content %}{% if first.user and system %}"
                r"{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}{% endif %}"
                r"{% set first.user = false %}{{ bos + '[INST] ' + content.strip() + ' [/INST]' }}{% else %}"
                r"{{ ' ' + m.content.strip() + ' ' + eos }}{% endif %}{% endfor %}")


CHATML_JINJA = (r"{% if system %}{{ im_start + 'system\n' + system + im_end + '\n' }}{% endif %}{% for m in turns %}"
                r"{{ im_start + m.role + '\n' + m.content + im_end + '\n' }}{% endfor %}"
                r"{% if add_generation_prompt %}{{ im_start + 'assistant\n' }}{% endif %}")


HUMAN_ASSISTANT_JINJA = (r"{{ bos }}{% if system %}{{ system + '\n\n' }}{% endif %}{% for m in turns %}"
                         r"{% if m.role == 'user' %}{% if loop.previtem and loop.previtem.role == 'assistant' %}"
                         r"{{ '\n\n' }}{% endif %}{{ 'Human: ' + m.content + '\n\n' }}{% else %}"
                         r"{{ 'Assistant: ' + m.content + eos }}{% endif %}{% endfor %}"
                         r"{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


BUILTIN_JINJA = {"baichuan": BAICHUAN_JINJA, "baichuan2": BAICHUAN_JINJA, "vicuna": VICUNA_JINJA,
                 "alpaca": ALPACA_JINJA, "aquila": AQUILA_JINJA, "llama-2": LLAMA2_JINJA, "chatml": CHATML_JINJA,
                 "human-assistant": HUMAN_ASSISTANT_JINJA}


def builtin_jinja(tok, name, default_system, encode):
    """Built-in template `name` as a Jinja chat_template for this tokenizer, or None where the Jinja would not give
    the ids of `encode(messages, add_generation_prompt)`, the built-in's own (e.g. where Baichuan's ids 195/196 are
    ordinary pieces, no string names them). Checked on a probe conversation, rendered and tokenized as transformers'
    apply_chat_template does."""
    space = " " if tok.dummy_prefix else ""
    strings = {"default": default_system, "space": space, "im_start": IM_START,
               "start": "".join(tok.id_to_token(i) or "" for i in tok.prefix) + (space if tok.prefix else ""),
               "bos": (tok.id_to_token(tok.bos_id) or "") + space if tok.bos_id is not None else "",
               "eos": tok.id_to_token(tok.eos_id) or "",
               "im_end": IM_END if tok.token_to_id(IM_END) is not None else tok.id_to_token(tok.eos_id),
               "user_token": reserved_marker(tok, 195), "assistant_token": reserved_marker(tok, 196)}
    header = "".join(f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}" for k, v in strings.items()
                     if v is not None)
    probe = copy.copy(tok)
    probe.chat_template = JINJA_MESSAGES + header + BUILTIN_JINJA[name]
    for messages, gen in ((JINJA_PROBE, False), (JINJA_PROBE[:4], True), (JINJA_PROBE[1:4], True)):
        try:
            ids = encode_rendered(probe, render_jinja(probe, messages, gen)[0])[0]
        except TemplateError:  # a name the header could not set
            return None
        if ids != encode(messages, gen):
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
