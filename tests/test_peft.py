"""PEFT LoRA adapters in (convert.py merge-lora, sample.py --adapter) and out (train.py's out_dir/adapter), checked
against peft and transformers themselves; LoRA across the fused q/k/v projection (Baichuan's W_pack)."""

import dataclasses
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
import prepare
import sample
from support import quant
import support.peft
from support.weights import write_checkpoint
from model import PRESETS, LoRALinear, Transformer, apply_lora, lora_state_dict, merge_lora
from support.quant import NF4Linear
from support.weights import load_tensors
from test_convert import L, baichuan_config, save_hf, w_pack_sd
from test_sample import byte_tokenizer, hf_to_checkpoint, run_cli, tiny_hf_llama

pytestmark = pytest.mark.usefixtures("one_thread")
IDX = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
HF_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(tmp_path, **lora):
    """A tiny GQA LlamaForCausalLM, its hf-to-native checkpoint dir (with a byte tokenizer), and a PEFT model on a
    second copy of it with random non-zero adapters (lora_B is zero at PEFT's initialisation)."""
    from peft import LoraConfig, get_peft_model

    ckpt = hf_to_checkpoint(tiny_hf_llama(2), tmp_path)
    byte_tokenizer(ckpt)
    config = dict(r=4, lora_alpha=8, target_modules=HF_LINEARS + ["lm_head"], task_type="CAUSAL_LM") | lora
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "embedding layers found in target_modules" (lm_head): expected
        peft_model = get_peft_model(tiny_hf_llama(2), LoraConfig(**config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    return ckpt, peft_model.eval()


def save_peft(peft_model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path, **kw)
    return path


def merged_reference(peft_model):
    """transformers' logits of the PEFT model merged by PEFT itself."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model.merge_and_unload()(IDX).logits


def logits(model, idx=IDX):
    with torch.no_grad():
        return model.eval()(idx)[0]


# --------------------------------------------------------------------------------------------------------------------
# PEFT adapters in


@pytest.mark.parametrize("weights, lora", [
    ("safetensors", dict(rank_pattern={"down_proj": 2}, alpha_pattern={"lm_head": 3})),
    ("bin", dict(use_rslora=True, layers_to_transform=[1])),
], ids=["safetensors-patterns", "bin-rslora-layer1"])
def test_peft_adapter_merges_into_the_converted_base_like_merge_and_unload(tmp_path, weights, lora):
    ckpt, peft_model = peft_llama(tmp_path, **lora)
    adapter = save_peft(peft_model, tmp_path / "adapter", safe_serialization=weights == "safetensors")
    assert (adapter / f"adapter_model.{weights}").exists()
    if weights == "bin":  # a stored base that is transposed (GPT-2's Conv1D) is not: the update is B A either way
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": True}))
    reference = merged_reference(peft_model)
    convert.main(["merge-lora", "--src", str(ckpt), "--adapter", str(adapter), "--dst", str(tmp_path / "merged")])
    ours = logits(Transformer.from_checkpoint(tmp_path / "merged"))
    assert (ours - reference).abs().max() <= 1e-4
    assert (ours - logits(Transformer.from_checkpoint(ckpt))).abs().max() > 0.1  # the adapters do change it


def test_full_weights_saved_beside_peft_adapters_replace_the_base_as_peft_loads_them(tmp_path):
    from peft import PeftModel

    ckpt, peft_model = peft_llama(tmp_path, target_modules=["v_proj", "lm_head"])
    adapter = save_peft(peft_model, tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    head = "base_model.model.lm_head.base_layer.weight"  # PEFT saves it when the head is adapted
    tensors[head] = tensors[head] + 0.5 * torch.randn_like(tensors[head])
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = merged_reference(PeftModel.from_pretrained(tiny_hf_llama(2), str(adapter)))
    convert.main(["merge-lora", "--src", str(ckpt), "--adapter", str(adapter), "--dst", str(tmp_path / "merged")])
    assert (logits(Transformer.from_checkpoint(tmp_path / "merged")) - reference).abs().max() <= 1e-4
    model, _ = sample.load_model(ckpt, "cpu", torch.float32)
    sample.add_adapter(model, adapter, "llama")
    assert (logits(model) - reference).abs().max() <= 1e-4


def test_sample_adapter_flag_folds_a_peft_adapter_like_merge_and_unload(tmp_path):
    # target_modules as a string: a regex the whole module name must match
    ckpt, peft_model = peft_llama(tmp_path, target_modules=r"model\.layers\.\d+\.(self_attn\.[qv]_proj|mlp\.down_proj)")
    adapter = save_peft(peft_model, tmp_path / "adapter")
    reference = merged_reference(peft_model)
    model, _ = sample.load_model(ckpt, "cpu", torch.float32)
    sample.add_adapter(model, adapter, "llama")
    assert (logits(model) - reference).abs().max() <= 1e-4
    prompt = [256] + list(b"hello")
    greedy = list(sample.generate(model, prompt, 10, temperature=0, eos_id=257))
    out = run_cli(["--ckpt", ckpt, "--adapter", adapter, "--prompt", "hello", "--temperature", 0,
                   "--max_new_tokens", 10])
    assert out == bytes(i for i in greedy if i < 256).decode("utf-8", errors="replace") + "\n"
    base = Transformer.from_checkpoint(ckpt).eval()
    assert list(sample.generate(base, prompt, 10, temperature=0, eos_id=257)) != greedy


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sample_quantises_while_loading_with_the_adapter_folded_first(tmp_path, mode):
    ckpt, peft_model = peft_llama(tmp_path)
    adapter = save_peft(peft_model, tmp_path / "adapter")
    full, _ = sample.load_model(ckpt, "cpu", torch.float32)
    sample.add_adapter(full, adapter, "llama")
    want = logits(quant.quantize_model(full, mode, group_size=16))
    got, _ = sample.load_model(ckpt, "cpu", torch.float32, mode, 16, adapter, "llama")  # one weight at a time
    assert torch.equal(logits(got), want)
    out = run_cli(["--ckpt", ckpt, "--adapter", adapter, "--quantize", mode, "--group_size", 16, "--prompt", "hello",
                   "--temperature", 0, "--max_new_tokens", 6])
    prompt = [256] + list(b"hello")
    greedy = sample.generate(got, prompt, 6, temperature=0, eos_id=257)
    assert out == "".join(sample.stream_text(prepare.load_tokenizer(ckpt), greedy, prompt)) + "\n"


def test_sample_nf4_runs_a_peft_adapter_beside_the_4bit_base_as_peft_does(tmp_path, monkeypatch):
    """--quantize=nf4 --adapter is the model QLoRA trained: PEFT's unmerged LoRA forward over the NF4-rounded base
    (the reference: our NF4 weights dequantised, exported to HF, PeftModel.from_pretrained on them)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ckpt, peft_model = peft_llama(tmp_path, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    adapter = save_peft(peft_model, tmp_path / "adapter")
    base, _ = sample.load_model(ckpt, "cpu", torch.float32, "nf4")
    rounded = {n: t for n, t in base.state_dict().items() if ".nf4_" not in n}
    rounded |= {f"{n}.weight": m.dequantize(torch.float32) for n, m in base.named_modules() if isinstance(m, NF4Linear)}
    write_checkpoint(tmp_path / "rounded", rounded, base.args, "llama")
    prepare.copy_tokenizer_files(ckpt, tmp_path / "rounded")
    convert.main(["native-to-hf", "--src", str(tmp_path / "rounded"), "--dst", str(tmp_path / "rounded_hf")])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_nf4 = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "rounded_hf"), adapter)
        reference = peft_nf4.eval()(IDX).logits

    got, _ = sample.load_model(ckpt, "cpu", torch.float32, "nf4", adapter=adapter, family="llama")
    assert isinstance(got.layers[0].attention.wq, LoRALinear) and isinstance(got.layers[0].attention.wq.base,
                                                                             NF4Linear)
    with monkeypatch.context() as m:  # the model's numbers: its NF4 products dequantised (no C kernel)
        m.setattr(quant, "quant_kernels", lambda: None)
        assert (logits(got) - reference).abs().max() <= 1e-4
    # through the C kernel (codes and x in int16: ~5e-5 off each product) a few 1e-4 of the logits' scale off them
    assert (logits(got) - reference).abs().max() <= 1e-3 * reference.abs().max()
    assert (logits(base) - reference).abs().max() > 0.1  # the adapter does change it

    sample.main(["--ckpt", str(ckpt), "--quantize", "nf4", "--save_quantized", str(tmp_path / "nf4"),
                 "--max_new_tokens", "1"])  # the NF4 base saved; the adapter runs beside it when loaded
    saved, config = sample.load_model(tmp_path / "nf4", "cpu", torch.float32, adapter=adapter, family="llama")
    assert config["quantization"] == {"mode": "nf4"} and torch.equal(logits(saved), logits(got))
    prompt = [256] + list(b"hello")
    greedy = sample.generate(got, prompt, 6, temperature=0, eos_id=257)
    want = "".join(sample.stream_text(prepare.load_tokenizer(ckpt), greedy, prompt)) + "\n"
    for src in (ckpt, tmp_path / "nf4"):
        flags = ["--quantize", "nf4"] if src == ckpt else []
        out = run_cli(["--ckpt", src, *flags, "--adapter", adapter, "--prompt", "hello", "--temperature", 0,
                       "--max_new_tokens", 6])
        assert out == want
    with pytest.raises(SystemExit, match="--save_quantized: with --quantize=nf4 the adapter stays apart"):
        run_cli(["--ckpt", ckpt, "--quantize", "nf4", "--adapter", adapter, "--save_quantized", tmp_path / "x"])


def tiny_baichuan(tmp_path):
    """A tiny Baichuan-7B-style HF dir (W_pack, RoPE) converted to a checkpoint dir."""
    hf = save_hf(tmp_path / "hf_baichuan", w_pack_sd(64, 4), baichuan_config("BaiChuanForCausalLM"))
    convert.main(["hf-to-native", "--src", str(hf), "--dst", str(tmp_path / "baichuan")])
    return tmp_path / "baichuan"


def w_pack_peft_adapter(path, r=4, alpha=8, seed=0, dim=64, layers=L):
    """A Baichuan W_pack + o_proj adapter in PEFT's layout, written by hand (transformers has no Baichuan class)."""
    torch.manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, rows in (("W_pack", 3 * dim), ("o_proj", dim)):
            name = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, dim) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(rows, r) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": ["W_pack", "o_proj"], "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
              "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def test_baichuan_w_pack_peft_adapter_merges_as_its_update_split_by_rows_into_wq_wk_wv(tmp_path):
    ckpt = tiny_baichuan(tmp_path)
    adapter = w_pack_peft_adapter(tmp_path / "adapter")
    convert.main(["merge-lora", "--src", str(ckpt), "--adapter", str(tmp_path / "adapter"),
                  "--dst", str(tmp_path / "merged")])
    base, merged = load_tensors(ckpt), load_tensors(tmp_path / "merged")
    for i in range(L):
        p = f"base_model.model.model.layers.{i}.self_attn."
        delta = 8 / 4 * adapter[p + "W_pack.lora_B.weight"] @ adapter[p + "W_pack.lora_A.weight"]
        for w, rows in zip(("wq", "wk", "wv"), delta.split(64)):
            name = f"layers.{i}.attention.{w}.weight"
            torch.testing.assert_close(merged[name], base[name] + rows, rtol=0, atol=1e-6)
        o = f"layers.{i}.attention.wo.weight"
        torch.testing.assert_close(merged[o], base[o] + 2 * adapter[p + "o_proj.lora_B.weight"]
                                   @ adapter[p + "o_proj.lora_A.weight"], rtol=0, atol=1e-6)
    untouched = [n for n in base if not n.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight"))]
    assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched)


