"""LoRA and QLoRA in model.py, NF4 in support/quant.py."""

import dataclasses

import pytest
import torch

import kernels
from model import (PRESETS, CheckpointError, LoRALinear, Transformer, apply_lora, load_lora, lora_state_dict,
                   merge_lora)
from support import cpu_linear, quant
from support.quant import NF4Linear


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(PRESETS["tiny"], **overrides))


def test_nf4_code_is_the_published_normal_float_table():
    # QLoRA's construction: quantiles of N(0, 1), 8 positive and 7 negative, with an exact zero, scaled to [-1, 1]
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    values = values / values.abs().max()
    torch.testing.assert_close(quant.NF4_CODE.double(), values, rtol=0, atol=1e-6)


def test_nf4_round_trip_error_is_within_the_code_spacing():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    q = quant.nf4_quantize(w)
    back = quant.nf4_dequantize(q, w.shape)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    half_gap = (quant.NF4_CODE[1:] - quant.NF4_CODE[:-1]).max() / 2
    stored_absmax = (q["absmax_q"].float() * q["absmax_scale"][:, None]).flatten()[: absmax.numel()]
    absmax_error = (stored_absmax + q["absmax_offset"] - absmax.flatten()).abs()[:, None]  # double quantisation
    assert (absmax_error <= q["absmax_scale"].max() / 2 + 1e-7).all()
    err = (back - w).view(-1, 64).abs()
    assert (err <= half_gap * absmax + absmax_error + 1e-7).all()
    # NF4 suits normal weights: clearly better than a uniform 4-bit grid over the same blocks
    uniform = ((w.view(-1, 64) / absmax * 7).round() / 7 * absmax).view_as(w)
    assert (back - w).pow(2).mean() < 0.8 * (uniform - w).pow(2).mean()
    assert (back - w).pow(2).mean().sqrt() < 0.12 * w.std()


def test_nf4_bits_per_parameter():
    w = torch.randn(4096, 1024)
    q = quant.nf4_quantize(w)
    bits = sum(t.numel() * t.element_size() * 8 for t in q.values()) / w.numel()
    assert 4.12 < bits < 4.14, bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 64 * 5])  # whole matrix, and 5-row chunks with a ragged last one
def test_nf4_linear_matches_the_dequantised_weight_and_saves_only_4_bits(monkeypatch, dtype, chunk):
    monkeypatch.setattr(cpu_linear, "CHUNK_WEIGHTS", chunk)
    torch.manual_seed(0)
    shape = (96, 64)
    q = quant.nf4_quantize(torch.randn(shape) * 0.02)
    x = torch.randn(2, 7, 64, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = quant.nf4_linear(x, q, shape)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = kernels.linear(x2, quant.nf4_dequantize(q, shape, dtype))
    (y2 * g).sum().backward()
    assert y.dtype == x.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # GEMM blocking
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    # what autograd keeps for backward is the 4-bit weight itself: no dequantised copy, no input
    assert sum(t.numel() * t.element_size() for t in saved) <= sum(t.numel() * t.element_size() for t in q.values())
    assert any(t.data_ptr() == q["packed"].data_ptr() for t in saved)


def test_lora_at_initialisation_leaves_outputs_unchanged():
    model = tiny_model()
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before, _ = model(idx)
        adapted = apply_lora(model, rank=4, alpha=8)
        after, _ = model(idx)
    assert len(adapted) == 2 * 7
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_only_adapter_weights_train_and_reach_the_optimiser():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets="wq,wv")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 2 * 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 512, (2, 16))
    for _ in range(3):
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(lora_state_dict(model)[n].abs().sum() > 0 for n in trainable if n.endswith("lora_b"))


@pytest.mark.parametrize("quantize", [False, True])
def test_merged_model_equals_model_with_adapters(quantize):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=16, quantize_base=quantize)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(std=0.05)  # trained-looking adapters
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        with_adapters, _ = model.eval()(idx)
        merge_lora(model)
        merged, _ = model(idx)
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-4)


def test_adapters_save_and_load_back():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_()
    saved = {n: p.detach().clone() for n, p in lora_state_dict(model).items()}
    other = tiny_model()
    apply_lora(other, rank=2, alpha=4)
    load_lora(other, saved)
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(other(idx)[0], model(idx)[0])


def test_adapter_for_another_shape_is_refused():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4)
    saved = lora_state_dict(model)
    other = tiny_model(dim=128, n_heads=8, n_kv_heads=4)
    apply_lora(other, rank=2, alpha=4)
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.attention\.wq\.lora_a has shape \(2, 64\)"):
        load_lora(other, saved)


