"""Used by sample.py (--serve: serve) and bench.py (--mode=serve): the OpenAI-compatible HTTP server and its chat page
(chat.html beside this file), on FastAPI and uvicorn.

sample.py's Engine is the generation (continuous batching, text, log-probabilities); this file adds what HTTP needs:
- the routes: GET / (chat.html, a page that chats with the model in a browser), GET /v1/models, POST /v1/completions
  and POST /v1/chat/completions, as JSON or as server-sent events in OpenAI's chunk format ending `data: [DONE]`;
- every request checked against OpenAI's fields (REQUEST_FIELDS), a bad one answered 4xx with OpenAI's error object;
- log-probabilities laid out as OpenAI's API does (completions: logprobs N with echo; chat: logprobs, top_logprobs);
- CORS for the origins --allowed_origins names (Starlette's middleware);
- bounds: a body over MAX_BODY_BYTES is 413, a request (its headers or its body) that stops arriving 408, past
  max_requests in progress 503 with Retry-After; connections wait on the event loop, not in a thread each;
- the stop: on SIGTERM or Ctrl-C it accepts no new connection, lets the answers in progress run for grace_period
  seconds, and ends those still running then with their last chunk (finish_reason "length") and [DONE].
"""
import asyncio
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from support import checks
from support.sample_checks import SampleError, check_system, log

MAX_BODY_BYTES = 1 << 20
CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API (and vLLM) allow


