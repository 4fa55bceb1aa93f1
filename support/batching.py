"""support/batching.py: continuous batching. Used by support/server.py through sample.py --serve (sample.Engine) and by
bench.py --mode=serve; what it adds to sample.py's one-call `generate`: the generation behind the OpenAI-compatible
server, where requests join and leave one running batch between decode steps.

One thread, the Batcher's, owns the model. A request becomes a Job; jobs waiting at the same time start a batch
together, and jobs that arrive while it decodes join it at the next step (Slots: continuous batching), each row with
its own settings; each row's tokens flow back through its Job's queue and become text with a TextStream, as in the
terminal. The sampling itself (filters, penalties, the decode step) is sample.py's, handed in as `sampler`.
"""
import collections
import queue
import sys
import threading
import time

import torch

from support.memory import kv_budget
from support.sample_checks import SETTINGS


def token_logprobs(logits, chosen, top):
    """Log-probabilities as OpenAI's API gives them: log-softmax in fp32 of the model's logits (R, V), before any
    sampling setting -> per row, (the chosen token's, [(id, log-probability) of the `top` most likely tokens])."""
    logprobs = logits.float().log_softmax(dim=-1)
    picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    if not top:
        return [(p, []) for p in picked]
    values, ids = logprobs.topk(top, dim=-1)
    return [(p, list(zip(i, v))) for p, i, v in zip(picked, ids.tolist(), values.tolist())]


class Job:
    """One request's generation: prompt ids and sampling settings in; out of it, the generated ids (a queue the
    Batcher fills, None last) and, where asked, their log-probabilities (token_logprobs) and the prompt's
    (prompt_logprobs, with echo). max_new_tokens may be 0: the prompt's log-probabilities alone."""

    def __init__(self, ids, max_new_tokens, end_ids, sampling, generator, logprobs=None, echo=False):
        self.ids, self.max_new_tokens, self.end_ids = ids, max_new_tokens, set(end_ids)
        self.sampling, self.generator = sampling, generator  # temperature, top_k, top_p, repetition_penalty
        self.logprobs, self.echo = logprobs, echo  # alternatives per token (None: no log-probabilities)
        self.token_logprobs, self.prompt_logprobs = [], None  # token_logprobs' (logprob, top) per token
        self.out = queue.SimpleQueue()
        self.wake = None  # called after each put: whoever waits on out without blocking a thread
        self.cancelled = threading.Event()  # set by the request's side: a stop string ended it, or the client left
        self.error = None
        self.submitted = time.monotonic()

    def put(self, token):
        self.out.put(token)
        if self.wake:
            self.wake()


