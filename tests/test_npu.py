"""The Ascend path as torch_npu 2.13 documents it, run against the fake torch_npu: the parts each fused op is listed
for, its shape limits, packed documents with one host read per batch, the compressed ALiBi bias, the cached causal
mask under inference mode, and decoding through the inference kernels on the KV cache in place."""

import dataclasses

import pytest
import torch

import kernels
from model import PRESETS, ModelArgs, Transformer
from conftest import is_timing


def portable(fn, *args, **kwargs):
    with kernels.force_npu(False):
        return fn(*args, **kwargs)


def on_part(fake, monkeypatch, name):
    """Make the fake NPU the part torch.npu.get_device_name() calls `name`, with nothing said yet."""
    monkeypatch.setattr(fake, "DEVICE_NAME", name)
    monkeypatch.setattr(kernels, "_said", set())
    kernels.npu_chip.cache_clear()


def qkv(B=2, H=4, H_kv=2, T=9, S=None, D=16, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    S = S or T
    shapes = [(B, H, T, D), (B, H_kv, S, D), (B, H_kv, S, D)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in shapes]


@pytest.mark.parametrize("name, family", [
    ("Ascend910B3", "Atlas A2"), ("Ascend910B4-1", "Atlas A2"), ("Ascend910_9392", "Atlas A3"),
    ("Ascend910B", "Atlas training"), ("Ascend910ProB", "Atlas training"), ("Ascend310P3", "Atlas inference"),
    ("Ascend950", "unknown")])
def test_parts_are_told_apart_by_their_soc_names(name, family):
    assert kernels.npu_family(name) == family  # the bare Ascend910B is the first 910, not a 910B1..B4


# --------------------------------------------------------------------------------------------------------------------
# parts and limits

FUSED_ON = {  # what a training step runs fused on each part (torch_npu 2.13's "supported models")
    "Ascend910B3": {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention"},
    "Ascend910_9392": {"npu_rms_norm", "npu_rotary_mul"},
    "Ascend910ProB": {"npu_rms_norm", "npu_rotary_mul"},
    "Ascend310P3": {"npu_rms_norm", "npu_rotary_mul"},
    "Ascend950": {"npu_rms_norm"},  # a part the 2.13 documentation does not name: only the op it lists for none
}


@pytest.mark.parametrize("part", sorted(FUSED_ON))
def test_each_part_runs_only_its_documented_ops_and_says_so_once(fake_npu, monkeypatch, capsys, part):
    on_part(fake_npu, monkeypatch, part)
    args = ModelArgs(dim=256, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=64, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(args)  # head_dim 128: what npu_rotary_mul takes on the parts before the 910B
    idx = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        _, loss = model(idx, idx)
        loss.backward()
    grad = model.layers[0].attention.wq.weight.grad.clone()
    model.zero_grad()
    _, ref = portable(model, idx, idx)
    ref.backward()
    assert set(fake_npu.calls) == FUSED_ON[part]  # and the fake raised on none of the others
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, 2 * model.layers[0].attention.wq.weight.grad, rtol=1e-4, atol=1e-6)
    err = capsys.readouterr().err
    lacking = {"npu_swiglu", "npu_fusion_attention", "npu_incre_flash_attention", "npu_prompt_flash_attention"}
    lacking = {"Ascend910B3": set(), "Ascend910_9392": lacking - {"npu_prompt_flash_attention"}}.get(part, lacking)
    assert err.count("documents") == (1 if lacking else 0) and all(op in err for op in lacking)


def test_device_type_reads_the_part_and_says_once_what_it_lacks(fake_npu, monkeypatch, capsys):
    on_part(fake_npu, monkeypatch, "Ascend910_9392")
    monkeypatch.setattr(kernels, "npu_available", lambda: True)
    assert kernels.device_type() == kernels.device_type() == "npu"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Ascend910_9392 (Atlas A3)" in err[0] and "npu_fusion_attention" in err[0]


def test_more_than_256_query_heads_take_the_portable_path_and_say_so(fake_npu, capsys):
    for dtype, grad in ((torch.float32, True), (torch.bfloat16, False)):  # training; inference, past all kernels
        q, k, v = qkv(B=1, H=260, H_kv=130, T=3, D=16, dtype=dtype)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(kernels.attention(q, k, v), portable(kernels.attention, q, k, v))
    assert not fake_npu.calls and capsys.readouterr().err.count("1..256 query heads") == 1


def test_rotary_on_parts_before_the_910b_takes_head_dim_128_one_table_and_1024_rows(fake_npu, monkeypatch, capsys):
    on_part(fake_npu, monkeypatch, "Ascend910ProB")
    cos, sin = (t[:, :, None] for t in kernels.rope_cos_sin(torch.arange(6).expand(2, 6), 128, 1e4))  # (B, T, 1, D)
    for x, c, s, fused in ((torch.randn(2, 6, 3, 128), cos[:1], sin[:1], True),  # 1S1D
                           (torch.randn(2, 6, 3, 128), cos, sin, False),  # BS1D: a table per row
                           (torch.randn(2, 6, 3, 64), cos[:1, ..., :64], sin[:1, ..., :64], False),
                           (torch.randn(2, 6, 513, 128), cos[:1], sin[:1], False)):  # broadcast over 1026 rows
        fake_npu.calls.clear()
        out = kernels.apply_rotary(x, c, s)
        assert ("npu_rotary_mul" in fake_npu.calls) == fused
        torch.testing.assert_close(out, portable(kernels.apply_rotary, x, c, s), rtol=1e-5, atol=1e-5)
    assert capsys.readouterr().err.count("npu_rotary_mul on Ascend910ProB takes head_dim 128") == 3
    with pytest.raises(RuntimeError, match="more than 1024 rows"):  # the documented limit, in the fake too
        fake_npu.npu_rotary_mul(torch.randn(2, 6, 513, 128), cos[:1], sin[:1])


def test_rotary_batch_of_1000_takes_the_portable_path(fake_npu, capsys):
    x = torch.randn(1000, 2, 1, 16)
    cos, sin = (t[None, :, None] for t in kernels.rope_cos_sin(torch.arange(2), 16, 1e4))
    out = kernels.apply_rotary(x, cos, sin)
    assert "npu_rotary_mul" not in fake_npu.calls and "batch and heads < 1000" in capsys.readouterr().err
    torch.testing.assert_close(out, portable(kernels.apply_rotary, x, cos, sin))


def test_fake_rotary_takes_the_documented_shapes_and_casts_mixed_dtypes(fake_npu, monkeypatch):
    x, r = torch.randn(2, 5, 3, 16), torch.randn(1, 5, 1, 16)
    out = fake_npu.npu_rotary_mul(x, r.bfloat16(), r.half())  # r1 / r2 in other dtypes are cast, not refused
    torch.testing.assert_close(out, fake_npu.npu_rotary_mul(x, r.bfloat16().float(), r.half().float()))
    for bad_x, bad_r, match in ((torch.randn(2, 5, 3, 15), r[..., :15], "even"),
                                (torch.randn(2, 5, 3, 896), torch.randn(1, 5, 1, 896), "< 896"),
                                (x, torch.randn(1, 4, 1, 16), "does not go with"),
                                (torch.randn(1000, 5, 1000, 16), torch.randn(1, 5, 1, 16), "< 1000")):
        with pytest.raises(RuntimeError, match=match):
            fake_npu.npu_rotary_mul(bad_x, bad_r, bad_r)
    on_part(fake_npu, monkeypatch, "Ascend310P3")
    with pytest.raises(RuntimeError, match="head_dim must be 128"):
        fake_npu.npu_rotary_mul(x, r, r)
    with pytest.raises(RuntimeError, match="does not go with"):  # BS1D: only 11SD / 1S1D / S11D there
        fake_npu.npu_rotary_mul(torch.randn(2, 5, 3, 128), torch.randn(2, 5, 1, 128), torch.randn(2, 5, 1, 128))


def test_fake_fusion_attention_limits(fake_npu, monkeypatch):
    q, k, v = qkv(B=1, H=260, H_kv=260, T=2, D=8)
    with pytest.raises(RuntimeError, match="1..256 query heads"):
        fake_npu.npu_fusion_attention(q, k, v, 260, "BNSD")
    q, k, v = (t.transpose(1, 2).reshape(-1, t.size(1), t.size(3)) for t in qkv(B=1, H=2, H_kv=2, T=1030, D=8))
    ends = list(range(1, 1031))
    mask = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    with pytest.raises(RuntimeError, match="1..1K entries"):
        fake_npu.npu_fusion_attention(q, k, v, 2, "TND", atten_mask=mask, sparse_mode=3, actual_seq_qlen=ends,
                                      actual_seq_kvlen=ends)
    with pytest.raises(RuntimeError, match="upper triangular"):
        fake_npu.npu_fusion_attention(q[:4], k[:4], v[:4], 2, "TND", atten_mask=~mask, sparse_mode=3,
                                      actual_seq_qlen=[4], actual_seq_kvlen=[4])
    on_part(fake_npu, monkeypatch, "Ascend910_9392")
    with pytest.raises(RuntimeError, match="not supported on Ascend910_9392"):
        fake_npu.npu_fusion_attention(q[:4], k[:4], v[:4], 2, "TND", atten_mask=mask, sparse_mode=3,
                                      actual_seq_qlen=[4], actual_seq_kvlen=[4])


# --------------------------------------------------------------------------------------------------------------------
# packed documents: their ends read once per batch, split into calls of at most 1K documents


def test_packed_doc_ends_stay_within_the_varlen_limits(monkeypatch):
    doc_ids = torch.tensor([[0, 0, 1, 2, 2, 2], [0, 1, 1, 1, 1, 2]])
    assert kernels.packed_doc_ends(doc_ids) == [(0, [2, 3, 6, 7, 11, 12])]
    monkeypatch.setattr(kernels, "TND_MAX_SEQS", 4)
    assert kernels.packed_doc_ends(doc_ids) == [(0, [2, 3, 6, 7]), (7, [4, 5])]
    monkeypatch.setattr(kernels, "TND_MAX_TOKENS", 5)
    assert kernels.packed_doc_ends(doc_ids) == [(0, [2, 3]), (3, [3, 4]), (7, [4, 5])]


def test_more_than_1k_documents_take_several_tnd_calls(fake_npu):
    T = 1100
    doc_ids = torch.stack([torch.arange(T).clamp(max=1049), torch.arange(T) // 100])  # 1050 + 11 documents
    q, k, v = qkv(H=2, H_kv=1, T=T, D=8)
    calls = kernels.packed_doc_ends(doc_ids)
    assert [len(ends) for _, ends in calls] == [1024, 37]
    out = kernels.attention(q, k, v, doc_ids=doc_ids)
    assert fake_npu.calls["npu_fusion_attention"] == 2
    torch.testing.assert_close(out, portable(kernels.attention, q, k, v, doc_ids=doc_ids), rtol=1e-5, atol=1e-5)


def test_packed_document_ends_are_read_once_per_batch_not_per_layer(fake_npu, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])  # 2 layers
    idx = torch.randint(0, 512, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    reads = []
    monkeypatch.setattr(kernels, "packed_doc_ends", lambda d, f=kernels.packed_doc_ends: reads.append(1) or f(d))
    _, loss = model(idx, idx, doc_ids=doc_ids)
    loss.backward()
    assert len(reads) == 1 and fake_npu.calls["npu_fusion_attention"] == 2
    _, ref = portable(model, idx, idx, doc_ids=doc_ids)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    q, k, v = qkv(T=10)
    kernels.attention(q, k, v, doc_ids=doc_ids)  # the first layer of a forward reads the ends
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("attention read the device"))
    kernels.attention(q, k, v, doc_ids=doc_ids)  # the next layers, given the same doc_ids, do not


# --------------------------------------------------------------------------------------------------------------------
# the cached causal mask, and ALiBi's compressed bias


def test_causal_mask_first_made_under_inference_mode_still_trains(fake_npu):
    kernels.npu_causal_mask.cache_clear()
    q, k, v = qkv(grad=True)
    with torch.inference_mode():  # fp32: npu_fusion_attention, which caches the 2048 x 2048 mask here
        kernels.attention(q, k, v)
    out = kernels.attention(q, k, v)  # the fake saves the mask for backward as the real op does
    out.sum().backward()
    assert q.grad is not None and fake_npu.calls["npu_fusion_attention"] == 2


def test_long_causal_alibi_passes_the_compressed_bias_with_the_same_numbers_and_gradients(fake_npu, monkeypatch):
    T, H = 1040, 6
    q, k, v = qkv(B=1, H=H, H_kv=H, T=T, D=16, grad=True)
    slopes = kernels.alibi_slopes(H)
    pse_rows = []
    real = fake_npu.npu_fusion_attention
    monkeypatch.setattr(fake_npu, "npu_fusion_attention",
                        lambda *a, pse=None, **kw: pse_rows.append(pse.size(2)) or real(*a, pse=pse, **kw))
    results = []
    for run in (kernels.attention, lambda *a, **kw: portable(kernels.attention, *a, **kw)):
        out = run(q, k, v, alibi_slopes=slopes)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        results.append((out.detach(), *(t.grad.clone() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    assert pse_rows == [kernels.ALIBI_ROWS]  # (1, H, 1024, T): a quarter of the bias at 4096 tokens
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    padded = torch.ones(1, T, dtype=torch.bool)
    padded[0, :5] = False
    kernels.attention(q, k, v, alibi_slopes=slopes, key_padding_mask=padded)
    assert pse_rows[-1] == T  # not lower-triangular with padding: the whole bias


def test_fake_takes_a_compressed_bias_only_where_documented(fake_npu):
    T = 1040
    q, k, v = qkv(B=1, H=2, H_kv=2, T=T, D=8)
    bias = kernels.alibi_attention_bias(kernels.alibi_slopes(2), torch.float32, 8, T, T)
    pse = kernels._npu_pse("fa", bias, torch.float32, 8, T, compressible=True)  # as the NPU path adapts it
    assert pse.shape == (1, 2, 1024, T)
    with pytest.raises(RuntimeError, match="lower-triangular"):
        fake_npu.npu_fusion_attention(q, k, v, 2, "BNSD", pse=pse)  # no mask
    with pytest.raises(RuntimeError, match="constant on each diagonal"):
        fake_npu.npu_fusion_attention(q, k, v, 2, "BNSD", pse=torch.randn_like(pse), sparse_mode=3,
                                      atten_mask=torch.ones(2048, 2048, dtype=torch.bool).triu(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_alibi_bias_is_the_last_rows_of_the_whole_bias(fake_npu, dtype):
    T, H, D = 1040, 6, 16
    slopes = kernels.alibi_slopes(H)
    rows = kernels.alibi_attention_bias(slopes, dtype, D, T, T)  # training: npu_fusion_attention, compressed
    whole = portable(kernels.alibi_attention_bias, slopes, dtype, D, T, T)
    assert rows.shape == (1, H, kernels.ALIBI_ROWS, T) and whole.shape == (1, H, T, T)
    torch.testing.assert_close(rows, whole[:, :, -kernels.ALIBI_ROWS:], rtol=0, atol=0)
    pse, pse_of_whole = (kernels._npu_pse("fa", b, dtype, D, T, compressible=True) for b in (rows, whole))
    torch.testing.assert_close(pse, pse_of_whole, rtol=0, atol=0)


def test_long_alibi_training_on_the_npu_never_builds_a_seq_by_seq_bias(fake_npu, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    T = 1040
    args = dataclasses.replace(PRESETS["tiny"], pos_emb="alibi", n_kv_heads=None, max_seq_len=T)
    torch.manual_seed(0)
    model = Transformer(args)
    idx, targets = torch.randint(0, 512, (1, T)), torch.randint(0, 512, (1, T))

    class SeqBySeq(TorchDispatchMode):  # every tensor made whose last two dims are (T, T)
        seen, in_kernel = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not self.in_kernel:
                self.seen += [(str(func), tuple(t.shape)) for t in (out if isinstance(out, (tuple, list)) else [out])
                              if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (T, T)]
            return out

    real = fake_npu.npu_fusion_attention

    def kernel(*a, **kw):  # the fake computes its scores (T, T) on the CPU: not what this test is about
        SeqBySeq.in_kernel = True
        try:
            return real(*a, **kw)
        finally:
            SeqBySeq.in_kernel = False

    monkeypatch.setattr(fake_npu, "npu_fusion_attention", kernel)
    with SeqBySeq():
        _, loss = model(idx, targets)
    assert fake_npu.calls["npu_fusion_attention"] == args.n_layers and SeqBySeq.seen == []
    loss.backward()
    _, ref = portable(model, idx, targets)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# inference: npu_incre_flash_attention for decode steps, npu_prompt_flash_attention for prefill, on the cache


INFER_CASES = {  # (T, q_start); the cache holds 12 positions, kv_len = q_start + T of them in use
    "decode": (1, 8), "prefill": (9, 0), "chunked-prefill": (4, 5),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("case", sorted(INFER_CASES))
def test_inference_kernels_on_a_left_padded_cache_equal_the_portable_path(fake_npu, case, alibi, dtype):
    T, q_start = INFER_CASES[case]
    H, H_kv = (6, 6) if alibi else (6, 2)  # 6 heads: ALiBi slopes that are not powers of two
    q, k, v = qkv(B=3, H=H, H_kv=H_kv, T=T, S=12, D=16, dtype=dtype)
    kv_len = q_start + T
    pad = torch.ones(3, kv_len, dtype=torch.bool)
    pad[1, :3] = pad[2, :1] = False  # left padding, as sample.generate batches prompts
    kwargs = dict(q_start=q_start, kv_len=kv_len, key_padding_mask=pad,
                  alibi_slopes=kernels.alibi_slopes(H) if alibi else None)
    with torch.inference_mode():
        out = kernels.attention(q, k, v, **kwargs)
        ref = portable(kernels.attention, q, k, v, **kwargs)
    assert set(fake_npu.calls) == {"npu_incre_flash_attention" if T == 1 else "npu_prompt_flash_attention"}
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    k[:, :, kv_len:], v[:, :, kv_len:] = 1e3, 1e3  # the cache's unused tail is never read
    with torch.inference_mode():
        torch.testing.assert_close(kernels.attention(q, k, v, **kwargs), out, rtol=0, atol=0)


def test_decode_on_an_a3_takes_the_prefill_kernel_and_on_a_310p_the_portable_path(fake_npu, monkeypatch):
    q, k, v = qkv(T=1, S=12, dtype=torch.bfloat16)
    for part, op in (("Ascend910_9392", "npu_prompt_flash_attention"), ("Ascend310P3", None)):
        on_part(fake_npu, monkeypatch, part)
        fake_npu.calls.clear()
        with torch.inference_mode():
            out = kernels.attention(q, k, v, q_start=8, kv_len=9)
            ref = portable(kernels.attention, q, k, v, q_start=8, kv_len=9)
        assert set(fake_npu.calls) == ({op} if op else set())
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["rope-gqa", "alibi-mha"])
def test_model_decodes_a_left_padded_batch_through_the_inference_kernels(fake_npu, case):
    torch.manual_seed(0)
    overrides = dict(n_kv_heads=2) if case == "rope-gqa" else dict(pos_emb="alibi", n_kv_heads=None)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], **overrides)).to(torch.bfloat16).eval()
    model.init_buffers()
    prompt = torch.randint(1, 512, (2, 6))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :2] = False  # row 1: a 4-token prompt, left padded
    positions = (mask[:, :6].long().cumsum(-1) - 1).clamp(min=0)

    def run():
        logits = []
        model.setup_cache(2, 10)
        with torch.inference_mode():
            out, _ = model(prompt, key_padding_mask=mask[:, :6], positions=positions)
            logits.append(out[:, -1])
            for step in range(4):
                token = out[:, -1].argmax(-1, keepdim=True)
                out, _ = model(token, start_pos=6 + step, positions=positions[:, -1:] + step + 1,
                               key_padding_mask=mask[:, :7 + step])
                logits.append(out[:, -1])
        model.clear_cache()
        return torch.stack(logits).float()

    ours, ref = run(), portable(run)
    assert fake_npu.calls["npu_prompt_flash_attention"] == 2 and fake_npu.calls["npu_incre_flash_attention"] == 8
    assert "npu_fusion_attention" not in fake_npu.calls
    torch.testing.assert_close(ours, ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("case", ["rope-gqa", "alibi"])
def test_a_request_joining_a_decoding_batch_runs_on_the_inference_kernels(fake_npu, case):
    """The server's continuous batching (support/batching.py's Slots): a prompt prefilled into its own row behind the batch's column
    (npu_prompt_flash_attention with queries that start past 0) and the decode steps after it match the portable
    path."""
    import sample
    from support import batching
    torch.manual_seed(0)
    overrides = dict(n_kv_heads=2) if case == "rope-gqa" else dict(pos_emb="alibi", n_kv_heads=None)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], **overrides)).to(torch.bfloat16).eval()
    model.init_buffers()
    greedy = dict(temperature=0, top_k=None, top_p=None, repetition_penalty=1.0)

    def run():
        slots, logits = batching.Slots(model, max_rows=2, sampler=sample), []
        slots.join([batching.Job([5, 9, 33, 70, 2, 3], 8, [], greedy, None)])
        for step in range(6):
            if step == 2:
                slots.join([batching.Job([4, 8, 15], 4, [], greedy, None)])  # prompt at columns 5..7 of row 1
            logits.append(slots.logits[:2].clone())
            slots.step(slots.sample())
        slots.clear()
        return logits

    ours, ref = run(), portable(run)
    assert fake_npu.calls["npu_prompt_flash_attention"] == 2 * model.args.n_layers
    assert fake_npu.calls["npu_incre_flash_attention"] == 6 * model.args.n_layers
    torch.testing.assert_close(ours, ref, rtol=3e-2, atol=3e-2)


def test_fake_inference_kernels_compute_and_reject_as_documented(fake_npu):
    q, k, v = qkv(B=1, H=2, H_kv=2, T=1, S=3, D=16, dtype=torch.bfloat16)
    pse = torch.randn(1, 2, 1, 3).bfloat16()
    out = fake_npu.npu_incre_flash_attention(q, k, v, pse_shift=pse, num_heads=2, scale_value=0.25,
                                             input_layout="BNSD")
    weights = (0.25 * (k[0, 0].float() @ q[0, 0, 0].float()) + pse[0, 0, 0].float()).softmax(0)  # pse after scale
    torch.testing.assert_close(out[0, 0, 0].float(), weights @ v[0, 0].float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="dtype"):
        fake_npu.npu_incre_flash_attention(q.float(), k.float(), v.float(), num_heads=2, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="no backward"):
        fake_npu.npu_incre_flash_attention(q.requires_grad_(), k, v, num_heads=2, input_layout="BNSD")
    q, k, v = qkv(B=1, H=2, H_kv=2, T=3, D=16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="query S must be 1"):
        fake_npu.npu_incre_flash_attention(q, k, v, num_heads=2, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="contiguous"):  # (B, N, S, D) as a view of (B, S, N, D)
        fake_npu.npu_prompt_flash_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, num_heads=2,
                                            input_layout="BNSD")
    with pytest.raises(RuntimeError, match="contiguous"):  # the mask and bias neither
        fake_npu.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BNSD",
                                            atten_mask=torch.zeros(3, 3, dtype=torch.bool).t())
    with pytest.raises(RuntimeError, match="atten_mask shape"):
        fake_npu.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BNSD",
                                            atten_mask=torch.zeros(2, 3, dtype=torch.bool))
    # the default band: next_tokens=0 keeps query i off every key after i, even where the mask allows it
    out = fake_npu.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BNSD", scale_value=0.25,
                                              atten_mask=torch.zeros(3, 3, dtype=torch.bool))
    causal = portable(kernels.attention, q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), causal, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------------