class APIError(Exception):
    """A request the server answers with an OpenAI-style error: status, message, the offending field, a code."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def body(self):
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}

    def response(self):
        """As JSON, closing the connection: a body left unread must not be taken for the next request."""
        return JSONResponse(self.body(), self.status, headers={"Connection": "close", **self.headers})


# -----------------------------------------------------------------------------
# what a request may hold

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_stop(v):
    return isinstance(v, str) or isinstance(v, list) and all(isinstance(s, str) for s in v)


# The fields both endpoints take: field -> (setting, narrower range) for a generation setting (the engine's ranges
# unless OpenAI's are narrower), else (type check, the type, value check, the values). null = not given.
# Fields of OpenAI's API this server does not implement are accepted only at the value that means "off".
REQUEST_FIELDS = {
    "model": (lambda v: isinstance(v, str), "a string", None, None),
    "max_tokens": ("max_new_tokens", "[0, inf)"),  # 0: only with echo (the prompt's log-probabilities alone)
    "max_completion_tokens": ("max_new_tokens", None),
    "temperature": ("temperature", "[0, 2]"),  # 0 = greedy
    "top_p": ("top_p", None),
    "top_k": ("top_k", None),  # 0 = off
    "repetition_penalty": ("repetition_penalty", None),  # 1 = off
    "seed": ("seed", "[-2**63, 2**63)"),  # OpenAI's int64: a negative seed is a seed too
    "n": (_is_int, "an integer", lambda v: v == 1, "1 (one choice per request)"),
    "stream": (lambda v: isinstance(v, bool), "a boolean", None, None),
    "stream_options": (lambda v: isinstance(v, dict), "an object",
                       lambda v: set(v) <= {"include_usage"} and isinstance(v.get("include_usage", False), bool),
                       '{"include_usage": true or false}'),
    "stop": (_is_stop, "a string or a list of strings",
             lambda v: all([v] if isinstance(v, str) else v) and len([v] if isinstance(v, str) else v) <= 16,
             "up to 16 non-empty strings"),
    "user": (lambda v: isinstance(v, str), "a string", None, None),
    # OpenAI's: each logit less presence_penalty once its token is in the answer, frequency_penalty per time it is
    "presence_penalty": (_is_number, "a number", lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (_is_number, "a number", lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "best_of": (_is_int, "an integer", lambda v: v == 1, "1 (not supported)"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object", lambda v: not v, "{} (not supported)"),
    "suffix": (lambda v: isinstance(v, str), "a string", lambda v: not v, '"" (not supported)'),
    "response_format": (lambda v: isinstance(v, dict), "an object", lambda v: v == {"type": "text"},
                        '{"type": "text"} (JSON mode and JSON schemas are not supported)'),
}
# Log-probabilities, as each endpoint defines them
COMPLETION_FIELDS = {  # logprobs: the N most likely alternatives of each token (0: the chosen token's alone)
    "logprobs": (lambda v: _is_int(v) or v is False, "an integer", lambda v: v is False or 0 <= v <= MAX_TOP_LOGPROBS,
                 f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
    "echo": (lambda v: isinstance(v, bool), "a boolean", None, None),  # the prompt too, with its log-probabilities
}
CHAT_FIELDS = {
    "logprobs": (lambda v: isinstance(v, bool), "a boolean", None, None),
    "top_logprobs": (_is_int, "an integer", lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                     f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
    "echo": (lambda v: isinstance(v, bool), "a boolean", lambda v: not v, "false (not supported in chat)"),
}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def read_fields(body, main_field, ranges, chat):
    """A request body checked against REQUEST_FIELDS (and the endpoint's own) -> {field: value} of those given;
    APIError 400 otherwise. ranges: the engine's {setting: (kind, range)}."""
    if body.get(main_field) is None:
        raise APIError(400, f"you must provide a {main_field!r} field", main_field)
    table = {**REQUEST_FIELDS, **(CHAT_FIELDS if chat else COMPLETION_FIELDS)}
    fields = {}
    for key, value in body.items():
        if key == main_field or value is None:
            continue
        if key not in table:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", key)
        shown = json.dumps(value)[:60]
        if len(table[key]) == 2:  # a generation setting
            setting, narrower = table[key]
            kind, interval = ranges[setting]
            try:
                checks.check_value(key, value, kind, narrower or interval)
            except ValueError as e:
                raise APIError(400, str(e), key) from None
            fields[key] = value
            continue
        type_ok, type_name, value_ok, values = table[key]
        if not type_ok(value):
            raise APIError(400, f"{key}: expected {type_name}, got {shown}", key)
        if value_ok and not value_ok(value):
            raise APIError(400, f"{key}={shown}: expected {values}", key)
        fields[key] = value
    if fields.get("logprobs") is False:  # off, as null
        del fields["logprobs"]
    if chat and "top_logprobs" in fields and not fields.get("logprobs"):  # OpenAI refuses it too
        raise APIError(400, "top_logprobs: only allowed when logprobs is true", "top_logprobs")
    if "stream_options" in fields and not fields.get("stream"):  # OpenAI refuses it too
        raise APIError(400, "stream_options: only allowed when stream is true", "stream_options")
    return fields


# -----------------------------------------------------------------------------
# the server

class Plan:
    """A checked request: the prompt ids, the answer's settings, what the answer holds."""

    def __init__(self, chat, ids, prompt_text, max_new, sampling, seed, stop, fields):
        self.chat, self.ids, self.prompt_text, self.max_new = chat, ids, prompt_text, max_new
        self.sampling, self.seed, self.stop, self.fields = sampling, seed, stop, fields
        self.stream = fields.get("stream", False)
        self.echo = fields.get("echo", False)
        if chat:
            self.logprobs = fields.get("top_logprobs", 0) if fields.get("logprobs") else None
        else:
            self.logprobs = fields.get("logprobs")


class ModelServer:
    """The HTTP server around an Engine: FastAPI's app, run by uvicorn on a socket bound at construction (port 0
    picks a free port; server_address says which). serve_forever() runs it in the calling thread until shutdown()
    (another thread) or SIGTERM / Ctrl-C (the main thread); server_close() then frees the socket and the engine."""

    def __init__(self, engine, *, host="127.0.0.1", port=8000, name="model", max_body=MAX_BODY_BYTES,
                 access_log=True, allowed_origins=(), grace_period=8.0, max_requests=256, request_timeout=60.0):
        self.engine, self.name, self.max_body, self.request_timeout = engine, name, max_body, request_timeout
        self.model, self.tok, self.batcher = engine.model, engine.tok, engine.batcher
        self.grace_period, self.max_requests = grace_period, max_requests
        self.allowed_origins = set(allowed_origins)  # web pages that may call the server from a browser ("*": any)
        self.created, self.page = int(time.time()), CHAT_PAGE.read_text(encoding="utf-8")
        self.in_progress, self.deadline = 0, None  # requests being answered; when answers are cut (stopping)
        self.started, self.stopped = threading.Event(), threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(socket.SOMAXCONN)  # the kernel holds a burst of connections until they are accepted
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        http = type("H11", (_H11,), {"request_timeout": request_timeout})
        config = uvicorn.Config(self.app(), http=http, loop="asyncio", lifespan="off", log_config=None,
                                access_log=access_log, backlog=socket.SOMAXCONN, timeout_keep_alive=60,
                                timeout_graceful_shutdown=grace_period + 5)  # a backstop: answers end at the grace
        self.uvicorn = _Uvicorn(config, self)
        if access_log:
            _log_to_stderr("uvicorn.access")

    # the app ------------------------------------------------------------------

    def app(self):
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.add_api_route("/", self.chat_page, methods=["GET", "HEAD"])
        app.add_api_route("/v1/models", self.models, methods=["GET", "HEAD"])
        app.add_api_route("/v1/models/{model_id:path}", self.one_model, methods=["GET", "HEAD"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_exception_handler(APIError, lambda request, e: e.response())
        app.add_exception_handler(HTTPException, self.http_error)
        app.add_exception_handler(Exception, self.internal_error)
        if self.allowed_origins:
            app.add_middleware(PreflightCORS, allow_origins=sorted(self.allowed_origins), allow_methods=["*"],
                               allow_headers=["*"], max_age=600)
        return Bounded(app, self)

    async def chat_page(self):
        return HTMLResponse(self.page, headers={
            # everything the page needs is in it: no script, style or font from elsewhere
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            "Cache-Control": "no-cache"})

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def one_model(self, model_id: str):
        if model_id != self.name:
            raise APIError(404, f"The model {model_id!r} does not exist", "model", "model_not_found")
        return self.model_card()

    def model_card(self):
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "sample.py",
                "max_model_len": self.model.args.max_seq_len}

    async def completions(self, request: Request):
        return await self.complete(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.complete(request, chat=True)

    async def http_error(self, request, e):
        """Routing's own refusals (no such path, the wrong method) in OpenAI's shape."""
        method, path = request.method, request.url.path
        if e.status_code == 404:
            return APIError(404, f"Invalid URL ({method} {path})", code="unknown_url").response()
        if e.status_code == 405:
            allow = ", ".join(m for m in (e.headers or {}).get("Allow", "").split(", ") if m not in ("HEAD", "OPTIONS"))
            return APIError(405, f"{method} {path}: method not allowed; use {allow}", code="method_not_allowed",
                            headers={"Allow": allow}).response()
        return APIError(e.status_code, str(e.detail)).response()

    async def internal_error(self, request, e):
        """A bug: a 500 for the client (uvicorn logs the traceback); the server goes on."""
        return APIError(500, f"internal error ({type(e).__name__}); see the server's log").response()

    # a request ----------------------------------------------------------------

    async def read_body(self, request) -> bytes:
        """The body: 413 past max_body (by Content-Length, or as chunks arrive), 408 when nothing of it arrives for
        request_timeout seconds."""
        length = request.headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            raise APIError(400, f"Content-Length: expected a number of bytes, got {length[:40]!r}")
        if length is not None and int(length) > self.max_body:
            raise APIError(413, f"request body of {int(length)} bytes is over the limit of {self.max_body}",
                           code="request_too_large")
        chunks, size, stream = [], 0, request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), self.request_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body stopped arriving: nothing in {self.request_timeout:g} s",
                               code="request_timeout") from None
            size += len(chunk)
            if size > self.max_body:
                raise APIError(413, f"request body over the limit of {self.max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def read_json(data: bytes) -> dict:
        """The body as a JSON object of text; APIError 400 otherwise."""
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, f"malformed JSON in the request body: {e}")
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object as the request body")
        try:  # JSON may escape a lone UTF-16 surrogate ("\ud83d", half an emoji): no tokenizer takes it
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            raise APIError(400, f"the request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), "
                                "which is not text")
        return body

    def prompt_ids(self, prompt):
        """/v1/completions' prompt: a string (encoded as --prompt is), a list of one string, or token ids (also as a
        list of one list) -> (ids, the prompt's text)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        vocab = self.model.args.vocab_size
        if isinstance(prompt, str):
            ids, text = self.engine.prompt_ids(prompt), prompt
        elif isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < vocab for t in prompt):
            ids, text = prompt, None
        else:
            raise APIError(400, f"prompt: expected a string, a list of one string or a list of token ids "
                                f"(0 <= id < {vocab})", "prompt")
        if not ids:
            raise APIError(400, "prompt: encodes to no tokens and the tokenizer has no bos token", "prompt")
        return ids, text

    def chat_ids(self, messages):
        """/v1/chat/completions' messages rendered with the chat template (the server's --system unless the
        messages hold a system message), ending where the assistant's reply starts."""
        if self.engine.template is None:
            raise APIError(400, f"{self.name} has no chat template; start the server with --template", "messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise APIError(400, f"messages[{i}].role: expected one of {', '.join(CHAT_ROLES)}", "messages")
            content = m.get("content")
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            given = {k for k, v in m.items() if v is not None and v != []}  # a dumped reply: refusal=null, ...
            if not isinstance(content, str) or given - {"role", "content", "name"}:
                raise APIError(400, f"messages[{i}]: expected role, content (a string or text parts) and an "
                                    f"optional name", "messages")
            turns.append({"role": CHAT_ROLES[m["role"]], "content": content})
        try:
            ids = self.engine.chat_ids(turns)
        except ValueError as e:  # the template's own objections, unknown roles
            raise APIError(400, f"messages: {e}", "messages")
        if not ids:  # e.g. Llama-2's template, given only a system message
            raise APIError(400, "messages: the chat template renders them to no tokens; send a user message",
                           "messages")
        return ids

    def plan(self, data, chat) -> Plan:
        """A request body -> its Plan; APIError for what does not suit."""
        body = self.read_json(data)
        main_field = "messages" if chat else "prompt"
        fields = read_fields(body, main_field, self.engine.ranges, chat)
        if fields.get("model", self.name) != self.name:
            raise APIError(404, f"The model {fields['model']!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")
        ids, text = (self.chat_ids(body["messages"]), None) if chat else self.prompt_ids(body["prompt"])
        context = self.model.args.max_seq_len
        max_new = fields.get("max_completion_tokens", fields.get("max_tokens"))
        if max_new == 0 and not fields.get("echo"):
            raise APIError(400, "max_tokens=0: expected at least 1 (0 only with echo: the prompt's "
                                "log-probabilities alone)", "max_tokens")
        if max_new is None:
            max_new = min(self.engine.max_new_tokens, context - len(ids))
        if len(ids) + max_new > context or max_new < (0 if fields.get("echo") else 1):  # the default: what is left
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(ids) + max(max_new, 1)} tokens ({len(ids)} in the {main_field}, "
                                f"{max(max_new, 1)} in the completion). Please reduce the length of the "
                                f"{main_field} or completion.", main_field, "context_length_exceeded")
        sampling = {k: fields.get(k, v) for k, v in self.engine.settings[chat].items()}
        sampling["top_k"] = sampling["top_k"] or None  # 0 = off
        sampling.update((k, fields.get(k, 0)) for k in ("presence_penalty", "frequency_penalty"))
        stop = fields.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if text is None and fields.get("echo"):
            text = self.tok.decode(ids)
        return Plan(chat, ids, text, max_new, sampling, fields.get("seed"), stop, fields)

    async def complete(self, request, chat):
        """POST /v1/completions or /v1/chat/completions: queue the job, then answer as its tokens come."""
        data = await self.read_body(request)
        plan = await run_in_threadpool(self.plan, data, chat)  # parsing and tokenizing: off the event loop
        job = self.engine.submit(plan.ids, plan.max_new, plan.sampling, chat, plan.seed, plan.logprobs, plan.echo)
        answer = Answer(self, plan, job, request)
        if plan.stream:
            return StreamingResponse(answer.events(), headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
        return JSONResponse(await answer.whole())

    # running and stopping -----------------------------------------------------

    def serve_forever(self):
        self.started.set()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def begin_stop(self):
        """No new connections from now; the answers in progress have grace_period seconds."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_period
            if self.in_progress:
                print(f"stopping: {self.in_progress} answers in progress get up to {self.grace_period:g} s to finish "
                      "(a second Ctrl-C stops at once)", file=sys.stderr, flush=True)

    def shutdown(self):
        """Stop serve_forever (from another thread) as SIGTERM would, and wait until it has."""
        self.begin_stop()
        self.uvicorn.should_exit = True
        if self.started.is_set():
            self.stopped.wait()

    def server_close(self):
        self.socket.close()
        self.engine.close()


class _H11(H11Protocol):
    """uvicorn's HTTP/1.1 connection, with a limit on a request whose line and headers stop arriving: after
    request_timeout seconds without them, 408 and the connection closed (uvicorn would wait for ever, and a silent
    connection would hold its socket)."""

    request_timeout = 60.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.headers_timer = self.loop.call_later(self.request_timeout, self.headers_timed_out)

    def headers_timed_out(self):
        if self.cycle is None and not self.transport.is_closing():
            body = APIError(408, f"the request stopped arriving: no complete headers in {self.request_timeout:g} s",
                            code="request_timeout").body()
            data = json.dumps(body).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
            self.transport.close()

    def connection_lost(self, exc):
        self.headers_timer.cancel()
        super().connection_lost(exc)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling ours when a signal begins the stop."""

    def __init__(self, config, owner):
        super().__init__(config)
        self.owner = owner

    def handle_exit(self, sig, frame):
        self.owner.begin_stop()
        super().handle_exit(sig, frame)


class Bounded:
    """ASGI middleware: at most max_requests requests in progress; past it, 503 with Retry-After, at once (a client
    should come back later, not wait on a connection the server cannot serve)."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = self.server
        if server.in_progress >= server.max_requests:
            error = APIError(503, f"the server is answering {server.max_requests} requests, its limit; retry in a "
                                  "second", code="server_busy", headers={"Retry-After": "1"})
            return await error.response()(scope, receive, send)
        server.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            server.in_progress -= 1


class PreflightCORS(CORSMiddleware):
    """Starlette's CORS middleware, answering a preflight as this server always has: 204 with the methods of the path,
    and from an origin it does not allow no preflight answer at all (the route's own 405)."""

    async def __call__(self, scope, receive, send):
        headers = Headers(scope=scope)
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if not preflight or "origin" not in headers:
            return await super().__call__(scope, receive, send)
        if not self.is_allowed_origin(headers["origin"]):
            return await self.app(scope, receive, send)
        allowed = self.preflight_response(request_headers=headers).headers
        method = "POST" if scope["path"].rstrip("/") in ("/v1/completions", "/v1/chat/completions") else "GET"
        response = Response(status_code=204, headers={
            **{k: v for k, v in allowed.items() if k.startswith("access-control-") or k == "vary"},
            "access-control-allow-methods": f"{method}, OPTIONS"})
        await response(scope, receive, send)


def _log_to_stderr(name):
    import logging
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# -----------------------------------------------------------------------------
# an answer

class Answer:
    """One request's answer, as its job's tokens come: text pieces with the log-probabilities of their tokens, the
    finish reason and the token count; whole (JSON) or as server-sent events."""

    def __init__(self, server, plan, job, request):
        self.server, self.plan, self.job, self.request = server, plan, job, request
        self.engine = server.engine
        self.text = self.engine.text(job, plan.stop, plan.chat)
        self.finish_reason, self.n_tokens = "length", 0
        kind = "chat.completion" if plan.chat else "text_completion"
        self.head = {"id": f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                     "created": int(time.time()), "model": server.name}
        # where the next token's text starts in the choice's text, and the tokens before it (its text is decoded
        # after them); with echo, the prompt's tokens come first
        self.offset = 0 if plan.echo else len(plan.prompt_text or "")
        self.before = [] if plan.echo else list(job.ids)

    async def tokens(self):
        """The job's ids as the Batcher makes them, waited for on the event loop. The job ends with the answer, when
        the client leaves, or when the stop's grace period is over (the answer is cut: finish_reason "length")."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        self.job.wake = lambda: loop.call_soon_threadsafe(ready.set)
        checked = time.monotonic()
        try:
            while True:
                if time.monotonic() - checked > 0.25:  # a client gone: its row is freed for others
                    checked = time.monotonic()
                    if await self.request.is_disconnected():
                        return
                try:
                    t = self.job.out.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if not self.job.out.empty():
                        continue
                    deadline = self.server.deadline
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    wait = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                    try:
                        async with asyncio.timeout(wait):  # no task per wait, as wait_for makes
                            await ready.wait()
                    except TimeoutError:
                        pass
                    continue
                if t is None:
                    break
                yield t
        finally:
            self.job.cancelled.set()
        if self.job.error:
            raise APIError(500, f"generation failed: {self.job.error}")

    async def pieces(self):
        """(text, [(token, (logprob, top))]) as text is released: the tokens' log-probabilities ride with the text
        that releases them. A chat reply loses its leading whitespace, as --chat's does."""
        scored, started = [], not self.plan.chat
        tokens = self.tokens()
        try:
            async for t in tokens:
                self.n_tokens += 1
                if t in self.job.end_ids:
                    self.finish_reason = "stop"
                if self.plan.logprobs is not None:  # an end token's too, as OpenAI's (its text is "")
                    scored.append((t, self.job.token_logprobs[self.n_tokens - 1]))
                piece = self.text.push(t)
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if self.text.stopped:
                    self.finish_reason = "stop"
                if piece:
                    yield piece, scored
                    scored = []
                if self.text.done:
                    break
        finally:
            await tokens.aclose()
        piece = self.text.flush()
        piece = piece if started else piece.lstrip()
        if piece or scored:
            yield piece, scored

    def logprobs(self, scored):
        """OpenAI's layout of the log-probabilities of tokens [(id, (logprob, top) or None)], or None where the
        request asked for none."""
        if self.plan.logprobs is None:
            return None
        entries = []
        for t, s in scored:
            text = self.engine.token_text(t, self.before)
            top = None if s is None else [(self.engine.token_text(a, self.before), v) for a, v in s[1]]
            entries.append((text, None if s is None else s[0], top))
            self.before = (self.before + [t])[-4:]
        if self.plan.chat:
            entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode())}  # noqa: E731
            return {"content": [{**entry(text, lp), "top_logprobs": [entry(a, v) for a, v in top]}
                                for text, lp, top in entries], "refusal": None}
        offsets = []
        for text, _, _ in entries:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else dict(reversed(top)) for _, _, top in entries],  # tokens of
                "text_offset": offsets}  # one text (e.g. bytes of a character: U+FFFD) keep the best value

    def echoed(self):
        """With echo (completions): the prompt's text and its tokens' log-probabilities (the first has none)."""
        scored = list(zip(self.job.ids, self.job.prompt_logprobs or [None] * len(self.job.ids)))
        return self.plan.prompt_text, self.logprobs(scored)

    def choice(self, text, finish=None, logprobs=None, delta=False):
        if not self.plan.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def usage(self):
        n = len(self.job.ids)
        return {"prompt_tokens": n, "completion_tokens": self.n_tokens, "total_tokens": n + self.n_tokens}

    async def whole(self):
        """The answer as one JSON object."""
        text, scored = "", []
        async for piece, tokens in self.pieces():
            text += piece
            scored += tokens
        logprobs = None
        if self.plan.echo:  # the prompt first, in text and log-probabilities
            echo_text, logprobs = self.echoed()
            text = echo_text + text
        answer = self.logprobs(scored)
        if logprobs and answer:
            logprobs = {k: v + answer[k] for k, v in logprobs.items()}
        return {**self.head, "choices": [self.choice(text, self.finish_reason, logprobs or answer)],
                "usage": self.usage()}

    async def events(self):
        """The answer as server-sent events: a chunk per piece of text (with echo, the prompt's first), then the
        finish reason, usage if asked, [DONE]; an error after the first chunk is the last event, as OpenAI's."""
        head = {**self.head, "object": "chat.completion.chunk" if self.plan.chat else "text_completion"}
        event = lambda data: f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"  # noqa: E731
        echo = self.plan.echo
        try:
            if self.plan.chat:
                yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            async for piece, scored in self.pieces():
                if echo:  # the prompt's log-probabilities are there once a token is
                    yield event({**head, "choices": [self.choice(*self.echoed_piece())]})
                    echo = False
                yield event({**head, "choices": [self.choice(piece, logprobs=self.logprobs(scored), delta=True)]})
            if echo:
                yield event({**head, "choices": [self.choice(*self.echoed_piece())]})
            yield event({**head, "choices": [self.choice("", self.finish_reason, delta=True)]})
            if (self.plan.fields.get("stream_options") or {}).get("include_usage"):
                yield event({**head, "choices": [], "usage": self.usage()})
            yield event("[DONE]")
        except APIError as e:
            yield event(e.body())

    def echoed_piece(self):
        text, logprobs = self.echoed()
        return text, None, logprobs


