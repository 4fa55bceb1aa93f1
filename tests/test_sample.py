"""Tests for sample.py: parity with transformers' generate, KV cache, batching, sampling, quantisation, CLI."""
import contextlib
import copy
import json

import pytest
import torch

import model as model_lib
import prepare
import sample
import support.device
import support.memory
from support import batching, quant

VOCAB = 260  # byte tokens 0..255 and 4 specials (see byte_tokenizer)


def tiny_hf_llama(n_kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.2 (not 0.02) spreads the logits so greedy choices are never near-ties
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=128,
                      rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def hf_to_checkpoint(hf, dst):
    """The HF model through convert.py hf-to-native, as users get their checkpoints."""
    import convert

    hf.save_pretrained(dst / "hf")
    convert.main(["hf-to-native", "--src", str(dst / "hf"), "--dst", str(dst / "ckpt")])
    return dst / "ckpt"


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from the converted checkpoint dir, checkpoint dir)."""
    hf = tiny_hf_llama(request.param)
    ckpt = hf_to_checkpoint(hf, tmp_path_factory.mktemp("ckpt"))
    return hf, model_lib.Transformer.from_checkpoint(ckpt).eval(), ckpt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tiny_hf_llama(2)
    return model_lib.Transformer.from_checkpoint(hf_to_checkpoint(hf, tmp_path_factory.mktemp("tiny"))).eval()


PROMPT = [1, 5, 9, 33, 70, 120]


def hf_greedy(hf, prompt, n, **kw):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(pair):
    hf, ours, _ = pair
    assert list(sample.generate(ours, PROMPT, 24, temperature=0)) == hf_greedy(hf, PROMPT, 24)


def test_repetition_penalty_greedy_matches_transformers(pair):
    hf, ours, _ = pair
    got = list(sample.generate(ours, PROMPT, 24, temperature=0, repetition_penalty=1.5))
    assert got == hf_greedy(hf, PROMPT, 24, repetition_penalty=1.5)
    assert got != list(sample.generate(ours, PROMPT, 24, temperature=0))  # the penalty did change something


@torch.inference_mode()
def test_cached_equals_uncached(tiny):
    cached = list(sample.generate(tiny, PROMPT, 20, temperature=0))
    tiny.clear_cache()
    seq = torch.tensor([PROMPT])
    for _ in range(20):  # full forward over the whole sequence every step, no cache
        nxt = tiny(seq)[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert cached == seq[0, len(PROMPT):].tolist()


def test_decode_layout_gives_the_same_logits_and_tokens(pair):
    """sample.py multiplies fp32 CPU linears in its C kernel when decoding: same greedy tokens as transformers, same
    logits."""
    import copy

    hf, ours, _ = pair
    moved = sample.decode_layout(copy.deepcopy(ours))
    kinds = {type(m).__name__ for m in moved.modules()}
    assert "DecodeLinear" in kinds and "Linear" not in kinds
    ids = torch.tensor([PROMPT])
    torch.testing.assert_close(moved(ids)[0], ours(ids)[0], rtol=1e-5, atol=1e-5)
    assert list(sample.generate(moved, PROMPT, 12, temperature=0)) == hf_greedy(hf, PROMPT, 12)
    rows = [[1, 5, 9], [4, 8, 15, 16, 23]]  # a batch decodes with two rows: the other branch
    assert list(sample.generate(moved, rows, 6, temperature=0)) == list(sample.generate(ours, rows, 6, temperature=0))


def test_batch_equals_one_by_one(tiny):
    rows = [[1, 5, 9], [1, 5, 9, 33, 70, 2, 3, 40], [4], [7, 7]]  # different lengths: left padding
    steps = list(sample.generate(tiny, rows, 12, temperature=0))
    batched = [list(col) for col in zip(*steps)]
    assert batched == [list(sample.generate(tiny, r, 12, temperature=0)) for r in rows]


def test_batch_rows_keep_their_own_sampling_settings(tiny):
    """Per-row settings (a server's requests in one batch): each row gets what it gets alone."""
    rows = [[1, 5, 9], [1, 5, 9, 33, 70, 2, 3, 40], [4, 8]]
    settings = [dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.0, seed=None),
                dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.0, seed=5),
                dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.5, seed=None)]
    per_row = {k: [s[k] for s in settings] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    generators = [None if s["seed"] is None else torch.Generator().manual_seed(s["seed"]) for s in settings]
    steps = list(sample.generate(tiny, rows, 12, generator=generators, **per_row))
    alone = [list(sample.generate(tiny, r, 12, **s)) for r, s in zip(rows, settings)]
    assert [list(col) for col in zip(*steps)] == alone
    assert alone[2] != list(sample.generate(tiny, rows[2], 12, temperature=0))  # the penalty did change row 2


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_requests_joining_a_decoding_batch_get_what_they_get_alone(pos_emb):
    """Continuous batching (sample.Slots, the server's): requests join a batch that is decoding, into new rows and
    into rows others have left (their keys still in the cache), with their own settings; each gets the tokens
    generate gives it alone."""
    import dataclasses
    torch.manual_seed(0)
    model = model_lib.Transformer(dataclasses.replace(model_lib.PRESETS["tiny"], pos_emb=pos_emb,
                                                      n_kv_heads=None if pos_emb == "alibi" else 2)).eval()
    with torch.no_grad():  # weights large enough that attention is sharp: a wrong position or mask changes tokens
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else None
    greedy = dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.0)
    asks = {0: [([1, 5, 9, 33, 70], 20, greedy)],  # step -> (prompt, max tokens, settings) joining then
            3: [([4, 8], 10, greedy), ([7] * 8, 6, dict(greedy, repetition_penalty=1.5))],
            9: [([2, 3, 5, 7], 10, dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.0, seed=5))]}
    slots, got, rows = batching.Slots(model, max_rows=3, sampler=sample), {}, []
    for step in range(40):
        for ids, n, settings in asks.get(step, []):
            gen = torch.Generator().manual_seed(settings["seed"]) if "seed" in settings else None
            job = batching.Job(ids, n, [], {k: settings[k] for k in greedy}, gen)
            assert not slots.live() or slots.can_join(job)
            slots.join([job])
            got[job] = (ids, n, settings, [])
        if not slots.live():
            break
        rows.append([r for r, _ in slots.live()])
        token = slots.sample()
        for r, job in slots.live():
            got[job][3].append(token[r].item())
            if len(got[job][3]) == job.max_new_tokens:
                slots.leave(r)
        slots.step(token)
    assert rows[3] == [0, 1, 2] and rows[9] == [0, 1, 2]  # the last one took the row the third left at step 9
    assert slots.size == (0, 0) and slots.col == 0  # the cache freed when the last row ended
    for ids, n, settings, tokens in got.values():
        assert tokens == list(sample.generate(model, ids, n, **settings)), (ids, settings)


