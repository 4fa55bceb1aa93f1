"""Tests for the config/ recipes: each published setup has a full recipe and a `_tiny` twin on the same code path.

Every *_tiny.py twin runs end to end: prepare.py writes its data (the default corpus, or small synthetic chats the
test writes in the recipe's format and template), train.py trains a few steps and exports, sample.py generates from
the export (chat twins in their template); fine-tuning twins start from the export of their base twin, LoRA twins
also leave out_dir/adapter and a merged export. Every full recipe passes `train.py --dry_run`, whose numbers are
checked against hand calculations on a small case.

    python -m pytest -q tests/test_recipes.py
"""

import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import prepare
import sample
import train
from model import PRESET_FAMILY, PRESETS, ModelArgs, Transformer
from support import cpu_linear, planner
from support.weights import load_tensors

ROOT = Path(__file__).resolve().parent.parent
MAIN_JOB = {"default.py", "sft_tiny.py"}  # the main job and its fine-tuning: not published setups, no twins
TWINS = sorted(p.name for p in (ROOT / "config").glob("*_tiny.py") if p.name not in MAIN_JOB)
FULL = sorted(p.replace("_tiny", "") for p in TWINS)
# what a twin may change of its full recipe: sizes, mesh, schedule length, paths; everything else is the code path
SIZE_KEYS = {"out_dir", "data_dir", "init_from", "devices", "dp", "tp", "seq_len", "micro_batch_size",
             "global_batch_size", "max_iters", "warmup_iters", "lr_decay_iters", "eval_interval", "eval_iters",
             "log_interval", "ckpt_interval", "peak_flops", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len",
             "activation_checkpointing_layers"}  # a count of blocks scales with n_layers
# the data each chat template's twins use: prepare.py --format for the synthetic records the test writes
TEMPLATE_FORMAT = {"baichuan2": "sharegpt", "vicuna": "sharegpt", "alpaca": "alpaca", "human-assistant": "belle",
                   "baichuan": "alpaca"}
# prepare.py flags a twin's data takes beyond --seq_len=256 --pack, as its recipe's prep command (in the twin's header)
TEMPLATE_PREPARE = {"baichuan": ["--max_source_len=85", "--max_target_len=171", "--one_per_row"],
                    "baichuan2": ["--one_per_row"], "alpaca": ["--one_per_row"]}


@pytest.fixture(scope="module", autouse=True)
def at_root_with_one_thread():
    # recipes and their twins use paths from the repo root (a twin reads its full recipe from config/)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared CPU
    yield
    os.chdir(cwd)
    torch.set_num_threads(threads)


def parse(name, *extra):
    return train.parse_config([f"config/{name}", *extra])


# --------------------------------------------------------------------------------------------------------------------
# synthetic instruction data, in the formats the published recipes use


def arithmetic(i):
    a, b = i % 7 + 1, i % 5 + 2
    return [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
            (f"And {a} times {b}?", f"{a} times {b} is {a * b}.")]