def serve(sampler, model, tok, args, family, template, decode_step=None):
    """python sample.py --serve: the server on --host:--port until Ctrl-C or SIGTERM, which let the answers in
    progress finish within --grace_period seconds (SampleError where it cannot listen there). sampler: sample.py's
    module (its Engine, template and settings), as support/batching.py takes it; support/ imports no script."""
    if template is None:  # no --template: the checkpoint's or the family's; without one only completions work
        try:
            template = sampler.resolve_template(None, tok, family)
        except SampleError as e:
            log(f"sample.py: warning: {e}; /v1/chat/completions will refuse")
    # else every request that sends no system message would be refused
    check_system(tok, template, args.system, sampler.encode_turn)
    engine = sampler.Engine(model, tok, template=template, system=args.system,
                            plain_settings=sampler.generation_settings(args, family, chat=False),
                            chat_settings=sampler.generation_settings(args, family, chat=True),
                            max_new_tokens=args.max_new_tokens, seed=args.seed, max_batch=args.max_batch,
                            decode_step=decode_step or sampler.decode_one)
    try:
        server = ModelServer(
            engine, host=args.host, port=args.port, name=os.path.basename(os.path.normpath(args.ckpt)),
            allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
            grace_period=args.grace_period, max_requests=args.max_requests)
    except OSError as e:  # port taken, address not on this machine
        engine.close()
        raise SampleError(f"--host={args.host} --port={args.port}: cannot listen there ({e.strerror or e})")
    host, port = server.server_address[:2]
    log(f"serving {server.name} at http://{host if ':' not in host else f'[{host}]'}:{port}/ (chat page; the API "
        f"under /v1) (chat template {template}, batches of up to {args.max_batch}, KV cache of up to "
        f"{engine.max_positions} positions, {args.max_requests} requests at once); Ctrl-C stops")
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # SIGTERM (docker stop, systemd, kill) stops it as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the signal that stopped it, raised again once the server has stopped
        pass
    finally:
        server.server_close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    log("stopped")
