"""FlagAI's Aquila format (support/flagai.py): a checkpoints_in/aquila-7b dir laid out as FlagAI's AQUILAModel saves
and loads it goes through convert.py hf-to-native with FlagAI's logits; FlagAI's step count from its own index maps."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import convert
from model import CheckpointError, read_config
from support import flagai
from test_convert import native_logits, run, to_meta

DIM, HEADS, LAYERS, VOCAB, MULTIPLE_OF = 64, 4, 2, 96, 32
HIDDEN = 192  # AQUILAForward: 32 * ceil(int(2 * 256 / 3) / 32) = 32 * ceil(170 / 32)


def flagai_dir(path, wrap_module=False, seed=0):
    """checkpoints_in/<model>/ as the document shows it: config.json with FlagAI's fields (training switches and
    all) and pytorch_model.bin holding AQUILAModel's state dict (Meta's names, interleaved rotary rows)."""
    torch.manual_seed(seed)
    sd = {"tok_embeddings.weight": torch.randn(VOCAB, DIM) * 0.3, "norm.weight": torch.rand(DIM) + 0.5,
          "output.weight": torch.randn(VOCAB, DIM) * 0.1}
    for i in range(LAYERS):
        p = f"layers.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            sd[p + f"attention.{n}.weight"] = torch.randn(DIM, DIM) * 0.1
        sd[p + "feed_forward.w1.weight"] = torch.randn(HIDDEN, DIM) * 0.1
        sd[p + "feed_forward.w3.weight"] = torch.randn(HIDDEN, DIM) * 0.1
        sd[p + "feed_forward.w2.weight"] = torch.randn(DIM, HIDDEN) * 0.1
        sd[p + "attention_norm.weight"] = torch.rand(DIM) + 0.5
        sd[p + "ffn_norm.weight"] = torch.rand(DIM) + 0.5
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "dim": DIM, "multiple_of": MULTIPLE_OF, "n_heads": HEADS, "n_layers": LAYERS, "norm_eps": 1e-05,
        "vocab_size": VOCAB, "max_seq_len": 64, "initializer_range": 0.006, "flash_atten": False,
        "flash_atten_llama_style": False, "checkpoint_activations": True, "ckpoint_layer": 1,
        "use_triangle_attn": True}))
    torch.save({"module": sd} if wrap_module else sd, path / "pytorch_model.bin")
    return sd


def flagai_logits(sd, idx, eps=1e-5):
    """AQUILAModel.forward (aquila_model.py, aquila_block.py, attentions.py at 0b48769): RMSNorm, rotary by
    view_as_complex over adjacent pairs, scores clamped to [-1024, 1024], causal mask, w2(silu(w1 x) * w3 x)."""
    T, hd = idx.shape[1], DIM // HEADS

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rotary(x):  # (B, T, H, hd)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None]).flatten(3)

    h = sd["tok_embeddings.weight"][idx]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q, k, v = ((x @ sd[p + f"attention.{n}.weight"].T).view(1, T, HEADS, hd) for n in ("wq", "wk", "wv"))
        q, k = rotary(q).transpose(1, 2), rotary(k).transpose(1, 2)
        scores = torch.clamp(q @ k.transpose(2, 3) / math.sqrt(hd), min=-1024.0, max=1024.0) + mask
        out = (F.softmax(scores.float(), dim=-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, T, DIM)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("wrap_module", [False, True], ids=["state-dict", "deepspeed-module"])
def test_flagai_dir_converts_with_flagais_logits(tmp_path, wrap_module):
    sd = flagai_dir(tmp_path / "aquila-7b", wrap_module)
    family = ["--family=aquila"] if wrap_module else []  # the command that said "field 'hidden_size' missing"
    run("hf-to-native", f"--src={tmp_path / 'aquila-7b'}", f"--dst={tmp_path / 'ours'}", *family)
    args, cfg = read_config(tmp_path / "ours")
    assert cfg["family"] == "aquila" and args.hidden_dim == HIDDEN and args.norm_eps == 1e-5
    assert (args.init_std, args.init_scaled_residual) == (0.006, False)  # initializer_range, FlagAI's init
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(native_logits(tmp_path / "ours", idx), flagai_logits(sd, idx), rtol=1e-4, atol=1e-5)


def test_interleaved_rotary_rows_become_rotate_half():
    w = torch.randn(DIM, DIM)
    got = dict(flagai.native_tensors({"layers.0.attention.wq.weight": to_meta(w, HEADS),
                                      "layers.0.attention.wv.weight": w}, flagai.flagai_args(
        {"dim": DIM, "n_heads": HEADS, "n_layers": 1, "multiple_of": 32}, "cfg"), convert.meta_to_rotate_half))
    assert torch.equal(got["layers.0.attention.wq.weight"], w) and got["layers.0.attention.wv.weight"] is w


def test_aquila_7b_config_of_the_document_is_the_preset():
    doc = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": 100008,
           "max_seq_len": 2048, "initializer_range": 0.006, "flash_atten": False, "flash_atten_llama_style": False,
           "checkpoint_activations": True, "ckpoint_layer": 26, "use_triangle_attn": True}  # seed 002, 准备环境
    from model import PRESETS
    args, preset = flagai.flagai_args(doc, "config.json"), PRESETS["aquila-7b"]
    for field in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "norm_eps", "max_seq_len"):
        assert getattr(args, field) == getattr(preset, field), field


def test_bad_flagai_dirs_are_one_line(tmp_path):
    flagai_dir(tmp_path / "a")
    (tmp_path / "a" / "pytorch_model.bin").unlink()
    with pytest.raises(SystemExit) as e:
        convert.main(["hf-to-native", f"--src={tmp_path / 'a'}", f"--dst={tmp_path / 'x'}"])
    assert str(e.value).startswith("convert.py: ") and "pytorch_model.bin: not found" in str(e.value)
    flagai_dir(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 2}))
    with pytest.raises(CheckpointError, match="multiple_of"):
        convert.hf_to_native(tmp_path / "b", tmp_path / "y")


def test_gpt_dataset_len_matches_flagais_demo_index_maps():
    # FlagAI's examples/indexed_dataset/data at 0b48769: demo_text_document.idx holds 20 documents of these sizes;
    # aquila_pretrain.py's split '90,10' gives train the first 18, valid the last 2, and the index maps FlagAI built
    # for num_samples [90, 10] at seq_length 1024 hold 95 and 11 rows of sample_idx: len 94 and 10
    sizes = [626, 772, 9158, 278, 919, 716, 2161, 1366, 1720, 2414, 1079, 8302, 1042, 61, 430, 336, 764, 147, 618, 154]
    assert flagai.gpt_dataset_len(sum(sizes[:18]), 1024, 90) == 94
    assert flagai.gpt_dataset_len(sum(sizes[18:]), 1024, 10) == 10
    # one epoch is enough when it holds num_samples windows: then every window counts, far more than 90
    assert flagai.gpt_dataset_len(10_000_000, 2048, 90) == (10_000_000 - 1) // 2048


def test_steps_per_epoch_as_distributed_sampler_and_drop_last():
    # 8 ranks of a DistributedSampler: each ceil(n / 8) samples; batches of 2, the last partial one dropped
    assert [flagai.steps_per_epoch(n, 2, 8) for n in (16, 17, 31, 32, 33)] == [1, 1, 2, 2, 2]
