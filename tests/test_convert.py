"""convert.py: HF parity per family, Baichuan W_pack / ALiBi / NormHead against plain references, round trips,
Meta shards, Vicuna deltas, DCP export, and bad input."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import convert
from model import Transformer, read_config
from support.weights import load_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, D, FF, L = 128, 64, 160, 2  # vocab, dim, ffn width, layers


def hf_llama(n_kv_heads=4, tied=False, vocab=V, seed=0, rope_theta=50000.0, eps=1e-5):
    """A random tiny transformers LlamaForCausalLM (rope_theta not 10000, eps 1e-5), fp32, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=n_kv_heads, rms_norm_eps=eps,
                         rope_theta=rope_theta, tie_word_embeddings=tied, max_position_embeddings=64,
                         attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from 1 so a misplaced norm shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def save_hf(path, state_dict, config):
    """An HF dir written by hand (for layouts transformers has no class for, e.g. Baichuan's W_pack)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def to_w_pack(sd):
    """LLaMA names -> Baichuan's: q/k/v stacked on rows into W_pack."""
    out = {}
    for name, t in sd.items():
        if ".q_proj." in name:
            k, v = sd[name.replace("q_proj", "k_proj")], sd[name.replace("q_proj", "v_proj")]
            out[name.replace("q_proj", "W_pack")] = torch.cat([t, k, v])
        elif ".k_proj." not in name and ".v_proj." not in name:
            out[name] = t
    return out


def baichuan_config(arch="BaichuanForCausalLM", alibi=False, baichuan2=False):
    cfg = {"architectures": [arch], "model_type": "baichuan", "hidden_size": D, "intermediate_size": FF,
           "num_attention_heads": 4, "num_hidden_layers": L, "rms_norm_eps": 1e-6, "vocab_size": V,
           "hidden_act": "silu", "model_max_length": 64, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if not alibi:  # the 7B configs state it; the ALiBi 13B configs do not
        cfg["max_position_embeddings"] = 64
    if baichuan2:
        cfg["z_loss_weight"] = 0
    return cfg


def random_sd(seed=0):
    torch.manual_seed(seed)
    return {k: (torch.rand(v.shape) + 0.5 if v.dim() == 1 else torch.randn(v.shape) * 0.1)
            for k, v in hf_llama().state_dict().items()}


def native_logits(path, idx):
    model = Transformer.from_checkpoint(path).eval()
    with torch.no_grad():
        return model(idx)[0]


def run(*argv):
    convert.main([str(a) for a in argv])


IDX = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))

# --------------------------------------------------------------------------------------------------------------------
# LLaMA: parity with transformers


@pytest.mark.parametrize("n_kv_heads,tied", [(4, False), (4, True), (2, False), (2, True)],
                         ids=["mha-untied", "mha-tied", "gqa-untied", "gqa-tied"])
def test_llama_logits_and_loss_match_transformers(tmp_path, n_kv_heads, tied):
    hf = hf_llama(n_kv_heads, tied)
    hf.save_pretrained(tmp_path / "hf")
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    model = Transformer.from_checkpoint(tmp_path / "ckpt").eval()
    assert model.args.rope_theta == 50000.0 and model.args.norm_eps == 1e-5
    assert model.args.kv_heads == n_kv_heads and model.args.tie_embeddings == tied
    with torch.no_grad():
        ref = hf(IDX, labels=IDX)
        logits, _ = model(IDX)
        _, loss = model(IDX[:, :-1], IDX[:, 1:])  # HF shifts labels inside; ours are already the next tokens
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)


