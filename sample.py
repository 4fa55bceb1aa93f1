"""
Generate text from a checkpoint dir: streamed sampling, family-aware chat, int8/int4/NF4 weight-only quantisation,
and continuous batching behind an OpenAI-compatible HTTP server with a chat page (--serve; support/server.py).

Run:
  python sample.py --ckpt=ckpt/llama-7b --prompt="Once upon a time" --max_new_tokens=100
  python sample.py --ckpt=ckpt/baichuan2-7b-chat --chat --system="You are helpful."   # /reset, /exit
  python sample.py --ckpt=ckpt/vicuna-7b --chat --multiline      # FastChat's CLI: a turn ends with Ctrl-D
  python sample.py --ckpt=ckpt/aquila-7b                         # on a terminal: a prompt at a time, as FlagAI's
  echo -e "Hi\\nWhat is 2+2?" | python sample.py --ckpt=DIR --chat                   # scripted chat
  python sample.py --ckpt=DIR --quantize=int4 --group_size=128 --save_quantized=DIR-int4   # then --ckpt=DIR-int4
  python sample.py --ckpt=DIR --prompt_file=prompts.txt --temperature=0               # batched, left padded
  python sample.py --ckpt=ckpt/baichuan-7b --adapter=out/baichuan_7b_qlora/adapter --chat  # LoRA adapters of train.py
  python sample.py --ckpt=ckpt/baichuan2-7b-chat --serve --port=8000    # the OpenAI API under /v1, a chat page at /

Generated text goes to stdout as it decodes; everything else (settings, speed, warnings) goes to stderr.

Library use:
  from sample import generate
  for token in generate(model, prompt_ids, 64, temperature=0.0, eos_id=tok.eos_id): ...

How it is fast (gpt-fast style): a static KV cache allocated once per call (model.setup_cache), the prompt is
prefilled in one forward, then one token per step; the per-step key padding mask and positions are views of
buffers allocated once; only the last position's logits are sampled; everything runs under inference_mode; and
`--compile` compiles the one-token decode step. On a CPU every weight is multiplied in small C kernels that read each
stored byte once: fp32 (support/decode_layout.py, q/k/v and gate/up as one product each) and, with `--quantize`
(quantised while loading, one weight at a time), int8/int4/NF4 (support/quant.py: a 7B model in 5-8 GiB at 2-3
tokens/s on two cores).
"""
import resource
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import model as model_lib
from support import batching, peft, sample_cli, weights
import prepare
from support.decode_layout import decode_layout, normalise_head
from support.memory import MemoryBudgetError, check_memory, kv_budget
from support.quant import load_quantized, quantize_from_meta
from support.sample_checks import (FlagError, SampleError, check_checkpoint_dir, check_load_flags, check_system,
                                   check_vocab, device_flag, fit_prompt, log, read_prompt_file)

# In --chat, the published settings of the family's chat models (model.FAMILIES) apply unless a flag overrides them;
# without --chat (base models, plain continuation), nanoGPT-like settings.
PLAIN_GENERATION_DEFAULTS = dict(temperature=0.8, top_k=200, top_p=None, repetition_penalty=1.0)