def write_records(path, fmt, n=160):
    rows = []
    for i in range(n):
        turns = arithmetic(i)
        if fmt == "sharegpt":  # multi-turn
            rows.append({"conversations": [m for q, a in turns for m in ({"from": "human", "value": q},
                                                                          {"from": "gpt", "value": a})]})
        else:  # alpaca and belle records: instruction, input, output
            rows.append({"instruction": turns[0][0], "input": "", "output": turns[0][1]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


class Lab:
    """Data prepared once per kind and each twin run at most once, so twins share what they can."""

    def __init__(self, root: Path):
        self.root, self.data_dirs, self.summaries = root, {}, {}

    def data(self, name: str) -> Path:
        """A twin's data_dir by its name: tiny_text (the default corpus) or tiny_<template> (synthetic chats)."""
        if name not in self.data_dirs:
            out = self.root / name
            if name == "tiny_text":
                prepare.main(["--max_chars=300000", "--vocab_size=512", f"--out={out}"])
            else:
                template = name.removeprefix("tiny_")
                fmt = TEMPLATE_FORMAT[template]
                records = write_records(self.root / f"{name}.jsonl", fmt)
                # every base was trained on tiny_text, so its tokenizer is theirs
                prepare.main([f"--input={records}", f"--format={fmt}", f"--template={template}",
                              f"--tokenizer={self.data('tiny_text')}", "--seq_len=256", "--pack", f"--out={out}",
                              *TEMPLATE_PREPARE.get(template, [])])
            self.data_dirs[name] = out
        return self.data_dirs[name]

    def base(self, init_from: str) -> Path:
        """The checkpoint dir a fine-tuning twin starts from: its base twin's export, or a small llama-family base
        (the twins of LLaMA recipes name the main job's export, too slow to train here)."""
        if init_from == "scratch":
            return init_from
        if init_from == "out/default/export":
            if "llama base" not in self.summaries:
                self.summaries["llama base"] = train.main([
                    "--model=llama-7b", "--dim=64", "--n_layers=2", "--n_heads=4", "--hidden_dim=176",
                    "--max_seq_len=256", "--seq_len=64", "--micro_batch_size=2", "--global_batch_size=2",
                    "--max_iters=2", "--eval_iters=1", "--peak_flops=1e9", "--export",
                    f"--data_dir={self.data('tiny_text')}", f"--out_dir={self.root / 'llama_base'}"])
            return self.summaries["llama base"]["export_dir"]
        base_twin = init_from.split("/")[1] + ".py"  # out/<name>_tiny/export
        return self.run(base_twin)["export_dir"]

    def run(self, twin: str) -> dict:
        if twin not in self.summaries:
            cfg, _ = parse(twin)
            self.summaries[twin] = train.main([
                f"config/{twin}", f"--data_dir={self.data(Path(cfg.data_dir).name)}",
                f"--init_from={self.base(cfg.init_from)}", f"--out_dir={self.root / 'out' / twin[:-3]}"])
        return self.summaries[twin]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return Lab(tmp_path_factory.mktemp("recipes"))


def generate(export: Path, template, capsys) -> int:
    """sample.py on an export: a continuation, or one chat turn in the template; returns the tokens generated."""
    argv = [f"--ckpt={export}", "--max_new_tokens=6", "--temperature=1.0", "--top_k=0", "--seed=0"]
    out = io.StringIO()
    capsys.readouterr()  # only sample.py's report below
    if template:
        sample.main(argv + ["--chat", f"--template={template}"], stdin=io.StringIO("What is 2 plus 3?\n"),
                    stdout=out)
    else:
        sample.main(argv + ["--prompt=def "], stdout=out)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if " tokens in " in line)
    return int(line.split()[0])


# --------------------------------------------------------------------------------------------------------------------
# tiny twins: the same code path as their recipe, end to end


def test_every_recipe_has_a_twin_and_every_twin_a_recipe():
    recipes = {p.name for p in (ROOT / "config").glob("[!_]*.py")} - MAIN_JOB - set(TWINS)  # _twin.py: the twins' overlay
    assert recipes == set(FULL) and len(FULL) >= 13


@pytest.mark.parametrize("recipe", FULL)
def test_recipe_says_how_its_loss_weighs_the_targets_and_why(recipe):
    """loss_weighting is set in the recipe with its reason, and its table gives its framework's rule beside ours."""
    text = (ROOT / "config" / recipe).read_text()
    assert re.search(r'^loss_weighting = "(token|micro_batch)"  # .{20,}$', text, re.M), recipe
    assert re.search(r"^# \| loss weighting +\| .+ \| (token|micro_batch)", text, re.M), recipe


@pytest.mark.parametrize("recipe", FULL + sorted(MAIN_JOB))
def test_every_recipe_states_keep_last_and_keeps_two_checkpoints_or_more(recipe):
    """keep_last >= 2: a damaged newest step dir falls back to the one before (its twin runs what it states)."""
    assert re.search(r"^keep_last = \d+  # \S", (ROOT / "config" / recipe).read_text(), re.M), recipe  # with why
    assert parse(recipe)[0].keep_last >= 2 and train.Config.keep_last >= 2


@pytest.mark.parametrize("twin", TWINS)
def test_twin_changes_only_sizes_of_its_recipe(twin):
    full_cfg, full_model = parse(twin.replace("_tiny", ""))
    cfg, model = parse(twin)
    changed = {k for k, v in asdict(cfg).items() if getattr(full_cfg, k) != v}
    changed |= {k for k in set(full_model) | set(model) if full_model.get(k) != model.get(k)}
    assert changed <= SIZE_KEYS, changed - SIZE_KEYS
    assert cfg.devices == 1 and cfg.max_iters <= 4  # a CPU test


@pytest.mark.slow
@pytest.mark.parametrize("twin", TWINS)
def test_twin_runs_prepare_train_export_sample(twin, lab, capsys):
    cfg, overrides = parse(twin)
    summary = lab.run(twin)
    assert len(summary["losses"]) == cfg.max_iters and all(math.isfinite(v) for v in summary["losses"].values())
    export = Path(summary["export_dir"])
    config = json.loads((export / "config.json").read_text())
    if cfg.init_from == "scratch":  # the recipe's family and architecture switches, at tiny sizes
        preset = replace(PRESETS[cfg.model], **overrides)
        assert config["family"] == PRESET_FAMILY[cfg.model]
        for key in ("pos_emb", "norm_head", "z_loss", "norm_eps", "dim", "n_layers"):
            assert config[key] == getattr(preset, key), key
    meta = json.loads((lab.data(Path(cfg.data_dir).name) / "meta.json").read_text())
    assert meta.get("packed") == (cfg.init_from != "scratch")  # fine-tuning rows are packed with document masks
    if cfg.lora_rank:
        adapter = Path(summary["adapter_dir"])
        settings = json.loads((adapter / "adapter_config.json").read_text())  # PEFT's format
        assert (settings["peft_type"], settings["r"], settings["lora_alpha"]) == ("LORA", cfg.lora_rank, cfg.lora_alpha)
        base, merged = load_tensors(lab.base(cfg.init_from)), load_tensors(export)
        targets = [t for name in cfg.lora_targets.split(",")  # W_pack (alias wqkv): one adapter on wq, wk, wv
                   for t in (("wq", "wk", "wv") if name in ("W_pack", "wqkv") else (name,))]
        for name, t in base.items():  # the merge changed exactly the adapted layers
            adapted = name.endswith(".weight") and name.split(".")[-2] in targets and name.startswith("layers.")
            assert torch.equal(merged[name].float(), t.float()) != adapted, name
    assert generate(export, meta.get("template"), capsys) > 0


# --------------------------------------------------------------------------------------------------------------------
# --dry_run: every full recipe, and the numbers by hand


# DESIGN.md's exact parameter counts of the published models
PUBLISHED_PARAMS = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "baichuan-7b": 7_000_559_616,
                    "baichuan-13b": 13_264_901_120, "baichuan2-7b": 7_505_973_248, "baichuan2-13b": 13_896_668_160,
                    "aquila-7b": 7_295_537_152}


