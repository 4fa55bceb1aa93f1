"""convert.py native-to-gguf / gguf-to-native (support/gguf.py), checked against the tools that read the format:
transformers loads the llama-architecture files (gguf_file=) and its logits are ours; the baichuan files are read
back with the gguf package and compared with llama.cpp's converter's layout (its BaichuanModel, restated below);
a file read back is the checkpoint it came from.

    python -m pytest -q tests/test_gguf.py
"""

import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf", reason="gguf (requirements.txt) is not installed")

import convert  # noqa: E402
import prepare  # noqa: E402
import support.weights  # noqa: E402
from model import ModelArgs, Transformer, read_config
from support.weights import load_tensors
from support.gguf import read_fields, rotary_rows  # noqa: E402
from test_bring_your_own import _byte_level_bpe  # noqa: E402
from test_convert import hf_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 400
IDX = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
TEXT = "def main(argv=None):\n    return  x <|im_start|> 42 héllo"


def run(*argv):
    convert.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A LLaMA-style sentencepiece model (byte fallback, user-defined <|im_start|>, <|im_end|>), vocab 400."""
    out = tmp_path_factory.mktemp("sp")
    prepare.train_sentencepiece([line for line in open(os.path.join(ROOT, "convert.py")) if line.strip()], out,
                                vocab_size=V)
    return out


def llama_ckpt(tmp_path, sentencepiece_dir, n_kv_heads=2, tied=False, template="vicuna"):
    hf = hf_llama(n_kv_heads, tied, vocab=V)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes((sentencepiece_dir / "tokenizer.model").read_bytes())
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt", "--template", template)
    return tmp_path / "ckpt"


def logits_of(ckpt):
    with torch.no_grad():
        return Transformer.from_checkpoint(ckpt).eval()(IDX)[0]


def transformers_logits(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(IDX).logits


def reader_tensors(path):
    """name -> (GGML type name, fp32 values dequantised by gguf itself, shape as (rows, cols))."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(shape)
        out[t.name] = (t.tensor_type.name, values)
    return reader, out


# --------------------------------------------------------------------------------------------------------------------
# the llama architecture (LLaMA, Aquila): transformers reads it


@pytest.mark.parametrize("n_kv_heads,tied", [(4, False), (2, True)], ids=["mha-untied", "gqa-tied"])
def test_llama_f32_gguf_gives_our_logits_and_token_ids_in_transformers(tmp_path, sentencepiece_dir, n_kv_heads,
                                                                         tied):
    from transformers import AutoTokenizer
    ckpt = llama_ckpt(tmp_path, sentencepiece_dir, n_kv_heads, tied)
    run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf", "--type", "f32")
    assert (transformers_logits(tmp_path / "m.gguf") - logits_of(ckpt)).abs().max() <= 1e-5
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours = prepare.load_tokenizer(ckpt)
    assert theirs(TEXT).input_ids == ours.encode(TEXT, add_special_tokens=True)
    # the chat template travels as Jinja (what llama.cpp and ollama render)
    assert theirs.chat_template == prepare.template_jinja(ours, "vicuna")


@pytest.mark.parametrize("qtype,levels,off", [("q8_0", 127, 0.5), ("q4_0", 8, 1.0)])
def test_quantised_gguf_is_what_gguf_dequantises_and_within_the_formats_error(tmp_path, sentencepiece_dir, qtype,
                                                                               levels, off):
    ckpt = llama_ckpt(tmp_path, sentencepiece_dir, 2, tied=True)
    run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf", "--type", qtype)
    run("gguf-to-native", "--src", tmp_path / "m.gguf", "--dst", tmp_path / "back")  # gguf's dequantisation
    theirs = transformers_logits(tmp_path / "m.gguf")
    assert (theirs - logits_of(tmp_path / "back")).abs().max() <= 1e-5
    # every weight within `off` steps of its block of 32 in the file (step d = absmax/127 for q8_0, absmax/8 for
    # q4_0, whose codes -8..7 leave the far end of the block a whole step off), plus d's rounding to fp16 (2^-11
    # relative) times the largest code
    original, back = load_tensors(ckpt), load_tensors(tmp_path / "back")
    args = read_config(ckpt)[0]
    for name, w in original.items():
        if w.dim() == 1:
            assert torch.equal(back[name], w), name  # norms stay f32
            continue
        heads = {"wq": args.n_heads, "wk": args.kv_heads}.get(name.split(".")[-2])
        layout = (lambda t: rotary_rows(t, heads, to_pairs=True)) if heads else (lambda t: t)  # the file's rows
        head = name == "tok_embeddings.weight"  # tied: the output layer, kept at q8_0 under q4_0
        blocks = layout(w).reshape(-1, 32)
        n, err = (127, 0.5) if head else (levels, off)
        bound = blocks.abs().amax(1, keepdim=True) / n * (err + n * 2**-11) + 1e-7
        assert ((layout(back[name]).reshape(-1, 32) - blocks).abs() <= bound).all(), name
    reader, tensors = reader_tensors(tmp_path / "m.gguf")
    assert tensors["token_embd.weight"][0] == "Q8_0" and tensors["blk.0.attn_q.weight"][0] == qtype.upper()
    assert (theirs - logits_of(ckpt)).abs().max() <= {"q8_0": 0.02, "q4_0": 0.3}[qtype] * logits_of(ckpt).abs().max()


