"""sample.py --serve holds and stops like a server: bounded requests in progress (503 with Retry-After), a stalled
body 408, chunked bodies, connections that wait on the event loop (no thread each), and on SIGTERM a grace period in
which the answers in progress finish, an answer cut by it ending with its last chunk and [DONE]."""
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import sample
import test_sample as ts
from test_serve import SlowModel, client_for, raw, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = ts.hf_to_checkpoint(ts.tiny_hf_llama(2), tmp_path_factory.mktemp("limits"))
    ts.byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return sample.decode_layout(sample.load_model(ckpt, "cpu", torch.float32)[0])


def stream(port, body, events, started=None):
    """POST a streamed completion; every event's data into `events`; `started` set at the first text chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    while line := resp.readline():
        if line.startswith(b"data: "):
            events.append(line[6:].strip().decode())
            if started is not None and events[-1].startswith("{"):
                started.set()
    conn.close()


# A --serve whose decode steps take 50 ms (the tiny model's own take ~1 ms): answers long enough to stop amid them
SLOW_CLI = ("import sys, time, sample\n"
            "decode = sample.decode_one\n"
            "sample.decode_one = lambda *a: (time.sleep(0.05), decode(*a))[1]\n"
            "sample.main(sys.argv[1:])\n")


@pytest.mark.parametrize("grace, max_tokens, cut", [(1, 100, True), (30, 20, False)], ids=["cut", "finished"])
def test_sigterm_lets_answers_in_progress_finish_within_the_grace_period(ckpt, grace, max_tokens, cut):
    """Four answers streaming when SIGTERM comes: no new connection is accepted, the grace period is printed, each
    answer ends with its finish_reason and [DONE] (all its tokens if the grace period allows, else cut there), and
    the process exits 0."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "--ckpt", str(ckpt), "--serve", "--port", "0",
                             "--temperature", "0", "--grace_period", str(grace)], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        while not lines or "serving" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", lines[-1]).group(1))
        events, started = [[] for _ in range(4)], [threading.Event() for _ in range(4)]
        body = {"max_tokens": max_tokens, "stream_options": {"include_usage": True}}
        threads = [threading.Thread(target=stream, args=(port, {**body, "prompt": f"p{i}"}, events[i], started[i]))
                   for i in range(4)]
        [t.start() for t in threads]
        assert all(s.wait(60) for s in started)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # stopped accepting
            socket.create_connection(("127.0.0.1", port), timeout=5)
        [t.join(60) for t in threads]
        assert proc.wait(60) == 0
        elapsed = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert f"get up to {grace} s to finish" in err and err.rstrip().endswith("stopped")
    for answer in events:
        assert answer[-1] == "[DONE]"
        finish, usage = json.loads(answer[-3]), json.loads(answer[-2])
        assert finish["choices"][0]["finish_reason"] == "length"
        tokens = usage["usage"]["completion_tokens"]
        assert (tokens < max_tokens) if cut else (tokens == max_tokens)
    if cut:
        assert elapsed < grace + 10  # the grace period, not the answers' 5 s, set when it stopped


