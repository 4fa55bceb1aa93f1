"""Used by train.py (--dry_run, its plan()): the plan of a config on its mesh without its data, checkpoint or devices.

What it adds to support/planner.py's numbers: the run's own model and mesh, asked as the run asks them (train.py's
model_args_for, support/train_checks.py's check_mesh), for a config whose data dir or init_from is not here yet:
the preset and the model's vocabulary stand in, and the plan says so.
"""

import os
from dataclasses import replace
from pathlib import Path

from model import PRESETS
from support.planner import training_plan
from support.train_checks import as_train_error, check_mesh


def plan(cfg, model_overrides: dict, model_args_for, load_meta) -> dict:
    """--dry_run: print the parameter count, per-device memory and step time of this config on its mesh; build nothing
    but a meta-device model. Returns the numbers (tests). model_args_for(cfg, overrides, meta) and load_meta(data_dir)
    are train.py's."""
    notes = []
    data = Path(cfg.data_dir) / "meta.json"
    meta = load_meta(cfg.data_dir) if data.exists() else None
    if cfg.init_from not in ("scratch", "resume") and not Path(cfg.init_from).exists():
        notes.append(f"init_from={cfg.init_from} is not here: planned with the preset model={cfg.model!r}")
        cfg = replace(cfg, init_from="scratch")
    if meta is None:
        notes.append(f"{data} is not here: the model's vocabulary and unpacked rows assumed (prepare.py --pack adds "
                     "a per-sequence attention mask, in the plan once the data is here)")
        vocab = PRESETS[cfg.model].vocab_size if cfg.model in PRESETS else 1
        meta = {"vocab_size": model_overrides.get("vocab_size", vocab)}
    args, family = model_args_for(cfg, model_overrides, meta)
    dp = check_mesh(cfg, args, cfg.devices or int(os.environ.get("WORLD_SIZE", "1")), "devices")
    with as_train_error(ValueError):  # lora_targets that match no layer
        return training_plan(args, family, cfg, dp, cfg.tp, meta, notes)