def test_requests_join_only_within_the_kv_budget(tiny):
    """Slots never holds more KV-cache positions (rows x columns) than its budget: a request that would need more
    waits (can_join False) until rows leave or the batch ends."""
    greedy = dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.0)
    job = lambda n: batching.Job([1, 5], n, [], greedy, None)  # noqa: E731
    slots = batching.Slots(tiny, max_rows=4, max_positions=64, sampler=sample)
    assert not slots.fit_together([job(30)] * 3) and slots.fit_together([job(30)] * 2)
    slots.join([job(20)])
    assert slots.size == (1, 22)
    slots.step(slots.sample())
    assert slots.can_join(job(10)) and not slots.can_join(job(10), [job(10)])  # 2 x 22 fits 64, 3 x 22 does not
    assert not slots.can_join(job(40))  # 2 rows x 43 columns
    slots.join([job(10)])
    assert slots.size == (2, 32)  # columns double as far as the budget allows: 64 // 2
    slots.clear()


@torch.inference_mode()
def test_prefill_builds_the_last_positions_logits_only_with_the_same_tokens(tiny, monkeypatch):
    """generate's prefill and the server's (Slots) ask the head for the last position only: every forward of
    generation returns (B, 1, vocab) logits, never a (B, T, vocab) of the prompt; the tokens are those of a full
    forward over the whole sequence at every step (no cache)."""
    def uncached(prompt, n):
        seq = torch.tensor([prompt])
        for _ in range(n):
            seq = torch.cat([seq, tiny(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq[0, len(prompt):].tolist()

    rows = [PROMPT, [7, 3], PROMPT[:4]]  # lengths differ: left padded
    want = [uncached(r, 8) for r in rows]
    shapes, forward = [], model_lib.Transformer.forward

    def recording(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        shapes.append(tuple(logits.shape))
        return logits, loss
    monkeypatch.setattr(model_lib.Transformer, "forward", recording)
    assert [list(t) for t in zip(*sample.generate(tiny, rows, 8, temperature=0))] == want
    assert shapes and set(shapes) == {(3, 1, VOCAB)}
    shapes.clear()
    greedy = dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.0)
    slots, got = batching.Slots(tiny, max_rows=2, sampler=sample), [[], []]
    slots.join([batching.Job(rows[0], 8, [], greedy, None)])
    for step in range(8):
        if step == 2:  # joins a batch that is decoding: a prefill of its own row, after the others' columns
            slots.join([batching.Job(rows[1], 6, [], greedy, None)])
        token = slots.sample()
        for r, _ in slots.live():
            got[r].append(token[r].item())
        slots.step(token)
    slots.clear()
    assert got == [want[0], want[1][:6]]
    assert (1, 1, VOCAB) in shapes and all(shape[1] == 1 for shape in shapes)


def test_memory_budgets_count_each_rows_last_position_logits(tiny, monkeypatch):
    """kv_budget sets aside the next-token logits of each row it may hold (one position, as the prefill builds them):
    a server's max_batch rows, or a prompt file's rows of a known length; check_memory counts one sequence's."""
    a, per_position = tiny.args, support.memory.kv_bytes(tiny.args, 1, 4)
    per_row = support.memory.logits_bytes(a, 1, 4)
    assert per_row == a.vocab_size * 8  # fp32 logits out of the head and their fp32 copy
    memory = {"bytes": 0}
    monkeypatch.setattr(support.device, "available_memory", lambda device: memory["bytes"])
    memory["bytes"] = 2 * (1000 * per_position + 8 * per_row)  # half of what is available is the budget
    assert support.memory.kv_budget(tiny, 8, "cpu") == 1000  # 8 rows' logits set aside, 1000 positions left
    memory["bytes"] -= 2  # a byte less: a position fewer
    assert support.memory.kv_budget(tiny, 8, "cpu") == 999
    columns = 40
    memory["bytes"] = 2 * 5 * (columns * per_position + per_row)  # five rows of 40 columns and their logits
    assert support.memory.kv_budget(tiny, 16, "cpu", columns) == 5 * columns
    memory["bytes"] -= 2
    assert support.memory.kv_budget(tiny, 16, "cpu", columns) == 4 * columns
    with torch.device("meta"):
        weights = model_lib.Transformer(a).num_params() * 4
    memory["bytes"] = weights + support.memory.kv_bytes(a, a.max_seq_len, 4) + per_row
    support.memory.check_memory(a, "cpu", torch.float32, "ckpt")  # fits exactly
    memory["bytes"] -= 1
    with pytest.raises(support.memory.MemoryBudgetError, match=r"--ckpt=ckpt: .* parameters in float32 need"):
        support.memory.check_memory(a, "cpu", torch.float32, "ckpt")


def test_batch_row_stops_at_eos(tiny):
    rows = [[1, 5, 9], [4, 8]]
    greedy0 = list(sample.generate(tiny, rows[0], 3, temperature=0))
    eos = greedy0[2]  # row 0's third greedy token acts as eos
    k = greedy0.index(eos)
    steps = list(sample.generate(tiny, rows, 8, temperature=0, eos_id=eos))
    assert steps[k][0] == eos and all(s[0] is None for s in steps[k + 1:])
    assert [s[1] for s in steps] == list(sample.generate(tiny, rows[1], len(steps), temperature=0, eos_id=eos))


def test_single_prompt_stops_after_eos(tiny):
    greedy = list(sample.generate(tiny, PROMPT, 10, temperature=0))
    assert list(sample.generate(tiny, PROMPT, 10, temperature=0, eos_id=greedy[4])) == greedy[:greedy.index(greedy[4]) + 1]


def test_seeded_sampling_is_reproducible(tiny):
    run = lambda seed: list(sample.generate(tiny, PROMPT, 20, temperature=1.0, top_p=0.95, seed=seed))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy(tiny):
    greedy = list(sample.generate(tiny, PROMPT, 20, temperature=0))
    assert list(sample.generate(tiny, PROMPT, 20, temperature=1.5, top_k=1, seed=3)) == greedy


def test_extreme_but_valid_settings_sample_without_overflow(tiny):
    """A tiny temperature or repetition penalty must not turn the logits into inf and the probabilities into nan
    (in a server, that failed every request of the batch)."""
    greedy = list(sample.generate(tiny, PROMPT, 8, temperature=0))
    assert list(sample.generate(tiny, PROMPT, 8, temperature=1e-40, seed=1)) == greedy
    assert list(sample.generate(tiny, PROMPT, 8, temperature=1e-300, seed=1)) == greedy
    for penalty in (1e-300, 1e300):
        out = list(sample.generate(tiny, PROMPT, 8, temperature=0.8, repetition_penalty=penalty, seed=1))
        assert len(out) == 8 and all(0 <= t < VOCAB for t in out)


def test_prompt_plus_new_tokens_must_fit(tiny):
    with pytest.raises(ValueError, match="max_seq_len"):
        list(sample.generate(tiny, [1] * 100, 29, temperature=0))


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = sample.apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0]]  # present: positive divided, negative multiplied; absent kept


def test_top_k_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ours = sample.filter_logits(logits, top_k=10)
    assert torch.equal(ours.isinf(), TopKLogitsWarper(10)(None, logits.clone()).isinf())
    for p in (0.1, 0.5, 0.9):
        ours = sample.filter_logits(logits, top_p=p)
        assert torch.equal(ours.isinf(), TopPLogitsWarper(p)(None, logits.clone()).isinf()), p


# -----------------------------------------------------------------------------
# text streaming


class ByteTokenizer:
    """ids are UTF-8 bytes, like sentencepiece byte fallback: a lone byte of a multi-byte character decodes to
    U+FFFD."""
    eos_id, bos_id, pad_id = 256, None, None

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_stream_text_never_splits_multibyte_characters():
    text = "héllo → 世界 ok"
    pieces = list(sample.stream_text(ByteTokenizer(), iter(list(text.encode()) + [256, 65])))
    assert "".join(pieces) == text  # stops at eos (256): the 'A' after it is not printed
    assert not any("\ufffd" in p for p in pieces)


def test_stream_text_stops_at_stop_string_split_across_tokens():
    tokens = iter(list("answer: 42\nUSER: more".encode()))
    pieces = list(sample.stream_text(ByteTokenizer(), tokens, stop=["\nUSER:"]))
    assert "".join(pieces) == "answer: 42"
    assert not any("\n" in p for p in pieces)  # the held-back start of the stop string never leaked


# -----------------------------------------------------------------------------
# quantisation


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = quant.Int8Linear(64, 32).quantize_from(lin.weight)
    x = torch.randn(3, 64)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (32,)
    err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert err < 0.01


def test_int4_packs_two_nibbles_and_dequantises_groupwise():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = quant.Int4Linear(64, 8, group_size=16).quantize_from(w)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (8, 32) and q.scales.shape == (8, 4)
    deq = q.dequantize(torch.float32)
    # every weight within half a quantisation step of its group
    step = q.scales.repeat_interleave(16, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # unpacking by hand agrees with the module
    nib = torch.stack([q.weight & 15, q.weight >> 4], -1).reshape(8, 64).float()
    assert torch.allclose(deq, nib * step + q.zeros.repeat_interleave(16, dim=1))


def test_int4_group_size_must_divide_in_features(tiny):
    import copy

    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq .*64x64.*in_features 64"):
        quant.quantize_model(copy.deepcopy(tiny), "int4", group_size=48)


@pytest.mark.parametrize("widths,want", [([512, 1376], 32), ([4096, 11008], 128), ([576, 1536], 96),
                                         ([2048, 5632], 128), ([64, 192], 64), ([48, 80], 16), ([6, 10], 2),
                                         ([5, 7], None)])
def test_int4_picks_the_largest_group_that_divides_every_layer(widths, want):
    assert quant.int4_group_size(widths) == want


def test_int4_without_a_group_size_quantises_a_model_whose_widths_128_does_not_divide():
    args = model_lib.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=VOCAB, hidden_dim=96, max_seq_len=32)
    model = quant.quantize_model(model_lib.Transformer(args).eval(), "int4")  # 128 would refuse hidden 96
    assert {m.group_size for m in model.modules() if isinstance(m, quant.Int4Linear)} == {32}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_tied_embedding_gets_an_int8_output_layer_saved_and_loaded(tmp_path, mode):
    torch.manual_seed(0)
    args = model_lib.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=VOCAB, hidden_dim=128, max_seq_len=32,
                               tie_embeddings=True)
    full = model_lib.Transformer(args).eval()
    q = quant.quantize_model(copy.deepcopy(full), mode, group_size=16)
    assert isinstance(q.output, quant.Int8Linear) and quant.quantized_head(q)
    assert torch.equal(q.tok_embeddings.weight, full.tok_embeddings.weight)  # the lookup keeps the fp32 rows
    with torch.no_grad():
        want, got = full(torch.tensor([PROMPT]))[0], q(torch.tensor([PROMPT]))[0]
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    quant.save_quantized(q, tmp_path / "src", tmp_path / "q", mode, None, "llama")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["tied_head"] is True
    loaded, _ = sample.load_model(tmp_path / "q", "cpu", torch.float32)
    assert isinstance(loaded.output, quant.Int8Linear)
    assert list(sample.generate(loaded, PROMPT, 6, temperature=0)) == list(sample.generate(q, PROMPT, 6, temperature=0))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_saves_and_loads(tiny, tmp_path, mode):
    import copy

    q = quant.quantize_model(copy.deepcopy(tiny), mode, group_size=16)
    idx = torch.tensor([PROMPT])
    with torch.inference_mode():
        want, ref = q(idx)[0], tiny(idx)[0]
    # random weights are the worst case for 4 bits; a packing or scaling bug gives errors of 100% and more
    assert (want - ref).norm() / ref.norm() < (0.05 if mode == "int8" else 0.4)
    quant.save_quantized(q, tmp_path / "src", tmp_path / "q", mode, 16, "llama")  # src: no tokenizer to copy
    loaded, config = sample.load_model(tmp_path / "q", "cpu", torch.float32)
    assert config["quantization"] == {"mode": mode, "group_size": 16}
    linear_bytes = lambda m: sum(sample.model_bytes(x) for x in m.modules()
                                 if isinstance(x, (torch.nn.Linear, quant.Int8Linear, quant.Int4Linear)))
    # int8: 1 byte + a scale per row; int4 (group 16): half a byte + fp32 scale and zero per 16 weights
    assert linear_bytes(loaded) < linear_bytes(tiny) / (3.7 if mode == "int8" else 3.9)
    with torch.inference_mode():
        assert torch.equal(loaded(idx)[0], want)
    assert list(sample.generate(loaded, PROMPT, 8, temperature=0)) == list(sample.generate(q, PROMPT, 8,
                                                                                            temperature=0))