@pytest.mark.parametrize("recipe", FULL)
def test_full_recipe_dry_run_plans_its_mesh(recipe, capsys):
    cfg, _ = parse(recipe)
    out = train.main([f"config/{recipe}", "--dry_run"])
    text = capsys.readouterr().out
    assert out["n_params"] == PUBLISHED_PARAMS[cfg.model]
    assert out["dp"] * out["tp"] == out["devices"] == cfg.devices and out["tp"] == cfg.tp
    assert out["fits"], f"{recipe} does not fit its devices:\n{text}"
    assert out["step_s"] > 0 and "step time at MFU" in text
    if cfg.lora_rank:
        assert out["n_trainable"] < out["n_params"] / 100
    assert not Path(cfg.out_dir).exists()  # nothing written


def test_dry_run_from_the_command_line():
    run = subprocess.run([sys.executable, "train.py", "config/baichuan2_13b_pretrain.py", "--dry_run"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "16 device(s) = dp 2 x tp 8" in run.stdout and "fits in 64 GiB" in run.stdout


def test_dry_run_of_a_mesh_that_does_not_add_up_is_one_line():
    with pytest.raises(SystemExit) as e:
        train.main(["config/baichuan2_13b_pretrain.py", "--dry_run", "--devices=8"])
    assert str(e.value) == ("train.py: dp=2 x tp=8 = 16 processes, but devices=8: dp * tp must be the number of "
                            "processes (--nnodes x --nproc_per_node of torchrun)")


def test_dry_run_refuses_the_meshes_a_run_refuses():
    # the plan asks support/train_checks.check_mesh as the run does: a plan for a mesh no run could use is not printed
    with pytest.raises(SystemExit) as e:
        train.main(["config/baichuan_13b_chat_lora.py", "--dry_run", "--tp=2", "--devices=2"])
    assert str(e.value) == "train.py: tp=2 with lora_rank: not supported; use data parallelism (--tp=1)"


def hand_cfg(**kw):
    base = dict(model="tiny", dtype="bfloat16", seq_len=32, micro_batch_size=2, global_batch_size=8, devices=2,
                dp=2, tp=1, activation_checkpointing="none", peak_flops=1e12, mfu=0.5, max_iters=10)
    return replace(train.Config(), **{**base, **kw})


def test_dry_run_numbers_by_hand(tmp_path):
    cfg = hand_cfg(data_dir=str(tmp_path / "no-data"))
    out = train.plan(cfg, {})
    d, L, H, kv, f, V = 64, 2, 4, 32, 176, 512  # the tiny preset: 4 heads of 16, 2 kv heads
    block = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * f  # norms, wq, wk, wv, wo, w1 w2 w3
    n = V * d + L * block + d + V * d
    assert out["n_params"] == out["n_trainable"] == n == 158_016
    b, T, s = 2, 32, 2
    mem = out["bytes"]
    assert mem["weights"] == 4 * n / 2 and mem["gradients"] == 4 * n / 2 and mem["optimizer"] == 8 * n / 2
    assert mem["working weights"] == s * (V * d + d + V * d) + 2 * s * block  # FSDP: root + two blocks
    layer = b * T * (s * (4 * d + 2 * kv + 3 * f) + 4 * 2 * d + 4 * H)  # residual x and h in fp32
    head = b * T * (d * (4 + s) + V * s)  # the final norm's input and output, the fused loss's one (b T, V) buffer
    assert mem["activations (none)"] == L * layer + head == mem["activations"]
    assert mem["activations (full)"] == L * b * T * 4 * d + layer + head
    assert mem["activations (selective)"] == L * b * T * (4 * d + s * (3 * d + kv + f) + 4 * H) + layer + head
    assert mem["total"] == 16 * n / 2 + mem["working weights"] + L * layer + head
    assert out["flops_per_token"] == 6 * (n - V * d) + 12 * L * T * d
    assert out["step_s"] == pytest.approx(8 * 32 * out["flops_per_token"] / (2 * 1e12 * 0.5))
    assert out["grad_accum"] == 2
    # tensor parallel splits everything per device; full checkpointing is what the total then counts
    tp = train.plan(hand_cfg(data_dir=str(tmp_path / "no-data"), dp=1, tp=2, activation_checkpointing="full"), {})
    assert tp["bytes"]["weights"] == mem["weights"]  # vocab-sharded logits: no fused loss, logits + 2 fp32 copies
    assert tp["bytes"]["activations"] == (L * b * T * 4 * d + layer + b * T * (d * (4 + s) + V * (s + 8))) / 2


def test_dry_run_of_checkpointing_some_blocks_and_of_zero_stages(tmp_path):
    d, kv, f, b, T, s, L = 64, 32, 176, 2, 32, 2, 4
    plans = {key: train.plan(hand_cfg(data_dir=str(tmp_path), activation_checkpointing="full", **kw), {"n_layers": L})
             for key, kw in (("all", {}), ("first 3", {"activation_checkpointing_layers": 3}),
                             ("zero2", {"zero_stage": 2}))}
    act = {k: v["bytes"]["activations"] for k, v in plans.items()}
    layer = b * T * (s * (4 * d + 2 * kv + 3 * f) + 8 * d + 4 * 4)  # one block that keeps everything
    assert act["all"] - act["first 3"] == b * T * 4 * d  # the fourth block's checkpoint, no longer kept
    block = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * f
    working = {k: v["bytes"]["working weights"] for k, v in plans.items()}
    assert working["zero2"] - working["all"] == s * (L - 2) * block  # every block gathered, not two
    assert act["zero2"] == act["all"] and layer < act["all"]


def test_dry_run_lora_and_qlora_by_hand(tmp_path):
    d, L, kv, f, r = 64, 2, 32, 176, 8
    n = train.plan(hand_cfg(data_dir=str(tmp_path)), {})["n_params"]
    lora = train.plan(hand_cfg(data_dir=str(tmp_path), devices=1, dp=1, lora_rank=r, lora_targets="wq,wv"), {})
    adapters = L * (r * (d + d) + r * (d + kv))  # wq: 64 -> 64, wv: 64 -> 32
    assert lora["n_trainable"] == adapters
    mem = lora["bytes"]
    assert mem["weights"] == 2 * n + 4 * adapters  # frozen base in bf16, fp32 adapters
    assert mem["gradients"] == 4 * adapters and mem["optimizer"] == 8 * adapters and mem["working weights"] == 0
    q = train.plan(hand_cfg(data_dir=str(tmp_path), devices=1, dp=1, lora_rank=r, qlora=True,
                            activation_checkpointing="full"), {})
    linears = [d * d, d * kv, d * kv, d * d, d * f, f * d, d * f]
    nf4 = L * sum(m // 2 + 256 * -(-(m // 64) // 256) + 4 * -(-(m // 64) // 256) + 4 for m in linears)
    assert planner.nf4_bytes(4096 * 4096) * 8 / (4096 * 4096) == pytest.approx(4.127, abs=1e-3)
    assert q["bytes"]["weights"] == nf4 + 2 * (n - L * sum(linears)) + 4 * q["n_trainable"]
    assert q["bytes"]["working weights"] == 2 * sum(linears)  # one block dequantised at a time
    # frozen weights skip their weight gradients: 4 FLOPs per weight instead of 6, adapters 6
    full_flops = planner.flops_per_token(PRESETS["tiny"], 32)
    assert lora["flops_per_token"] == full_flops - 2 * (n - 512 * d) + 6 * adapters


@pytest.mark.parametrize("pos_emb, dtype, packed", [("rope", "float32", False), ("alibi", "bfloat16", True)])
def test_activation_estimate_matches_what_autograd_keeps(pos_emb, dtype, packed, monkeypatch):
    # the bytes one forward leaves for backward (every saved tensor but the parameters), on an accelerator's kernels:
    # bf16 matmuls and attention in bf16 (this CPU would detour through fp32 copies)
    monkeypatch.setattr(cpu_linear, "CPU_HAS_BF16_UNITS", True)
    args = ModelArgs(dim=256, n_layers=4, n_heads=8, hidden_dim=688, vocab_size=2048, max_seq_len=256,
                     pos_emb=pos_emb)
    torch.manual_seed(0)
    model = Transformer(args)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, T = 2, 256
    x = torch.randint(0, args.vocab_size, (b, T))
    doc_ids = (torch.arange(T) // 64).expand(b, T) if packed else None  # four documents per row
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=train.DTYPES[dtype], enabled=dtype != "float32"):
        model(x, x, doc_ids=doc_ids)
    cfg = replace(train.Config(), dtype=dtype, seq_len=T, micro_batch_size=b, global_batch_size=b)
    mem = planner.memory_plan(args, cfg, dp=1, tp=1, packed=packed)["bytes"]
    planned = mem["activations (none)"] + mem["working weights"]  # with autocast's 16-bit weight copies
    assert 0.97 < sum(saved.values()) / planned < 1.03


# --------------------------------------------------------------------------------------------------------------------
# recipe values against the seed documents (../shared/seeds): what a header quotes is the document's, and the values
# the documents and the code they name fix are the recipes'

SEEDS = ROOT.parent / "shared" / "seeds"
MARKERS = ("script:", "AscendSpeed:", "FlagAI:", "port:", "FastChat:", "DeepSpeed:", "HF Trainer:",
           "LLaMA-Efficient-Tuning:", "ours:")  # values a header takes from elsewhere, each marked with its source
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def seed_recipes() -> dict[str, str]:
    """recipe -> the text of the seed document its header names ("Document: seed NNN")."""
    if not SEEDS.is_dir():
        pytest.skip(f"{SEEDS} not found: the seed documents sit beside the repository (shared/seeds)")
    out = {}
    for path in sorted((ROOT / "config").glob("[!_]*.py")):
        m = re.search(r"Document: seed (\d{3})", path.read_text())
        if m:
            out[path.name] = next(SEEDS.glob(f"{m[1]}_*.txt")).read_text()
    return out


def header(recipe: str) -> str:
    return "".join(line for line in (ROOT / "config" / recipe).read_text().splitlines(True) if line.startswith("#"))


def document_says(recipe: str) -> dict[str, str]:
    """value -> the "document says" cell of the recipe's header table, its wrapped lines joined."""
    cells, value = {}, None
    for line in header(recipe).splitlines():
        parts = line.split("|")
        if not line.startswith("# |") or len(parts) < 4 or parts[1].strip() == "value":
            continue
        value = parts[1].strip() or value
        cells[value] = (cells.get(value, "") + " " + parts[2].strip()).strip()
    return cells


def unmarked(cell: str) -> list[str]:
    """The parts of a cell that claim to be the document's: ";"-separated parts not starting with a source marker."""
    return [part for part in cell.split(";") if not part.strip().startswith(MARKERS)]


def test_document_says_column_quotes_only_the_document():
    recipes = seed_recipes()
    assert len(recipes) == 9  # the nine runs of documents 000-004
    for recipe, doc in recipes.items():
        flat = doc.replace(",", "")
        for value, cell in document_says(recipe).items():
            for part in unmarked(cell):
                for section in re.findall(r"\[([^\]]*)\]", part):  # a section named in Chinese is a heading there
                    for name in section.split(","):
                        assert not re.search(r"[\u4e00-\u9fff]", name) or name.strip() in doc, (recipe, name)
                for number in NUMBER.findall(re.sub(r"\[[^\]]*\]", "", part)):
                    assert number in doc or number.replace(",", "") in flat, (recipe, value, number, part)


def val_fraction_of(recipe: str) -> float:
    """The --val_fraction of the header's prepare.py commands that write the recipe's data_dir (one for all)."""
    commands = re.sub(r"\\\n#\s*", " ", header(recipe)).splitlines()
    out = f"--out={parse(recipe)[0].data_dir}"
    found = {m for c in commands if "prepare.py" in c and out in c for m in re.findall(r"--val_fraction=([\d.]+)", c)}
    assert len(found) == 1, (recipe, found)
    return float(found.pop())


def trained(n_documents: int, val_fraction: float) -> int:
    return sum(not prepare.is_val(d, val_fraction) for d in range(n_documents))


def test_splits_are_the_scripts_split():
    # AscendSpeed's scripts at 64b1937 and FlagAI's aquila_pretrain.py split by documents: --split 949,50,1 holds out
    # 5% (the 0.1% test part is never read), '90,10' 10%
    for recipe in ("baichuan_7b_pretrain.py", "baichuan2_7b_pretrain.py", "baichuan2_13b_pretrain.py",
                   "baichuan2_13b_sft.py"):
        assert "949,50,1" in header(recipe) and val_fraction_of(recipe) == 0.05, recipe
    assert "'90,10'" in header("aquila_7b_pretrain.py") and val_fraction_of("aquila_7b_pretrain.py") == 0.1


@pytest.mark.parametrize("recipe, documents, epochs", [("baichuan_13b_chat_lora.py", 48818, 1),
                                                       ("vicuna_7b.py", 52002, 3), ("vicuna_13b.py", 52002, 3)])
def test_epochs_count_what_is_trained(recipe, documents, epochs):
    # the documents train on every example (LLaMA-Efficient-Tuning without --dev_ratio, FastChat's eval_dataset=None);
    # train.py needs a val split: the steps are the epochs of what the header's prepare command leaves for training
    # (48818: the 13B log's bar, one example a step; 52,002: alpaca-data-conversation's records)
    cfg, _ = parse(recipe)
    per_epoch = trained(documents, val_fraction_of(recipe)) // cfg.global_batch_size
    assert cfg.max_iters == cfg.lr_decay_iters == epochs * per_epoch
    assert cfg.warmup_iters == math.ceil(0.03 * cfg.max_iters) if "vicuna" in recipe else cfg.warmup_iters == 0


def test_13b_chat_lora_log_is_its_first_logged_step_not_step_1000():
    # 003 1.2.2 prints {'loss': 1.9935, 'learning_rate': 4.9999995806904065e-05} beside the bar at 1000/48818: that lr
    # is the 5e-5 cosine over 48818 steps at step 9, the first logging_steps=10 entry
    cfg = replace(parse("baichuan_13b_chat_lora.py")[0], lr_decay_iters=48818)
    logged = 4.9999995806904065e-05
    assert min(range(48818), key=lambda s: abs(train.get_lr(s, cfg) - logged)) == 9
    assert train.get_lr(9, cfg) == pytest.approx(logged, rel=1e-12)
    assert train.get_lr(1000, cfg) == pytest.approx(4.9948e-05, rel=1e-4)
    text = header("baichuan_13b_chat_lora.py") + (ROOT / "docs" / "recipes.md").read_text()
    assert "loss 1.9935 at step 1000" not in text and "step 9" in text


def test_qlora_adapters_sit_on_w_pack_as_find_all_linear_names_puts_them():
    # Baichuan-7B's Linear4bit layers but lm_head: W_pack (q, k, v fused), o_proj, gate_proj, up_proj, down_proj
    cfg, _ = parse("baichuan_7b_qlora.py")
    out = train.main(["config/baichuan_7b_qlora.py", "--dry_run"])
    d, f, r, L = 4096, 11008, cfg.lora_rank, 32
    assert out["n_trainable"] == L * r * ((d + 3 * d) + (d + d) + 3 * (d + f)) == 17_891_328
    assert cfg.keep_last == 3  # save_total_limit=3


def test_baichuan_7b_pretrain_runs_the_optimizer_ascendspeed_builds():
    # pretrain_baichuan_zero_7B.sh at 64b1937 runs under DeepSpeed, but ascendspeed/training.py hands
    # deepspeed.initialize its own optimizer (optimizer/__init__.py: AdamW from --lr 0.00001, --weight-decay 1e-2 and
    # arguments.py's --adam-beta1 0.9, --adam-beta2 0.999, --adam-eps 1e-08 defaults): the ds_config "optimizer"
    # block (AdamW lr 2e-5, betas 0.9/0.95, weight_decay 0.0) is not what runs
    cfg, _ = parse("baichuan_7b_pretrain.py")
    assert (cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.adam_eps) == (1e-5, 0.01, 0.9, 0.999, 1e-8)


def test_baichuan2_7b_runs_the_first_1024_steps_of_the_scripts_schedule():
    # Performance: total Iterations 1024; pretrain_baichuan2_ptd_7B.sh: --train-iters 100000, cosine 1e-6 -> 1e-8
    cfg, _ = parse("baichuan2_7b_pretrain.py")
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.warmup_iters) == (1024, 100_000, 0)
    assert train.get_lr(cfg.max_iters - 1, cfg) > 0.99 * cfg.lr
    assert "criterion: relative error under 2%" not in header("baichuan2_7b_pretrain.py")


def test_aquila_steps_are_flagais_count_of_the_prepared_windows(tmp_path, monkeypatch):
    from support import flagai
    cfg, _ = parse("aquila_7b_pretrain.py")  # no data here: the header's estimate
    assert cfg.max_iters == 600 * flagai.steps_per_epoch(flagai.gpt_dataset_len(6_480_000, 2048, 90), 2, 8) == 118_800
    data = tmp_path / cfg.data_dir
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"train_tokens": 1_000_000}))
    monkeypatch.chdir(tmp_path)
    prepared, _ = train.parse_config([str(ROOT / "config/aquila_7b_pretrain.py")])
    windows = (1_000_000 - 1) // 2048  # one epoch of windows is more than 90: every window counts
    assert prepared.max_iters == prepared.lr_decay_iters == 600 * (-(-windows // 8) // 2) == 600 * 30
