"""sample.py --serve: the OpenAI-compatible HTTP server (support/server.py around sample.Engine), driven by the
official `openai` client and raw HTTP.

A tiny random LLaMA checkpoint with a byte tokenizer (test_sample's); the server runs in-process on a free
127.0.0.1 port, except in the command-line tests, which start `python sample.py --serve` as users do.
"""
import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai  # the official client (requirements-dev.txt)
import pytest
import torch

import prepare
import sample
import test_sample as ts
from support import server as http_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = ts.hf_to_checkpoint(ts.tiny_hf_llama(2), tmp_path_factory.mktemp("serve"))
    ts.byte_tokenizer(d)
    return d


SERVER_ARGS = ("allowed_origins", "grace_period", "max_requests", "request_timeout", "max_body", "access_log")


def start_server(ckpt, model=None, **kw):
    """A ModelServer on a free port, as sample.py --serve builds it (decode layout, the family's chat template);
    kw: the Engine's settings and the server's (SERVER_ARGS)."""
    tok = prepare.load_tokenizer(ckpt)
    if model is None:
        model = sample.decode_layout(sample.load_model(ckpt, "cpu", torch.float32)[0])
    flags = argparse.Namespace(temperature=None, top_k=None, top_p=None, repetition_penalty=None)
    engine = sample.Engine(model, tok, template=sample.resolve_template(None, tok, "llama"),
                           plain_settings=sample.generation_settings(flags, "llama", chat=False),
                           chat_settings=sample.generation_settings(flags, "llama", chat=True),
                           **{k: v for k, v in kw.items() if k not in SERVER_ARGS})
    server = http_server.ModelServer(engine, port=0, name="tiny", **{k: v for k, v in kw.items() if k in SERVER_ARGS})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(ckpt):
    s = start_server(ckpt)
    yield s
    stop_server(s)


