"""kernels.py: the torch_npu path (through a fake torch_npu with the documented semantics) equals the portable path."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kernels
from support import cpu_linear
from model import PRESETS, Transformer

TOL = dict(rtol=1e-5, atol=1e-5)


def portable(fn, *args, **kwargs):
    with kernels.force_npu(False):
        return fn(*args, **kwargs)


def test_device_and_backend_on_this_machine():
    assert kernels.device_type() == "cpu"
    assert [kernels.dist_backend(d) for d in ("npu", "cuda", "cpu", "mps")] == ["hccl", "nccl", "gloo", "gloo"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_npu_equals_portable(fake_npu, dtype):
    x, w = torch.randn(2, 5, 64, dtype=dtype), torch.randn(64, dtype=dtype)
    out = kernels.rms_norm(x, w, 1e-5)
    assert fake_npu.calls["npu_rms_norm"] == 1
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, portable(kernels.rms_norm, x, w, 1e-5), **tol)


def test_rotary_npu_equals_portable(fake_npu):
    x = torch.randn(2, 6, 4, 16)
    cos, sin = kernels.rope_cos_sin(torch.arange(6)[None], 16, 10000.0)
    cos, sin = cos[:, :, None], sin[:, :, None]
    out = kernels.apply_rotary(x, cos, sin)
    assert fake_npu.calls["npu_rotary_mul"] == 1
    torch.testing.assert_close(out, portable(kernels.apply_rotary, x, cos, sin), **TOL)


def test_swiglu_npu_equals_portable(fake_npu):
    gate, up = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    out = kernels.swiglu(gate, up)
    assert fake_npu.calls["npu_swiglu"] == 1
    torch.testing.assert_close(out, portable(kernels.swiglu, gate, up), **TOL)


def qkv(B=2, H=4, H_kv=2, T=9, S=None, D=16):
    torch.manual_seed(0)
    S = S or T
    return torch.randn(B, H, T, D), torch.randn(B, H_kv, S, D), torch.randn(B, H_kv, S, D)


ATTENTION_CASES = {
    "causal": dict(),
    "causal-mha": dict(shape=dict(H_kv=4)),
    "alibi": dict(alibi=True),
    "padding": dict(padding=True),
    "alibi-padding": dict(alibi=True, padding=True),
    "packed-docs": dict(docs=True),
    "decode-step": dict(shape=dict(T=1, S=9), q_start=8),
    "chunked-prefill": dict(shape=dict(T=4, S=9), q_start=5, alibi=True),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_npu_equals_portable(fake_npu, case):
    spec = ATTENTION_CASES[case]
    q, k, v = qkv(**spec.get("shape", {}))
    kwargs = dict(q_start=spec.get("q_start", 0))
    if spec.get("alibi"):
        kwargs["alibi_slopes"] = kernels.alibi_slopes(q.size(1))
    if spec.get("padding"):
        kwargs["key_padding_mask"] = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
    if spec.get("docs"):
        kwargs["doc_ids"] = torch.tensor([[0] * 4 + [1] * 5, [0] * 2 + [1] * 3 + [2] * 4])
    out = kernels.attention(q, k, v, **kwargs)
    assert fake_npu.calls["npu_fusion_attention"] == 1
    torch.testing.assert_close(out, portable(kernels.attention, q, k, v, **kwargs), **TOL)


@pytest.mark.parametrize("D", [8, 800])
def test_attention_head_dim_limits_are_the_documented_1_to_768(fake_npu, capsys, D):
    """head_dim 8 (no multiple of 16: not a documented limit) runs fused; 800 takes the portable path, said once."""
    q, k, v = qkv(H=2, H_kv=2, T=5, D=D)
    out = kernels.attention(q, k, v)
    kernels.attention(q, k, v)
    assert fake_npu.calls.get("npu_fusion_attention", 0) == (2 if D <= 768 else 0)
    assert capsys.readouterr().err.count("head_dim 1..768") == (0 if D <= 768 else 1)
    torch.testing.assert_close(out, portable(kernels.attention, q, k, v), **TOL)


MODEL_CASES = {"rope-gqa": dict(n_kv_heads=2), "alibi-mha": dict(pos_emb="alibi", n_kv_heads=None)}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_whole_model_forward_and_backward_on_npu_path(fake_npu, case):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], **MODEL_CASES[case]))
    idx = torch.randint(0, 512, (2, 10))
    pad = torch.tensor([[True] * 10, [False] * 4 + [True] * 6])
    positions = (pad.long().cumsum(1) - 1).clamp(min=0)
    _, loss = model(idx, idx, key_padding_mask=pad, positions=positions)
    loss.backward()
    npu_grad = model.layers[0].attention.wq.weight.grad.clone()
    model.zero_grad()
    _, ref_loss = portable(model, idx, idx, key_padding_mask=pad, positions=positions)
    ref_loss.backward()
    logits, _ = model(idx, key_padding_mask=pad, positions=positions)  # with targets training skips the logits
    ref_logits, _ = portable(model, idx, key_padding_mask=pad, positions=positions)
    assert {"npu_fusion_attention", "npu_rms_norm", "npu_swiglu"} <= set(fake_npu.calls)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(npu_grad, model.layers[0].attention.wq.weight.grad, **TOL)


# the fake must reject what the real kernels reject, or the tests above prove little


def test_fake_rejects_wrong_mask_shape(fake_npu):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="atten_mask shape"):
        fake_npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=torch.ones(2, 4, 9, dtype=torch.bool), scale=1.0)


def test_fake_rejects_sparse_mode_without_2048_mask(fake_npu):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="2048x2048"):
        fake_npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=torch.ones(9, 9, dtype=torch.bool).triu(1),
                                      sparse_mode=3)


def test_fake_rejects_head_dim_and_dtype(fake_npu):
    q, k, v = qkv(H=2, H_kv=2, D=776)
    with pytest.raises(RuntimeError, match="1..768"):
        fake_npu.npu_fusion_attention(q, k, v, 2, "BNSD")
    q, k, v = (t.double() for t in qkv())
    with pytest.raises(RuntimeError, match="dtype"):
        fake_npu.npu_fusion_attention(q, k, v, 4, "BNSD")


def test_fake_attention_scale_and_pse_semantics(fake_npu):
    # softmax(scale * (pse + q k^T)) v, checked by hand on one query
    q, k, v = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    pse = torch.randn(1, 1, 1, 3)
    out = fake_npu.npu_fusion_attention(q, k, v, 1, "BNSD", pse=pse, scale=0.25)[0]
    weights = (0.25 * (pse[0, 0, 0] + k[0, 0] @ q[0, 0, 0])).softmax(0)
    torch.testing.assert_close(out[0, 0, 0], weights @ v[0, 0], **TOL)


def test_cross_entropy_counts_only_unmasked_tokens():
    logits = torch.randn(2, 3, 11)
    targets = torch.tensor([[1, 2, -100], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    loss = kernels.cross_entropy(logits, targets, mask)
    keep = [(0, 0), (0, 1), (1, 1), (1, 2)]
    ref = torch.stack([torch.nn.functional.cross_entropy(logits[b, t], targets[b, t]) for b, t in keep]).mean()
    torch.testing.assert_close(loss, ref)


# --------------------------------------------------------------------------------------------------------------------
# the fused portable ops: the same numbers as the plain torch ops they replace


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fused_forward_and_backward_equal_f_rms_norm(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    g = torch.randn(3, 7, 64, dtype=dtype)

    def run(fn):
        x.grad = w.grad = None
        y = fn()
        y.backward(g)
        return y.detach(), x.grad, w.grad

    ours = run(lambda: kernels.rms_norm(x, w, 1e-6))
    ref = run(lambda: torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)


def test_rms_norm_under_autocast_hands_out_one_16_bit_copy():
    x, w = torch.randn(3, 7, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.rms_norm(x, w, 1e-6)
        projections = [kernels.linear(y, torch.randn(16, 64)) for _ in range(3)]  # as wq, wk, wv read it
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (64,), w, 1e-6).to(torch.bfloat16), rtol=0, atol=0)
    assert all(p.dtype == torch.bfloat16 for p in projections)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_keeps_only_gate_and_up_with_autograd_s_gradients(dtype):
    torch.manual_seed(0)
    gate, up = (torch.randn(3, 7, 40, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(3, 7, 40, dtype=dtype)

    def run(fn):
        gate.grad = up.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn()
        y.backward(g)
        return (y.detach(), gate.grad, up.grad), saved

    ours, saved = run(lambda: kernels.swiglu(gate, up))
    ref, ref_saved = run(lambda: torch.nn.functional.silu(gate) * up)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same ops: the same bits
    assert len(ref_saved) == 3 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def lce_case(dtype=torch.float32, V=65536):
    """h (100, 8) and a vocabulary of 65536 rows: the loss runs in two slices of 64 rows; some targets not counted."""
    torch.manual_seed(0)
    h = torch.randn(4, 25, 8, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(V, 8)).to(dtype).requires_grad_()
    targets = torch.randint(V, (4, 25))
    targets[0, :3] = -100
    mask = torch.ones(4, 25, dtype=torch.long)
    mask[1, 10:] = 0
    return h, w, targets, mask


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_linear_cross_entropy_equals_linear_then_cross_entropy(z_loss):
    h, w, targets, mask = lce_case()

    def run(fn):
        h.grad = w.grad = None
        loss = fn()
        (2.5 * loss).backward()  # a scaled loss (loss scaling, grad accumulation) scales the gradients
        return loss.detach(), h.grad, w.grad

    ours = run(lambda: kernels.linear_cross_entropy(h, w, targets, mask, z_loss))
    ref = run(lambda: kernels.cross_entropy(h @ w.T, targets, mask, z_loss))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradient buffer
        torch.testing.assert_close(kernels.linear_cross_entropy(h, w, targets, mask, z_loss), ref[0])


@pytest.mark.parametrize("weights", ["float32-autocast", "bfloat16", "bfloat16-sliced", "bfloat16-units"])
def test_linear_cross_entropy_in_bf16_is_within_bf16_rounding(weights, monkeypatch):
    dtype = torch.float32 if weights == "float32-autocast" else torch.bfloat16
    if weights == "bfloat16-units":  # the path of GPUs and CPUs with bf16 units: bf16 GEMMs, a bf16 gradient buffer
        monkeypatch.setattr(cpu_linear, "CPU_HAS_BF16_UNITS", True)
    if weights == "bfloat16-sliced":  # a bf16 weight converted to fp32 in slices of 300 rows, the last one ragged
        monkeypatch.setattr(cpu_linear, "CHUNK_WEIGHTS", 300 * 64)
    h, w, targets, mask = lce_case(dtype, V=4096)
    results = []
    for fn in (kernels.linear_cross_entropy, lambda h, w, *a: kernels.cross_entropy(kernels.linear(h, w), *a)):
        h.grad = w.grad = None
        saved = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = fn(h, w, targets, mask)
        if fn is kernels.linear_cross_entropy and dtype == torch.bfloat16:  # no fp32 copy of the weight is kept
            assert not any(t.dtype == torch.float32 and t.shape == w.shape for t in saved)
            with torch.no_grad():
                assert kernels.linear_cross_entropy(h, w, targets, mask).item() == pytest.approx(loss.item(), rel=1e-6)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == dtype
        results.append((loss.detach(), h.grad, w.grad))
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = results
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    for g, ref in ((gh, ref_gh), (gw, ref_gw)):
        assert (g.float() - ref.float()).norm() <= 0.01 * ref.float().norm()


@pytest.mark.parametrize("head", ["output", "tied", "norm_head"])
def test_model_training_loss_skips_logits_with_the_same_loss_and_gradients(head):
    overrides = {"output": {}, "tied": dict(tie_embeddings=True), "norm_head": dict(norm_head=True, z_loss=1e-3)}
    args = dataclasses.replace(PRESETS["tiny"], **overrides[head])
    torch.manual_seed(0)
    model = Transformer(args)
    idx, targets = torch.randint(512, (2, 16)), torch.randint(512, (2, 16))
    logits, loss = model(idx, targets)
    assert logits is None  # the fused path ran
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = kernels.cross_entropy(model(idx)[0], targets, None, args.z_loss)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        logits, loss = model(idx, targets)  # evaluation keeps the logits
    assert logits is not None and loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("chunk", [1 << 22, 7 * 48])  # the whole weight, and slices of 7 rows (ragged last one)
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_linear_on_fp32_units_is_a_bf16_gemm(monkeypatch, chunk, autocast):
    """kernels.linear in bf16 on a CPU without bf16 units (the fp32 GEMM on bf16 operands, the weight converted a
    slice at a time) against torch's own bf16 GEMM: forward and both gradients within one bf16 rounding."""
    monkeypatch.setattr(cpu_linear, "CPU_HAS_BF16_UNITS", False)
    monkeypatch.setattr(cpu_linear, "CHUNK_WEIGHTS", chunk)
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(3, 10, 48, dtype=dtype, requires_grad=True)
    w = torch.randn(40, 48, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 10, 40)
    results = []
    for fn in (kernels.linear, lambda x, w: F.linear(x.bfloat16(), w.bfloat16())):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, w)
        (y.float() * g).sum().backward()
        results.append((y, x.grad, w.grad))
    for ours, ref in zip(*results):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=8e-3, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------------