def quantized(mode, rows, cols, group_size=16, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    layer = quant.Int8Linear(cols, rows) if mode == "int8" else quant.Int4Linear(cols, rows, group_size)
    return layer.quantize_from(w), w


def kernels_built():
    if quant.quant_kernels() is None:  # a machine without a C compiler: the fallback's own test covers it
        pytest.skip("no C compiler here: the quantised matmul kernels could not be built")


# (rows, cols, group size): int4's vector loop takes 64 columns at a time when the group size is a multiple of 32;
# the others, and the columns left over, take its byte-at-a-time loop
@pytest.mark.parametrize("mode,rows,cols,group_size", [
    ("int8", 33, 64, None), ("int8", 7, 100, None), ("int8", 40, 4160, None),
    ("int4", 8, 64, 16), ("int4", 33, 96, 32), ("int4", 17, 256, 64), ("int4", 40, 512, 128), ("int4", 5, 4160, 64)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernels_compute_the_product_with_the_dequantised_weight(mode, rows, cols, group_size, m):
    kernels_built()
    layer, w = quantized(mode, rows, cols, group_size)
    x = torch.randn(2, m, cols)
    want = x @ layer.dequantize(torch.float32).T
    got = layer(x)
    assert got.shape == (2, m, rows)
    if mode == "int8" and 2 * m > quant.INT8_KERNEL_ROWS and quant.exact_int_mm():  # x in two int8 parts: each
        assert (got - want).norm() / want.norm() < 1e-4  # off by ~max|x| / (127 * 254 * 12 ** 0.5): ~4e-5 of N(0, 1)
    elif mode == "int8":  # the same products, summed in another order
        assert (got - want).norm() / want.norm() < 1e-5
    else:  # x rounded to int8 per 32 columns: ~0.5% off, against int4's own ~10% from the true weight
        assert (got - want).norm() / want.norm() < 0.015
        exact = x @ w.T
        assert (got - exact).norm() / exact.norm() < 1.1 * (want - exact).norm() / exact.norm()


def test_decoding_never_dequantises_a_weight(tiny, monkeypatch):
    import copy

    kernels_built()
    models = {mode: quant.quantize_model(copy.deepcopy(tiny), mode, group_size=16) for mode in ("int8", "int4")}
    want = {mode: list(sample.generate(m, PROMPT, 8, temperature=0)) for mode, m in models.items()}

    def refuse(*_):
        raise AssertionError("a dequantised weight was built")

    monkeypatch.setattr(quant, "dequantised_linear", refuse)
    for mode, m in models.items():  # prefill and every decode step read the stored bytes only
        assert list(sample.generate(m, PROMPT, 8, temperature=0)) == want[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_without_kernels_products_are_dequantised_a_block_of_rows_at_a_time(mode, monkeypatch):
    layer, _ = quantized(mode, 40, 64)
    x = torch.randn(3, 64)
    want = x @ layer.dequantize(torch.float32).T
    monkeypatch.setattr(quant, "quant_kernels", lambda: None)
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 64 * 16)  # blocks of 16 rows: 16, 16, 8
    blocks = []
    unpack = quant.int8_dequantize if mode == "int8" else quant.int4_dequantize
    monkeypatch.setattr(quant, f"{mode}_dequantize", lambda w, *p: blocks.append(w.size(0)) or unpack(w, *p))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert blocks == [16, 16, 8]


# NF4 (QLoRA's base, quant.nf4_quantize): the C kernel takes rows whose length is a multiple of 32 (a row may start
# half-way into a 64-weight block), in fp32, autograd off, up to quant.NF4_KERNEL_ROWS rows; the rest is dequantised
@pytest.mark.parametrize("rows,cols", [(8, 64), (34, 192), (130, 4160), (8, 32), (16, 96), (32, 1376)])
@pytest.mark.parametrize("m", [1, 3, 16, 70])
def test_nf4_kernel_computes_the_product_with_the_dequantised_weight(rows, cols, m, monkeypatch):
    kernels_built()
    torch.manual_seed(0)
    layer = quant.NF4Linear(cols, rows).quantize_from(torch.randn(rows, cols))
    x = torch.randn(2, m, cols)
    want = x.double() @ layer.dequantize(torch.float64).T
    calls = []
    nf4_matmul = quant.nf4_matmul
    monkeypatch.setattr(quant, "nf4_matmul", lambda *a: calls.append(a[0].size(0)) or nf4_matmul(*a))
    with torch.no_grad():
        got = layer(x)
    assert calls == ([2 * m] if 2 * m <= quant.NF4_KERNEL_ROWS else [])
    # the kernel multiplies int16 codes by x rounded to int16 per block of 64 (AVX2): ~5e-5 off; else fp32
    assert (got.double() - want).norm() / want.norm() < (1e-4 if calls else 1e-6)
    x.requires_grad_(True)  # training (QLoRA): the dequantising path, whose backward exists
    layer(x).sum().backward()
    assert calls == ([2 * m] if 2 * m <= quant.NF4_KERNEL_ROWS else []) and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_quantize_in_c_gives_torchs_codes(monkeypatch, dtype):
    kernels_built()
    torch.manual_seed(0)
    w = (torch.randn(96, 320) * 0.02).to(dtype)
    w[3, :64] = 0  # a block of zeros
    w[7, 64:128] = 1e-30  # an absmax under the 1e-12 floor
    w[9, 0] = w[9, 1:64].abs().max() * 0.5 * (quant.NF4_CODE[12] + quant.NF4_CODE[13]).item()  # a tie (fp32)
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 64 * 100)  # several chunks, the last one short
    ours = quant.nf4_quantize(w)
    monkeypatch.setattr(quant, "quant_kernels", lambda: None)  # torch.bucketize's codes
    for name, t in quant.nf4_quantize(w).items():
        assert torch.equal(ours[name], t), name


def test_nf4_decoding_reads_the_stored_bytes_only(monkeypatch):
    import copy

    kernels_built()
    torch.manual_seed(0)
    args = model_lib.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=192,
                               max_seq_len=64)
    model = quant.quantize_model(model_lib.Transformer(args).eval(), "nf4")
    assert isinstance(model.layers[0].feed_forward.w2, quant.NF4Linear)
    assert type(model.output) is not quant.NF4Linear  # QLoRA's base: the head stays as it is
    reference = copy.deepcopy(model)
    monkeypatch.setattr(quant, "quant_kernels", lambda: None)  # dequantised blocks: the reference numbers
    want = list(sample.generate(reference, PROMPT, 8, temperature=0))
    monkeypatch.undo()

    def refuse(*_):
        raise AssertionError("a dequantised NF4 weight was built")

    monkeypatch.setattr(quant, "nf4_dequantize", refuse)
    assert list(sample.generate(model, PROMPT, 8, temperature=0)) == want


def test_kernels_are_built_once_per_cpu_then_loaded_from_the_cache(tmp_path, monkeypatch, capsys):
    kernels_built()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert quant.quant_kernels.__wrapped__() is not None
    assert "built the quantised matmul kernels for this CPU" in capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "nanollama").iterdir())  # no object or half file left behind
    assert len(names) == 2 and names[0].endswith(".ops.so") and names[1] == names[0].replace(".ops.so", ".so")
    assert quant.quant_kernels.__wrapped__() is not None and "built" not in capsys.readouterr().err