# --------------------------------------------------------------------------------------------------------------------
# our adapters out: train.py writes PEFT's format, PeftModel loads it on the HF export of the base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from test_lora import lora_base

    return lora_base(tmp_path_factory.mktemp("peft_base"))


def test_train_lora_adapter_loads_in_peft_on_the_hf_export_with_our_merged_logits(base, tmp_path):
    from peft import PeftConfig, PeftModel
    from safetensors import safe_open
    from test_lora import lora_run
    from transformers import AutoModelForCausalLM

    data, ckpt = base
    # the fused q/k/v adapter on a LLaMA model (exported as q/k/v adapters sharing A), the MLP, and the head
    run = lora_run(data, tmp_path / "out", f"--init_from={ckpt}", "--lora_rank=4", "--lora_alpha=8",
                   "--lora_targets=W_pack,w1,w2,w3,output", "--max_iters=6", "--export")
    assert run["losses"][6] < run["losses"][1]
    adapter = run["adapter_dir"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword arguments" for keys of ours
        config = PeftConfig.from_pretrained(str(adapter))
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha) == ("LORA", "CAUSAL_LM", 4, 8)
    assert config.base_model_name_or_path == str(ckpt.resolve())
    assert sorted(config.target_modules) == ["down_proj", "gate_proj", "k_proj", "lm_head", "q_proj", "up_proj",
                                             "v_proj"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["quantize_base"] == "False" and f.metadata()["lora_targets"] == "W_pack,w1,w2,w3,output"
    convert.main(["native-to-hf", "--src", str(ckpt), "--dst", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    idx = IDX % 64
    with torch.no_grad():
        theirs = peft_model(idx).logits
    model = Transformer.from_checkpoint(run["export_dir"]).eval()
    with torch.no_grad():
        ours = model(idx)[0]
        base_logits = Transformer.from_checkpoint(ckpt).eval()(idx)[0]
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - base_logits).abs().max() > 1e-3


class HFBaichuanShape(torch.nn.Module):
    """Just the module names and linears of HF's BaichuanForCausalLM (transformers has no Baichuan class): enough for
    peft to find W_pack and merge an adapter into it as it would in the real model."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for i in range(L):
            layer = torch.nn.Module()
            layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
            for parent, name in (("self_attn", "W_pack"), ("self_attn", "o_proj"), ("mlp", "gate_proj"),
                                 ("mlp", "up_proj"), ("mlp", "down_proj")):
                w = tensors[f"model.layers.{i}.{parent}.{name}.weight"]
                linear = torch.nn.Linear(w.size(1), w.size(0), bias=False)
                linear.weight = torch.nn.Parameter(w.clone())
                setattr(getattr(layer, parent), name, linear)
            self.model.layers.append(layer)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # what peft's causal-LM wrapper looks up
        raise NotImplementedError


@pytest.mark.parametrize("targets", ["W_pack,wo", "wq,wk,wv,wo", "wq,wv"])
def test_baichuan_adapters_export_as_a_w_pack_adapter_peft_merges_to_our_weights(tmp_path, targets):
    from peft import PeftModel

    ckpt = tiny_baichuan(tmp_path)
    model = Transformer.from_checkpoint(ckpt)
    apply_lora(model, rank=4, alpha=8, targets=targets)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(std=0.1)
    support.peft.write_peft_adapter(tmp_path / "adapter", lora_state_dict(model), model.args, "baichuan", rank=4,
                               alpha=8, dropout=0.0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "W_pack" in config["target_modules"]
    separate = 3 if targets.startswith("wq,wk,wv") else 2 if targets == "wq,wv" else 0
    assert config["rank_pattern"] == ({"W_pack": 4 * separate} if separate else {})  # block-diagonal: r per part
    assert config["alpha_pattern"] == ({"W_pack": 8 * separate} if separate else {})
    hf = HFBaichuanShape(load_file(str(tmp_path / "hf_baichuan" / "model.safetensors")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_by_peft = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).merge_and_unload()
    merge_lora(model)
    for i in range(L):
        attention = model.layers[i].attention
        ours = torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight])
        theirs = merged_by_peft.model.layers[i].self_attn.W_pack.weight
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # and our own reader folds the exported adapter back to the same weights
    convert.main(["merge-lora", "--src", str(ckpt), "--adapter", str(tmp_path / "adapter"),
                  "--dst", str(tmp_path / "merged")])
    merged = load_tensors(tmp_path / "merged")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(merged[name], p, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# LoRA on the fused q/k/v projection


def trainable(targets: str, preset="baichuan-7b") -> int:
    with torch.device("meta"):
        model = Transformer(PRESETS[preset])
    apply_lora(model, rank=8, alpha=16, targets=targets)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_baichuan_7b_rank_8_trainable_parameters_w_pack_and_separate_q_k_v():
    # LLaMA-Efficient-Tuning's Baichuan-7B LoRA: one adapter on W_pack, o_proj and the three MLP linears
    assert trainable("W_pack,wo,w1,w2,w3") == 17_891_328
    assert trainable("wqkv,wo,w1,w2,w3") == 17_891_328
    assert trainable("wq,wk,wv,wo,w1,w2,w3") == 19_988_480


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(PRESETS["tiny"], **overrides))


def test_fused_adapter_is_one_a_and_one_b_and_leaves_outputs_unchanged_at_init():
    model = tiny_model()
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model.eval()(idx)[0]
    adapted = apply_lora(model, rank=4, alpha=8, dropout=0.1, targets="W_pack")
    assert adapted == ["layers.0.attention.wqkv", "layers.1.attention.wqkv"]
    shapes = {n: tuple(p.shape) for n, p in lora_state_dict(model).items()}
    assert shapes == {f"layers.{i}.attention.wqkv.lora_{k}": s for i in range(2)
                      for k, s in (("a", (4, 64)), ("b", (64 + 32 + 32, 4)))}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], before, rtol=0, atol=0)


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_fused_adapter_trains_and_the_merged_model_equals_the_model_with_adapters(quantize):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets="wqkv,w2", quantize_base=quantize)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(15):
        _, loss = model.train()(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses[::5]
    with torch.no_grad():
        for p in lora_state_dict(model).values():  # every row of B non-zero, whatever training reached
            p.add_(torch.randn_like(p) * 0.05)
        with_adapters = model.eval()(idx)[0]
        merge_lora(model)
        merged = model(idx)[0]
    assert all(layer.attention.wqkv is None for layer in model.layers)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-4)


def test_fused_and_separate_adapters_on_the_same_projection_are_refused():
    with pytest.raises(ValueError, match="layers.0.attention would get both the fused wqkv adapter and its own wk"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets="W_pack,wk")


def test_w_pack_qlora_run_exports_a_w_pack_adapter_and_its_merge(base, tmp_path):
    from test_lora import lora_run

    data, ckpt = base
    run = lora_run(data, tmp_path / "out", f"--init_from={ckpt}", "--lora_rank=4", "--lora_targets=W_pack",
                   "--qlora", "--dtype=bfloat16", "--max_iters=4", "--export")
    assert all(torch.isfinite(torch.tensor(list(run["losses"].values()))))
    merged, original = load_tensors(run["export_dir"]), load_tensors(ckpt)
    for name, w in original.items():
        assert torch.equal(merged[name], w) != name.endswith(("wq.weight", "wk.weight", "wv.weight")), name
    model, _ = sample.load_model(ckpt, "cpu", torch.float32)
    sample.add_adapter(model, run["adapter_dir"], "llama")
    idx = IDX % 64  # the base's vocabulary
    torch.testing.assert_close(logits(model, idx), logits(Transformer.from_checkpoint(run["export_dir"]), idx),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# bad adapters: one line naming the file and the field


def bad_config(**change):
    return lambda adapter: (adapter / "adapter_config.json").write_text(json.dumps(
        json.loads((adapter / "adapter_config.json").read_text()) | change))


def edit_tensors(change):
    """An edit of an adapter dir: change(tensors) applied to its adapter_model.safetensors."""
    def edit(adapter):
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        change(tensors)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return edit


def rename_tensor(old, new):
    return edit_tensors(lambda tensors: tensors.__setitem__(new, tensors.pop(old)))


def reshape_tensor(name, shape):
    return edit_tensors(lambda tensors: tensors.__setitem__(name, torch.zeros(shape)))


P = "base_model.model.model.layers.1.self_attn."


@pytest.mark.parametrize("edit, message", [
    (bad_config(use_dora=True), r"adapter_config.json: use_dora: True is not supported"),
    (bad_config(peft_type="IA3"), r"adapter_config.json: peft_type: 'IA3' is not supported \(only 'LORA'\)"),
    (bad_config(bias="all"), r"adapter_config.json: bias: 'all' is not supported"),
    (bad_config(modules_to_save=["lm_head"]), r"adapter_config.json: modules_to_save: \['lm_head'\] is not supported"),
    (bad_config(init_lora_weights="pissa"), r"adapter_config.json: init_lora_weights: 'pissa' changed the base"),
    (bad_config(r=0), r"adapter_config.json: r=0: expected an integer >= 1"),
    (bad_config(target_modules=["W_pack", "qkv_proj"]),
     r"adapter_config.json: target_modules: 'qkv_proj' names no linear layer of a baichuan model"),
    (bad_config(target_modules="W_pack"),  # a string is a regex for the whole name, as in PEFT
     r"adapter_config.json: target_modules: 'W_pack' matches no linear layer of a baichuan model"),
    (bad_config(target_modules=["W_pack"]), r"adapter_model.safetensors: model.layers.0.self_attn.o_proj is adapted "
                                            r"in the weights but not in adapter_config.json's target_modules"),
    (lambda a: (a / "adapter_model.safetensors").unlink(),
     r"adapter_model.safetensors: not found \(nor adapter_model.bin\)"),
    (rename_tensor(P + "W_pack.lora_A.weight", "base_model.model.model.layers.7.self_attn.W_pack.lora_A.weight"),
     r"adapter_model.safetensors: tensor base_model.model.model.layers.7.self_attn.W_pack.lora_A.weight adapts "
     r"model.layers.7.self_attn.W_pack, which is no linear layer of the baichuan base"),
    (rename_tensor(P + "W_pack.lora_A.weight", P + "q_proj.lora_A.weight"),
     r"adapter_model.safetensors: tensor .*q_proj.lora_A.weight adapts model.layers.1.self_attn.q_proj, which is no"),
    (reshape_tensor(P + "W_pack.lora_B.weight", (3 * 96, 4)),
     r"adapter_model.safetensors: tensor .*layers.1.self_attn.W_pack.lora_B.weight has shape \(288, 4\), the base "
     r"needs \(192, 4\)"),
    (reshape_tensor(P + "o_proj.lora_A.weight", (2, 64)),
     r"tensor .*layers.1.self_attn.o_proj.lora_A.weight has shape \(2, 64\), the base needs \(4, 64\) \(rank 4\)"),
    (lambda a: (a / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}'),
     r"adapter_config.json: peft_type: missing \(expected a PEFT LoRA adapter"),
], ids=["dora", "ia3", "bias", "modules_to_save", "pissa", "rank", "target", "regex", "untargeted", "no-weights",
        "layer", "name", "rows", "rank-shape", "not-an-adapter"])
def test_bad_peft_adapter_is_one_line_naming_file_and_field(tmp_path, edit, message):
    ckpt = tiny_baichuan(tmp_path)
    w_pack_peft_adapter(tmp_path / "adapter")
    edit(tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        convert.main(["merge-lora", "--src", str(ckpt), "--adapter", str(tmp_path / "adapter"),
                      "--dst", str(tmp_path / "merged")])
    text = str(e.value)
    assert text.startswith("convert.py: ") and "\n" not in text
    assert re.search(message, text), text
    assert not (tmp_path / "merged").exists()


def test_bad_peft_adapter_in_sample_is_one_line(tmp_path):
    ckpt = tiny_baichuan(tmp_path)
    w_pack_peft_adapter(tmp_path / "adapter")
    bad_config(use_dora=True)(tmp_path / "adapter")
    model, _ = sample.load_model(ckpt, "cpu", torch.float32)
    # library code raises SampleError; sample.py's main says it as "sample.py: ..." in one line and exits
    with pytest.raises(sample.SampleError, match=r"^--adapter=.*adapter_config.json: use_dora: True is not "
                                                 r"supported[^\n]*$"):
        sample.add_adapter(model, tmp_path / "adapter", "baichuan")


def test_our_older_adapter_dirs_still_merge(tmp_path):
    model = tiny_model()
    write_checkpoint(tmp_path / "base", model.state_dict(), model.args, "llama")
    apply_lora(model, rank=4, alpha=8, targets="wq,w2")
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(std=0.05)
    (tmp_path / "old").mkdir()
    save_file({n: p.detach().contiguous() for n, p in lora_state_dict(model).items()},
              str(tmp_path / "old" / "adapter.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({"rank": 4, "alpha": 8, "targets": "wq,w2"}))
    convert.main(["merge-lora", "--src", str(tmp_path / "base"), "--adapter", str(tmp_path / "old"),
                  "--dst", str(tmp_path / "merged")])
    idx = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_checkpoint(tmp_path / "merged")(idx)[0], model.eval()(idx)[0],
                                   rtol=1e-5, atol=1e-5)
