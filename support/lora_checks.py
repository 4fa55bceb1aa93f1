"""support/lora_checks.py: LoRA's inputs checked where they enter model.py's apply_lora and load_lora.

Used by model.py. What it adds: the rank refused unless a positive integer; the lora_targets string read into the
names of the layers it selects (fnmatch patterns on a linear layer's full name or its last part; wqkv, alias W_pack,
for one adapter across the fused q/k/v projection), refused where a pattern matches nothing or a projection would be
adapted twice; adapter tensors checked against the model's by name and shape (CheckpointError).
"""

import fnmatch

from support.weights import CheckpointError


def check_rank(rank):
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora_rank={rank!r}: expected a positive integer")


# The fused q/k/v projection as a LoRA target: our name, and HF Baichuan's (LLaMA-Efficient-Tuning's --lora_target)
FUSED_QKV = ("wqkv", "W_pack")


def lora_targets(names: list[str], n_layers: int, targets: str) -> set[str]:
    """The names a lora_targets string selects among a model's linear layers `names` (of n_layers blocks): linear
    layers by fnmatch on the full name or its last part, and the fused q/k/v projections (layers.{i}.attention.wqkv)
    by patterns whose last part is wqkv or W_pack."""
    fused = [f"layers.{i}.attention.wqkv" for i in range(n_layers)]
    adapted = set()
    for pattern in [p.strip() for p in targets.split(",") if p.strip()]:
        head, _, last = pattern.rpartition(".")
        if last in FUSED_QKV:
            pattern, candidates = f"{head}.wqkv" if head else "wqkv", fused
        else:
            candidates = names
        hits = {n for n in candidates
                if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], pattern)}
        if not hits:
            raise ValueError(f"lora_targets: pattern {pattern!r} matches no linear layer "
                             f"(they are named like {names[0]}, {names[-1]}, or wqkv / W_pack for q, k, v fused)")
        adapted |= hits
    for name in sorted(n for n in adapted if n.endswith(".wqkv")):
        attention = name[: -len(".wqkv")]
        both = [w for w in ("wq", "wk", "wv") if f"{attention}.{w}" in adapted]
        if both:  # one update per weight keeps merging and PEFT's W_pack export unambiguous
            raise ValueError(f"lora_targets: {attention} would get both the fused wqkv adapter and its own "
                             f"{both[0]} adapter; choose one")
    return adapted


def check_adapter(tensors: dict, own: dict):
    """Adapter tensors (load_lora) against the model's own (lora_state_dict): the same names, each of its shape."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"adapter: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]} "
                              "(were the adapters trained with other lora_targets?)")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise CheckpointError(f"adapter: tensor {name} has shape {tuple(t.shape)}, the base model needs "
                                  f"{tuple(own[name].shape)}")