@pytest.mark.parametrize("compiler", ["CC", "CXX"])  # the C kernels, the C++ torch ops
def test_a_failed_kernel_build_warns_and_leaves_the_dequantising_path(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv(compiler, str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached build to fall back on
    with pytest.warns(UserWarning, match="cannot build the quantised matmul kernels .*dequantising"):
        assert quant.quant_kernels.__wrapped__() is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantising_in_blocks_of_rows_changes_nothing(mode, monkeypatch):
    w = torch.randn(40, 64).to(torch.bfloat16)  # any float dtype in: a bf16 checkpoint's memory-mapped tensor
    layer = lambda: quant.Int8Linear(64, 40) if mode == "int8" else quant.Int4Linear(64, 40, 16)
    whole = layer().quantize_from(w.float())
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 64 * 16)
    blocks = layer().quantize_from(w)  # 16 rows at a time
    for a, b in zip(whole.stored(), blocks.stored()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_model_built_on_meta_straight_into_quantised_form_equals_the_quantised_model(tiny, mode):
    import copy

    want = quant.quantize_model(copy.deepcopy(tiny), mode, group_size=16)
    with torch.device("meta"):
        meta = model_lib.Transformer(tiny.args)
    state, asked = tiny.state_dict(), []
    built = quant.quantize_from_meta(meta, mode, 16, lambda name: asked.append(name) or state[name])
    assert sorted(asked) == sorted(name for name, _ in tiny.named_parameters())  # each weight once
    assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
    idx = torch.tensor([PROMPT])
    with torch.inference_mode():
        assert torch.equal(built(idx)[0], want(idx)[0])


@pytest.mark.parametrize("norm_head", [False, True], ids=["llama", "normhead"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantising_while_loading_equals_quantising_the_loaded_model(tmp_path, mode, norm_head):
    from support.weights import write_checkpoint

    args = model_lib.ModelArgs(**{**model_lib.PRESETS["tiny"].__dict__, "norm_head": norm_head})
    torch.manual_seed(0)
    write_checkpoint(tmp_path, model_lib.Transformer(args).state_dict(), args, "baichuan2")
    full, _ = sample.load_model(tmp_path, "cpu", torch.float32)
    want = quant.quantize_model(full, mode, group_size=16)
    got, _ = sample.load_model(tmp_path, "cpu", torch.float32, mode, 16)
    idx = torch.tensor([PROMPT])
    with torch.inference_mode():
        assert torch.equal(got(idx)[0], want(idx)[0])


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_decode_layout_makes_qkv_and_gate_up_one_product_each_with_the_same_numbers(tiny, mode):
    """decode_layout stacks q/k/v and gate/up into one linear each (RowsOf): one kernel call where there were three
    and two, the same logits (each output row is the same dot product) and the same greedy tokens, eager and
    compiled; the weights are counted once."""
    import copy

    from support.decode_layout import RowsOf

    kernels_built()
    plain = quant.quantize_model(copy.deepcopy(tiny), mode, group_size=16) if mode else copy.deepcopy(tiny)
    shared = sample.decode_layout(copy.deepcopy(plain))
    attention, ffn = shared.layers[0].attention, shared.layers[0].feed_forward
    assert all(isinstance(getattr(attention, n), RowsOf) for n in ("wq", "wk", "wv"))
    assert all(isinstance(getattr(ffn, n), RowsOf) for n in ("w1", "w3"))
    calls = []
    attention.wq.product.register_forward_hook(lambda *_: calls.append(1))
    idx = torch.tensor([PROMPT])
    with torch.inference_mode():
        torch.testing.assert_close(shared(idx)[0], plain(idx)[0], rtol=1e-5, atol=1e-5)
    assert len(calls) == 1  # q, k and v from one call
    assert sample.model_bytes(shared) == pytest.approx(sample.model_bytes(plain), rel=0.01)
    eager = list(sample.generate(plain, PROMPT, 8, temperature=0))
    assert list(sample.generate(shared, PROMPT, 8, temperature=0)) == eager
    assert list(sample.generate(shared, PROMPT, 8, temperature=0, decode_step=sample.CompiledDecode())) == eager


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int4", "nf4"])
def test_compiled_decode_keeps_the_kernels_in_one_graph(tiny, mode):
    import copy

    kernels_built()
    q = quant.quantize_model(copy.deepcopy(tiny), mode, group_size=16)
    eager = list(sample.generate(q, PROMPT, 8, temperature=0))
    assert list(sample.generate(q, PROMPT, 8, temperature=0, decode_step=sample.CompiledDecode())) == eager
    q.setup_cache(1, 16)
    explained = torch._dynamo.explain(sample.decode_one)(q, torch.tensor([[1]]), 3, None, None)
    q.clear_cache()
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "int8"])
def test_compiled_decode_of_more_rows_than_the_kernels_take_is_one_graph(tiny, mode):
    """A batch of more rows than FP32_KERNEL_ROWS / INT8_KERNEL_ROWS (a server's) takes the GEMMs, in the graph"""
    import copy

    kernels_built()
    m = copy.deepcopy(tiny)
    m = sample.decode_layout(quant.quantize_model(m, mode) if mode else m)
    rows = max(quant.FP32_KERNEL_ROWS, quant.INT8_KERNEL_ROWS) + 1
    m.setup_cache(rows, 16)
    explained = torch._dynamo.explain(sample.decode_one)(m, torch.ones(rows, 1, dtype=torch.long), 3, None, None)
    m.clear_cache()
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_gives_the_same_greedy_tokens(tiny, dtype):
    import copy

    m = copy.deepcopy(tiny).to(dtype)
    eager = list(sample.generate(m, PROMPT, 12, temperature=0))
    step = sample.CompiledDecode()
    assert list(sample.generate(m, PROMPT, 12, temperature=0, decode_step=step)) == eager
    assert not step.failed


# -----------------------------------------------------------------------------
# command line and chat


def byte_tokenizer(dst, chat_template=None):
    """A tokenizer.json whose ids are the UTF-8 bytes (no merges, so encoding is concatenation-invariant and the
    ids of a template string can be written by hand) plus <s> 256, </s> 257, <|im_start|> 258, <|im_end|> 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    # GPT-2's byte -> printable character table, so that id == byte value
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])  # as LLaMA's
    tok.save(str(dst / "tokenizer.json"))
    config = {"bos_id": 256, "eos_id": 257, "pad_id": 257, "chat_template": chat_template}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny GQA model's checkpoint dir with the byte tokenizer."""
    d = hf_to_checkpoint(tiny_hf_llama(2), tmp_path_factory.mktemp("cli"))
    byte_tokenizer(d)
    return d


def run_cli(argv, stdin=""):
    import io

    out = io.StringIO()
    sample.main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out)
    return out.getvalue()


def test_cli_streams_the_greedy_continuation(ckpt, tiny, capsys):
    out = run_cli(["--ckpt", ckpt, "--prompt", "héllo", "--temperature", 0, "--max_new_tokens", 12])
    ids = list(sample.generate(tiny, [256] + list("héllo".encode()), 12, temperature=0, eos_id=257))
    want = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    assert out == want + "\n"
    assert "tokens/s" in capsys.readouterr().err  # speed report on stderr, not in the text


def test_default_max_new_tokens_leaves_room_for_the_prompt(ckpt, tiny, capsys):
    """The default model has max_seq_len 256 (this one 128): without --max_new_tokens, README's commands must run."""
    out = run_cli(["--ckpt", ckpt, "--prompt", "import ", "--temperature", 0])
    ids = list(sample.generate(tiny, [256] + list(b"import "), 64, temperature=0, eos_id=257))
    assert out == bytes(i for i in ids if i < 256).decode("utf-8", errors="replace") + "\n"
    assert run_cli(["--ckpt", ckpt, "--chat", "--temperature", 0], stdin="hi\n").endswith("\n")


def test_cli_num_samples_with_seed_is_reproducible(ckpt):
    argv = ["--ckpt", ckpt, "--prompt", "ab", "--seed", 7, "--num_samples", 2, "--max_new_tokens", 8]
    first = run_cli(argv)
    assert first == run_cli(argv)
    assert len(first.split("\n")) >= 3  # two samples, each ended by a newline


def test_cli_prompt_file_is_one_batch(ckpt, tiny, tmp_path):
    (tmp_path / "p.txt").write_text("ab\nlonger prompt\n")
    out = run_cli(["--ckpt", ckpt, "--prompt_file", tmp_path / "p.txt", "--temperature", 0, "--max_new_tokens", 6])
    tok = prepare.load_tokenizer(ckpt)
    want = []
    for p in ["ab", "longer prompt"]:  # each row's tokens as generated alone, printed as --prompt streams them
        ids = [256] + list(p.encode())
        new = [t for t in sample.generate(tiny, ids, 6, temperature=0, eos_id=257)]
        want.append("".join(sample.stream_text(tok, new, ids)))
    assert out == "\n".join(want) + "\n"


def test_cli_prompt_file_batches_as_many_rows_as_the_kv_cache_fits(ckpt, monkeypatch, tmp_path, capsys):
    """A long prompt file is not one batch whose KV cache outgrows memory: batches of what kv_budget allows, with the
    same continuations (greedy) in the file's order."""
    (tmp_path / "p.txt").write_text("ab\nlonger prompt\nx\nthe fourth\nfive\n")
    argv = ["--ckpt", ckpt, "--prompt_file", tmp_path / "p.txt", "--temperature", 0, "--max_new_tokens", 6]
    whole = run_cli(argv)
    assert "batches of" not in capsys.readouterr().err
    sizes, generate = [], sample.generate

    def counting(model, rows, *args, **kwargs):
        sizes.append(len(rows))
        return generate(model, rows, *args, **kwargs)
    monkeypatch.setattr(sample, "generate", counting)
    monkeypatch.setattr(sample, "kv_budget", lambda model, rows, device, columns: 2 * (len("longer prompt") + 1 + 6))
    assert run_cli(argv) == whole and sizes == [2, 2, 1]
    assert "5 prompts in batches of 2" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--ckpt=.*nope: no config.json"):
        run_cli(["--ckpt", tmp_path / "nope", "--prompt", "x"])


def test_missing_tokenizer_is_a_clear_error(ckpt, tmp_path):
    import shutil

    for f in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / f, tmp_path / f)
    with pytest.raises(SystemExit, match=r"--ckpt=.*: no tokenizer \(tokenizer.model or tokenizer.json\)"):
        run_cli(["--ckpt", tmp_path, "--prompt", "x"])