# the op table and path (2): bf16 on a CPU without bf16 units


def test_op_table_names_every_op_and_every_path():
    table = kernels.__doc__
    for op in ("rms_norm", "apply_rotary", "attention", "swiglu", "cross_entropy", "linear_cross_entropy", "linear",
               "nf4_linear"):
        assert f"\n    {op}(" in table, op
    functions = [n for n, o in vars(kernels).items() if isinstance(o, type) and issubclass(o, torch.autograd.Function)]
    assert functions and all(n in table for n in functions), functions
    assert "plain_training" in table and "bf16_on_fp32_units" in table


@pytest.mark.parametrize("case", ["causal", "alibi", "alibi-padding", "decode-step"])
def test_bf16_attention_on_fp32_units_is_torch_bf16_sdpa(monkeypatch, case):
    """Path (2) for attention: fp32 SDPA on the bf16 values against torch's own bf16 SDPA, the ALiBi bias included
    (shared by the layers in fp32, holding the bf16 bias's values)."""
    spec = ATTENTION_CASES[case]
    q, k, v = (t.bfloat16() for t in qkv(**spec.get("shape", {})))
    kwargs = dict(q_start=spec.get("q_start", 0))
    if spec.get("padding"):
        kwargs["key_padding_mask"] = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
    results = []
    for units in (False, True):
        monkeypatch.setattr(cpu_linear, "CPU_HAS_BF16_UNITS", units)
        alibi = {}
        if spec.get("alibi"):
            slopes = kernels.alibi_slopes(q.size(1))
            bias = kernels.alibi_attention_bias(slopes, torch.bfloat16, 16, q.size(2), k.size(2), **kwargs)
            assert bias.dtype == (torch.bfloat16 if units else torch.float32)
            torch.testing.assert_close(bias.float(), bias.bfloat16().float(), rtol=0, atol=0)
            alibi = dict(alibi_slopes=slopes, alibi_bias=bias)
        results.append(kernels.attention(q, k, v, **kwargs, **alibi))
    fp32_units, torch_bf16 = results
    assert fp32_units.dtype == torch_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(fp32_units.float(), torch_bf16.float(), rtol=8e-3, atol=1e-2)