# bench.py --mode=npu-check, the script for the first machine with an Ascend NPU


def test_npu_check_runs_every_fused_op_and_catches_a_wrong_one(fake_npu, monkeypatch):
    import bench

    result = bench.run_npu_check(PRESETS["tiny"], 1, 64, 1, torch.device("cpu"))
    assert result["ok"] and result["chip"] == "Ascend910B1" and len(result["cases"]) == 22
    assert {r["kernel"] for r in result["cases"]} == set(bench.NPU_KERNELS)
    assert all(r["ran"] == {r["kernel"]: r["ran"][r["kernel"]]} for r in result["cases"])  # that kernel alone
    assert all(r["max_err"] > 0 and is_timing(r["ms"], r["portable_ms"]) for r in result["cases"])
    swapped = lambda x, dim=-1: fake_npu.F.silu(x.chunk(2, dim)[1]) * x.chunk(2, dim)[0]  # noqa: E731
    monkeypatch.setattr(fake_npu, "npu_swiglu", swapped)  # the gate half taken from the wrong side
    result = bench.run_npu_check(PRESETS["tiny"], 1, 64, 1, torch.device("cpu"))
    assert not result["ok"] and {r["op"] for r in result["cases"] if not r["ok"]} == {"swiglu"}


def test_npu_check_reports_a_kernel_that_raises_and_runs_the_other_cases(fake_npu, monkeypatch, capsys):
    import bench

    def refuses(*args, **kwargs):
        raise RuntimeError("EZ1001: the kernel refused\n[a long device trace]")

    monkeypatch.setattr(fake_npu, "npu_incre_flash_attention", refuses)
    result = bench.run_npu_check(PRESETS["tiny"], 1, 32, 1, torch.device("cpu"))
    failed = [r for r in result["cases"] if not r["ok"]]
    assert not result["ok"] and len(result["cases"]) == 22 and len(failed) == 4  # 2 decode cases x 2 dtypes
    assert all(r["error"] == "RuntimeError: EZ1001: the kernel refused" for r in failed)
    assert capsys.readouterr().err.count("FAIL: RuntimeError: EZ1001: the kernel refused") == 4