def test_too_long_prompt_errors_or_truncates_as_asked(ckpt, capsys):
    argv = ["--ckpt", ckpt, "--prompt", "x" * 120, "--max_new_tokens", 20, "--temperature", 0]
    with pytest.raises(SystemExit, match=r"--prompt: 121 tokens \+ --max_new_tokens=20 exceed .*max_seq_len 128"):
        run_cli(argv)
    out = run_cli(argv + ["--on_long_prompt", "truncate"])
    assert out.endswith("\n") and "keeping the last 108 tokens" in capsys.readouterr().err


def test_unknown_template_is_a_clear_error(ckpt):
    with pytest.raises(SystemExit, match=r"--template: unknown chat template 'nope'; expected one of .*vicuna"):
        run_cli(["--ckpt", ckpt, "--chat", "--template", "nope"], stdin="hi\n")


def test_int4_group_size_not_suiting_shapes_is_a_clear_error(ckpt):
    with pytest.raises(SystemExit, match=r"--group_size=48 does not suit layer layers.0.attention.wq \(weight 64x64\)"):
        run_cli(["--ckpt", ckpt, "--quantize", "int4", "--group_size", 48, "--prompt", "x"])


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_cli_saves_and_reloads_a_quantized_checkpoint(ckpt, tmp_path, mode, capsys):
    argv = ["--prompt", "ab", "--temperature", 0, "--max_new_tokens", 8]
    direct = run_cli(["--ckpt", ckpt, "--quantize", mode, "--save_quantized", tmp_path / "q"] + argv)
    n = model_lib.Transformer.from_checkpoint(ckpt).num_params()
    assert f"(llama, {n:,} params, {mode})" in capsys.readouterr().err  # quantised weights counted too
    assert (tmp_path / "q" / "tokenizer.json").exists()
    assert run_cli(["--ckpt", tmp_path / "q"] + argv) == direct