def client_for(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0,
                         timeout=120, http_client=openai.DefaultHttpxClient(trust_env=False))


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def raw(server, method, path, body=None, headers=None):
    """(status, headers (names in any case, as HTTP's), body text) of one request sent with the standard library's
    http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, resp.headers, resp.read().decode()
    conn.close()
    return out


def cli(ckpt, *argv, stdin=""):
    return ts.run_cli(["--ckpt", ckpt, "--temperature", 0, *argv], stdin=stdin)


# -----------------------------------------------------------------------------
# what comes back


def test_models_lists_the_served_checkpoint(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_allowed_origins_answer_a_browsers_preflight_and_only_theirs(ckpt, server):
    """--allowed_origins: a browser's OPTIONS preflight from a listed origin gets 204 with the methods and headers
    it asked for, and answers carry Access-Control-Allow-Origin, so a web chat page can call the server; another
    origin, and every origin on a server without the flag, get no such header (the browser then withholds the
    answer from the page)."""
    page, other = "http://localhost:3000", "http://evil.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2}
    cors = start_server(ckpt, model=server.model, allowed_origins=[page])
    try:
        status, headers, _ = raw(cors, "OPTIONS", "/v1/completions", headers={"Origin": page, **preflight})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == page
        assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
        assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
        for method, path, data in (("POST", "/v1/completions", body), ("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", {"prompt": "ab", "n": 2})):  # errors too
            status, headers, _ = raw(cors, method, path, data, {"Origin": page, "Content-Type": "application/json"})
            assert headers.get("Access-Control-Allow-Origin") == page, (method, path, status)
        status, headers, _ = raw(cors, "OPTIONS", "/v1/completions", headers={"Origin": other, **preflight})
        assert status == 405 and "Access-Control-Allow-Origin" not in headers
        assert "Access-Control-Allow-Origin" not in raw(cors, "POST", "/v1/completions", body, {"Origin": other})[1]
    finally:
        stop_server(cors)
    status, headers, _ = raw(server, "OPTIONS", "/v1/completions", headers={"Origin": page, **preflight})
    assert status == 405 and "Access-Control-Allow-Origin" not in headers
    assert "Access-Control-Allow-Origin" not in raw(server, "POST", "/v1/completions", body, {"Origin": page})[1]
    with pytest.raises(SystemExit, match=r"--allowed_origins: 'http://localhost:3000/': expected origins"):
        sample.parse_args(["--ckpt", str(ckpt), "--serve", "--allowed_origins", "*,http://localhost:3000/"])


def test_head_answers_as_get_without_a_body(server):
    get, head = raw(server, "GET", "/v1/models"), raw(server, "HEAD", "/v1/models")
    assert head[0] == 200 and head[2] == "" and head[1]["Content-Length"] == get[1]["Content-Length"]
    assert raw(server, "HEAD", "/v1/completions")[0] == 405


def test_greedy_completion_equals_sample_py_streamed_or_not(ckpt, client):
    want = cli(ckpt, "--prompt", "héllo wörld", "--max_new_tokens", 12)  # the text plus a newline
    got = client.completions.create(model="tiny", prompt="héllo wörld", max_tokens=12, temperature=0)
    assert got.choices[0].text + "\n" == want
    assert got.usage.prompt_tokens == 1 + len("héllo wörld".encode()) and got.usage.completion_tokens == 12
    assert got.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="héllo wörld", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) + "\n" == want
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_greedy_chat_equals_sample_py_chat_with_its_system_prompt(ckpt, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = cli(ckpt, "--chat", "--system", "Be brief.", "--max_new_tokens", 10, stdin="Hi there\n")
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    reply = got.choices[0].message
    assert reply.role == "assistant" and reply.content == want[:-1].lstrip()  # no leading space, as --chat keeps it
    tok = prepare.load_tokenizer(ckpt)
    template = sample.resolve_template(None, tok, "llama")
    rendered = prepare.encode_chat(tok, template, messages, add_generation_prompt=True)[0]
    assert got.usage.prompt_tokens == len(rendered)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.content
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_the_servers_system_prompt_applies_unless_the_messages_hold_one(ckpt, client):
    """--system is the default system message; a request's own (system or developer role) replaces it."""
    ask = lambda c, *system: c.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
        *system, {"role": "user", "content": "Hi there"}])
    given = ask(client, {"role": "system", "content": "Be brief."})
    server = start_server(ckpt, system="Be brief.")
    try:
        default = ask(client_for(server))
        replaced = ask(client_for(server), {"role": "developer", "content": "Be long."})
    finally:
        stop_server(server)
    assert (default.choices[0].message.content, default.usage) == (given.choices[0].message.content, given.usage)
    assert replaced.usage == ask(client, {"role": "system", "content": "Be long."}).usage != given.usage


def test_a_reply_sent_back_as_the_client_dumps_it_continues_the_chat(client):
    """message.model_dump() (how many programs keep the history) carries refusal, tool_calls, ... as nulls."""
    messages = [{"role": "user", "content": "Hi there"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    dumped = reply.choices[0].message.model_dump()
    assert dumped["refusal"] is None and dumped["tool_calls"] is None
    history = messages + [dumped, {"role": "user", "content": "And?"}]
    got = client.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=messages + [
        {"role": "assistant", "content": dumped["content"]}, {"role": "user", "content": "And?"}])
    assert got.choices[0].message.content == again.choices[0].message.content
    assert got.usage.prompt_tokens == again.usage.prompt_tokens
    history[1] = {**dumped, "tool_calls": [], "annotations": []}  # other clients send empty lists for "none"
    empty = client.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    assert empty.choices[0].message.content == got.choices[0].message.content


def test_messages_the_template_renders_to_nothing_are_a_400(ckpt, tmp_path):
    """Llama-2's template renders a system message only inside the first user turn: alone, it renders nothing."""
    import shutil

    from test_bring_your_own import LLAMA2

    shutil.copytree(ckpt, tmp_path / "ckpt")
    ts.byte_tokenizer(tmp_path / "ckpt", chat_template=LLAMA2)
    server = start_server(tmp_path / "ckpt")
    try:
        status, _, text = raw(server, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 2})
    finally:
        stop_server(server)
    assert status == 400 and json.loads(text)["error"]["param"] == "messages", text
    assert "no tokens" in text


