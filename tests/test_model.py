"""model.py: presets, ALiBi, KV cache, masks, precision, checkpoint dirs and bad arguments."""

import dataclasses
import math
import resource

import pytest
import torch

import kernels
from kernels import alibi_slopes
from support.weights import write_checkpoint
from support.planner import flops_per_token
from model import PRESETS, CheckpointError, Transformer
from support.weights import load_tensors

EXPECTED_PARAMS = {
    "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "baichuan-7b": 7_000_559_616,
    "baichuan-13b": 13_264_901_120, "baichuan2-7b": 7_505_973_248, "baichuan2-13b": 13_896_668_160,
    "aquila-7b": 7_295_537_152,
}


def tiny(**overrides):
    return dataclasses.replace(PRESETS["tiny"], **overrides)


def build(args, seed=0):
    torch.manual_seed(seed)
    return Transformer(args).eval()


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    assert model.num_params() == EXPECTED_PARAMS[name]


def test_13b_on_meta_device_allocates_nothing():
    # (no time bound: a timed test fails on a loaded machine; the memory says whether weights were made)
    with torch.device("meta"):
        Transformer(PRESETS["tiny"])  # first use of the meta device pays one-off setup
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = Transformer(PRESETS["baichuan2-13b"])
    assert all(p.is_meta for p in model.parameters())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB: no weights allocated


def test_bench_preset_flops_formula():
    args = PRESETS["bench-llama"]
    with torch.device("meta"):
        n = Transformer(args).num_params(exclude_embedding=True)
    assert flops_per_token(args, 256) == 6 * n + 12 * args.n_layers * 256 * args.dim


@pytest.mark.parametrize("n_heads", [8, 12, 40])
def test_alibi_slopes_equal_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3), n_heads, torch.float32)  # (heads, 1, 3): slope * position
    torch.testing.assert_close(alibi_slopes(n_heads), alibi[:, 0, 1], rtol=1e-6, atol=0)  # Bloom rounds in fp32


def test_alibi_attention_equals_plain_loop():
    torch.manual_seed(0)
    B, H, T, D = 2, 12, 7, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    slopes = alibi_slopes(H)
    out = kernels.attention(q, k, v, alibi_slopes=slopes)
    ref = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores = [q[b, h, i] @ k[b, h, j] / math.sqrt(D) + slopes[h] * (j - i) for j in range(i + 1)]
                weights = torch.stack(scores).softmax(0)
                ref[b, h, i] = sum(w * v[b, h, j] for j, w in enumerate(weights))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_alibi_bias_is_built_once_and_saved_once_for_all_layers(monkeypatch, autocast):
    model = build(tiny(pos_emb="alibi", n_kv_heads=None, n_layers=3)).train()
    T = 32
    idx, targets = torch.randint(0, 512, (2, T)), torch.randint(0, 512, (2, T))
    built, saved = [], {}
    monkeypatch.setattr(kernels, "alibi_attention_bias",
                        lambda *a, f=kernels.alibi_attention_bias, **k: built.append(1) or f(*a, **k))

    def pack(t):  # autograd's saved (.., T, T) float tensors: the bias (and nothing else with SDPA's fused kernel)
        if t.dim() == 4 and t.shape[-2:] == (T, T) and t.is_floating_point():
            saved[t.untyped_storage().data_ptr()] = t.shape
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets)
    loss.backward()
    assert len(built) == 1  # once per forward, not once per layer
    assert list(saved.values()) == [(1, model.args.n_heads, T, T)]  # one copy kept for backward, not three
    # the layers get what attention would have built itself
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        shared, _ = model(idx)
        monkeypatch.setattr(type(model), "_alibi_bias", lambda *a: None)
        per_layer, _ = model(idx)
    torch.testing.assert_close(shared, per_layer, rtol=0, atol=0)


CACHE_CASES = {"rope-mha": dict(n_kv_heads=None), "rope-gqa": dict(n_kv_heads=2),
               "alibi-mha": dict(pos_emb="alibi", n_kv_heads=None), "alibi-gqa": dict(pos_emb="alibi", n_kv_heads=2)}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_kv_cache_decoding_equals_full_forward(case):
    model = build(tiny(**CACHE_CASES[case]))
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(batch_size=2, max_seq_len=16)
        prefill, _ = model(idx[:, :5])  # a multi-token chunk first, then one token at a time
        steps = [model(idx[:, t : t + 1], start_pos=t)[0] for t in range(5, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_left_padding_with_mask_and_positions_equals_unpadded(pos_emb):
    model = build(tiny(pos_emb=pos_emb))
    short = torch.randint(0, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    real = torch.tensor([[False] * 3 + [True] * 6])
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref, _ = model(short)
        out, _ = model(padded, key_padding_mask=real, positions=positions)
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_packed_documents_equal_separate_forwards(pos_emb):
    model = build(tiny(pos_emb=pos_emb))
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 7))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed, _ = model(torch.cat([a, b], 1), doc_ids=doc_ids)
        ref_a, _ = model(a)
        ref_b, _ = model(b)
    torch.testing.assert_close(packed, torch.cat([ref_a, ref_b], 1), rtol=1e-5, atol=1e-5)


def test_loss_ignores_masked_and_minus_100_targets():
    model = build(tiny())
    idx = torch.randint(0, 512, (2, 10))
    targets = torch.randint(0, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, :4] = 0
    with torch.no_grad():
        logits, loss = model(idx, targets, loss_mask=mask)
        other = targets.clone()
        other[:, :4] = (other[:, :4] + 1) % 512  # masked targets changed: loss must not move
        _, same = model(idx, other, loss_mask=mask)
        ignored = targets.masked_fill(mask == 0, -100)
        _, via_ignore = model(idx, ignored)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 512), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert same.item() == loss.item() == via_ignore.item()