@pytest.mark.parametrize("tensor,change", [
    ("layers.0.attention.wq.nf4_absmax_scale", lambda t: t.view(torch.int32)),  # (another float dtype is converted)
    ("layers.0.attention.wq.nf4_packed", lambda t: t.to(torch.int8)),
    ("layers.1.feed_forward.w2.nf4_packed", lambda t: t[:-1]),
])
def test_a_saved_quantized_tensor_of_another_dtype_or_shape_is_refused(ckpt, tmp_path, tensor, change):
    from safetensors.torch import load_file, save_file

    run_cli(["--ckpt", ckpt, "--quantize", "nf4", "--save_quantized", tmp_path / "q", "--max_new_tokens", 1])
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(file)
    tensors[tensor] = change(tensors[tensor]).contiguous()
    save_file(tensors, file)
    with pytest.raises(SystemExit, match=rf"tensor {tensor}: .* where config.json's quantization needs"):
        run_cli(["--ckpt", tmp_path / "q", "--prompt", "ab", "--max_new_tokens", 2])


class ScriptedModel(torch.nn.Module):
    """Stands in for a Transformer: records every prompt it is given and emits a fixed token script."""

    def __init__(self, script):
        super().__init__()
        self.args = model_lib.ModelArgs(dim=8, n_layers=1, n_heads=1, hidden_dim=8, vocab_size=VOCAB, max_seq_len=512)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script, self.prompts = list(script), []

    def setup_cache(self, *args, **kwargs):
        pass

    def clear_cache(self):
        pass

    def cache_rows(self, start, stop):
        return contextlib.nullcontext()

    def num_params(self):
        return 1

    def forward(self, idx, start_pos=0, **kwargs):
        if start_pos == 0:
            self.prompts.append(idx[0].tolist())
        logits = torch.zeros(idx.size(0), idx.size(1), VOCAB)
        logits[..., self.script.pop(0)] = 1.0
        return logits, None