def test_qlora_stores_block_linears_in_nf4_and_lowers_the_loss():
    model = tiny_model()
    apply_lora(model, rank=8, alpha=16, dropout=0.05, quantize_base=True)
    assert isinstance(model.layers[0].feed_forward.w2.base, NF4Linear)
    assert isinstance(model.output, torch.nn.Linear)  # the head is neither quantised nor adapted
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    idx = torch.randint(0, 64, (4, 32))  # a small repeated batch the adapters can fit
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses[::10]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(rank=0), "lora_rank=0"), (dict(rank=-2), "lora_rank=-2"),
    (dict(rank=4, targets="wq,attn_proj"), "pattern 'attn_proj' matches no linear layer"),
])
def test_bad_lora_settings_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        apply_lora(tiny_model(), alpha=8, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# adapter dirs and convert.py merge-lora


def trained_adapter(tmp_path, quantize=False):
    """A base checkpoint dir, and an adapter dir with non-zero adapters trained (here: drawn) on it."""
    import support.peft
    from support.weights import write_checkpoint

    model = tiny_model()
    write_checkpoint(tmp_path / "base", model.state_dict(), model.args, "llama")
    apply_lora(model, rank=4, alpha=8, targets="wq,wv,w2", quantize_base=quantize)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(std=0.05)
    support.peft.write_peft_adapter(tmp_path / "adapter", lora_state_dict(model), model.args, "llama", rank=4,
                                    alpha=8, dropout=0.0)
    return model.eval()


def test_merge_lora_command_equals_model_with_adapters(tmp_path):
    import convert

    model = trained_adapter(tmp_path)
    convert.main(["merge-lora", "--src", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                  "--dst", str(tmp_path / "merged")])
    merged = Transformer.from_checkpoint(tmp_path / "merged")
    idx = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)