def test_norm_head_normalises_rows_and_z_loss_adds_max_logit_term():
    model = build(tiny(norm_head=True, z_loss=2e-4))
    idx = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        logits, loss = model(idx, idx)
        h = model.tok_embeddings(idx)
        for layer in model.layers:
            h = layer(h, *(t[None, :8, None] for t in (model.rope_cos, model.rope_sin)))
        w = model.output.weight
        ref_logits = model.norm(h) @ (w / w.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 512), idx.view(-1))
    torch.testing.assert_close(loss, ce + 2e-4 * logits.max(-1).values.pow(2).mean())


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_bf16_forward_backward_reaches_every_parameter(pos_emb):
    model = build(tiny(pos_emb=pos_emb)).to(torch.bfloat16).train()
    idx = torch.randint(0, 512, (2, 16))
    _, loss = model(idx, idx)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("field,value,needle", [
    ("dim", 66, "dim"), ("n_kv_heads", 3, "n_kv_heads"), ("pos_emb", "learned", "pos_emb"),
    ("n_layers", 0, "n_layers"),
])
def test_inconsistent_model_args_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{needle}="):
        tiny(**{field: value})


def test_init_scales_residual_projections_by_depth():
    model = build(tiny(n_layers=8, dim=256, n_heads=4, hidden_dim=512))
    std_wq = model.layers[0].attention.wq.weight.std().item()
    std_wo = model.layers[0].attention.wo.weight.std().item()
    assert abs(std_wq - 0.02) < 0.002
    assert abs(std_wo - 0.02 / math.sqrt(16)) < 0.001


def test_init_std_and_unscaled_residual_as_flagai():
    # FlagAI's Aquila: every matrix Normal(0, initializer_range), the residual projections too
    model = build(tiny(n_layers=8, dim=256, n_heads=4, hidden_dim=512, init_std=0.006, init_scaled_residual=False))
    for w in (model.tok_embeddings.weight, model.layers[0].attention.wq.weight, model.layers[0].attention.wo.weight,
              model.layers[3].feed_forward.w2.weight, model.output.weight):
        assert abs(w.std().item() - 0.006) < 0.0005


# --------------------------------------------------------------------------------------------------------------------
# checkpoint dirs


@pytest.mark.parametrize("shard_bytes", [None, 60_000])
def test_checkpoint_roundtrip_single_and_sharded(tmp_path, shard_bytes):
    model = build(tiny(tie_embeddings=True))
    write_checkpoint(tmp_path, model.state_dict(), model.args, "llama", max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_bytes is not None)
    loaded = Transformer.from_checkpoint(tmp_path)
    idx = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def mapped_from(file):
    """Address ranges of this process's memory maps of `file` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(file)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_checkpoint_is_memory_mapped_not_copied(tmp_path):
    model = build(tiny())
    write_checkpoint(tmp_path, model.state_dict(), model.args, "llama")
    tensors = load_tensors(tmp_path)
    maps = mapped_from(tmp_path / "model.safetensors")
    assert maps and all(any(a <= t.data_ptr() < b for a, b in maps) for t in tensors.values())  # views of the map
    loaded = Transformer.from_checkpoint(tmp_path)
    w = loaded.layers[0].attention.wq.weight
    assert any(a <= w.data_ptr() < b for a, b in mapped_from(tmp_path / "model.safetensors"))


def test_checkpoint_bf16_load_casts(tmp_path):
    model = build(tiny())
    write_checkpoint(tmp_path, model.state_dict(), model.args, "llama")
    loaded = Transformer.from_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert loaded.rope_cos.dtype == torch.float32  # tables stay fp32


def test_missing_checkpoint_names_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        Transformer.from_checkpoint(tmp_path / "nope")


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    model = build(tiny())
    write_checkpoint(tmp_path, model.state_dict(), model.args, "llama")
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupted safetensors file"):
        Transformer.from_checkpoint(tmp_path)


def test_mismatched_checkpoint_names_tensor_and_shapes(tmp_path):
    model = build(tiny())
    write_checkpoint(tmp_path, model.state_dict(), dataclasses.replace(model.args, hidden_dim=192), "llama")
    with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.w1\.weight has shape \(176, 64\)"):
        Transformer.from_checkpoint(tmp_path)


def test_checkpoint_with_missing_tensor_is_named(tmp_path):
    model = build(tiny())
    state = model.state_dict()
    del state["norm.weight"]
    write_checkpoint(tmp_path, state, model.args, "llama")
    with pytest.raises(CheckpointError, match="missing tensor norm.weight"):
        Transformer.from_checkpoint(tmp_path)


def test_sharded_checkpoint_with_missing_shard_is_named(tmp_path):
    model = build(tiny())
    write_checkpoint(tmp_path, model.state_dict(), model.args, "llama", max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard named in"):
        load_tensors(tmp_path)