def ids_of(*parts):
    """Token ids of template pieces: str -> UTF-8 bytes, int -> that id; <s> </s> <|im_start|> <|im_end|> named."""
    specials = {"<s>": 256, "</s>": 257, "<|im_start|>": 258, "<|im_end|>": 259}
    ids = []
    for part in parts:
        ids += [part] if isinstance(part, int) else [specials[part]] if part in specials else list(part.encode())
    return ids


# The second turn of: system "Be brief.", user "Hi there", assistant "Hello!", user "A joke?" -- written out by
# hand from each published format (see prepare.TEMPLATES' sources).
TWO_TURNS = {
    "baichuan2": ids_of("Be brief.", 195, "Hi there", 196, "Hello!", "</s>", 195, "A joke?", 196),
    "baichuan": ids_of("Be brief.", 195, "Hi there", 196, "Hello!", "</s>", 195, "A joke?", 196),
    "vicuna": ids_of("<s>", "Be brief. USER: Hi there ASSISTANT: Hello!", "</s>", "USER: A joke? ASSISTANT:"),
    "alpaca": ids_of("<s>", "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!", "</s>",
                     "\n\n### Instruction:\nA joke?\n\n### Response:\n"),
    "aquila": ids_of("Be brief.###Human: Hi there###Assistant: Hello!###Human: A joke?###Assistant:"),
    "llama-2": ids_of("<s>", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! ", "</s>",
                      "<s>", "[INST] A joke? [/INST]"),
    "chatml": ids_of("<|im_start|>", "system\nBe brief.", "<|im_end|>", "\n", "<|im_start|>", "user\nHi there",
                     "<|im_end|>", "\n", "<|im_start|>", "assistant\nHello!", "<|im_end|>", "\n",
                     "<|im_start|>", "user\nA joke?", "<|im_end|>", "\n", "<|im_start|>", "assistant\n"),
    "human-assistant": ids_of("<s>", "Be brief.\n\nHuman: Hi there\n\nAssistant: Hello!", "</s>",
                              "\n\nHuman: A joke?\n\nAssistant:"),
}
# how each template's reply ends when the model writes it
REPLY_END = {"chatml": ids_of("<|im_end|>"), "aquila": ids_of("###"), "baichuan": [195], "baichuan2": [195]}


@pytest.mark.parametrize("template", sorted(TWO_TURNS))
def test_chat_sends_the_templates_exact_token_ids(ckpt, monkeypatch, template):
    reply = ids_of(" Hello!" if template in ("aquila", "llama-2") else "Hello!")
    scripted = ScriptedModel(reply + REPLY_END.get(template, [257]) + [257] * 8)
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {"family": "llama"}))
    out = run_cli(["--ckpt", ckpt, "--chat", "--template", template, "--system", "Be brief.", "--temperature", 0],
                  stdin="Hi there\nA joke?\n")
    assert out.splitlines()[0].strip() == "Hello!"  # the reply's end token / stop string is not printed
    assert len(scripted.prompts) == 2
    assert scripted.prompts[1] == TWO_TURNS[template]


# Baichuan-13B-Chat's and Baichuan2-*-Chat's generation_config.json: user_token_id 195, assistant_token_id 196;
# their generation_utils.py build_chat_input opens each user turn with the first and each reply with the second
USER_TOKEN_ID, ASSISTANT_TOKEN_ID = 195, 196


@pytest.mark.parametrize("template", ["baichuan", "baichuan2"])
def test_baichuan_reply_ends_where_the_model_opens_the_next_user_turn(ckpt, monkeypatch, template):
    # a reply ends at eos (the template's reply end) or where the model writes on into the user's next turn (195),
    # not at the assistant's own token (196); text follows each, so a wrong end id cannot hide at a reply's end
    scripted = ScriptedModel(ids_of("Hello!", USER_TOKEN_ID, "Bye", ASSISTANT_TOKEN_ID, "now", "</s>") + [257] * 8)
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {"family": template}))
    out = run_cli(["--ckpt", ckpt, "--chat", "--template", template, "--temperature", 0], stdin="Hi\nMore\n")
    first, second = out.strip().splitlines()
    assert first.strip() == "Hello!" and second.strip().startswith("Bye") and second.strip().endswith("now")
    # the reply goes into the history closed as the template closes a reply (eos), the user's next turn after it
    assert scripted.prompts[1] == ids_of(USER_TOKEN_ID, "Hi", ASSISTANT_TOKEN_ID, "Hello!", "</s>",
                                         USER_TOKEN_ID, "More", ASSISTANT_TOKEN_ID)


def test_chat_reset_forgets_history_and_exit_quits(ckpt, monkeypatch):
    scripted = ScriptedModel(ids_of("Hi", "</s>") * 3)
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {"family": "baichuan2"}))
    run_cli(["--ckpt", ckpt, "--chat", "--template", "baichuan2", "--temperature", 0],
            stdin="one\n/reset\ntwo\n/exit\nthree\n")
    assert scripted.prompts == [ids_of(195, "one", 196), ids_of(195, "two", 196)]


def test_chat_uses_family_template_and_generation_defaults(monkeypatch):
    import argparse

    def tok(template):
        return argparse.Namespace(template_name=template)  # a built-in name

    monkeypatch.setattr(prepare, "literal_id_warning", lambda tok, name: None)  # this stand-in has no vocabulary

    assert sample.resolve_template(None, tok(None), "baichuan2") == model_lib.FAMILIES["baichuan2"].chat_template
    assert sample.resolve_template(None, tok("vicuna"), "baichuan2") == "vicuna"
    assert sample.resolve_template("chatml", tok("vicuna"), "baichuan2") == "chatml"
    flags = argparse.Namespace(temperature=None, top_k=None, top_p=0.5, repetition_penalty=None)
    assert sample.generation_settings(flags, "baichuan2", chat=True) == dict(
        temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.05)  # the flag overrides one default
    assert sample.generation_settings(flags, "baichuan", chat=True)["repetition_penalty"] == 1.1


