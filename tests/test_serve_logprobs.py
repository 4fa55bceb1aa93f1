"""sample.py --serve's log-probabilities, as OpenAI's API defines them, and evaluation through lm-evaluation-harness.

completions: `logprobs` N (the N most likely alternatives of each token) with `echo` (the prompt's tokens too, the
first without one; max_tokens 0 allowed); chat: `logprobs: true` with `top_logprobs`. Each value is the model's
log-softmax in fp32, before any sampling setting. lm-eval's local-completions backend scores a multiple-choice task
the test writes (a task YAML over a local JSONL file) against the server, and its own hf backend scores the same task
on the convert.py native-to-hf export of the checkpoint: the same accuracy, log-likelihoods within 1e-4. lm-eval sends
4 requests at a time there, so the server scores prompts that join a running batch too.
"""
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import convert
import prepare
import sample
import test_sample as ts
from test_serve import client_for, raw, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [256, 104, 105, 32, 116, 104, 101, 114, 101]  # <s> "hi there"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = ts.hf_to_checkpoint(ts.tiny_hf_llama(2), tmp_path_factory.mktemp("logprobs"))
    ts.byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def server(ckpt):
    s = start_server(ckpt)
    yield s
    stop_server(s)


def reference(model, ids):
    """log-softmax in fp32 of our forward pass over the whole sequence: (T, V), row i scores token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def check_position(ref_row, token, logprob, top, n):
    """One token's log-probability and its alternatives against the reference row. Alternatives are keyed by text,
    and several byte tokens share a text (U+FFFD), so each value must be one of the top n, the best among them."""
    assert logprob == pytest.approx(ref_row[token].item(), abs=1e-5)
    best = ref_row.topk(n).values.tolist()
    values = sorted(top.values(), reverse=True)
    assert values[0] == pytest.approx(best[0], abs=1e-5)
    assert all(any(abs(v - b) < 1e-5 for b in best) for v in values)


def test_completion_logprobs_are_the_log_softmax_of_the_forward_pass(server):
    """echo with logprobs 3: the prompt's tokens (the first with none) then the answer's, each the log-softmax of
    our forward pass over prompt + answer; the text is the prompt's then the answer's, text_offset where each token
    starts in it; a repetition penalty changes the answer but not what its tokens' log-probabilities are."""
    prompt = [256, 97, 98]  # <s> "ab"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 3, "echo": True,
            "repetition_penalty": 1.8}
    status, _, text = raw(server, "POST", "/v1/completions", body)
    assert status == 200, text
    choice = json.loads(text)["choices"][0]
    answer = list(sample.generate(server.model, prompt, 12, temperature=0, repetition_penalty=1.8, eos_id=257))
    assert answer != list(sample.generate(server.model, prompt, 12, temperature=0, eos_id=257))
    ids = prompt + answer
    ref = reference(server.model, ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        check_position(ref[i - 1], ids[i], lp["token_logprobs"][i], lp["top_logprobs"][i], 3)
    assert choice["text"] == server.tok.decode(prompt) + server.tok.decode([t for t in answer if t != 257])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert "".join(lp["tokens"]) == choice["text"]
    assert any(lp["token_logprobs"][i] < max(lp["top_logprobs"][i].values()) - 1e-6  # not the model's first choice
               for i in range(len(prompt), len(ids)))


def test_echo_with_max_tokens_0_scores_the_prompt_alone(server):
    """What lm-eval's loglikelihood requests need: the prompt's log-probabilities, no answer."""
    status, _, text = raw(server, "POST", "/v1/completions", {"prompt": "hi there", "max_tokens": 0, "logprobs": 0,
                                                               "echo": True})
    assert status == 200, text
    out = json.loads(text)
    ref = reference(server.model, PROMPT)
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == "hi there" and out["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))],
                                                     abs=1e-5)
    assert lp["top_logprobs"][1:] == [{}] * (len(PROMPT) - 1)  # logprobs 0: the chosen tokens' alone


def test_prompts_scored_while_a_batch_decodes_score_as_alone(ckpt, server):
    """Scoring requests (echo, max_tokens 0 and 1, as lm-eval sends them) that join a batch while a long answer
    decodes get the log-probabilities they get alone: their prefill is their own row's."""
    from test_serve import SlowModel

    asks = [{"prompt": [256] + list(f"score {i} please".encode()), "max_tokens": i % 2, "logprobs": 1, "echo": True,
             "temperature": 0} for i in range(4)]
    alone = [json.loads(raw(server, "POST", "/v1/completions", a)[2])["choices"][0]["logprobs"] for a in asks]
    slow = start_server(ckpt, model=SlowModel(server.model, 0.02))
    try:
        events, got = [], [None] * len(asks)
        long = threading.Thread(target=lambda: events.append(raw(slow, "POST", "/v1/completions", {
            "prompt": "ab", "max_tokens": 100, "temperature": 0, "stream": True})))
        long.start()
        while not slow.batcher.batches or slow.batcher.batches[-1][1] < 20:  # decoding, its column past the prompts
            time.sleep(0.02)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, json.loads(raw(
            slow, "POST", "/v1/completions", asks[i])[2])["choices"][0]["logprobs"])) for i in range(len(asks))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        long.join(120)
        assert slow.batcher.batches[0][0] > 1  # they did join the long answer's batch
    finally:
        stop_server(slow)
    for a, b in zip(got, alone):
        assert a["tokens"] == b["tokens"] and a["token_logprobs"][0] is None
        assert a["token_logprobs"][1:] == pytest.approx(b["token_logprobs"][1:], abs=1e-5)