def test_f32_gguf_read_back_is_the_checkpoint_exactly(tmp_path, sentencepiece_dir):
    ckpt = llama_ckpt(tmp_path, sentencepiece_dir, 2, tied=False, template="vicuna")
    run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf", "--type", "f32")
    run("gguf-to-native", "--src", tmp_path / "m.gguf", "--dst", tmp_path / "back")
    original, back = load_tensors(ckpt), load_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert asdict(read_config(tmp_path / "back")[0]) == asdict(read_config(ckpt)[0])
    assert read_config(tmp_path / "back")[1]["family"] == "llama"
    before, after = prepare.load_tokenizer(ckpt), prepare.load_tokenizer(tmp_path / "back")
    assert after.encode(TEXT, add_special_tokens=True) == before.encode(TEXT, add_special_tokens=True)
    assert (after.bos_id, after.eos_id, after.chat_template) == (before.bos_id, before.eos_id, "vicuna")


def aquila_ckpt(tmp_path):
    """An Aquila checkpoint whose tokenizer is a byte-level BPE tokenizer.json with a bos post-processor."""
    _byte_level_bpe(tmp_path / "tok", ["<unk>", "<s>", "</s>", "<|user|>"], "<s>")
    hf = hf_llama(2, vocab=520)  # the tokenizer's 500 and 20 rows more
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(architectures=["AquilaForCausalLM"], model_type="aquila", bos_token_id=1, eos_token_id=2)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hf" / "generation_config.json").unlink()
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tmp_path / "tok" / "tokenizer.json").read_bytes())
    run("hf-to-native", "--src", tmp_path / "hf", "--dst", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_aquila_byte_level_bpe_gguf_in_transformers_and_back(tmp_path):
    from transformers import AutoTokenizer
    ckpt = aquila_ckpt(tmp_path)
    ours = prepare.load_tokenizer(ckpt)
    assert ours.vocab_size < 520  # the export pads the vocabulary to the model's rows
    run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf", "--type", "f32")
    assert (transformers_logits(tmp_path / "m.gguf") - logits_of(ckpt)).abs().max() <= 1e-5
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert theirs(TEXT).input_ids == ours.encode(TEXT, add_special_tokens=True)
    run("gguf-to-native", "--src", tmp_path / "m.gguf", "--dst", tmp_path / "back")
    assert read_config(tmp_path / "back")[1]["family"] == "aquila"
    after = prepare.load_tokenizer(tmp_path / "back")
    assert after.encode(TEXT, add_special_tokens=True) == ours.encode(TEXT, add_special_tokens=True)
    assert after.chat_template == "aquila"


# --------------------------------------------------------------------------------------------------------------------
# the baichuan architecture: no transformers loader; read back against llama.cpp's converter


def baichuan_ckpt(tmp_path, sentencepiece_dir, pos_emb, family="baichuan", norm_head=False):
    n_layers = {"rope": 32, "alibi": 40}[pos_emb]  # the depths llama.cpp runs as 7B and 13B
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, vocab_size=V, hidden_dim=96, max_seq_len=64,
                     pos_emb=pos_emb, norm_head=norm_head)
    torch.manual_seed(0)
    state = {k: torch.rand(v.shape) + 0.5 if v.dim() == 1 else torch.randn(v.shape) * 0.1
             for k, v in Transformer(args).state_dict().items()}
    ckpt = tmp_path / "ckpt"
    support.weights.write_checkpoint(ckpt, state, args, family)
    prepare.load_tokenizer(sentencepiece_dir).save(ckpt, template=family)
    return ckpt, args, state


