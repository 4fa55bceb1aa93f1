"""convert.py ascendspeed-to-native / native-to-ascendspeed (support/ascendspeed.py): checkpoints laid out the way
AscendSpeed's converter (tools/ckpt_convert/llama at 64b1937) and training lay them out, read back exactly, written
back exactly, and computing the logits AscendSpeed's model computes from them."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convert
from model import CheckpointError, read_config
from support.weights import load_tensors
from support import ascendspeed
from test_convert import hf_llama, native_logits, run

HEADS, HD = 4, 16  # test_convert's tiny LLaMA: dim 64, 4 heads, ffn 160, 2 layers, vocab 128, rope_theta 50000


# --------------------------------------------------------------------------------------------------------------------
# AscendSpeed's converter as its code does it (ckpt_utils.py, convert_weights_from_huggingface.py), from an HF state
# dict: written here independently of support/ascendspeed.py


def row_split(w, tp, r):  # rank r's block of rows
    rows = w.shape[0] // tp
    return w.narrow(0, r * rows, rows).clone()


def column_split(w, tp, r):  # rank r's block of columns
    cols = w.shape[1] // tp
    return w.narrow(1, r * cols, cols).clone()


def pad_embed(w, divisible_by, tp):  # up to a multiple of divisible_by * tp rows, repeating the last rows
    extra = -w.shape[0] % (divisible_by * tp)
    return torch.cat([w, w[w.shape[0] - extra:]]) if extra else w.clone()


def permute_qkv_weight(w, n_head, hidden, tp):  # [q; k; v] of a rank -> per head [q_h; k_h; v_h]
    heads, hd = n_head // tp, hidden // n_head
    return torch.stack(w.split(heads * hd)).view(3, heads, hd, -1).transpose(0, 1).reshape(w.shape).clone()


def ascendspeed_convert(sd, out, tp, pp=1, divisible_by=8, merge_mlp=True, n_layers=2, hidden=64):
    """convert_weights_from_huggingface.py --tensor-model-parallel-size tp --pipeline-model-parallel-size pp
    [--merge-mlp] --make-vocab-size-divisible-by divisible_by, writing out/latest_checkpointed_iteration.txt and
    out/release/mp_rank_*/model_optim_rng.pt."""
    out.mkdir(parents=True)
    (out / "latest_checkpointed_iteration.txt").write_text("release\n")
    per = n_layers // pp
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            rank = {"language_model": {"embedding": {"word_embeddings": {"weight": {}}}, "encoder": {},
                                       "output_layer": {}}}
            enc = rank["language_model"]["encoder"]
            if pp_rank == 0:
                rank["language_model"]["embedding"]["word_embeddings"]["weight"] = row_split(
                    pad_embed(sd["model.embed_tokens.weight"], divisible_by, tp), tp, tp_rank)
            if pp_rank == pp - 1:
                enc["final_layernorm.weight"] = sd["model.norm.weight"].clone()
                rank["language_model"]["output_layer"]["weight"] = row_split(
                    pad_embed(sd["lm_head.weight"], divisible_by, tp), tp, tp_rank)
            for i in range(per):
                h = f"model.layers.{per * pp_rank + i}."
                q, k, v = (row_split(sd[h + f"self_attn.{n}_proj.weight"], tp, tp_rank) for n in "qkv")
                enc[f"layers.{i}.self_attention.query_key_value.weight"] = permute_qkv_weight(
                    torch.cat([q, k, v]), HEADS, hidden, tp)
                enc[f"layers.{i}.self_attention.dense.weight"] = column_split(sd[h + "self_attn.o_proj.weight"], tp,
                                                                              tp_rank)
                gate = row_split(sd[h + "mlp.gate_proj.weight"], tp, tp_rank)
                up = row_split(sd[h + "mlp.up_proj.weight"], tp, tp_rank)
                if merge_mlp:
                    enc[f"layers.{i}.mlp.proj.weight"] = torch.cat([gate, up], 0).contiguous().clone()
                else:
                    enc[f"layers.{i}.mlp.gate_proj.weight"] = gate
                    enc[f"layers.{i}.mlp.dense_h_to_4h.weight"] = up
                enc[f"layers.{i}.mlp.dense_4h_to_h.weight"] = column_split(sd[h + "mlp.down_proj.weight"], tp, tp_rank)
                enc[f"layers.{i}.input_layernorm.weight"] = sd[h + "input_layernorm.weight"].clone()
                enc[f"layers.{i}.post_attention_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"].clone()
            name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
            (out / "release" / name).mkdir(parents=True)
            torch.save({"checkpoint_version": 3.0, "model": rank}, out / "release" / name / "model_optim_rng.pt")
    return out


def rank_tensors(root):
    """(relative file, flat name) -> tensor of every rank file under root."""
    out = {}
    for f in sorted(root.rglob("*.pt")):
        sd = torch.load(f, weights_only=False)
        out.update({(str(f.relative_to(root)), k): v
                    for k, v in ascendspeed.flatten(sd.get("model", sd.get("module"))).items()})
    return out


# --------------------------------------------------------------------------------------------------------------------
# AscendSpeed's model on those shards (transformer.py at 64b1937: query_key_value viewed as (heads, 3 * head_dim),
# rotate-half RoPE, RMSNorm, mlp.proj chunked into gate and up, row-parallel outputs summed, logits over the padded vocab)


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ascendspeed_logits(root, idx, tp, pp=1, n_layers=2, theta=50000.0):
    ranks = {}
    for f in (root / "release").glob("mp_rank_*/model_optim_rng.pt"):
        parts = f.parent.name.split("_")[2:]
        ranks[(int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)] = ascendspeed.flatten(
            torch.load(f, weights_only=True)["model"]["language_model"])
    T, per = idx.shape[1], n_layers // pp
    emb = torch.cat([ranks[(t, 0)]["embedding.word_embeddings.weight"] for t in range(tp)])
    x = emb[idx[0]]
    inv = 1.0 / theta ** (torch.arange(0, HD, 2).float() / HD)
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # (heads, T, hd), rotate_half
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    for layer in range(n_layers):
        p, at = layer // per, f"encoder.layers.{layer % per}."
        h = rms(x, ranks[(0, p)][at + "input_layernorm.weight"])
        attn = 0
        for t in range(tp):
            r = ranks[(t, p)]
            mixed = (h @ r[at + "self_attention.query_key_value.weight"].T).view(T, -1, 3 * HD)  # (T, heads, 3 hd)
            q, k, v = (m.transpose(0, 1) for m in mixed.split(HD, -1))
            scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(HD)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
            attn = attn + o @ r[at + "self_attention.dense.weight"].T
        x = x + attn
        h = rms(x, ranks[(0, p)][at + "post_attention_layernorm.weight"])
        mlp = 0
        for t in range(tp):
            r = ranks[(t, p)]
            if at + "mlp.proj.weight" in r:
                gate, up = (h @ r[at + "mlp.proj.weight"].T).chunk(2, -1)
            else:
                gate, up = h @ r[at + "mlp.gate_proj.weight"].T, h @ r[at + "mlp.dense_h_to_4h.weight"].T
            mlp = mlp + (F.silu(gate) * up) @ r[at + "mlp.dense_4h_to_h.weight"].T
        x = x + mlp
    x = rms(x, ranks[(0, pp - 1)]["encoder.final_layernorm.weight"])
    return torch.cat([x @ ranks[(t, pp - 1)]["output_layer.weight"].T for t in range(tp)], -1)


@pytest.fixture
def hf_and_like(tmp_path):
    """A tiny LLaMA's HF state dict, and its checkpoint dir (the --like of the run's architecture)."""
    model = hf_llama(n_kv_heads=HEADS)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    run("hf-to-native", f"--src={hf}", f"--dst={tmp_path / 'like'}")
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}, tmp_path / "like"


@pytest.mark.parametrize("tp, pp, merge_mlp", [(1, 1, True), (2, 1, True), (4, 1, False), (2, 2, True)])
def test_converter_layout_reads_with_its_models_logits_and_writes_back_exactly(tmp_path, hf_and_like, tp, pp,
                                                                               merge_mlp):
    model, sd, like = hf_and_like
    src = ascendspeed_convert(sd, tmp_path / "weight", tp, pp, divisible_by=8, merge_mlp=merge_mlp)
    idx = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    theirs = ascendspeed_logits(src, idx, tp, pp)
    assert theirs.shape[-1] == 128 if 128 % (8 * tp) == 0 else theirs.shape[-1] > 128
    with torch.no_grad():  # the reference model above is the HF model on those shards
        torch.testing.assert_close(theirs[:, :128], model(idx).logits[0], rtol=1e-4, atol=1e-5)
    run("ascendspeed-to-native", f"--src={src}", f"--like={like}", f"--dst={tmp_path / 'ours'}")
    torch.testing.assert_close(native_logits(tmp_path / "ours", idx)[0], theirs[:, :128], rtol=1e-4, atol=1e-5)
    mlp = [] if merge_mlp else ["--no_merge_mlp"]
    run("native-to-ascendspeed", f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'back'}", f"--tp={tp}",
        f"--pp={pp}", "--make_vocab_size_divisible_by=8", *mlp)
    before, after = rank_tensors(src), rank_tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                        after[k])]
    assert (tmp_path / "back" / "latest_checkpointed_iteration.txt").read_text() == "release\n"


def test_native_round_trip_through_ascendspeed_is_tensor_identical(tmp_path, hf_and_like):
    _, _, like = hf_and_like
    run("native-to-ascendspeed", f"--src={like}", f"--dst={tmp_path / 'as'}", "--tp=2")  # divisible_by 128: padded
    lm = torch.load(tmp_path / "as/release/mp_rank_01/model_optim_rng.pt", weights_only=True)["model"]["language_model"]
    assert lm["output_layer"]["weight"].shape == (128, 64)  # 256 padded rows over 2 ranks
    run("ascendspeed-to-native", f"--src={tmp_path / 'as'}", f"--dst={tmp_path / 'back'}")  # its own config.json
    a, b = load_tensors(like), load_tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_config(tmp_path / "back")[1] == read_config(like)[1]
    run("native-to-ascendspeed", f"--src={like}", f"--dst={tmp_path / 'ds'}", "--deepspeed")  # seed 000's DeepSpeed run
    assert (tmp_path / "ds/latest").read_text() == "release\n"
    assert sorted(p.name for p in (tmp_path / "ds/release").iterdir()) == ["mp_rank_00_model_states.pt"]
    run("ascendspeed-to-native", f"--src={tmp_path / 'ds'}", f"--dst={tmp_path / 'back2'}")
    c = load_tensors(tmp_path / "back2")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_training_and_deepspeed_checkpoints_read_their_model(tmp_path, hf_and_like):
    """What checkpointing.save_checkpoint writes (iter_XXXXXXX/, the tracker holding the iteration, args, RNG and
    optimizer beside the model) and DeepSpeed's layout (latest, mp_rank_XX_model_states.pt with "module")."""
    _, sd, like = hf_and_like
    release = ascendspeed_convert(sd, tmp_path / "weight", tp=2)
    trained, ds = tmp_path / "ckpt", tmp_path / "ds"
    (trained / "iter_0001000").mkdir(parents=True)
    (trained / "latest_checkpointed_iteration.txt").write_text("1000")
    (ds / "global_step1000").mkdir(parents=True)
    (ds / "latest").write_text("global_step1000")
    for r in range(2):
        state = torch.load(release / f"release/mp_rank_{r:02d}/model_optim_rng.pt", weights_only=True)
        extra = {"args": argparse.Namespace(tensor_model_parallel_size=2, lr="1e-6"), "iteration": 1000,
                 "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state(),
                 "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-6}]}}
        (trained / f"iter_0001000/mp_rank_{r:02d}").mkdir()
        torch.save({**state, **extra}, trained / f"iter_0001000/mp_rank_{r:02d}/model_optim_rng.pt")
        torch.save({"module": state["model"], "dp_world_size": 0, **extra},
                   ds / f"global_step1000/mp_rank_{r:02d}_model_states.pt")
    args, _ = read_config(like)
    want = ascendspeed.read_native(release, args)
    for root in (trained, ds, trained / "iter_0001000"):
        got = ascendspeed.read_native(root, args)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_baichuan2_head_comes_in_raw_with_norm_head(tmp_path, hf_and_like):
    # AscendSpeed's Baichuan2 runs normalise output_layer in every forward (--lm-norm-weight): the stored rows are raw
    _, sd, like = hf_and_like
    config = read_config(like)[1]
    (like / "config.json").write_text(__import__("json").dumps({**config, "family": "baichuan2"}))
    src = ascendspeed_convert(sd, tmp_path / "weight", tp=2)
    run("ascendspeed-to-native", f"--src={src}", f"--like={like}", f"--dst={tmp_path / 'ours'}")
    args, cfg = read_config(tmp_path / "ours")
    assert cfg["family"] == "baichuan2" and args.norm_head
    assert torch.equal(load_tensors(tmp_path / "ours")["output.weight"], sd["lm_head.weight"])


def test_grouped_query_attention_and_missing_ranks_are_refused(tmp_path, hf_and_like):
    _, sd, like = hf_and_like
    src = ascendspeed_convert(sd, tmp_path / "weight", tp=2)
    (src / "release/mp_rank_00/model_optim_rng.pt").unlink()
    (src / "release/mp_rank_00").rmdir()
    args, _ = read_config(like)
    with pytest.raises(CheckpointError, match="rank file mp_rank_00 missing for tp=2"):
        ascendspeed.read_native(tmp_path / "weight", args)
    good = ascendspeed_convert(sd, tmp_path / "good", tp=2)
    rank = torch.load(good / "release/mp_rank_01/model_optim_rng.pt", weights_only=True)
    rank["model"]["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 3)
    torch.save(rank, good / "release/mp_rank_01/model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=r"layers.1.feed_forward.w2.weight joined from 2 rank\(s\) is \(64, 83\)"):
        ascendspeed.read_native(good, args)
    with pytest.raises(CheckpointError, match="grouped-query attention"):
        ascendspeed.read_native(src, args.__class__(**{**args.__dict__, "n_kv_heads": 2}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        convert.main(["ascendspeed-to-native", f"--src={tmp_path / 'empty'}", f"--like={like}",
                      f"--dst={tmp_path / 'x'}"])
    assert str(e.value).startswith("convert.py: ") and "not an AscendSpeed checkpoint" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        convert.main(["native-to-ascendspeed", f"--src={like}", f"--dst={tmp_path / 'y'}", "--tp=3"])
    assert str(e.value) == "convert.py: --tp=3, --pp=1: must divide n_heads=4 and n_layers=2"