class Slots:
    """Continuous batching: the rows of one KV cache, which requests join between decode steps and leave when they
    end, so a request that arrives while others decode starts at the next step instead of after them.

    Every row writes its next token at the same cache column, `col`. A prompt of P tokens joins a row by a prefill of
    that row alone into columns col - P .. col - 1 (the first prompts of a batch set col to the longest of them), so
    it can join while P <= col and col + its max_tokens fits the context. Its positions start at 0 as a prompt's alone
    do, and its own row of the mask hides what an earlier request left there. The cache grows, in rows and columns,
    as requests need it, never past max_positions (rows x columns), and is freed when the last row has ended."""

    def __init__(self, model, max_rows, decode_step=None, max_positions=None, *, sampler):
        self.model, self.max_rows, self.sampler = model, max_rows, sampler
        self.decode_step = decode_step or sampler.decode_one
        self.max_positions = max_positions or max_rows * model.args.max_seq_len
        self.param = next(model.parameters())
        self.jobs = []  # the job of each row in use, None where one has ended; trailing free rows are dropped
        self.col, self.size = 0, (0, 0)  # the column written next; the cache's (rows, columns)

    def live(self):
        return [(r, job) for r, job in enumerate(self.jobs) if job is not None]

    def can_join(self, job, joining=()):
        """Whether job can join the running batch now, after the jobs `joining` at this step."""
        rows = len(self.jobs) + max(0, len(joining) + 1 - self.jobs.count(None))
        columns = max(self.size[1], *(self.col + j.max_new_tokens for j in (*joining, job)))
        return (bool(self.live()) and rows <= self.max_rows and len(job.ids) <= self.col
                and columns <= self.model.args.max_seq_len and rows * columns <= self.max_positions)

    def fit_together(self, jobs):
        """Whether jobs can start a batch together: the longest prompt and the most new tokens in the context."""
        columns = max(len(j.ids) for j in jobs) + max(j.max_new_tokens for j in jobs)
        return (len(jobs) <= self.max_rows and columns <= self.model.args.max_seq_len
                and len(jobs) * columns <= self.max_positions)

    @torch.inference_mode()
    def join(self, jobs):
        """Prefill each job into a free row; its first token comes out of the next step. No row running: jobs start
        a batch, and must fit the context together (the longest prompt + the most new tokens)."""
        if not self.live():
            self.jobs, self.col = [], max(len(job.ids) for job in jobs)
        for job in jobs:
            r = self.jobs.index(None) if None in self.jobs else len(self.jobs)
            self.jobs[r:r + 1] = [job]
            self._grow(len(self.jobs), self.col + job.max_new_tokens)
            self._prefill(r, job)

    def _grow(self, rows, columns):
        """The cache and the rows' state at least this big; columns at least double, up to the context."""
        if rows <= self.size[0] and columns <= self.size[1]:
            return
        old_rows, old_columns = self.size
        rows = max(rows, old_rows)
        columns = max(columns, min(2 * old_columns, self.model.args.max_seq_len, self.max_positions // rows),
                      old_columns)
        self.model.setup_cache(rows, columns, dtype=self.param.dtype, device=self.param.device, keep=True)
        V, device = self.model.args.vocab_size, self.param.device
        grown = dict(mask=torch.zeros(rows, columns, dtype=torch.bool, device=device),
                     next_pos=torch.zeros(rows, 1, dtype=torch.long, device=device),
                     logits=torch.zeros(rows, V, device=device), seen=torch.zeros(rows, V, dtype=torch.bool,
                                                                                  device=device),
                     counts=torch.zeros(rows, V, device=device))  # of each token in the answer so far
        for name, t in grown.items():
            if old_rows:
                old = getattr(self, name)
                t[:old.size(0), :old.size(1)] = old
            setattr(self, name, t)
        self.size = (rows, columns)

    def _prefill(self, r, job):
        P, start = len(job.ids), self.col - len(job.ids)
        self.mask[r] = False
        self.mask[r, start:self.col] = True
        self.next_pos[r] = P
        idx = torch.tensor([job.ids], dtype=torch.long, device=self.param.device)
        self.seen[r] = False
        self.seen[r, idx[0]] = True
        self.counts[r] = 0
        alone = start == 0  # no padding before it: the plain causal path, as generate takes for one prompt
        score = job.echo and job.logprobs is not None  # the prompt's log-probabilities need every position's logits
        with self.model.cache_rows(r, r + 1):
            logits, _ = self.model(idx, start_pos=start, positions=None if alone else torch.arange(P)[None].to(idx),
                                   key_padding_mask=None if alone else self.mask[r:r + 1, :self.col],
                                   last_only=not score)
        self.logits[r] = logits[0, -1].float()
        if score:  # the prompt's own, from the full logits: each scores the next token
            job.prompt_logprobs = [None] + token_logprobs(logits[0, :-1], idx[0, 1:], job.logprobs)

    @torch.inference_mode()
    def sample(self):
        """The next token of every row in use (B,), each with its job's settings (free rows: greedy, unused)."""
        n = len(self.jobs)
        settings = [job.sampling if job else dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.0)
                    for job in self.jobs]
        logits = self.logits[:n]
        penalty = [s["repetition_penalty"] for s in settings]
        if any(p != 1.0 for p in penalty):
            penalty = torch.tensor(penalty, dtype=torch.float32, device=logits.device)[:, None]
            logits = self.sampler.apply_repetition_penalty(logits, self.seen[:n], penalty)
        presence, frequency = ([s.get(k, 0) for s in settings] for k in ("presence_penalty", "frequency_penalty"))
        if any(presence) or any(frequency):  # OpenAI's penalties, on the answer's tokens (as vLLM)
            per_row = lambda v: torch.tensor(v, dtype=torch.float32, device=logits.device)[:, None]  # noqa: E731
            counts = self.counts[:n]
            logits = logits - per_row(frequency) * counts - per_row(presence) * (counts > 0)
        return self.sampler.sample_rows(logits, *([s[k] for s in settings] for k in ("temperature", "top_k", "top_p")),
                           [job.generator if job else None for job in self.jobs])

    def logprobs(self, token):
        """{row: (logprob, top)} of the sampled tokens (B,) in the rows whose job asks for log-probabilities."""
        rows = [r for r, job in self.live() if job.logprobs is not None]
        if not rows:
            return {}
        top = max(self.jobs[r].logprobs for r in rows)
        scored = token_logprobs(self.logits[rows], token[rows], top)
        return {r: (p, alternatives[:self.jobs[r].logprobs]) for r, (p, alternatives) in zip(rows, scored)}

    def leave(self, r):
        self.jobs[r] = None
        while self.jobs and self.jobs[-1] is None:
            self.jobs.pop()

    @torch.inference_mode()
    def step(self, token):
        """Feed the sampled tokens of the rows still in use (one decode step); the cache goes when none is."""
        n = len(self.jobs)
        if not n:
            return self.clear()
        token = token[:n, None]
        self.seen[:n].scatter_(1, token, True)
        self.counts[:n].scatter_add_(1, token, torch.ones_like(token, dtype=self.counts.dtype))
        self.mask[:n, self.col] = True
        padded = not bool(self.mask[:n, :self.col + 1].all())  # no padding anywhere: the plain causal path
        self.logits[:n] = self.decode_step(self.model, token, self.col, self.next_pos[:n] if padded else None,
                                           self.mask[:n, :self.col + 1] if padded else None).float()
        self.next_pos[:n] += 1
        self.col += 1

    def clear(self):
        self.model.clear_cache()
        self.jobs, self.col, self.size = [], 0, (0, 0)
        self.mask = self.next_pos = self.logits = self.seen = self.counts = None


