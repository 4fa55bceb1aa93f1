"""Used by convert.py (merge-lora, dcp-to-native of a LoRA run), train.py (writes a LoRA run's adapter dir) and
sample.py (--adapter): PEFT's LoRA adapter format, read and written, and an adapter put on a loaded model.

What it adds: adapter_config.json checked field by field (what is not a plain update W + scale * B A of linear
layers is refused), PEFT's rules for which modules a config selects and at what rank and scale, HF module names
mapped to ours (Baichuan's W_pack update splits by rows into wq, wk, wv), and our older adapter dirs
(adapter.safetensors with our names, read only). Errors are CheckpointError naming file and field.
"""

import json
import math
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import model as model_lib
from model import ModelArgs
from support import diskspace, quant
from support.checks import check_json_fields, load_json
from support.hf_names import hf_layout, native_shapes, stacked_shape
from support.outputs import replace_dir
from support.weights import CheckpointError, load_file


def fail(msg):
    raise CheckpointError(msg)


ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model: then HF's own module names
NATIVE_WEIGHTS = "adapter.safetensors"
# LoraConfig fields that change what an adapter computes beyond W + scale * B A, refused when set
PEFT_UNSUPPORTED = ("use_dora", "use_qalora", "lora_bias", "modules_to_save", "trainable_token_indices",
                    "layer_replication", "target_parameters", "alora_invocation_tokens", "use_bdlora", "arrow_config",
                    "kasa_config", "monteclora_config", "velora_config")
# init_lora_weights that change the base weights at initialisation: the adapter then fits a base we do not have
PEFT_BASE_CHANGING_INIT = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