def test_stream_is_server_sent_events_ending_with_done(server):
    status, headers, text = raw(server, "POST", "/v1/completions",
                                {"prompt": "ab", "max_tokens": 4, "temperature": 0, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer_before_it(client):
    full = client.completions.create(model="tiny", prompt="ab", max_tokens=16, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].isprintable())
    cut = full.index(stop)
    for stream in (False, True):
        got = client.completions.create(model="tiny", prompt="ab", max_tokens=16, temperature=0, stop=[stop],
                                        stream=stream)
        chunks = list(got) if stream else [got]
        assert "".join(c.choices[0].text for c in chunks) == full[:cut]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_end_of_turn_token_ends_a_chat_reply_with_stop(ckpt):
    """The scripted model writes "Hi" then eos: the reply is "Hi", finish_reason stop, and eos counted once."""
    scripted = ts.ScriptedModel(ts.ids_of("Hi", "</s>") + [257] * 4)
    server = start_server(ckpt, model=scripted)
    try:
        got = client_for(server).chat.completions.create(model="tiny", max_tokens=8, temperature=0,
                                                         messages=[{"role": "user", "content": "x"}])
    finally:
        stop_server(server)
    assert got.choices[0].message.content == "Hi" and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == 3


def test_a_chat_requests_stop_strings_are_added_to_the_templates(ckpt):
    """llama-2's template ends a reply at "[INST]" (the user's next turn, as text); a request's own `stop` list adds
    to that, whichever comes first ends the reply, the stop string not included."""
    replies = []
    for text in ("Hi X then [INST] more", "Hi [INST] then X more"):
        server = start_server(ckpt, model=ts.ScriptedModel(ts.ids_of(text) + [257] * 4))
        try:
            replies.append(client_for(server).chat.completions.create(
                model="tiny", max_tokens=32, temperature=0, stop=["X"],
                messages=[{"role": "user", "content": "x"}]).choices[0])
        finally:
            stop_server(server)
    assert [(r.message.content, r.finish_reason) for r in replies] == [("Hi ", "stop")] * 2


def test_a_request_without_max_tokens_gets_at_most_the_context_left_after_its_prompt(ckpt):
    """The server's default max_tokens (256, as sample.py's --max_new_tokens) where the prompt leaves room for it,
    else what the prompt leaves of the context (the model's max_seq_len), ending with finish_reason length, as
    vLLM does; not a 400 for a request that asked for no length."""
    scripted = ts.ScriptedModel([ord("a")] * 1000)  # never an end token
    context = scripted.args.max_seq_len
    server = start_server(ckpt, model=scripted)
    try:
        client = client_for(server)
        got = [client.completions.create(model="tiny", prompt=[ord("b")] * n, temperature=0)
               for n in (10, context - 100)]
    finally:
        stop_server(server)
    assert [(g.usage.prompt_tokens, g.usage.completion_tokens, g.choices[0].finish_reason) for g in got] == [
        (10, 256, "length"), (context - 100, 100, "length")]
    assert got[1].choices[0].text == "a" * 100


def test_sampling_fields_take_effect(ckpt, client):
    """top_k=1 and a tiny top_p leave one candidate (sampling at temperature 1 = greedy); repetition_penalty and
    max_completion_tokens (max_tokens' newer name) answer as sample.py's flags; user is accepted."""
    ask = lambda **kw: client.completions.create(model="tiny", prompt="ab", max_tokens=12, **kw).choices[0].text
    greedy, sampled = ask(temperature=0), ask(temperature=1.0, seed=5)
    assert sampled != greedy
    assert ask(temperature=1.0, seed=5, extra_body={"top_k": 1}) == greedy
    assert ask(temperature=1.0, seed=5, top_p=1e-6) == greedy
    want = cli(ckpt, "--prompt", "ab", "--max_new_tokens", 12, "--repetition_penalty", 1.8)
    assert ask(temperature=0, extra_body={"repetition_penalty": 1.8}) + "\n" == want != greedy + "\n"
    got = client.completions.create(model="tiny", prompt="ab", temperature=0, user="someone",
                                    extra_body={"max_completion_tokens": 5})
    assert got.usage.completion_tokens == 5 and got.choices[0].text == greedy[:len(got.choices[0].text)]


@pytest.mark.parametrize("penalties", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                       dict(frequency_penalty=-0.5, presence_penalty=0.8)])
def test_presence_and_frequency_penalties_are_openais(server, client, penalties):
    """OpenAI's formula, checked against a plain loop over the model (no cache): each logit less frequency_penalty
    times its token's count in the answer so far and presence_penalty once it is there."""
    prompt, n = [256, 97, 98, 99], 16
    model = server.model
    counts, ref = torch.zeros(model.args.vocab_size), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + ref]))[0][0, -1].float()
            logits -= (penalties.get("frequency_penalty", 0) * counts
                       + penalties.get("presence_penalty", 0) * (counts > 0))
            ref.append(int(logits.argmax()))
            counts[ref[-1]] += 1
    ask = lambda **kw: client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, **kw)
    got, plain = ask(**penalties), ask()
    assert 257 not in ref and got.choices[0].text == server.tok.decode(ref) != plain.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    ask = lambda seed: client.completions.create(model="tiny", prompt="ab", max_tokens=12, temperature=1.0,
                                                 top_p=0.95, seed=seed, extra_body={"top_k": 50}).choices[0].text
    assert ask(3) == ask(3)
    assert ask(3) != ask(4)
    assert ask(-1) == ask(-1) != ask(3)  # OpenAI's seeds are int64 (llama.cpp's clients send -1)