# -----------------------------------------------------------------------------
# sampling

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style penalty (as transformers' RepetitionPenaltyLogitsProcessor): for tokens already present,
    positive logits are divided by `penalty` and negative ones multiplied. logits (B, V) float, seen (B, V) bool."""
    if not torch.is_tensor(penalty) and penalty == 1.0:  # penalty: a number, or one per row (B, 1)
        return logits
    big = torch.finfo(logits.dtype).max  # a tiny penalty must not make a logit +inf (softmax: nan)
    penalised = torch.where(logits > 0, (logits / penalty).clamp(max=big), logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / the top-p nucleus to -inf (the most likely token always stays). (B, V)."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (cum_probs - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token per row from last-position logits (B, V) float -> (B,) long. temperature 0 = greedy, as is any
    temperature below 1e-5 (vLLM's rule: dividing by it would overflow)."""
    if temperature < 1e-5:
        return logits.argmax(dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)  # the top logit at 0: logits / temperature stays finite
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_rows(logits, temperature, top_k, top_p, generator):
    """sample_next with each row's own settings: every argument a list with one entry per row of logits (B, V)."""
    if not any(temperature):  # all greedy: one argmax for the batch
        return logits.argmax(dim=-1)
    return torch.cat([sample_next(logits[b:b + 1], temperature[b], top_k[b], top_p[b], generator[b])
                      for b in range(logits.size(0))])


# -----------------------------------------------------------------------------
# generation

def decode_one(model, token, start_pos, positions, key_padding_mask):
    """One decode step: token (B, 1) -> last-position logits (B, V)."""
    logits, _ = model(token, start_pos=start_pos, positions=positions, key_padding_mask=key_padding_mask)
    return logits[:, -1]


class CompiledDecode:
    """decode_one under torch.compile; falls back to eager with a warning if this platform cannot compile."""

    def __init__(self):
        # dynamic: start_pos changes every step; one symbolic-shape graph instead of a recompile per value
        self.fn = torch.compile(decode_one, dynamic=True)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.fn(*args)
            except Exception as e:  # inductor raises many types (no C++ compiler, unsupported op, ...)
                self.failed = True
                warnings.warn(f"sample.py: --compile failed on this platform ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); decoding without compile")
        return decode_one(*args)


def _as_rows(prompt_ids):
    """A single prompt (list of ints or 1-D tensor) or a batch (list of lists or 2-D tensor) -> (rows, batched)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) > 0 and isinstance(prompt_ids[0], (list, tuple)):
        return [list(r) for r in prompt_ids], True
    return [list(prompt_ids)], False


def left_padded(rows: list[list[int]], total: int, pad_id: int, device):
    """A batch of prompts left padded to the longest, T: (idx (B, T), mask (B, total): True = a real token, grown
    into as tokens come, positions (B, T): real tokens at 0..len-1, next_pos (B, 1): the next token's position).
    Prompts of one length need no padding: positions and next_pos are None, and the model takes its plain causal
    path (positions start_pos + arange)."""
    B, T = len(rows), max(len(r) for r in rows)
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, total), dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        idx[b, T - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[b, T - len(r):] = True
    if len({len(r) for r in rows}) == 1:
        return idx, mask, None, None
    return idx, mask, (mask[:, :T].long().cumsum(-1) - 1).clamp(min=0), mask[:, :T].sum(-1, keepdim=True)


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, eos_id=None, pad_id=0, seed=None, generator=None, decode_step=None):
    """Yield generated tokens one step at a time (streaming).

    prompt_ids: one prompt (list of ints / 1-D tensor) -> yields ints; or a batch (list of lists / 2-D tensor,
    lengths may differ: rows are left padded) -> yields a list per step with one int per row, None for rows that
    already produced eos. eos_id: an int or several (any of them ends a row); it is yielded, then that row stops;
    iteration ends when every row has stopped or after max_new_tokens. Close the generator (break) to stop early,
    e.g. on a stop string. seed / generator make sampling reproducible. decode_step: e.g. CompiledDecode().
    Rows with their own settings (a server's requests): temperature, top_k, top_p, repetition_penalty and generator
    all lists with one entry per row. The KV cache lives for the call only: the model is left without one, as it was.
    """
    rows, batched = _as_rows(prompt_ids)
    if any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token (e.g. bos)")
    if max_new_tokens <= 0:
        return
    B, T = len(rows), max(len(r) for r in rows)
    total = T + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_seq_len ({model.args.max_seq_len})")
    param = next(model.parameters())
    device = param.device
    per_row = isinstance(temperature, (list, tuple))
    if generator is None and seed is not None and not per_row:
        generator = torch.Generator(device=device).manual_seed(seed)
    penalise = any(p != 1.0 for p in repetition_penalty) if per_row else repetition_penalty != 1.0
    penalty = repetition_penalty  # a number, or (B, 1)
    if per_row:
        penalty = torch.tensor(repetition_penalty, dtype=torch.float32, device=device)[:, None]
    decode_step = decode_step or decode_one
    end_ids = torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ())), dtype=torch.long,
                           device=device)

    idx, mask, positions, next_pos = left_padded(rows, total, pad_id, device)
    padded = positions is not None

    seen = torch.zeros((B, model.args.vocab_size), dtype=torch.bool, device=device)
    if penalise:  # count occurrences so that pads (mask 0) never mark or unmark a token
        seen = torch.zeros_like(seen, dtype=torch.long).scatter_add_(1, idx, mask[:, :T].long()) > 0

    model.setup_cache(B, total, dtype=param.dtype, device=device)
    try:  # the cache lives for this call only, even when the caller stops early (closing the generator)
        logits, _ = model(idx, start_pos=0, positions=positions, key_padding_mask=mask[:, :T] if padded else None,
                          last_only=True)  # prompts are left padded: every row's last position is a real token
        logits = logits[:, -1]  # (B, V)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits.float(), seen, penalty) if penalise else logits.float()
            if per_row:
                token = sample_rows(logits, temperature, top_k, top_p, generator)  # (B,)
            else:
                token = sample_next(logits, temperature, top_k, top_p, generator)
            token = token.masked_fill(finished, pad_id)
            out = token.tolist()
            if batched:
                yield [None if f else t for t, f in zip(out, finished.tolist())]
            else:
                yield out[0]
            if len(end_ids):
                finished |= torch.isin(token, end_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if penalise:
                seen.scatter_(1, token[:, None], True)
            mask[:, T + step] = True
            logits = decode_step(model, token[:, None], T + step, next_pos,
                                 mask[:, :T + step + 1] if padded else None)
            if padded:
                next_pos += 1
    finally:
        model.clear_cache()


def apply_stop(text, stop):
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class TextStream:
    """Token ids pushed in, text pieces out, as stream_text releases them: a piece only when the decoded text grew
    and does not end in U+FFFD (an incomplete UTF-8 sequence); decoding starts from the last prompt tokens
    (context_ids) so that leading spaces survive sentencepiece's stripping; text that might be the start of a stop
    string is held back. `done` once an end token (default tok.eos_id; never printed) or a stop string (`stopped`)
    has ended the text."""

    def __init__(self, tok, context_ids=(), stop=(), end_ids=None):
        self.tok, self.stop = tok, stop
        self.end_ids = {tok.eos_id} if end_ids is None else set(end_ids)
        self.ids = list(context_ids)[-4:]
        self.prefix, self.read = 0, len(self.ids)
        self.pending = ""  # decoded, not yet released because it may begin a stop string
        self.done = self.stopped = False

    def push(self, t) -> str:
        """The text that token t releases ("" while it may be part of a character or of a stop string)."""
        if t in self.end_ids:
            self.done = True
            return self.flush()
        self.ids.append(t)
        before, after = self.tok.decode(self.ids[self.prefix:self.read]), self.tok.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.pending += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.pending, self.stopped = apply_stop(self.pending, self.stop)
        if self.stopped:
            self.done = True
            return self.flush()
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        piece, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return piece

    def flush(self) -> str:
        """The text held back (the tokens have ended)."""
        piece, self.pending = self.pending, ""
        return piece


def stream_text(tok, tokens, context_ids=(), stop=(), end_ids=None):
    """Turn a stream of token ids into a stream of text pieces (TextStream); on a stop string the stream ends,
    closing `tokens`."""
    text = TextStream(tok, context_ids, stop, end_ids)
    for t in tokens:
        if piece := text.push(t):
            yield piece
        if text.done:
            if text.stopped and hasattr(tokens, "close"):
                tokens.close()
            return
    if piece := text.flush():
        yield piece


# -----------------------------------------------------------------------------
# loading

def model_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def load_model(ckpt, device, dtype, quantize=None, group_size=None, adapter=None, family="llama"):
    """A checkpoint dir -> (Transformer in eval mode, config.json dict). Reads dirs written by --save_quantized.
    adapter: a LoRA adapter dir folded into the weights (beside them where they are NF4: peft.attach_adapter).
    quantize='int8'|'int4'|'nf4' quantises while loading, one weight at a time from the memory-mapped file (a 7B model
    never whole in fp32)."""
    try:
        args, config = model_lib.read_config(ckpt)
        quant = config.get("quantization")
        if not quant and not quantize:
            model = normalise_head(model_lib.Transformer.from_checkpoint(ckpt, device=device, dtype=dtype))
            if adapter:
                add_adapter(model, adapter, family)
            return model.eval(), config
        if not quant:  # names and shapes checked against config.json, nothing read yet
            model = model_lib.Transformer.from_checkpoint(ckpt, device="meta", dtype=dtype)
        tensors = weights.load_tensors(ckpt)
    except model_lib.CheckpointError as e:
        raise SampleError(str(e))
    updates, replaced = read_adapter(adapter, args, family) if adapter else ({}, {})
    if not quant:
        unmerged = quantize == "nf4"  # the adapter stays beside NF4 weights (attach_adapter), else folded in first

        def weight(name):  # as the full-precision path: normalise_head, then the adapter
            w = tensors[name]
            w = F.normalize(w.float(), dim=-1) if name == "output.weight" and args.norm_head else w
            return w if unmerged else peft.fold_adapter(name, w, updates, replaced)

        normalise_head(model)  # the module type; weight() normalises the rows
        model = quantize_from_meta(model, quantize, group_size, weight, device)
        return peft.attach_adapter(model, updates, replaced).eval() if unmerged else model.eval(), config
    # build the quantised structure on meta, then assign the saved tensors (nothing materialised twice)
    with torch.device("meta"):
        model = model_lib.Transformer(args)
    normalise_head(model)  # saved heads are already normalised: this only swaps the module type
    try:
        load_quantized(model, ckpt, config, tensors, dtype, device)
    except ValueError as e:  # config.json's quantization and the tensors do not fit each other
        raise SampleError(str(e))
    return peft.attach_adapter(model, updates, replaced).eval(), config


def read_adapter(path, args, family: str = "llama"):
    """--adapter's dir -> (updates, replaced) (support/peft.py reads the formats and checks them against the model)."""
    try:
        return peft.read_adapter(path, args, family)
    except model_lib.CheckpointError as e:
        raise SampleError(f"--adapter={path}: {e}")


def add_adapter(model, path, family: str = "llama"):
    """Fold a LoRA adapter dir into the weights of a full-precision model, in place (support/peft.py)."""
    peft.attach_adapter(model, *read_adapter(path, model.args, family))


class Engine(batching.Engine):
    """The generation an OpenAI-style server drives (support/batching.py: continuous batching), sampling with this
    file's functions."""
    sampler = sys.modules[__name__]


def serve(model, tok, args, family, template, decode_step=None):
    """python sample.py --serve: the OpenAI-compatible server (support/server.py) on --host:--port until Ctrl-C or
    SIGTERM, generating with Engine."""
    from support import server as http_server  # FastAPI and uvicorn: only --serve needs them
    http_server.serve(sys.modules[__name__], model, tok, args, family, template, decode_step)


# -----------------------------------------------------------------------------
# command line

def resolve_template(flag, tok, family):
    """--template, else the checkpoint's own (a built-in name, or its Jinja template: "hf"), else the family's."""
    own = tok.template_name
    name = flag or own or (family in model_lib.FAMILIES and model_lib.FAMILIES[family].chat_template) or None
    names = ", ".join(sorted(prepare.TEMPLATES)) + f" or {prepare.HF_TEMPLATE}"
    if name is None:
        raise SampleError(f"--chat: no chat template for family {family!r}; pass --template (one of {names})")
    if name not in prepare.TEMPLATES and name != prepare.HF_TEMPLATE:
        raise SampleError(f"--template: unknown chat template {name!r}; expected one of {names}")
    if name == prepare.HF_TEMPLATE:
        if own != prepare.HF_TEMPLATE:
            raise SampleError(f"--template=hf: {tok.template_file} holds no Jinja chat_template")
        try:
            prepare.check_jinja_template(tok)
        except prepare.TemplateError as e:
            raise SampleError(str(e))
    elif warning := prepare.literal_id_warning(tok, name):
        print(f"sample.py: {warning}", file=sys.stderr)
    return name


def generation_settings(args, family, chat):
    """Family chat defaults (or plain defaults), overridden by any flag given."""
    family = model_lib.FAMILIES.get(family)
    settings = dict(family.generation if chat and family else PLAIN_GENERATION_DEFAULTS)
    for k in settings:
        if getattr(args, k) is not None:
            settings[k] = getattr(args, k)
    settings["top_k"] = settings["top_k"] or None  # 0 = off
    return settings


def chat_end_ids(tok, template):
    """eos plus the template's own end-of-turn tokens (those the vocabulary has; for a model's Jinja template, the
    special token that closes an assistant turn in it)."""
    ids = {tok.eos_id}
    if template == prepare.HF_TEMPLATE:
        ids.add(prepare.jinja_turn_end(tok))
    for t in getattr(prepare.TEMPLATES.get(template), "stop", ()):
        if not isinstance(t, str):  # strings are stop text, handled by stream_text
            ids.add(t if isinstance(t, int) else tok.token_to_id(t.name))
    return sorted(i for i in ids if i is not None)


def chat_stop_strings(template):
    """The template's stop text (its turn markers where its model has no end-of-turn token), for stream_text."""
    return [s for s in getattr(prepare.TEMPLATES.get(template), "stop", ()) if isinstance(s, str)]


def encode_prompt(tok, text):
    """A prompt with the special tokens the tokenizer itself adds (transformers' tokenizer(prompt).input_ids);
    an empty prompt starts from bos. [] when there is nothing to start from."""
    return tok.encode(text, add_special_tokens=True) or [tok.bos_id] * (tok.bos_id is not None)


def encode_turn(tok, template, messages, system):
    """Chat turns rendered with the template, ending where the assistant's reply starts (TemplateError where the
    template refuses them)."""
    return prepare.encode_chat(tok, template, messages, system=system, add_generation_prompt=True)[0]


def parse_args(argv):
    try:
        return sample_cli.parse_flags(argv, __doc__.split("\n\n")[0])
    except FlagError as e:  # as argparse's own errors: the command line ends here
        raise SystemExit(f"sample.py: {e}") from None


def load_checkpoint(args):
    """The checks on --ckpt, --device, the tokenizer and the chat template, then the model loaded (quantised,
    adapted) as the flags say. -> (model, tok, family, template, device)."""
    check_checkpoint_dir(args.ckpt)
    device = device_flag(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    try:
        model_args, ckpt_config = model_lib.read_config(args.ckpt)
    except model_lib.CheckpointError as e:  # malformed config.json: one line, not a traceback
        raise SampleError(str(e))
    family = ckpt_config.get("family", "llama")
    tok = prepare.load_tokenizer(args.ckpt)
    template = resolve_template(args.template, tok, family) if args.chat or args.template else None
    check_vocab(args.ckpt, tok, model_args)

    check_memory(model_args, device, dtype, args.ckpt)
    t0 = time.perf_counter()
    quantized = ckpt_config.get("quantization")
    check_load_flags(args, quantized)
    try:  # quantised while loading, one weight at a time
        model, _ = load_model(args.ckpt, device, dtype, args.quantize, args.group_size, args.adapter, family)
    except ValueError as e:  # a --group_size that does not suit the shapes
        raise SampleError(str(e))
    stored = args.quantize or (quantized or {}).get("mode", args.dtype or str(dtype)[6:])
    log(f"loaded {args.ckpt} ({family}, {model.num_params():,} params, {stored}) "
        f"in {time.perf_counter() - t0:.1f}s; weights {model_bytes(model) / 2**20:.1f} MiB on {device}")
    return model, tok, family, template, device


def run_prompt_file(model, tok, args, common, stdout) -> dict:
    """--prompt_file: one prompt per line, generated as left-padded batches, as many rows at once as the KV cache
    fits in memory (kv_budget); each continuation on its own line."""
    prompts = read_prompt_file(args.prompt_file)
    rows = [fit_prompt(tok.encode(p, add_special_tokens=True), args.max_new_tokens, model.args.max_seq_len,
                       args.on_long_prompt, f"--prompt_file line {i + 1}", tok.bos_id)
            for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    outs = [[] for _ in rows]
    n = 0
    columns = max(map(len, rows)) + args.max_new_tokens
    size = max(1, kv_budget(model, len(rows), next(model.parameters()).device, columns) // columns)
    if size < len(rows):
        log(f"--prompt_file: {len(rows)} prompts in batches of {size}: the KV cache of more would not fit in memory")
    for first in range(0, len(rows), size):
        for step in generate(model, rows[first:first + size], args.max_new_tokens, **common):
            for b, t in enumerate(step, first):
                if t is not None and t != tok.eos_id:
                    outs[b].append(t)
                    n += 1
    stats = dict(tokens=n, seconds=time.perf_counter() - t0)
    for row, out in zip(rows, outs):  # the text --prompt would stream for the same tokens
        stdout.write("".join(stream_text(tok, out, row, args.stop)) + "\n")
    return stats


def run_prompt(model, tok, args, common, stdout) -> dict:
    """--prompt (or bos alone): --num_samples continuations, each streamed as it decodes."""
    ids = encode_prompt(tok, args.prompt or "")
    if not ids:
        raise SampleError("--prompt: encodes to no tokens and the tokenizer has no bos token to start from")
    ids = fit_prompt(ids, args.max_new_tokens, model.args.max_seq_len, args.on_long_prompt, "--prompt", tok.bos_id)
    stats = dict(tokens=0, seconds=0.0)
    for i in range(args.num_samples):
        if i:
            log("---------------")
        tokens = generate(model, ids, args.max_new_tokens, **common)
        sample_cli.timed_stream(stream_text(tok, sample_cli.counted(tokens, stats), ids, args.stop), stats, stdout)
        stdout.write("\n")
        stdout.flush()
    return stats


def main(argv=None, stdin=None, stdout=None):
    try:
        run(parse_args(argv), stdin, stdout)
    except (SampleError, FlagError, MemoryBudgetError) as e:
        raise SystemExit(f"sample.py: {e}") from None


def run(args, stdin=None, stdout=None):
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if stdin is sys.stdin and hasattr(stdin, "reconfigure"):  # bytes not UTF-8: lone surrogates read_input skips
        stdin.reconfigure(errors="surrogateescape")
    model, tok, family, template, device = load_checkpoint(args)
    if args.max_new_tokens is None:  # room for a prompt in a small context (the default model's is 256)
        args.max_new_tokens = min(256, model.args.max_seq_len // 2)
    if args.save_quantized:
        sample_cli.write_quantized(model, args, family)
        if args.prompt is None and args.prompt_file is None and not args.chat and not args.serve:
            return

    decode_layout(model)
    settings = generation_settings(args, family, args.chat)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    decode_step = CompiledDecode() if args.compile else None
    pad_id = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    common = dict(eos_id=tok.eos_id, pad_id=pad_id, generator=generator, decode_step=decode_step, **settings)
    if args.serve:
        return serve(model, tok, args, family, template, decode_step)
    if args.chat:
        check_system(tok, template, args.system, encode_turn)
        stop = args.stop + chat_stop_strings(template)
        try:
            stats = sample_cli.run_chat(sys.modules[__name__], model, tok, template, settings, system=args.system,
                                        max_new_tokens=args.max_new_tokens, on_long_prompt=args.on_long_prompt,
                                        stop=stop, stdin=stdin, stdout=stdout, generator=generator,
                                        decode_step=decode_step, multiline=args.multiline)
        except prepare.TemplateError as e:  # the template refuses the conversation
            raise SampleError(f"--chat: {e}") from None
    elif args.prompt_file:
        stats = run_prompt_file(model, tok, args, common, stdout)
    elif args.prompt is None and sample_cli.is_terminal(stdin):
        stats = sample_cli.run_prompts(sys.modules[__name__], model, tok, args, common, stdin, stdout)
    else:
        stats = run_prompt(model, tok, args, common, stdout)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    log(f"{stats['tokens']} tokens in {stats['seconds']:.2f}s ({stats['tokens'] / max(stats['seconds'], 1e-9):.1f} "
        f"tokens/s); weights {model_bytes(model) / 2**20:.1f} MiB, peak memory {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    try:
        main()
    except (prepare.DataError, prepare.TemplateError) as e:  # a tokenizer or data dir read through prepare.py
        raise SystemExit(f"sample.py: {e}") from None