def test_sharded_safetensors_and_bin_convert_alike(tmp_path):
    hf = hf_llama(2)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    # .bin shards with their index (transformers 5 no longer writes them, older checkpoints are made of them)
    sd, b = hf.state_dict(), tmp_path / "bin"
    b.mkdir()
    names = [n for n in sd if n != "lm_head.weight"], ["lm_head.weight"]
    weight_map = {}
    for i, group in enumerate(names):
        torch.save({n: sd[n].clone() for n in group}, b / f"pytorch_model-{i + 1:05d}-of-00002.bin")
        weight_map.update({n: f"pytorch_model-{i + 1:05d}-of-00002.bin" for n in group})
    (b / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (b / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    for src in ("single", "sharded", "bin"):
        run("hf-to-native", "--src", tmp_path / src, "--dst", tmp_path / f"out-{src}", "--max_shard_size", "50KB")
    ref = load_tensors(tmp_path / "out-single")
    assert (tmp_path / "out-single" / "model.safetensors.index.json").exists()  # the output is sharded too
    for src in ("sharded", "bin"):
        got = load_tensors(tmp_path / f"out-{src}")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert (native_logits(tmp_path / "out-bin", IDX) - hf(IDX).logits).abs().max() <= 1e-4


def test_dtype_flag_casts_every_tensor(tmp_path):
    hf_llama().save_pretrained(tmp_path / "hf")
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt", "--dtype", "bfloat16")
    assert {t.dtype for t in load_tensors(tmp_path / "ckpt").values()} == {torch.bfloat16}


def test_aquila_copies_tokenizer_json_and_writes_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_llama().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(architectures=["AquilaForCausalLM"], model_type="aquila", bos_token_id=100, eos_token_id=101,
               pad_token_id=0)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hf" / "generation_config.json").unlink()  # it would win: it is what generation uses
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    assert read_config(tmp_path / "ckpt")[1]["family"] == "aquila"
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    tok_cfg = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert tok_cfg == {"bos_id": 100, "eos_id": 101, "pad_id": 0, "chat_template": "aquila",
                       "add_bos_token": False, "add_eos_token": False}  # no post-processor: text gets neither
    # and back: HF's tokenizer_config.json names the tokens, so AutoTokenizer reads the dir
    from transformers import AutoTokenizer
    run("native-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "back")
    tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("t100", "t101", "t0")
    assert tok("t5 t7", add_special_tokens=False)["input_ids"] == [5, 7]


def test_llama_sentencepiece_tokenizer_ids_from_hf_token_strings(tmp_path):
    import prepare

    hf_llama(vocab=400).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()  # leave the ids to the tokenizer files
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if "token_id" not in k}))
    text = [line for line in open(os.path.join(ROOT, "convert.py")) if line.strip()]
    prepare.train_sentencepiece(text, tmp_path / "hf", vocab_size=400)  # unk 0, bos 1, eos 2, pad 3
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(  # HF's: token strings, eos as pad
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": {"content": "</s>"},
         "pad_token": "</s>"}))
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt", "--template", "vicuna")
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == (tmp_path / "hf" / "tokenizer.model").read_bytes()
    ours = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    # nothing says otherwise: LLaMA's sentencepiece convention, bos and no eos
    assert ours == {"bos_id": 1, "eos_id": 2, "pad_id": 2, "chat_template": "vicuna", "add_bos_token": True,
                    "add_eos_token": False, "legacy": False}
    assert prepare.load_tokenizer(tmp_path / "ckpt").eos_id == 2
    run("native-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "back")
    theirs = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    # the built-in template as its Jinja form (test_bring_your_own.py checks its ids against apply_chat_template)
    assert theirs.pop("chat_template") == prepare.template_jinja(prepare.load_tokenizer(tmp_path / "ckpt"), "vicuna")
    assert theirs == {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                      "pad_token": "</s>", "add_bos_token": True, "add_eos_token": False, "legacy": False}


# the published config.json files (fields that matter), as in each preset's linked repo
PUBLISHED = {
    "llama-7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                 "intermediate_size": 11008, "max_position_embeddings": 2048, "num_attention_heads": 32,
                 "num_hidden_layers": 32, "rms_norm_eps": 1e-06, "vocab_size": 32000},
    "baichuan-7b": {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
                    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
                    "num_hidden_layers": 32, "rms_norm_eps": 1e-06, "vocab_size": 64000},
    "baichuan-13b": {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 5120,
                     "intermediate_size": 13696, "model_max_length": 4096, "num_attention_heads": 40,
                     "num_hidden_layers": 40, "rms_norm_eps": 1e-06, "vocab_size": 64000},
    "baichuan2-7b": {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
                     "intermediate_size": 11008, "max_position_embeddings": 4096, "model_max_length": 4096,
                     "num_attention_heads": 32, "num_hidden_layers": 32, "rms_norm_eps": 1e-06,
                     "vocab_size": 125696, "z_loss_weight": 0},
    "baichuan2-13b": {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 5120,
                      "intermediate_size": 13696, "model_max_length": 4096, "num_attention_heads": 40,
                      "num_hidden_layers": 40, "rms_norm_eps": 1e-06, "vocab_size": 125696, "z_loss_weight": 0},
    "aquila-7b": {"architectures": ["AquilaModel"], "model_type": "aquila", "hidden_size": 4096,
                  "intermediate_size": 11008, "max_position_embeddings": 2048, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "vocab_size": 100008},
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_read_as_their_presets(preset):
    from model import PRESET_FAMILY, PRESETS

    family = convert.detect_family(PUBLISHED[preset], "config.json")
    assert family == PRESET_FAMILY[preset]
    # Baichuan2's NormHead is architecture: its presets and every conversion of it have norm_head=true
    assert convert.hf_args(PUBLISHED[preset], family, "config.json") == PRESETS[preset]


# --------------------------------------------------------------------------------------------------------------------
# Baichuan: W_pack, ALiBi, NormHead against references written here


def test_baichuan7b_w_pack_split_equals_llama_reference(tmp_path):
    hf = hf_llama(rope_theta=10000.0, eps=1e-6)  # Baichuan-7B is LLaMA with q/k/v fused
    sd = to_w_pack(hf.state_dict())
    save_hf(tmp_path / "hf", sd, baichuan_config("BaiChuanForCausalLM"))
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    args, cfg = read_config(tmp_path / "ckpt")
    assert cfg["family"] == "baichuan" and args.pos_emb == "rope"
    got, w_pack = load_tensors(tmp_path / "ckpt"), sd["model.layers.1.self_attn.W_pack.weight"]
    assert torch.equal(got["layers.1.attention.wq.weight"], w_pack[:D])
    assert torch.equal(got["layers.1.attention.wk.weight"], w_pack[D:2 * D])
    assert torch.equal(got["layers.1.attention.wv.weight"], w_pack[2 * D:])
    assert (native_logits(tmp_path / "ckpt", IDX) - hf(IDX).logits).abs().max() <= 1e-4


def baichuan_alibi_slopes(n):
    """Baichuan-13B's modeling_baichuan._get_interleave, verbatim in substance."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + baichuan_alibi_slopes(2 * p)[0::2][: n - p]


def baichuan13b_reference(sd, idx, n_heads, eps=1e-6, norm_head=False):
    """A plain Baichuan-13B forward: W_pack attention with Baichuan's ALiBi bias slope * key_position (softmax is
    shift-invariant per row, so this equals slope * (j - i)), causal mask, SwiGLU, RMSNorm."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    B, T = idx.shape
    h = sd["model.embed_tokens.weight"][idx]
    slopes = torch.tensor(baichuan_alibi_slopes(n_heads))
    bias = slopes[:, None, None] * torch.arange(T)[None, None, :]  # (H, 1, T)
    causal = torch.full((T, T), float("-inf")).triu(1)
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")}
    for i in sorted(layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q, k, v = (x @ sd[p + "self_attn.W_pack.weight"].T).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) + bias + causal
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        h = h + y @ sd[p + "self_attn.o_proj.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["lm_head.weight"]
    return rms(h, sd["model.norm.weight"]) @ (F.normalize(head, dim=-1) if norm_head else head).T


def w_pack_sd(dim, n_heads, seed=0):
    """A random Baichuan state dict of any width (L layers, FF inner, V vocabulary)."""
    torch.manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(V, dim) * 0.1, "model.norm.weight": torch.rand(dim) + 0.5,
          "lm_head.weight": torch.randn(V, dim) * 0.1}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.W_pack.weight": torch.randn(3 * dim, dim) * 0.1,
                   p + "self_attn.o_proj.weight": torch.randn(dim, dim) * 0.1,
                   p + "mlp.gate_proj.weight": torch.randn(FF, dim) * 0.1,
                   p + "mlp.up_proj.weight": torch.randn(FF, dim) * 0.1,
                   p + "mlp.down_proj.weight": torch.randn(dim, FF) * 0.1,
                   p + "input_layernorm.weight": torch.rand(dim) + 0.5,
                   p + "post_attention_layernorm.weight": torch.rand(dim) + 0.5})
    return sd