# -----------------------------------------------------------------------------
# concurrency


def test_concurrent_requests_decode_together_each_with_its_own_settings(server, client):
    """Requests sent at once from threads share batches, and each answer is the one it gets alone: greedy rows,
    seeded sampled rows and a repetition penalty side by side."""
    asks = [dict(prompt="ab", temperature=0), dict(prompt="longer prompt", temperature=0),
            dict(prompt="ab", temperature=1.0, seed=7, extra_body={"top_k": 40}),  # extensions go in extra_body
            dict(prompt="x", temperature=0, extra_body={"repetition_penalty": 1.5})]
    alone = [client.completions.create(model="tiny", max_tokens=10, **a).choices[0].text for a in asks]
    server.batcher.wait, wait = 1.0, server.batcher.wait  # room for all four threads to arrive
    try:
        results = [None] * len(asks)

        def ask(i):
            results[i] = client.completions.create(model="tiny", max_tokens=10, **asks[i]).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    finally:
        server.batcher.wait = wait
    assert results == alone
    assert max(rows for rows, _ in list(server.batcher.batches)[-4:]) > 1


def test_a_request_joins_a_decoding_batch_where_it_fits(ckpt, server, client):
    """Continuous batching: while a long answer decodes (a 3-token prompt, 100 tokens, of 128 positions), a short
    request joins it at the next step, and a 101-token prompt joins only once the batch's column has reached its
    length (or the batch has ended); each gets the answer it gets alone."""
    asks = {"long": dict(prompt="ab", max_tokens=100), "short": dict(prompt="cd", max_tokens=10),
            "wide": dict(prompt="y" * 100, max_tokens=5)}
    alone = {k: client.completions.create(model="tiny", temperature=0, **a).choices[0].text for k, a in asks.items()}
    slow = start_server(ckpt, model=SlowModel(server.model, 0.02))
    try:
        c, got = client_for(slow), {}
        stream = c.completions.create(model="tiny", temperature=0, stream=True, **asks["long"])
        first = next(iter(stream)).choices[0].text  # decoding now
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, c.completions.create(
            model="tiny", temperature=0, **asks[k]).choices[0].text)) for k in ("short", "wide")]
        [t.start() for t in threads]
        got["long"] = first + "".join(chunk.choices[0].text for chunk in stream)
        [t.join(120) for t in threads]
        assert got == alone
        (rows, steps), *_ = slow.batcher.batches
        assert rows >= 2 and steps >= 100  # the short one decoded beside the long one
    finally:
        stop_server(slow)