def test_past_max_requests_a_request_gets_503_with_retry_after(ckpt, model):
    server = start_server(ckpt, model=SlowModel(model, 0.02), max_requests=2)
    try:
        port, events, started = server.server_address[1], [[], []], [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream, args=(port, {"prompt": "ab", "max_tokens": 60}, events[i],
                                                         started[i])) for i in range(2)]
        [t.start() for t in threads]
        assert all(s.wait(60) for s in started)
        status, headers, text = raw(server, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(text)["error"]["type"] == "server_error"
        [t.join(60) for t in threads]
        assert all(e[-1] == "[DONE]" for e in events)
        assert raw(server, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200
    finally:
        stop_server(server)


def test_a_stalled_body_gets_408_and_does_not_hold_up_others(ckpt, model):
    server = start_server(ckpt, model=model, request_timeout=1)
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        assert raw(server, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200  # meanwhile
        sock.settimeout(30)
        answer = b""
        while chunk := sock.recv(65536):  # the server answers, then closes the connection
            answer += chunk
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        stop_server(server)


def test_a_chunked_body_is_read_and_a_chunked_body_over_the_limit_is_413(ckpt, model):
    server = start_server(ckpt, model=model, max_body=4096)
    try:
        body = json.dumps({"prompt": "ab", "max_tokens": 5, "temperature": 0}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        conn.request("POST", "/v1/completions", body=iter([body[:7], body[7:]]), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers.get("Content-Length")
        chunked = json.loads(resp.read())["choices"][0]["text"]
        assert chunked == json.loads(raw(server, "POST", "/v1/completions", body)[2])["choices"][0]["text"]
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        conn.request("POST", "/v1/completions", body=iter([b" " * 3000] * 3), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
        conn.close()
    finally:
        stop_server(server)


def test_many_half_open_connections_take_no_thread_each_and_time_out(ckpt, model):
    """300 connections that sent half a request's headers: the process has as many threads as before, a request from
    another client is answered, and after request_timeout each half-open one gets 408 and is closed."""
    server = start_server(ckpt, model=model, request_timeout=3)
    try:
        assert raw(server, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200
        threads = threading.active_count()
        socks = []
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.server_address[1]))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        time.sleep(0.5)
        assert raw(server, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200
        assert threading.active_count() <= threads + 2  # the thread pool may start one for the request's prompt
        for s in socks:
            s.settimeout(30)
            answer = b""
            while chunk := s.recv(65536):  # the answer, then the end of the connection
                answer += chunk
            s.close()
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in answer
    finally:
        stop_server(server)


def test_what_held_before_the_move_still_holds(ckpt, model):
    """32 concurrent streams each equal to its answer alone; 20 clients leaving mid-stream free their rows; 413 for
    a 50 MB body; 400 for 10,000 messages."""
    server = start_server(ckpt, model=model)
    try:
        port, client = server.server_address[1], client_for(server)
        asks = [{"prompt": f"stream {i}", "max_tokens": 8, "temperature": 0} for i in range(32)]
        alone = [client.completions.create(model="tiny", **a).choices[0].text for a in asks]
        events = [[] for _ in asks]
        threads = [threading.Thread(target=stream, args=(port, a, e)) for a, e in zip(asks, events)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert ["".join(json.loads(d)["choices"][0]["text"] for d in e[:-1]) for e in events] == alone
    finally:
        stop_server(server)
    server = start_server(ckpt, model=SlowModel(model, 0.01))
    try:
        port = server.server_address[1]
        body = json.dumps({"prompt": "ab", "max_tokens": 100, "stream": True}).encode()
        socks = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            socks.append(s)
        for s in socks:
            received = b""
            while b"data: " not in received:
                received += s.recv(65536)
            s.close()
        deadline = time.monotonic() + 30
        while server.batcher.waiting or sum(steps for _, steps in server.batcher.batches) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client_for(server).completions.create(model="tiny", prompt="ab", max_tokens=2).usage.completion_tokens
        assert sum(steps for _, steps in server.batcher.batches) < 20 * 100 // 2  # they stopped long before the end
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", str(50 * 2**20))
        conn.endheaders(b'{"prompt": "' + b"x" * 65536)
        assert conn.getresponse().status == 413
        conn.close()
        messages = [{"role": "user", "content": "x"}] * 10_000
        status, _, text = raw(server, "POST", "/v1/chat/completions", {"messages": messages})
        assert status == 400 and json.loads(text)["error"]["code"] == "context_length_exceeded"
    finally:
        stop_server(server)


@pytest.mark.slow
def test_memory_stays_flat_over_2000_mixed_requests(ckpt, model):
    """Completions and chat, streamed and not, from 8 threads: the process's resident memory after 2,000 requests is
    within 40 MiB of where it was after the first 400."""
    import psutil

    server = start_server(ckpt, model=model, access_log=False)
    client, errors = client_for(server), []

    def requests(k, n):
        for i in range(n):
            try:
                kw = dict(model="tiny", max_tokens=3, temperature=0.7, seed=i, stream=bool(i % 2))
                if (k + i) % 2:
                    out = client.chat.completions.create(messages=[{"role": "user", "content": f"m {k} {i}"}], **kw)
                else:
                    out = client.completions.create(prompt=f"p {k} {i}", **kw)
                list(out) if kw["stream"] else out
            except Exception as e:  # counted: the test reports every lost request
                errors.append(repr(e))

    def burst(n):
        threads = [threading.Thread(target=requests, args=(k, n // 8)) for k in range(8)]
        [t.start() for t in threads]
        [t.join(600) for t in threads]

    try:
        burst(400)
        before = psutil.Process().memory_info().rss
        burst(1600)
        after = psutil.Process().memory_info().rss
    finally:
        stop_server(server)
    assert errors == []
    assert after - before < 40 * 2**20, (before, after)


@pytest.mark.parametrize("flags", [["--max_requests", "0"], ["--grace_period", "-1"], ["--grace_period", "inf"]])
def test_limits_out_of_range_are_one_line(ckpt, flags):
    with pytest.raises(SystemExit, match=r"^sample.py: --max_requests=\S+ --grace_period=\S+: expected at least 1"):
        sample.parse_args(["--ckpt", str(ckpt), "--serve", *flags])
