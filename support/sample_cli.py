"""support/sample_cli.py: sample.py's command line. Used by sample.py (its main); what it adds: the flags
(parse_flags), --save_quantized (write_quantized), and the interactive loops around generation: prompts read one
after another on a terminal (run_prompts, FlagAI's interactive generate.py) and the chat (run_chat: a turn a line or,
with --multiline, a turn up to Ctrl-D; /reset and /exit, FastChat's !!reset and !!exit; the oldest turns dropped
where the context is full).

Generation itself is sample.py's, handed in as `sampler` (its module: generate, stream_text, encode_turn,
chat_end_ids), as support/batching.py takes it; support/ imports no script.
"""
import argparse
import sys
import time

from support.quant import save_quantized
from support.sample_checks import SampleError, check_flags, fit_prompt, log, not_utf8


def parse_flags(argv, description):
    """sample.py's flags, --stop unescaped and checked (FlagError for the first that is wrong)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (config.json, weights, tokenizer)")
    p.add_argument("--prompt", default=None, help="text to continue (default: on a terminal, ask for "
                   "prompts one after another; else start from bos)")
    p.add_argument("--prompt_file", default=None, help="one prompt per line, generated as left-padded batches")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default 256, or half the model's max_seq_len where that is less")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8, or family chat)")
    p.add_argument("--top_k", type=int, default=None, help="0 = off (default 200, or family chat default)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string, not empty (repeatable; \\n and \\t understood)")
    p.add_argument("--chat", action="store_true", help="interactive chat with the checkpoint's template")
    p.add_argument("--multiline", action="store_true", help="interactive input of several lines, ended by Ctrl-D "
                   "on an empty line (FastChat's CLI --multiline)")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--template", default=None, help="chat template: a built-in name, or hf for the checkpoint's own "
                                                    "Jinja template (default: the checkpoint's, else the family's)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter dir (train.py's out_dir/adapter, or any PEFT "
                   "LoRA adapter of the checkpoint's HF export) folded into the weights at load")
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], default=None, help="weight-only quantisation "
                   "while loading (nf4: QLoRA's 4-bit base; an --adapter then runs beside it, unmerged)")
    p.add_argument("--group_size", type=int, default=None, help="int4 group size (must divide in_features; default: "
                   "the largest up to 128 that divides every layer's, a multiple of 32 where one does)")
    p.add_argument("--save_quantized", default=None, help="write the quantised checkpoint to this dir")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on accelerators, float32 on CPU")
    p.add_argument("--device", default=None, help="default: kernels.device_type()")
    p.add_argument("--on_long_prompt", choices=["error", "truncate"], default="error")
    p.add_argument("--serve", action="store_true", help="serve the OpenAI API (/v1/completions, /v1/chat/completions)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="--serve: port (0 = any free one)")
    p.add_argument("--max_batch", type=int, default=8, help="--serve: most requests decoded together")
    p.add_argument("--grace_period", type=float, default=8.0, help="--serve: seconds the answers in progress get to "
                   "finish once Ctrl-C or SIGTERM stops the server (8: within docker stop's 10)")
    p.add_argument("--max_requests", type=int, default=256, help="--serve: requests in progress at once (answered or "
                   "waiting); past it, 503 with Retry-After")
    p.add_argument("--allowed_origins", default="", help="--serve: web pages (comma-separated origins such as "
                                                         "http://localhost:3000, or *) whose scripts may call the "
                                                         "server from a browser (CORS); none by default")
    args = p.parse_args(argv)
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    check_flags(args)
    return args


def write_quantized(model, args, family):
    """--save_quantized: the quantised model written to that dir (SampleError where it cannot be)."""
    if not args.quantize:
        raise SampleError("--save_quantized: also pass --quantize=int8|int4|nf4")
    try:
        save_quantized(model, args.ckpt, args.save_quantized, args.quantize, args.group_size, family)
    except ValueError as e:  # support.outputs refused the destination
        raise SampleError(str(e)) from None
    except OSError as e:  # a full destination
        raise SampleError(f"--save_quantized={args.save_quantized}: cannot write there "
                          f"({e.strerror}: {e.filename})")
    log(f"wrote {args.save_quantized}")


def timed_stream(pieces, stats, out):
    """Write text pieces to `out` as they come; count time."""
    t0 = time.perf_counter()
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    stats["seconds"] += time.perf_counter() - t0
    return "".join(text)


def counted(tokens, stats):
    for t in tokens:
        stats["tokens"] += 1
        yield t


EXIT, RESET = ("/exit", "!!exit"), ("/reset", "!!reset")  # ours and FastChat's CLI's spellings


def is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def read_input(stdin, prompt: str, multiline: bool):
    """One input of the user: a line, or with multiline every line up to an end of input (Ctrl-D on an empty line of
    a terminal, as FastChat's --multiline); a command (/exit, /reset) on the first line ends it at once. The prompt
    goes to stderr on a terminal; an input that is not UTF-8 is skipped with a warning. None at the end of input."""
    while True:
        if is_terminal(stdin):
            sys.stderr.write(prompt + (" [Ctrl-D on an empty line ends it]" if multiline else "") + "> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line:
            return None
        lines = [line.rstrip("\n")]
        while multiline and lines[0].strip() not in EXIT + RESET:
            line = stdin.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        if not (bad := not_utf8(text := "\n".join(lines))):
            return text
        log(f"sample.py: warning: input skipped: {bad}")


def run_prompts(sampler, model, tok, args, common, stdin, stdout) -> dict:
    """Without --prompt on a terminal: read a prompt, stream its continuation, and again (FlagAI's interactive
    generate.py); each prompt on its own, /exit or the end of input quits."""
    stats = dict(tokens=0, seconds=0.0)
    log("sample.py: type a prompt (Enter generates); /exit or Ctrl-D quits")
    while (text := read_input(stdin, "prompt", args.multiline)) is not None and text.strip() not in EXIT:
        if not text.strip():
            continue
        ids = fit_prompt(tok.encode(text, add_special_tokens=True), args.max_new_tokens, model.args.max_seq_len,
                         args.on_long_prompt, "prompt", tok.bos_id)
        timed_stream(sampler.stream_text(tok, counted(sampler.generate(model, ids, args.max_new_tokens, **common),
                                                      stats), ids, args.stop), stats, stdout)
        stdout.write("\n")
        stdout.flush()
    return stats


def run_chat(sampler, model, tok, template, settings, *, system, max_new_tokens, on_long_prompt, stop, stdin, stdout,
             generator=None, decode_step=None, multiline=False):
    """Interactive chat: each user input is a turn (a line, or with multiline the lines up to Ctrl-D); /reset
    clears the history, /exit (or end of input) quits; FastChat's !!reset and !!exit work too."""
    history, stats = [], dict(tokens=0, seconds=0.0)
    end_ids = sampler.chat_end_ids(tok, template)
    interactive = is_terminal(stdin)
    log(f"chat: template {template}, {settings}; /reset clears the history, /exit quits")
    while True:
        line = read_input(stdin, "user", multiline)
        if line is None or line.strip() in EXIT:
            break
        if line.strip() in RESET:
            history = []
            log("(history cleared)")
            continue
        if not line.strip():
            continue
        messages = history + [{"role": "user", "content": line}]
        ids = sampler.encode_turn(tok, template, messages, system)
        # drop the oldest turns while the conversation does not fit; a single turn follows --on_long_prompt
        while len(ids) + max_new_tokens > model.args.max_seq_len and len(messages) > 2:
            messages = messages[2:]
            ids = sampler.encode_turn(tok, template, messages, system)
            log("sample.py: warning: conversation too long for the context; dropped the oldest turn")
        ids = fit_prompt(ids, max_new_tokens, model.args.max_seq_len, on_long_prompt, "chat turn", tok.bos_id)
        tokens = sampler.generate(model, ids, max_new_tokens, eos_id=end_ids, pad_id=max(tok.pad_id or 0, 0),
                                  generator=generator, decode_step=decode_step, **settings)
        if interactive:
            sys.stderr.write("assistant> ")
        reply = timed_stream(sampler.stream_text(tok, counted(tokens, stats), ids, stop, end_ids), stats, stdout)
        stdout.write("\n")
        stdout.flush()
        history = messages + [{"role": "assistant", "content": reply.strip()}]
    return stats