class SlowModel(torch.nn.Module):
    """The model, `seconds` slower per forward: long enough generations to leave in the middle of."""

    def __init__(self, model, seconds):
        super().__init__()
        self.inner, self.args, self.seconds = model, model.args, seconds

    def setup_cache(self, *args, **kwargs):
        self.inner.setup_cache(*args, **kwargs)

    def clear_cache(self):
        self.inner.clear_cache()

    def cache_rows(self, *args):
        return self.inner.cache_rows(*args)

    def forward(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_client_leaving_mid_answer_frees_its_slot(ckpt, stream):
    model = sample.load_model(ckpt, "cpu", torch.float32)[0]
    assert 257 not in sample.generate(model, [256, 97, 98], 100, temperature=0)  # no eos: 100 steps unless cut
    server = start_server(ckpt, model=SlowModel(model, 0.03))
    try:
        body = json.dumps({"prompt": "ab", "max_tokens": 100, "temperature": 0, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while b"data: " not in received:  # the answer has started
                received += sock.recv(65536)
        else:
            time.sleep(0.5)
        sock.close()
        quick = client_for(server).completions.create(model="tiny", prompt="ab", max_tokens=2, temperature=0)
        assert quick.usage.completion_tokens == 2  # the server is free for the next one
        assert sum(steps for _, steps in server.batcher.batches) < 60  # 100 steps take >= 3 s: it stopped soon
    finally:
        stop_server(server)


def test_bounded_load_loses_no_request(server, client):
    """48 mixed requests from 6 threads (completions and chat, streamed and not, greedy and sampled) within 180 s:
    every one answered in full."""
    n_threads, per_thread, deadline = 6, 8, time.monotonic() + 180
    answers, errors = [], []

    def worker(k):
        for i in range(per_thread):
            try:
                kw = dict(model="tiny", max_tokens=4 + (k + i) % 9, temperature=0 if i % 2 else 0.9, seed=k * 100 + i,
                          stream=bool(i % 3 == 0))
                if (k + i) % 2:
                    out = client.chat.completions.create(messages=[{"role": "user", "content": f"hi {k} {i}"}], **kw)
                else:
                    out = client.completions.create(prompt=f"load {k} {i}", **kw)
                chunks = list(out) if kw["stream"] else [out]
                answers.append((kw["max_tokens"], chunks[-1].choices[0].finish_reason))
            except Exception as e:  # counted, not raised: the test reports every lost request
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    [t.start() for t in threads]
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
    assert not any(t.is_alive() for t in threads), "load test over its time limit"
    assert errors == []
    assert len(answers) == n_threads * per_thread
    assert all(reason in ("stop", "length") for _, reason in answers)
    assert not server.batcher.waiting


def test_a_burst_of_clients_connecting_at_once_is_served_in_full(server):
    """96 connections opened at once, three times: none reset while waiting to be accepted."""
    for _ in range(3):
        statuses, errors = [], []

        def ask(i):
            try:
                statuses.append(raw(server, "POST", "/v1/completions", {"prompt": f"b{i}", "max_tokens": 2})[0])
            except OSError as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(96)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert errors == [] and statuses == [200] * 96


# -----------------------------------------------------------------------------
# bad requests


BAD = [
    ("POST", "/v1/completions", b'{"prompt": "hi",', 400, None, None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None, None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens", None),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", None),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", None),
    ("POST", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("POST", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options",
     None),  # as OpenAI: only with stream
    ("POST", "/v1/completions", {"prompt": "hi", "stop": ["", "x"]}, 400, "stop", None),
    ("POST", "/v1/completions", {"prompt": "hi", "tools": []}, 400, "tools", None),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),  # OpenAI's 0..20
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs", None),  # chat's kind
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),  # 0: only with echo
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, 400,
     "logprobs", None),  # completions' kind
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", None),  # only with logprobs true, as OpenAI
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo",
     None),
    ("POST", "/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ("POST", "/v1/completions", {"prompt": "hi", "frequency_penalty": "1"}, 400, "frequency_penalty", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_object"}}, 400, "response_format", None),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", None),
    ("POST", "/v1/completions", {"max_tokens": 5}, 400, "prompt", None),
    ("POST", "/v1/completions", {"prompt": "x" * 120, "max_tokens": 20}, 400, "prompt", "context_length_exceeded"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages", None),
    ("POST", "/v1/completions", {"prompt": "\ud800 hi"}, 400, None, None),  # a lone surrogate: valid JSON, not text
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}]}, 400, None, None),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("GET", "/v1/models/gpt-4", None, 404, "model", "model_not_found"),
    ("GET", "/v1/nope", None, 404, None, "unknown_url"),
    ("GET", "/v1/completions", None, 405, None, "method_not_allowed"),
    ("POST", "/v1/models", b"{}", 405, None, "method_not_allowed"),
]