class LowRank(NamedTuple):
    """The update of one native weight: W + scale * b @ a, a (rank, in), b (rows of this weight, rank)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def hf_linears(args: ModelArgs, family: str) -> dict[str, list[str]]:
    """HF linear module name (model.layers.0.self_attn.W_pack, lm_head) -> the native weights it stacks on rows."""
    shapes = native_shapes(args)
    return {hf[: -len(".weight")]: natives for hf, natives in hf_layout(args, family).items()
            if len(shapes[natives[0]]) == 2 and natives[0] != "tok_embeddings.weight"}


def native_linears(args: ModelArgs) -> dict[str, list[str]]:
    """Our adaptable module names (layers.0.attention.wq, output, the fused layers.0.attention.wqkv) -> weights."""
    out = {n[: -len(".weight")]: [n] for n, shape in native_shapes(args).items()
           if len(shape) == 2 and n != "tok_embeddings.weight"}
    for i in range(args.n_layers):
        out[f"layers.{i}.attention.wqkv"] = [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv")]
    return out


def low_rank_updates(pairs: dict, weights_of: dict[str, list[str]], rank_alpha, shapes, where, name_of) -> dict:
    """{module: {"a": A, "b": B}} -> {native weight: LowRank}, B split by rows over the weights its module stacks.
    rank_alpha(module) -> (rank, scale); name_of(module, kind) names a tensor in messages as the file does."""
    updates = {}
    for module, ab in sorted(pairs.items()):
        if len(ab) != 2:
            fail(f"{where}: {name_of(module, 'b' if 'a' in ab else 'a')} is missing (an adapter needs A and B)")
        rank, scale = rank_alpha(module)
        natives = weights_of[module]
        rows = [shapes[n][0] for n in natives]
        for kind, want in (("a", (rank, shapes[natives[0]][1])), ("b", (sum(rows), rank))):
            if tuple(ab[kind].shape) != want:
                fail(f"{where}: tensor {name_of(module, kind)} has shape {tuple(ab[kind].shape)}, the base needs "
                     f"{want} (rank {rank})")
        for n, b in zip(natives, ab["b"].split(rows)):
            if n in updates:  # e.g. a fused wqkv adapter and a wq adapter in one file
                fail(f"{where}: {n} is adapted twice ({name_of(module, 'a')} and another adapter)")
            updates[n] = LowRank(ab["a"], b, scale)
    return updates


def read_adapter(path, args: ModelArgs, family: str) -> tuple[dict[str, LowRank], dict[str, torch.Tensor]]:
    """A LoRA adapter dir, PEFT's or our older one, as updates of the base's native weights, checked against args:
    ({native weight: LowRank}, {native weight: replacement}). Replacements are full weights PEFT saves beside the
    adapters when it thinks the embedding or head may have changed; loading the adapter puts them in the base."""
    path = Path(path)
    cfg = load_json(path / ADAPTER_CONFIG, CheckpointError)
    if "peft_type" in cfg:
        return read_peft_adapter(path, cfg, args, family)
    if "rank" in cfg and "alpha" in cfg:
        return read_native_adapter(path, cfg, args), {}
    fail(f"{path / ADAPTER_CONFIG}: peft_type: missing (expected a PEFT LoRA adapter, peft_type 'LORA')")


def read_native_adapter(path: Path, cfg: dict, args: ModelArgs) -> dict[str, LowRank]:
    """Our older adapter dirs: adapter.safetensors named as lora_state_dict, one rank and alpha."""
    for key in ("rank", "alpha"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            fail(f"{path / ADAPTER_CONFIG}: {key}: expected a positive number")
    file = path / NATIVE_WEIGHTS
    if not file.exists():
        fail(f"{file}: not found")
    weights_of, pairs = native_linears(args), {}
    for name, t in load_file(file).items():
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b") or module not in weights_of:
            fail(f"{file}: tensor {name} adapts no weight of the base")
        pairs.setdefault(module, {})[kind[-1]] = t
    return low_rank_updates(pairs, weights_of, lambda m: (cfg["rank"], cfg["alpha"] / cfg["rank"]),
                            native_shapes(args), file, lambda m, kind: f"{m}.lora_{kind}")


def peft_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in PEFT_WEIGHTS:
        if (path / name).exists():
            return path / name, load_file(path / name)  # .bin: torch.load(weights_only=True)
    fail(f"{path / PEFT_WEIGHTS[0]}: not found (nor {PEFT_WEIGHTS[1]}): the PEFT adapter has no weights")


# adapter_config.json: the fields read to select and scale the adapters, their types and ranges
PEFT_FIELDS = {"r": (int, "[1, inf)"), "lora_alpha": (float, "(0, inf)"), "use_rslora": Optional[bool],
               "target_modules": str | list | None, "exclude_modules": str | list | None,
               "layers_to_transform": int | list | None, "layers_pattern": str | list | None,
               "rank_pattern": Optional[dict], "alpha_pattern": Optional[dict]}


def check_peft_config(cfg: dict, where: Path):
    """Refuse, one field at a time, what is not a plain LoRA update W + scale * B A of linear layers, and fields of
    the wrong type: names where names go, regular expressions that compile, ranks and alphas in range."""
    if cfg.get("peft_type") != "LORA":
        fail(f"{where}: peft_type: {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    check_json_fields(cfg, PEFT_FIELDS, where, CheckpointError, required=("r", "lora_alpha"))
    for key, kind, interval in (("rank_pattern", int, "[1, inf)"), ("alpha_pattern", float, "(0, inf)")):
        for pattern, value in (cfg.get(key) or {}).items():
            regex(pattern, where, key)
            check_json_fields({pattern: value}, {pattern: (kind, interval)}, f"{where}: {key}", CheckpointError)
    for key in ("target_modules", "exclude_modules", "layers_pattern"):  # a string is a regex; a list, names
        value = cfg.get(key)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            fail(f"{where}: {key}: expected a list of module names, got {json.dumps(value)[:80]}")
        for pattern in [value] if isinstance(value, str) else value if key == "layers_pattern" and value else []:
            regex(pattern, where, key)  # layers_pattern's names go into a regex too
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, list) and not all(type(i) is int and i >= 0 for i in layers) or \
            type(layers) is int and layers < 0:
        fail(f"{where}: layers_to_transform: expected layer numbers >= 0, got {json.dumps(layers)[:80]}")
    if cfg.get("bias", "none") != "none":
        fail(f"{where}: bias: {cfg['bias']!r} is not supported (adapters with bias terms; expected 'none')")
    for key in PEFT_UNSUPPORTED:
        if cfg.get(key):
            fail(f"{where}: {key}: {cfg[key]!r} is not supported (only plain LoRA on linear layers)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(PEFT_BASE_CHANGING_INIT):
        fail(f"{where}: init_lora_weights: {init!r} changed the base weights at initialisation; save the adapter "
             f"with PEFT's path_initial_model_for_weight_conversion to get one for the original base")


def regex(pattern: str, where, key: str):
    """CheckpointError unless pattern compiles (adapter configs name modules by regular expressions)."""
    try:
        re.compile(pattern)
    except re.error as e:
        fail(f"{where}: {key}: {pattern!r} is not a regular expression ({e})")


def peft_selected(cfg: dict, modules: list[str], where: Path, family: str) -> set[str]:
    """The HF modules a LoraConfig adapts, decided as PEFT does: target_modules (a list: names or name suffixes; a
    string: a regex the whole module name must match; "all-linear": every linear but the head), exclude_modules,
    layers_to_transform (with layers_pattern)."""
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")

    def in_list(key, names):
        return key in names or any(key.endswith(f".{n}") for n in names)

    if targets == "all-linear":
        selected = {m for m in modules if m != "lm_head"}
    elif isinstance(targets, str):
        selected = {m for m in modules if re.fullmatch(targets, m)}
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        for t in targets:
            if not any(in_list(m, [t]) for m in modules):
                fail(f"{where}: target_modules: {t!r} names no linear layer of a {family} model (its linear layers: "
                     f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))})")
        selected = {m for m in modules if in_list(m, targets)}
    else:
        fail(f"{where}: target_modules: expected a list of module names or a regex string, got {targets!r}")
    if not selected:
        fail(f"{where}: target_modules: {targets!r} matches no linear layer of a {family} model")
    if exclude:
        selected = {m for m in selected if not (re.fullmatch(exclude, m) if isinstance(exclude, str)
                                                 else in_list(m, exclude))}
    layers = cfg.get("layers_to_transform")
    if layers is not None and layers != [] and (targets == "all-linear" or not isinstance(targets, str)):
        layers = [layers] if isinstance(layers, int) else layers
        patterns = cfg.get("layers_pattern") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns

        def index(m):
            found = ([re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", m) for p in patterns]
                     or [re.match(r".*?\.[^.]*\.(\d+)\.", m)])
            return next((int(f[1]) for f in found if f), None)

        # a module named in full (lm_head) is taken whatever its layer, as PEFT does
        selected = {m for m in selected if index(m) in layers or (isinstance(targets, list) and m in targets)}
    return selected


def peft_rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of one module: rank_pattern / alpha_pattern keys are regexes matched against the end of the
    module name, the first that matches wins; scale = alpha / rank, or alpha / sqrt(rank) with use_rslora."""
    def pattern_value(patterns, default):
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        return patterns[key] if key is not None else default

    rank = pattern_value(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
    return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_peft_adapter(path: Path, cfg: dict, args: ModelArgs, family: str) -> tuple[dict, dict]:
    """PEFT's adapter_config.json + adapter_model.safetensors (or .bin): lora_A (r, in) and lora_B (out, r) per HF
    module. Baichuan's W_pack update B A is split by rows into wq, wk, wv. fan_in_fan_out only says the stored base is
    transposed (GPT-2's Conv1D); PEFT turns it off for nn.Linear, which every linear of these families is, so the
    update of the (out, in) weight is B A either way."""
    where = path / ADAPTER_CONFIG
    check_peft_config(cfg, where)
    file, tensors = peft_weights(path)
    linears = hf_linears(args, family)
    pairs = {}
    for name, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", name)
        if m is None:
            if name.startswith(PEFT_PREFIX) and name.endswith(".weight") and "lora_" not in name:
                continue  # a full weight saved beside the adapters: peft_replacements
            fail(f"{file}: tensor {name} is not a LoRA weight (expected {PEFT_PREFIX}<module>.lora_A.weight / "
                 "lora_B.weight)")
        if m[1] not in linears:
            fail(f"{file}: tensor {name} adapts {m[1]}, which is no linear layer of the {family} base "
                 f"({args.n_layers} layers)")
        pairs.setdefault(m[1], {})[m[2].lower()] = t
    selected = peft_selected(cfg, list(linears), where, family)
    if set(pairs) != selected:
        odd = sorted(set(pairs) ^ selected)[0]
        fail(f"{file}: {odd} is {'adapted in the weights but not in' if odd in pairs else 'missing, but selected by'} "
             f"{ADAPTER_CONFIG}'s target_modules")
    updates = low_rank_updates(pairs, linears, lambda m: peft_rank_alpha(cfg, m), native_shapes(args), file,
                               lambda m, kind: f"{PEFT_PREFIX}{m}.lora_{kind.upper()}.weight")
    return updates, peft_replacements(file, tensors, args, family)


def peft_replacements(file: Path, tensors: dict, args: ModelArgs, family: str) -> dict[str, torch.Tensor]:
    """Full weights in a PEFT adapter file (lm_head.base_layer.weight, model.embed_tokens.weight): as loaded by PEFT,
    they replace the base's. Their shapes must be the base's (a resized vocabulary is not supported)."""
    layout, shapes = hf_layout(args, family), native_shapes(args)
    out = {}
    for name, t in tensors.items():
        if "lora_" in name or not name.startswith(PEFT_PREFIX):
            continue
        hf = name[len(PEFT_PREFIX):].replace(".base_layer.", ".")
        if hf not in layout:
            fail(f"{file}: tensor {name} is no weight of the {family} base")
        natives = layout[hf]
        want = stacked_shape([shapes[n] for n in natives])
        if tuple(t.shape) != want:
            fail(f"{file}: tensor {name} has shape {tuple(t.shape)}, the base's {hf} has {want}")
        out.update(zip(natives, t.split([shapes[n][0] for n in natives])))
    return out


def write_peft_adapter(path, tensors: dict[str, torch.Tensor], args: ModelArgs, family: str, *, rank: int,
                       alpha: float, dropout: float, base=None, metadata=None):
    """Our adapters (lora_state_dict's names) as a PEFT LoRA adapter for the HF export of the base (native-to-hf),
    so that PeftModel.from_pretrained(<that export>, path) computes what our model with the adapters computes.

    The update of every native weight goes to the HF module holding it. A fused wqkv adapter becomes Baichuan's
    W_pack adapter as it is, or on a LLaMA-family model q_proj / k_proj / v_proj adapters sharing its A. Separate
    wq / wk / wv adapters of a Baichuan model become one W_pack adapter of rank 3r (r per part adapted): A stacks
    their A, B is block-diagonal, so B A stacks their updates; rank_pattern / alpha_pattern (alpha 3 alpha) keep the
    scale alpha / r. metadata (strings) goes into the safetensors header, where PEFT does not look."""
    from safetensors.torch import save_file

    weights_of, shapes = native_linears(args), native_shapes(args)
    parts, pairs = {}, {}  # native weight -> (A, rows of B, adapter it came from)
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b") or module not in weights_of:
            fail(f"adapter: tensor {name} adapts no weight of the model")
        pairs.setdefault(module, {})[kind[-1]] = t.detach().float().cpu()
    for module, ab in pairs.items():
        natives = weights_of[module]
        for n, b in zip(natives, ab["b"].split([shapes[n][0] for n in natives])):
            parts[n] = (ab["a"], b, module)
    out, ranks = {}, {}
    for hf_module, natives in hf_linears(args, family).items():
        present = [parts.get(n) for n in natives]
        if not any(present):
            continue
        if all(present) and len({p[2] for p in present}) == 1:  # one adapter covers the module: A shared
            a, b = present[0][0], torch.cat([p[1] for p in present])
        else:  # separate adapters on parts of W_pack: stacked A, block-diagonal B
            a = torch.cat([p[0] for p in present if p])
            b = torch.zeros(sum(shapes[n][0] for n in natives), a.size(0))
            row = col = 0
            for n, p in zip(natives, present):
                if p:
                    b[row: row + p[1].size(0), col: col + p[0].size(0)] = p[1]
                    col += p[0].size(0)
                row += shapes[n][0]
        # own copies: safetensors refuses tensors sharing memory (a fused A on three LLaMA modules, B's row blocks)
        out[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = a.clone(memory_format=torch.contiguous_format)
        out[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = b.clone(memory_format=torch.contiguous_format)
        ranks[hf_module] = a.size(0)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base and str(base),
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
              "target_modules": sorted(module_patterns({m: True for m in ranks}, hf_linears(args, family))),
              "rank_pattern": module_patterns({m: r for m, r in ranks.items() if r != rank}, ranks),
              "alpha_pattern": module_patterns({m: alpha * r / rank for m, r in ranks.items() if r != rank}, ranks)}
    need = sum(t.numel() * t.element_size() for t in out.values())
    with replace_dir(path, True, "--dst", (), CheckpointError) as tmp, \
            diskspace.reported(path, tmp, need, CheckpointError):
        save_file(out, str(tmp / PEFT_WEIGHTS[0]), metadata={"format": "pt", **(metadata or {})})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def module_patterns(values: dict[str, object], modules) -> dict[str, object]:
    """PEFT's module keys for {HF module: value}: the short name (q_proj) where every one of modules with that name
    has the same value, else the full names."""
    by_short, out = {}, {}
    for m in modules:
        by_short.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    for short, group in sorted(by_short.items()):
        got = {values[m] for m in group if m in values}
        if len(got) == 1 and all(m in values for m in group):
            out[short] = got.pop()
        else:
            out.update({m: values[m] for m in group if m in values})
    return out


# --------------------------------------------------------------------------------------------------------------------
# an adapter on a loaded model (sample.py --adapter)


def fold_adapter(name, w, updates, replaced):
    """Weight `name` with its adapter folded in: the adapter's tensor where it replaces w, then + scale * B A where it
    is adapted."""
    w = replaced.get(name, w)
    if name not in updates:
        return w
    u = updates[name]
    return (w.float() + u.scale * (u.b.float() @ u.a.float()).to(w.device)).to(w.dtype)


@torch.no_grad()
def attach_adapter(model, updates, replaced):
    """An adapter on a model whose block linears are NF4 (QLoRA's base), in place: each adapted NF4 linear is wrapped
    in a LoRALinear holding the adapter's A and B, unmerged, as PEFT runs an adapter on a 4-bit base, so the model is
    the one QLoRA trained (folding B A in and quantising again would round it twice); a replaced NF4 weight is
    quantised from its replacement; the other weights (embedding, output layer) take the adapter folded in."""
    for name in sorted({*updates, *replaced}):
        path = name.rpartition(".")[0]
        module = model.get_submodule(path)
        if not isinstance(module, quant.NF4Linear):
            p = model.get_parameter(name)
            p.copy_(fold_adapter(name, p, updates, replaced))
            continue
        if name in replaced:
            module.quantize_from(replaced[name])
        if name in updates:
            u = updates[name]
            lora = model_lib.LoRALinear(module, rank=u.a.size(0), alpha=u.scale * u.a.size(0))
            lora.lora_a.copy_(u.a)
            lora.lora_b.copy_(u.b)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, lora)
    return model