def test_merge_lora_into_a_base_of_another_shape_is_refused(tmp_path):
    import convert
    from support.weights import write_checkpoint

    trained_adapter(tmp_path)
    other = tiny_model(hidden_dim=192)
    write_checkpoint(tmp_path / "other", other.state_dict(), other.args, "llama")
    with pytest.raises(SystemExit, match=r"mlp\.down_proj\.lora_A\.weight has shape \(4, 176\), the base needs \(4, 192\)"):
        convert.main(["merge-lora", "--src", str(tmp_path / "other"), "--adapter", str(tmp_path / "adapter"),
                      "--dst", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_merge_lora_without_adapter_config_is_refused(tmp_path):
    import convert

    trained_adapter(tmp_path)
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(SystemExit, match="adapter_config.json: not found"):
        convert.main(["merge-lora", "--src", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                      "--dst", str(tmp_path / "merged")])


# --------------------------------------------------------------------------------------------------------------------
# LoRA and QLoRA fine-tuning runs of train.py: on a base checkpoint dir, only adapters train, exact resume, export

def lora_base(tmp_path):
    """Markov data (test_train's) and a base checkpoint dir trained on it for a few steps."""
    import train
    from test_train import BASE, markov_tokens, write_data

    data = write_data(tmp_path / "data", markov_tokens(1200, 1), markov_tokens(600, 2))
    pre = train.main(BASE + [f"--data_dir={data}", f"--out_dir={tmp_path / 'pre'}", "--max_iters=15", "--export"])
    return data, pre["export_dir"]


def lora_run(data, out, *extra):
    import train
    from test_train import BASE

    return train.main(BASE + [f"--data_dir={data}", f"--out_dir={out}", "--lr=1e-2", *extra])


def native_names(peft_tensors: dict) -> dict:
    """A LLaMA model's PEFT adapter tensors under our names, through support.hf_names.HF_LAYER (one weight per HF
    module)."""
    import re

    from support.hf_names import HF_LAYER

    out = {}
    for name, t in peft_tensors.items():
        m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight", name)
        out[f"layers.{m[1]}.{HF_LAYER[m[2] + '.weight'][: -len('.weight')]}.lora_{m[3].lower()}"] = t
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)  # tiny models: threads only cost spin-waits on a shared CPU
    return lora_base(tmp_path_factory.mktemp("lora"))


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_run_trains_only_adapters_lowers_the_loss_and_exports_the_merge(base, tmp_path, qlora):
    import json

    from safetensors import safe_open
    from model import load_lora
    from support.weights import load_tensors

    data, ckpt = base
    flags = [f"--init_from={ckpt}", "--lora_rank=4", "--lora_alpha=8", "--lora_targets=wq,wv,w2", "--max_iters=12",
             "--export"]
    run = lora_run(data, tmp_path / "out", *flags, *(["--qlora", "--dtype=bfloat16"] if qlora else []))
    losses = run["losses"]
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < losses[1] - 0.05
    # the adapter dir is PEFT's (tests/test_peft.py loads it with peft); our settings ride in the safetensors header
    settings = json.loads((run["adapter_dir"] / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["base_model_name_or_path"] == str(ckpt.resolve())
    with safe_open(str(run["adapter_dir"] / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["quantize_base"] == str(qlora)
        adapters = native_names({n: f.get_tensor(n) for n in f.keys()})
    assert len(adapters) == 2 * 3 * 2 and all(n.endswith((".lora_a", ".lora_b")) for n in adapters)
    # the export is the base's own weights plus B A on the adapted layers, the rest bit-identical
    merged, original = load_tensors(run["export_dir"]), load_tensors(ckpt)
    for name, w in original.items():
        changed = not torch.equal(merged[name], w)
        assert changed == name.endswith(("wq.weight", "wv.weight", "w2.weight")), name
    # and it computes what the base with the trained adapters computes
    model = Transformer.from_checkpoint(ckpt)
    apply_lora(model, rank=4, alpha=8, targets="wq,wv,w2")
    load_lora(model, adapters)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_checkpoint(run["export_dir"])(idx)[0], model(idx)[0],
                                   rtol=1e-4, atol=1e-4)
    # sample.py --adapter folds the adapter dir into the base at load: the same model again
    import sample

    folded, _ = sample.load_model(ckpt, "cpu", torch.float32)
    sample.add_adapter(folded, run["adapter_dir"])
    with torch.no_grad():
        torch.testing.assert_close(folded(idx)[0], model(idx)[0], rtol=1e-4, atol=1e-4)


def test_lora_resume_is_exact(base, tmp_path):
    data, ckpt = base
    flags = ["--lora_rank=4", "--qlora", f"--init_from={ckpt}", "--ckpt_interval=3"]
    straight = lora_run(data, tmp_path / "a", *flags, "--max_iters=6")
    lora_run(data, tmp_path / "b", *flags, "--max_iters=3")
    resumed = lora_run(data, tmp_path / "b", *flags[:2], "--init_from=resume", "--ckpt_interval=3", "--max_iters=6")
    assert [resumed["losses"][s] for s in (4, 5, 6)] == [straight["losses"][s] for s in (4, 5, 6)]


def test_lora_resume_takes_its_lora_settings_from_its_step_dir(base, tmp_path):
    # as a fine-tuning run's model keys: `--init_from=resume` alone continues a LoRA run; contradicting settings are
    # named instead of surfacing as a checkpoint that cannot be loaded
    data, ckpt = base
    flags = ["--lora_rank=4", "--lora_alpha=8", "--lora_targets=wq,wv", "--qlora", f"--init_from={ckpt}",
             "--ckpt_interval=3"]
    straight = lora_run(data, tmp_path / "a", *flags, "--max_iters=6")
    lora_run(data, tmp_path / "b", *flags, "--max_iters=3")
    with pytest.raises(SystemExit, match=r"init_from=resume: .*step_00000003 holds a LoRA run with lora_rank=4, "
                                         r"lora_targets='wq,wv', qlora=True; resume it with those \(or none\)"):
        lora_run(data, tmp_path / "b", "--lora_rank=8", "--init_from=resume", "--max_iters=6")
    resumed = lora_run(data, tmp_path / "b", "--init_from=resume", "--ckpt_interval=3", "--max_iters=6")
    assert [resumed["losses"][s] for s in (4, 5, 6)] == [straight["losses"][s] for s in (4, 5, 6)]
    assert resumed["adapter_dir"] is not None


@pytest.mark.parametrize("qlora", [False, True])
def test_dcp_to_native_of_a_lora_step_dir_merges_that_steps_adapters_into_the_base(base, tmp_path, qlora):
    # a LoRA run's step dir holds its adapters beside the frozen base: the documented export of a step dir merges them
    import convert
    from support.weights import load_tensors

    data, ckpt = base
    run = lora_run(data, tmp_path / "out", f"--init_from={ckpt}", "--lora_rank=4", "--lora_alpha=8",
                   "--lora_targets=wqkv,w2", "--max_iters=4", "--ckpt_interval=2", "--export",
                   *(["--qlora"] if qlora else []))
    for step in (2, 4):
        convert.main(["dcp-to-native", "--src", str(tmp_path / "out" / f"step_{step:08d}"),
                      "--dst", str(tmp_path / f"ckpt{step}")])
    exported, last, earlier = (load_tensors(d) for d in (run["export_dir"], tmp_path / "ckpt4", tmp_path / "ckpt2"))
    assert last.keys() == exported.keys() and all(torch.equal(last[n], exported[n]) for n in exported)
    assert not torch.equal(earlier["layers.0.attention.wq.weight"], exported["layers.0.attention.wq.weight"])


@pytest.mark.parametrize("flags, message", [
    (["--qlora"], "qlora=True trains adapters on a 4-bit base: set lora_rank"),
    (["--lora_rank=-1"], "--lora_rank=-1: expected an integer >= 0"),
    (["--lora_rank=4", "--lora_targets=wz"], "lora_targets: pattern 'wz' matches no linear layer"),
])
def test_lora_bad_settings_are_one_line(base, tmp_path, flags, message):
    data, ckpt = base
    with pytest.raises(SystemExit, match=message):
        lora_run(data, tmp_path / "out", f"--init_from={ckpt}", "--max_iters=1", *flags)