@pytest.mark.parametrize("method, path, body, status, param, code", BAD,
                         ids=[f"{i}-{s}-{p or c}" for i, (*_, s, p, c) in enumerate(BAD)])
def test_bad_request_gets_an_openai_error(server, method, path, body, status, param, code):
    got, headers, text = raw(server, method, path, body, {"Content-Type": "application/json"})
    assert got == status, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "Traceback" not in text
    assert (error["param"], error["code"]) == (param, code)
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")


def test_body_over_the_limit_is_413_and_the_server_goes_on(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(http_server.MAX_BODY_BYTES + 1))
    conn.endheaders(b'{"prompt": "')  # the server answers from the header, without reading the body
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert client.completions.create(model="tiny", prompt="ab", max_tokens=2).usage.completion_tokens == 2


def test_unsupported_fields_are_accepted_at_their_off_value(client):
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                         response_format={"type": "text"}, logprobs=False, presence_penalty=0)
    assert got.choices[0].message.content is not None


def test_openai_client_raises_the_servers_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 120, max_tokens=20)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 128" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


class FailingModel(SlowModel):
    """The model, failing on any prompt that holds an "!" (33): as a batch that runs out of memory would."""

    def forward(self, idx, *args, **kwargs):
        if (idx == 33).any():
            raise RuntimeError("out of memory (a test's)")
        return self.inner(idx, *args, **kwargs)


def test_a_failing_batch_answers_500_and_the_server_goes_on(ckpt):
    server = start_server(ckpt, model=FailingModel(sample.load_model(ckpt, "cpu", torch.float32)[0], 0))
    try:
        status, _, text = raw(server, "POST", "/v1/completions", {"prompt": "hi!", "max_tokens": 4})
        assert status == 500 and "Traceback" not in text
        assert json.loads(text)["error"] == {"message": "generation failed: RuntimeError: out of memory (a test's)",
                                             "type": "server_error", "param": None, "code": None}
        status, _, text = raw(server, "POST", "/v1/completions", {"prompt": "hi!", "max_tokens": 4, "stream": True})
        assert status == 200 and json.loads(text.split("\n\n")[0][6:])["error"]["type"] == "server_error"
        assert client_for(server).completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens
    finally:
        stop_server(server)