def test_chat_multiline_turn_and_fastchat_commands(ckpt, monkeypatch):
    scripted = ScriptedModel(ids_of("Hi", "</s>") * 3)
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {"family": "baichuan2"}))
    run_cli(["--ckpt", ckpt, "--chat", "--multiline", "--template", "baichuan2", "--temperature", 0],
            stdin="first line\nsecond line\n")  # one turn: every line up to the end of input
    assert scripted.prompts == [ids_of(195, "first line\nsecond line", 196)]
    scripted = ScriptedModel(ids_of("Hi", "</s>") * 3)
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {"family": "baichuan2"}))
    run_cli(["--ckpt", ckpt, "--chat", "--template", "baichuan2", "--temperature", 0],
            stdin="one\n!!reset\ntwo\n!!exit\nthree\n")  # FastChat's spellings
    assert scripted.prompts == [ids_of(195, "one", 196), ids_of(195, "two", 196)]


def test_text_that_is_not_utf8_is_a_clear_error_or_a_skipped_turn(ckpt, monkeypatch, capsys):
    # argv and a stdin not in UTF-8 reach Python as lone surrogates (surrogateescape): "caf\xe9" in Latin-1
    with pytest.raises(SystemExit, match=r"--prompt: not UTF-8 text \(character 4\)"):
        run_cli(["--ckpt", ckpt, "--prompt", "caf\udce9", "--max_new_tokens", 2])
    with pytest.raises(SystemExit, match=r"--system: not UTF-8 text"):
        run_cli(["--ckpt", ckpt, "--chat", "--system", "\udce9"], stdin="hi\n")
    scripted = ScriptedModel(ids_of("Hi", "</s>") * 3)
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {"family": "baichuan2"}))
    run_cli(["--ckpt", ckpt, "--chat", "--template", "baichuan2", "--temperature", 0], stdin="caf\udce9\ntwo\n")
    assert scripted.prompts == [ids_of(195, "two", 196)]  # the chat goes on without the line it cannot read
    assert "not UTF-8 text" in capsys.readouterr().err


def test_prompt_file_prints_what_prompt_streams(ckpt, monkeypatch, tmp_path):
    """The same tokens give the same text: "ab" then half of a 3-byte character cut by --max_new_tokens."""
    (tmp_path / "p.txt").write_text("x\n")
    outs = []
    for source in (["--prompt", "x"], ["--prompt_file", tmp_path / "p.txt"]):
        monkeypatch.setattr(sample, "load_model", lambda *a: (ScriptedModel(ids_of("ab") + [0xE4, 0xBD]), {}))
        outs.append(run_cli(["--ckpt", ckpt, *source, "--temperature", 0, "--max_new_tokens", 4]))
    assert outs == ["ab\n", "ab\n"]


def test_prompt_file_saved_with_a_byte_order_mark_prompts_without_it(ckpt, monkeypatch, tmp_path):
    (tmp_path / "p.txt").write_text("hi\n", encoding="utf-8-sig")  # as Windows' Notepad saves UTF-8
    scripted = ScriptedModel(ids_of("ab"))
    monkeypatch.setattr(sample, "load_model", lambda *a: (scripted, {}))
    run_cli(["--ckpt", ckpt, "--prompt_file", tmp_path / "p.txt", "--temperature", 0, "--max_new_tokens", 2])
    assert scripted.prompts == [ids_of("<s>", "hi")]


class Terminal:
    """sample.py in a pseudo-terminal, as a person at a keyboard runs it: stdin, stdout and stderr a tty in line mode
    (Ctrl-D on an empty line is an end of input) with echo; output bytes pass unchanged (no \\n -> \\r\\n)."""

    def __init__(self, argv):
        import os
        import pty
        import subprocess
        import sys
        import termios
        from pathlib import Path

        self.fd, child = pty.openpty()
        attrs = termios.tcgetattr(child)
        attrs[1] &= ~termios.OPOST  # oflag
        termios.tcsetattr(child, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen([sys.executable, "sample.py", *map(str, argv)], stdin=child, stdout=child,
                                     stderr=child, cwd=Path(__file__).resolve().parent.parent, close_fds=True)
        os.close(child)
        self.data = b""

    @property
    def text(self):
        return self.data.decode("utf-8", "replace")

    def expect(self, marker: str, count=1, timeout=120):
        """Read until `marker` has appeared `count` times."""
        import os
        import select
        import time

        deadline = time.monotonic() + timeout
        while self.data.count(marker.encode()) < count:
            assert time.monotonic() < deadline and self.proc.poll() is None, f"no {marker!r} in:\n{self.text}"
            if select.select([self.fd], [], [], 1)[0]:
                self.data += os.read(self.fd, 4096)

    def send(self, data: bytes):
        import os
        os.write(self.fd, data)

    def converse(self, marker: str, inputs) -> int:
        """Answer the program's n-th `marker` prompt with the n-th input; -> its exit code after the last."""
        try:
            for i, data in enumerate(inputs):
                self.expect(marker, i + 1)
                self.send(data)
            return self.close()
        finally:
            self.proc.kill()

    def close(self, timeout=60):
        """Wait for the exit, reading what is left; -> the exit code."""
        import os

        code = self.proc.wait(timeout=timeout)
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            self.data += chunk
        os.close(self.fd)
        return code


def test_no_prompt_on_a_terminal_asks_for_prompts_in_a_loop(ckpt):
    argv = ["--ckpt", ckpt, "--temperature", 0, "--max_new_tokens", 8]
    prompts = ["héllo", "ab"]
    wants = [run_cli(argv + ["--prompt", text]) for text in prompts]  # each prompt continued on its own (greedy)
    term = Terminal(argv)
    assert term.converse("prompt> ", [text.encode() + b"\n" for text in prompts] + [b"/exit\n"]) == 0
    for text, want in zip(prompts, wants):  # the echoed prompt, then its continuation streamed to the terminal
        assert (text + "\n" + want).encode() in term.data, (want, term.text)
    assert " tokens in " in term.text  # the report at the end


def test_chat_on_a_terminal_takes_multiline_turns_resets_and_exits(ckpt):
    argv = ["--ckpt", ckpt, "--chat", "--multiline", "--template", "baichuan2", "--temperature", 0,
            "--max_new_tokens", 6]
    turn = "line one\nline two"
    want = run_cli(argv, stdin=turn + "\n").strip()  # the reply to the two lines as one turn (no history)
    term = Terminal(argv)
    # Ctrl-D on an empty line ends a turn; a command needs none
    inputs = [turn.encode() + b"\n\x04", b"/reset\n", turn.encode() + b"\n\x04", b"/exit\n"]
    assert term.converse("user [Ctrl-D on an empty line ends it]> ", inputs) == 0
    assert "(history cleared)" in term.text
    # the reply to the whole turn, twice: after /reset the same turn gets the same first reply
    assert term.data.count(("assistant> " + want).encode()) == 2, (want, term.text)