def test_npu_check_on_a_part_without_some_kernels_checks_what_runs_there(fake_npu, monkeypatch, capsys):
    import bench

    on_part(fake_npu, monkeypatch, "Ascend910_9392")  # Atlas A3: no npu_fusion_attention, swiglu or decode kernel
    result = bench.run_npu_check(PRESETS["tiny"], 1, 32, 1, torch.device("cpu"))
    assert result["ok"] and result["family"] == "Atlas A3"
    absent = {r["kernel"] for r in result["cases"] if not r["on_this_part"]}
    assert absent == {"npu_swiglu", "npu_fusion_attention", "npu_incre_flash_attention"}
    decode = [r for r in result["cases"] if r["case"].startswith("decode")]
    assert all(set(r["ran"]) == {"npu_prompt_flash_attention"} for r in decode)
    assert "(npu_fusion_attention: not on Atlas A3)" in capsys.readouterr().err


def test_npu_check_without_an_npu_says_so():
    import subprocess
    import sys
    from pathlib import Path

    def run(*flags):
        return subprocess.run([sys.executable, "bench.py", "--mode=npu-check", *flags], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)

    out = run()
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "bench.py: --mode=npu-check: needs an Ascend NPU (torch_npu and a device); this machine's device is cpu"]
    out = run("--device=npu:1")  # a device this machine does not have: one line, no traceback
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "bench.py: --device=npu:1: 'npu:1' is not a device name; this machine has cpu"]