# -----------------------------------------------------------------------------
# command line


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; docker stop, systemd, kill
def test_cli_serves_until_interrupted(ckpt, stop):
    want = cli(ckpt, "--prompt", "ab", "--max_new_tokens", 6)
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(ckpt), "--serve", "--port", "0",
                             "--temperature", "0", "--max_new_tokens", "6"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        while not lines or "serving" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)  # the server exited before serving
        port = int(lines[-1].split("127.0.0.1:")[1].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        got = client.completions.create(model=ckpt.name, prompt="ab")  # --max_new_tokens and --temperature apply
        assert got.choices[0].text + "\n" == want
        proc.send_signal(stop)
        assert proc.wait(60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_cli_serve_takes_host_quantize_dtype_and_adapter(tmp_path, monkeypatch):
    """--host is where it listens (127.0.0.2: loopback on Linux, not 127.0.0.1), and the model it serves is the one
    --adapter, --quantize and --dtype make: greedy answers equal sample.py --prompt's with those flags."""
    from test_peft import peft_llama, save_peft

    ckpt, peft_model = peft_llama(tmp_path)
    flags = ["--adapter", save_peft(peft_model, tmp_path / "adapter"), "--quantize", "int8", "--dtype", "bfloat16"]
    want = cli(ckpt, "--prompt", "ab", "--max_new_tokens", 8, *flags)
    assert want != cli(ckpt, "--prompt", "ab", "--max_new_tokens", 8)  # the flags change the answer
    serve_forever, got = http_server.ModelServer.serve_forever, []

    def serve_one_request(self):
        threading.Thread(target=serve_forever, args=(self,), daemon=True).start()
        try:
            got.append(self.server_address)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", self.server_address[1]), timeout=5)
            conn = http.client.HTTPConnection("127.0.0.2", self.server_address[1], timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 8}))
            got.append(json.loads(conn.getresponse().read())["choices"][0]["text"])
        finally:
            self.shutdown()

    monkeypatch.setattr(http_server.ModelServer, "serve_forever", serve_one_request)
    cli(ckpt, "--serve", "--host", "127.0.0.2", "--port", 0, *flags)
    assert got[0][0] == "127.0.0.2" and got[1] + "\n" == want


def test_serve_refuses_terminal_only_flags(ckpt):
    with pytest.raises(SystemExit, match="--serve: takes prompts from HTTP requests"):
        ts.run_cli(["--ckpt", ckpt, "--serve", "--prompt", "x"])


MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
           " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
           "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")  # no system role


def test_serve_refuses_a_system_prompt_its_template_refuses(ckpt, tmp_path, monkeypatch):
    """Mistral's template has no system role: --system would make every request without one a 400."""
    import shutil

    shutil.copytree(ckpt, tmp_path / "ckpt")
    ts.byte_tokenizer(tmp_path / "ckpt", chat_template=MISTRAL)
    monkeypatch.setattr(http_server.ModelServer, "serve_forever", lambda self: pytest.fail("it served"))
    with pytest.raises(SystemExit, match=r"--system: .*chat_template: Conversation roles must alternate"):
        ts.run_cli(["--ckpt", tmp_path / "ckpt", "--serve", "--port", 0, "--system", "Be brief."])


def test_chat_refuses_a_system_prompt_its_template_refuses_before_reading_a_turn(ckpt, tmp_path):
    import shutil

    shutil.copytree(ckpt, tmp_path / "ckpt")
    ts.byte_tokenizer(tmp_path / "ckpt", chat_template=MISTRAL)
    with pytest.raises(SystemExit, match=r"--system: .*chat_template: Conversation roles must alternate"):
        ts.run_cli(["--ckpt", tmp_path / "ckpt", "--chat", "--system", "Be brief."], stdin="")  # no turn at all


def test_a_port_in_use_is_a_one_line_error(ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"--host=127.0.0.1 --port={port}: cannot listen there \(Address"):
            ts.run_cli(["--ckpt", ckpt, "--serve", "--port", port])