@pytest.mark.parametrize("n_heads", [4, 6])  # 6: not a power of two, like the 13B models' 40 heads
def test_baichuan13b_alibi_matches_plain_reference(tmp_path, n_heads):
    dim = 8 * n_heads
    sd = w_pack_sd(dim, n_heads)
    save_hf(tmp_path / "hf", sd, baichuan_config(alibi=True) | {"hidden_size": dim, "num_attention_heads": n_heads})
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    args, cfg = read_config(tmp_path / "ckpt")
    assert cfg["family"] == "baichuan" and args.pos_emb == "alibi" and args.n_heads == n_heads
    ref = baichuan13b_reference(sd, IDX, n_heads=n_heads)
    assert (native_logits(tmp_path / "ckpt", IDX) - ref).abs().max() <= 1e-4


def baichuan2_hf(path):
    """A Baichuan2 (ALiBi) HF dir whose head rows have very different lengths; its state dict."""
    sd = to_w_pack(random_sd())
    sd["lm_head.weight"] = sd["lm_head.weight"] * torch.rand(V, 1) * 5
    save_hf(path, sd, baichuan_config(alibi=True, baichuan2=True))
    return sd


def test_baichuan2_keeps_its_raw_normhead_however_converted_and_sample_normalises_it_once(tmp_path, capsys):
    import sample

    sd = baichuan2_hf(tmp_path / "hf")
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    assert "--for_training" not in capsys.readouterr().err
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "old-flag", "--for_training")  # older recipes
    assert "--for_training is no longer needed and does nothing" in capsys.readouterr().err
    ref = baichuan13b_reference(sd, IDX, n_heads=4, norm_head=True)
    raw = sd["lm_head.weight"]
    for name in ("ckpt", "old-flag"):
        args, cfg = read_config(tmp_path / name)
        assert cfg["family"] == "baichuan2" and args.norm_head
        assert torch.equal(load_tensors(tmp_path / name)["output.weight"], raw)
        assert (native_logits(tmp_path / name, IDX) - ref).abs().max() <= 1e-4
    model, _ = sample.load_model(tmp_path / "ckpt", "cpu", torch.float32)  # for generation: normalised once, in fp32
    assert type(model.output) is torch.nn.Linear
    assert torch.allclose(model.output.weight, raw / raw.norm(dim=-1, keepdim=True))
    with torch.no_grad():
        assert (model(IDX)[0] - ref).abs().max() <= 1e-4