def llama_cpp_baichuan(hf_dir):
    """GGUF name -> tensor, as llama.cpp's convert_hf_to_gguf.py BaichuanModel writes a Hugging Face Baichuan dir:
    names through gguf's tensor map, W_pack split in three with q and k permuted by _reverse_hf_permute_part."""
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    n_head = cfg["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BAICHUAN, cfg["num_hidden_layers"])

    def reverse_hf_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    out = {}
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        if name.endswith("W_pack.weight"):
            bid, r = int(name.split(".")[2]), w.shape[0] // 3
            out[f"blk.{bid}.attn_q.weight"] = reverse_hf_permute(w[:r], n_head)
            out[f"blk.{bid}.attn_k.weight"] = reverse_hf_permute(w[r:2 * r], n_head)
            out[f"blk.{bid}.attn_v.weight"] = w[2 * r:]
        else:
            out[names.get_name(name, try_suffixes=(".weight",))] = w
    return out, cfg


@pytest.mark.parametrize("pos_emb,family,norm_head", [("rope", "baichuan", False), ("alibi", "baichuan", False),
                                                      ("rope", "baichuan2", True)],
                         ids=["7b-rope", "13b-alibi", "baichuan2-normhead"])
def test_baichuan_gguf_is_llama_cpps_baichuan_layout(tmp_path, sentencepiece_dir, pos_emb, family, norm_head):
    ckpt, args, state = baichuan_ckpt(tmp_path, sentencepiece_dir, pos_emb, family, norm_head)
    run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf", "--type", "f32")
    run("native-to-hf", "--src", ckpt, "--dst", tmp_path / "hf")
    expected, cfg = llama_cpp_baichuan(tmp_path / "hf")
    if norm_head:  # Baichuan2's NormHead goes out normalised, as inference uses it
        expected["output.weight"] = F.normalize(expected["output.weight"], dim=-1)
    reader, tensors = reader_tensors(tmp_path / "m.gguf")
    assert tensors.keys() == expected.keys()
    for name, w in expected.items():
        assert tensors[name][0] == "F32" and torch.equal(tensors[name][1], w), name
    fields = {k: v for k, v in gguf_fields(reader).items() if not k.startswith(("GGUF.", "tokenizer."))}
    assert fields == {  # set_gguf_parameters of llama.cpp's BaichuanModel, and ours
        "general.architecture": "baichuan", "general.name": "ckpt", "general.file_type": 0,
        "baichuan.tensor_data_layout": "Meta AI original pth",
        "baichuan.context_length": cfg.get("max_position_embeddings", cfg["model_max_length"]),
        "baichuan.embedding_length": 64, "baichuan.block_count": args.n_layers, "baichuan.feed_forward_length": 96,
        "baichuan.rope.dimension_count": 16, "baichuan.attention.head_count": 4,
        "baichuan.attention.head_count_kv": 4, "baichuan.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        **({"baichuan.rope.freq_base": 10000.0} if pos_emb == "rope" else {}),
        "nanollama.family": family, "nanollama.chat_template": family}
    # _set_vocab_sentencepiece: every piece with its score and type, the special ids, the template as Jinja
    tok = prepare.load_tokenizer(ckpt)
    f = gguf_fields(reader)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "default")
    assert f["tokenizer.ggml.tokens"] == [tok.sp.id_to_piece(i) for i in range(V)]
    assert f["tokenizer.ggml.scores"] == pytest.approx([tok.sp.get_score(i) for i in range(V)])
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == 2 and types[1] == types[2] == 3  # unk, then bos and eos control
    assert types[tok.token_to_id("<|im_start|>")] == 4 and types[tok.token_to_id("<0x41>")] == 6
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is True


def gguf_fields(reader):
    return read_fields(reader)


# --------------------------------------------------------------------------------------------------------------------
# refusals


def test_a_baichuan_depth_llama_cpp_cannot_run_is_refused_in_one_line(tmp_path, sentencepiece_dir):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=V, hidden_dim=96, max_seq_len=64)
    support.weights.write_checkpoint(tmp_path / "ckpt", Transformer(args).state_dict(), args, "baichuan")
    prepare.load_tokenizer(sentencepiece_dir).save(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        run("native-to-gguf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "m.gguf")
    assert "n_layers=2" in str(e.value) and "32" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_an_existing_gguf_is_replaced_only_with_overwrite(tmp_path, sentencepiece_dir):
    ckpt = llama_ckpt(tmp_path, sentencepiece_dir)
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(SystemExit, match="exists"):
        run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "mine"
    run("native-to-gguf", "--src", ckpt, "--dst", tmp_path / "m.gguf", "--overwrite")
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