def test_streamed_logprobs_are_the_same_as_whole(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True}
    whole = json.loads(raw(server, "POST", "/v1/completions", body)[2])["choices"][0]
    events = raw(server, "POST", "/v1/completions", {**body, "stream": True})[2].split("\n\n")
    chunks = [json.loads(e[6:])["choices"][0] for e in events if e.startswith("data: {")]
    got = {k: sum((c["logprobs"][k] for c in chunks if c["logprobs"]), []) for k in whole["logprobs"]}
    assert got == whole["logprobs"]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_logprobs_through_the_openai_client(ckpt, server):
    """The official client's types: completions' logprobs with echo, chat's logprobs.content with top_logprobs,
    each against our forward pass."""
    client = client_for(server)
    got = client.completions.create(model="tiny", prompt="hi there", max_tokens=4, temperature=0, logprobs=2, echo=True)
    answer = list(sample.generate(server.model, PROMPT, 4, temperature=0, eos_id=257))
    ref = reference(server.model, PROMPT + answer)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([ref[i, t].item() for i, t in enumerate((PROMPT + answer)[1:])],
                                                  abs=1e-5)
    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3)
    tok = prepare.load_tokenizer(ckpt)
    prompt = prepare.encode_chat(tok, sample.resolve_template(None, tok, "llama"), messages,
                                 add_generation_prompt=True)[0]
    answer = list(sample.generate(server.model, prompt, 5, temperature=0, eos_id=sample.chat_end_ids(tok, "chatml")))
    ref = reference(server.model, prompt + answer)
    content = chat.choices[0].logprobs.content
    assert len(content) == len(answer)
    for k, (entry, t) in enumerate(zip(content, answer)):
        row = ref[len(prompt) + k - 1]
        assert entry.logprob == pytest.approx(row[t].item(), abs=1e-5)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-5)
        assert bytes(entry.bytes).decode() == entry.token
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


# -----------------------------------------------------------------------------
# lm-evaluation-harness

QUESTIONS = [("The sky is", ["blue", "green", "loud"], 0), ("Two plus two is", ["four", "five"], 0),
             ("Fire is", ["cold", "hot", "wet", "square"], 1), ("A cat says", ["woof", "meow"], 1),
             ("Ice is", ["hot", "cold"], 1), ("The sun rises in the", ["west", "east", "north"], 1),
             ("Grass is", ["green", "red"], 0), ("Fish live in", ["trees", "water", "sand"], 1)]
TASK = """task: nanollama_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def lm_eval(model, model_args, tasks_dir, out, *flags):
    """lm-eval's command line, offline: -> ({doc_id: [log-likelihood of each choice]}, accuracy)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                          "--tasks", "nanollama_tiny_mc", "--include_path", str(tasks_dir), "--batch_size", "1",
                          "--output_path", str(out), "--log_samples", *flags], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [results] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    [samples] = glob.glob(str(out / "**" / "samples_nanollama_tiny_mc_*.jsonl"), recursive=True)
    accuracy = json.loads(Path(results).read_text())["results"]["nanollama_tiny_mc"]["acc,none"]
    scores = {}
    for line in Path(samples).read_text().splitlines():
        s = json.loads(line)
        scores[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
    return scores, accuracy


@pytest.mark.slow
def test_lm_eval_scores_a_multiple_choice_task_against_the_server_as_its_hf_backend_does(ckpt, server, tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=data))
    convert.main(["native-to-hf", "--src", str(ckpt), "--dst", str(tmp_path / "hf")])
    hf = tmp_path / "hf"
    ours, our_accuracy = lm_eval("local-completions", f"base_url=http://127.0.0.1:{server.server_address[1]}"
                                 f"/v1/completions,model=tiny,tokenizer={hf},tokenizer_backend=huggingface,"
                                 "add_bos_token=True,num_concurrent=4",  # bos: as the hf backend's tokenizer does
                                 tmp_path / "tasks", tmp_path / "ours")
    theirs, their_accuracy = lm_eval("hf", f"pretrained={hf},dtype=float32", tmp_path / "tasks", tmp_path / "hf-out",
                                     "--device", "cpu")
    assert sorted(ours) == sorted(theirs) == list(range(len(QUESTIONS)))
    for doc in ours:
        assert len(ours[doc]) == len(QUESTIONS[doc][1])
        assert ours[doc] == pytest.approx(theirs[doc], abs=1e-4), doc
    assert our_accuracy == their_accuracy
    print(f"lm-eval: accuracy {our_accuracy} both ways; largest log-likelihood difference "
          f"{max(abs(a - b) for d in ours for a, b in zip(ours[d], theirs[d])):.2e}")