def older_baichuan2_dir(tmp_path, head):
    """A checkpoint dir as convert.py hf-to-native wrote Baichuan2 before its head was kept raw (norm_head=false),
    with this head."""
    path = tmp_path / "older"
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", path, "--overwrite")
    tensors = {k: v.clone() for k, v in load_tensors(path).items()}
    save_file({**tensors, "output.weight": head}, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "norm_head": False}))
    return path


OLDER_BAICHUAN2 = "ignore:.*family baichuan2 with norm_head=false"  # said where the test expects it


@pytest.mark.filterwarnings(OLDER_BAICHUAN2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_older_baichuan2_dirs_with_their_head_normalised_once_load_as_normhead(tmp_path, dtype):
    """family baichuan2 with norm_head=false and unit-length head rows (normalised once in fp32, then rounded to the
    dir's dtype) is what the older conversion wrote: loaded as Baichuan2's NormHead, the same logits, said once."""
    sd = baichuan2_hf(tmp_path / "hf")
    raw = sd["lm_head.weight"]
    path = older_baichuan2_dir(tmp_path, F.normalize(raw, dim=-1).to(dtype))
    with pytest.warns(UserWarning, match=r"config.json: family baichuan2 with norm_head=false: its head rows are "
                                         r"normalised once .* loaded as NormHead \(norm_head=true\)"):
        args, cfg = read_config(path)
    assert args.norm_head and cfg["norm_head"] is True
    ref = baichuan13b_reference(sd, IDX, n_heads=4, norm_head=True)
    model = Transformer.from_checkpoint(path, dtype=torch.float32).eval()
    assert type(model.output).__name__ == "NormHead"
    with torch.no_grad():
        assert (model(IDX)[0] - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 2e-2)
    loads = f"import model; model.read_config({str(path)!r}); model.Transformer.from_checkpoint({str(path)!r})"
    err = subprocess.run([sys.executable, "-c", loads], cwd=ROOT, capture_output=True, text=True, timeout=120).stderr
    assert err.count("UserWarning: ") == 1 and "loaded as NormHead" in err, err  # loaded twice, said once


@pytest.mark.filterwarnings(OLDER_BAICHUAN2)
def test_older_baichuan2_dirs_trained_without_normhead_load_as_written(tmp_path):
    """A head whose rows are not unit length was trained on as a plain head (a run from an older conversion): it
    keeps norm_head=false, and its logits are those of a plain head, said once. A step dir is read as written."""
    sd = baichuan2_hf(tmp_path / "hf")
    head = F.normalize(sd["lm_head.weight"], dim=-1) * torch.linspace(0.9, 1.1, V)[:, None]  # trained on a little
    path = older_baichuan2_dir(tmp_path, head)
    with pytest.warns(UserWarning, match=r"its head rows are not unit length \(trained without NormHead\), loaded "
                                         r"as written \(norm_head=false\)"):
        args, _ = read_config(path)
    assert not args.norm_head
    plain = baichuan13b_reference({**sd, "lm_head.weight": head}, IDX, n_heads=4)
    assert (native_logits(path, IDX) - plain).abs().max() <= 1e-4
    step = tmp_path / "step_00000010"  # a step dir of such a run: no safetensors, its resume continues as it ran
    step.mkdir()
    (step / "config.json").write_text((path / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not read_config(step)[0].norm_head


def test_family_flag_overrides_detection(tmp_path):
    save_hf(tmp_path / "hf", to_w_pack(random_sd()), baichuan_config())  # reads as Baichuan (v1)
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt", "--family", "baichuan2")
    args, cfg = read_config(tmp_path / "ckpt")
    assert cfg["family"] == "baichuan2"
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())["chat_template"] == "baichuan2"


# --------------------------------------------------------------------------------------------------------------------
# native -> HF


@pytest.mark.parametrize("family", ["llama", "aquila", "baichuan", "baichuan-alibi", "baichuan2"])
def test_round_trip_hf_native_hf_is_tensor_identical(tmp_path, family):
    sd = random_sd()
    if family in ("llama", "aquila"):
        cfg = json.loads(json.dumps(hf_llama(2).config.to_dict()))
        sd = hf_llama(2).state_dict()
        cfg["architectures"] = ["AquilaForCausalLM" if family == "aquila" else "LlamaForCausalLM"]
    else:
        sd, cfg = to_w_pack(sd), baichuan_config("BaiChuanForCausalLM" if family == "baichuan" else
                                                 "BaichuanForCausalLM", alibi=family != "baichuan",
                                                 baichuan2=family == "baichuan2")
    save_hf(tmp_path / "hf", sd, cfg)
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    run("native-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    out_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    if family.startswith("baichuan"):
        for key in ("architectures", "model_type", "hidden_size", "num_attention_heads", "vocab_size"):
            assert out_cfg[key] == cfg[key]
        assert ("max_position_embeddings" in out_cfg) == (family == "baichuan")  # RoPE 7B vs ALiBi 13B
        run("hf-to-native", "--src", tmp_path / "back", "--dst", tmp_path / "again")
        assert read_config(tmp_path / "again") == read_config(tmp_path / "ckpt")  # family and layout read back


def test_native_to_hf_loads_in_transformers_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_llama(2, tied=True).save_pretrained(tmp_path / "hf")
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    run("native-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "back", "--max_shard_size", "40KB")
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(hf(IDX).logits, hf_llama(2, tied=True)(IDX).logits)
    assert (hf(IDX).logits - native_logits(tmp_path / "ckpt", IDX)).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------------------------
# Meta checkpoints


def to_meta(w, n_heads):
    """Rotate-half rows -> Meta's interleaved pairs (the inverse of DESIGN.md's Meta -> HF map)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_rope(x, theta):
    """Meta's rotary embedding: consecutive pairs as complex numbers. x (T, n_heads, head_dim)."""
    T, _, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(T, -1, hd // 2, 2))
    return torch.view_as_real(xc * rot[:, None]).flatten(2)


def test_meta_hidden_dim_as_meta_computes_it():
    assert convert.meta_hidden_dim(4096, 256) == 11008  # LLaMA 7B
    assert convert.meta_hidden_dim(5120, 256) == 13824  # 13B
    assert convert.meta_hidden_dim(8192, 4096, 1.3) == 28672  # LLaMA 2 70B


def test_meta_model_parallel_shards_merge_and_unpermute(tmp_path):
    hf_llama(2).save_pretrained(tmp_path / "hf")
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ref")
    ref, args = load_tensors(tmp_path / "ref"), read_config(tmp_path / "ref")[0]
    meta = {k: t.clone() for k, t in ref.items()}
    for k in meta:
        if k.endswith("wq.weight"):
            meta[k] = to_meta(meta[k], args.n_heads)
        elif k.endswith("wk.weight"):
            meta[k] = to_meta(meta[k], args.kv_heads)
    # Meta's layout splits: column-parallel on dim 0, row-parallel and the embedding on dim 1, norms replicated
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    src = tmp_path / "meta"
    src.mkdir()
    for rank in range(2):
        shard = {k: (t.chunk(2, dims[k.split(".")[-2]])[rank] if t.dim() == 2 else t) for k, t in meta.items()}
        shard["rope.freqs"] = torch.ones(8)  # LLaMA 1 checkpoints carry the rotary table
        torch.save({k: v.clone() for k, v in shard.items()}, src / f"consolidated.0{rank}.pth")
    # 2*4*64/3 = 170 -> multiple of 32 = 192; times 0.9 -> 153 -> 160 = FF
    (src / "params.json").write_text(json.dumps({"dim": D, "n_layers": L, "n_heads": 4, "n_kv_heads": 2,
                                                 "multiple_of": 32, "ffn_dim_multiplier": 0.9, "norm_eps": 1e-5,
                                                 "rope_theta": 50000.0, "vocab_size": -1}))
    run("meta-to-native", "--src", src, "--dst", tmp_path / "out", "--max_seq_len", 64)
    got = load_tensors(tmp_path / "out")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert read_config(tmp_path / "out")[0] == args
    # independent of the test's inverse map: Meta's complex RoPE on Meta rows gives the scores ours give
    x = torch.randn(5, D)
    q_meta = meta_rope((x @ meta["layers.0.attention.wq.weight"].T).view(5, 4, 16), 50000.0)
    k_meta = meta_rope((x @ meta["layers.0.attention.wk.weight"].T).view(5, 2, 16), 50000.0)
    import kernels
    cos, sin = (t[None, :, None] for t in kernels.rope_cos_sin(torch.arange(5), 16, 50000.0))  # (1, T, 1, hd)
    q = kernels.apply_rotary((x @ got["layers.0.attention.wq.weight"].T).view(1, 5, 4, 16), cos, sin)[0]
    k = kernels.apply_rotary((x @ got["layers.0.attention.wk.weight"].T).view(1, 5, 2, 16), cos, sin)[0]
    scores = lambda q, k: torch.einsum("thd,shd->hts", q, k.repeat_interleave(2, dim=1))
    assert torch.allclose(scores(q, k), scores(q_meta, k_meta), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Vicuna-style delta


def test_apply_delta_adds_weights_and_keeps_extra_vocab_rows(tmp_path):
    hf_llama(seed=0).save_pretrained(tmp_path / "base")
    hf_llama(seed=1, vocab=V + 2).save_pretrained(tmp_path / "delta")  # the delta added two tokens
    run("apply-delta", "--src", tmp_path / "base", "--delta", tmp_path / "delta", "--dst", tmp_path / "out")
    base, delta = load_file(str(tmp_path / "base" / "model.safetensors")), \
        load_file(str(tmp_path / "delta" / "model.safetensors"))
    got = load_tensors(tmp_path / "out")
    assert read_config(tmp_path / "out")[0].vocab_size == V + 2
    w = "layers.1.attention.wk.weight"
    assert torch.equal(got[w], base["model.layers.1.self_attn.k_proj.weight"] +
                       delta["model.layers.1.self_attn.k_proj.weight"])
    for ours, theirs in (("tok_embeddings.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        assert torch.equal(got[ours][:V], base[theirs] + delta[theirs][:V])
        assert torch.equal(got[ours][V:], delta[theirs][V:])
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == "vicuna"
    # the base may also be one of our checkpoint dirs
    run("hf-to-native", "--src", tmp_path / "base", "--dst", tmp_path / "base-native")
    run("apply-delta", "--src", tmp_path / "base-native", "--delta", tmp_path / "delta", "--dst", tmp_path / "out2")
    again = load_tensors(tmp_path / "out2")
    assert all(torch.equal(again[k], got[k]) for k in got)


# --------------------------------------------------------------------------------------------------------------------
# training checkpoints (torch.distributed.checkpoint)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_step_dir_exports_and_loads_in_sample_with_the_training_models_logits(tmp_path):
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import sample
    from model import PRESETS

    args = dataclasses.replace(PRESETS["tiny"], norm_head=True)  # a Baichuan2-style head, raw while training
    torch.manual_seed(0)
    model = Transformer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, args.vocab_size, (2, 8)), torch.randint(0, args.vocab_size, (2, 8)))[1].backward()
    optimizer.step()
    # what train.py writes: DCP {"model", "optim"} without a process group, config.json and tokenizer beside it
    step = tmp_path / "step_00000001"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=step, no_dist=True)
    (step / "config.json").write_text(json.dumps({**dataclasses.asdict(args), "family": "baichuan2"}))
    (step / "tokenizer_config.json").write_text(json.dumps({"bos_id": 1, "eos_id": 2, "pad_id": 3}))
    convert.dcp_to_native(step, tmp_path / "ckpt", max_shard_bytes=100_000)  # several batches and shards
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert (tmp_path / "ckpt" / "tokenizer_config.json").exists()
    assert read_config(tmp_path / "ckpt") == read_config(step)
    loaded, _ = sample.load_model(tmp_path / "ckpt", "cpu", torch.float32)
    idx = torch.randint(0, args.vocab_size, (2, 10))
    with torch.no_grad():
        assert (loaded(idx)[0] - model.eval()(idx)[0]).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------------------------------
# bad input: one clear line, nothing overwritten


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(tmp_path / "hf", random_sd(), hf_llama().config.to_dict() | {"architectures": ["LlamaForCausalLM"]})


def test_unknown_architecture_lists_supported(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(SystemExit, match=r"GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM.*Baichuan"):
        run("hf-to-native", "--src", hf_dir, "--dst", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shard_named_in_index_but_missing(tmp_path):
    hf_llama().save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(SystemExit, match=rf"{shard.name}: shard named in model.safetensors.index.json is missing"):
        run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "out")


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path):
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(FF - 1, D)
    save_file(sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"model.layers.1.mlp.up_proj.weight has shape \(159, 64\), "
                                         r"expected \(160, 64\)"):
        run("hf-to-native", "--src", hf_dir, "--dst", tmp_path / "out")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_unexpected_tensor_is_named(hf_dir, tmp_path, change):
    sd = load_file(str(hf_dir / "model.safetensors"))
    if change == "missing":
        del sd["model.layers.0.self_attn.v_proj.weight"]
        match = "missing tensor model.layers.0.self_attn.v_proj.weight"
    else:
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(D)
        match = "unexpected tensor model.layers.0.self_attn.q_proj.bias"
    save_file(sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=match):
        run("hf-to-native", "--src", hf_dir, "--dst", tmp_path / "out")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused(hf_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(V, D), "x": _Evil(str(marker))},
               hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"pytorch_model.bin: refused to unpickle"):
        run("hf-to-native", "--src", hf_dir, "--dst", tmp_path / "out")
    assert not marker.exists()


def test_existing_destination_refused_unless_overwrite(hf_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        run("hf-to-native", "--src", hf_dir, "--dst", dst)
    assert (dst / "keep.txt").read_text() == "mine"
    run("hf-to-native", "--src", hf_dir, "--dst", dst, "--overwrite")
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.*")) and not list(tmp_path.glob("out.tmp-*"))


def test_unknown_template_is_refused(hf_dir, tmp_path):
    with pytest.raises(SystemExit, match="--template=vicunna: unknown; expected one of .*vicuna"):
        run("hf-to-native", "--src", hf_dir, "--dst", tmp_path / "out", "--template", "vicunna")
    assert not (tmp_path / "out").exists()


def test_dcp_dir_without_metadata_is_refused(tmp_path):
    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "config.json").write_text(json.dumps({"family": "llama", "dim": 64, "n_heads": 4, "n_layers": 2}))
    with pytest.raises(SystemExit, match="not a torch.distributed.checkpoint dir"):
        run("dcp-to-native", "--src", step, "--dst", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["hf-to-native", "native-to-hf", "meta-to-native", "apply-delta", "dcp-to-native"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        run(command, "--help")
    assert e.value.code == 0 and "--src" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_without_traceback(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated
    r = subprocess.run([sys.executable, "convert.py", "hf-to-native", "--src", str(hf_dir), "--dst",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model.safetensors" in r.stderr
    assert not (tmp_path / "out").exists()