class Batcher:
    """The one thread that runs the model. It waits for a job, then until that job has waited `wait` seconds for
    others (up to max_batch), and starts the oldest waiting jobs that fit the context together as a batch (Slots).
    While the batch decodes, jobs that arrive join it at the next step where they fit (oldest first: one that cannot
    join yet holds back those after it), each row with its own settings. A row ends at an end id, its max_tokens, a
    stop string or its client gone. A failing step fails the jobs of its batch, not the server."""

    def __init__(self, model, max_batch=8, wait=0.01, decode_step=None, max_positions=None, *, sampler):
        self.model, self.decode_step, self.sampler = model, decode_step, sampler
        self.max_batch, self.wait, self.max_positions = max_batch, wait, max_positions
        self.waiting, self.closed = [], False
        self.cv = threading.Condition()
        self.batches = collections.deque(maxlen=1000)  # [most rows at once, steps] of the latest batches
        self.thread = threading.Thread(target=self.run, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, job):
        with self.cv:
            self.waiting.append(job)
            self.cv.notify()
            if self.closed:
                self.turn_away()

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join()
        with self.cv:
            self.turn_away()

    def turn_away(self):
        for job in self.waiting:
            job.error = "the server is shutting down"
            job.put(None)
        self.waiting = []

    def next_jobs(self, slots):
        """The jobs to start a batch (waiting for one when none runs), or to join the running one; None: closed."""
        with self.cv:
            while not self.closed and not slots.live():
                self.waiting = [j for j in self.waiting if not j.cancelled.is_set()]  # clients that left waiting
                if self.waiting:
                    break
                self.cv.wait(0.5)
            if not slots.live():
                deadline = self.waiting[0].submitted + self.wait if self.waiting else 0
                while not self.closed and len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                    self.cv.wait(max(deadline - time.monotonic(), 0))
            if self.closed:
                return None
            jobs, running = [], bool(slots.live())
            for job in self.waiting:  # oldest first
                if job.cancelled.is_set():
                    continue
                if running and not slots.can_join(job, jobs):  # in order: it holds back the ones after it
                    break
                if running or slots.fit_together(jobs + [job]):
                    jobs.append(job)
            self.waiting = [j for j in self.waiting if all(j is not b for b in jobs) and not j.cancelled.is_set()]
            return jobs

    def run(self):
        slots = Slots(self.model, self.max_batch, self.decode_step, self.max_positions, sampler=self.sampler)
        record, produced = None, {}
        while (jobs := self.next_jobs(slots)) is not None:
            try:
                if jobs:
                    if not slots.live():
                        record = [0, 0]
                        self.batches.append(record)  # before any row ends: a client with its answer finds it
                    slots.join(jobs)
                    produced.update((id(job), 0) for job in jobs)
                    jobs = []  # in the batch now: a failure below fails them with it
                    for r, job in slots.live():  # max_tokens 0: the prompt's log-probabilities were all it asked
                        if job.max_new_tokens == 0:
                            slots.leave(r)
                            del produced[id(job)]
                            job.put(None)
                    if not slots.live():
                        slots.clear()
                if not slots.live():
                    continue
                record[0] = max(record[0], len(slots.live()))
                self.decode_one_step(slots, produced)
                record[1] += 1
            except Exception as e:  # e.g. out of memory: these requests get a 500, the server goes on
                failed = jobs + [job for job in slots.jobs if job is not None and job not in jobs]
                print(f"sample.py: serve: a batch of {len(failed)} failed: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
                for job in failed:
                    job.error = f"{type(e).__name__}: {e}"
                    job.put(None)
                slots.clear()
                produced.clear()
        slots.clear()

    def decode_one_step(self, slots, produced):
        """Each row's next token to its job; rows that end leave; one decode step for the rest."""
        token = slots.sample()
        out, scored = token.tolist(), slots.logprobs(token)
        for r, job in slots.live():
            ended = job.cancelled.is_set()
            if not ended:
                if r in scored:  # before the token: whoever takes it finds its log-probability there
                    job.token_logprobs.append(scored[r])
                job.put(out[r])
                produced[id(job)] += 1
                ended = out[r] in job.end_ids or produced[id(job)] == job.max_new_tokens
            if ended:
                slots.leave(r)
                del produced[id(job)]
                job.put(None)
        slots.step(token)


class Engine:
    """What an OpenAI-style server needs of generation (support/server.py speaks the HTTP around it): prompts and chat
    turns as ids, with the server's defaults (chat template, system prompt, settings, seed); a Job per request, run by
    the Batcher; ids back to text.

    sampler: what generates, sample.py's module (its sampling functions, chat end ids and stop strings, prompt
    encoding, TextStream; support/ imports no script): sample.Engine sets it."""
    sampler = None

    def __init__(self, model, tok, *, template=None, system=None, plain_settings=None, chat_settings=None,
                 max_new_tokens=256, seed=None, max_batch=8, batch_wait=0.01, decode_step=None):
        self.model, self.tok, self.template, self.system = model, tok, template, system
        s = self.sampler
        self.settings = {False: plain_settings or s.PLAIN_GENERATION_DEFAULTS}
        self.settings[True] = chat_settings or self.settings[False]
        self.max_new_tokens = max_new_tokens
        self.end_ids = {False: [tok.eos_id], True: s.chat_end_ids(tok, template)}
        self.stop = {False: [], True: s.chat_stop_strings(template)}
        self.device = next(model.parameters()).device
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.max_positions = kv_budget(model, max_batch, self.device)
        self.batcher = Batcher(model, max_batch, batch_wait, decode_step, self.max_positions, sampler=s)
        self.ranges = SETTINGS  # the values each setting takes, which requests are checked against

    def prompt_ids(self, text: str) -> list[int]:
        return self.sampler.encode_prompt(self.tok, text)

    def chat_ids(self, turns) -> list[int]:
        """Chat turns rendered with the template, ending where the assistant's reply starts (the server's system
        prompt unless the turns hold one); ValueError where the template refuses them."""
        system = None if any(t["role"] == "system" for t in turns) else self.system
        return self.sampler.encode_turn(self.tok, self.template, turns, system)

    def submit(self, ids, max_new_tokens, sampling, chat, seed=None, logprobs=None, echo=False) -> Job:
        """Queue a request: seed, else the server's generator (--seed), else torch's."""
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed % 2**64)
        job = Job(ids, max_new_tokens, self.end_ids[chat], sampling, generator, logprobs, echo)
        self.batcher.submit(job)
        return job

    def text(self, job, stop, chat):
        """The job's tokens to text: its stop strings, and a chat template's."""
        return self.sampler.TextStream(self.tok, job.ids, list(stop) + self.stop[chat], job.end_ids)

    def token_text(self, t, before=()) -> str:
        """A token's own text, decoded after the tokens before it (sentencepiece's leading space kept)."""
        before = list(before)[-4:]
        head, text = self.tok.decode(before), self.tok.decode(before + [t])
        return text[len(head):] if text.startswith(head) else self.tok.decode([t])

    def close(self):
        self.batcher.close()
