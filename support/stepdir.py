"""Used by train.py (checkpoint, resume, the export) and convert.py (dcp-to-native reads a step dir): the training
step-dir format, out_dir/step_XXXXXXXX, written whole or not at all, verified, and read without trust, for resume
and for export (its model tensors in batches, or a LoRA run's adapters as a PEFT adapter dir).

What it adds: the manifest of sizes and sha256 digests written last, so a half-written or corrupted step dir is
never taken for a complete one; pruning and rerunning a step without a window where no good step dir exists; and
DCP loading that cannot run code from a crafted file (.metadata through an allow-list unpickler, non-tensor entries
with weights_only).
"""

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from model import ModelArgs, read_config
from support import diskspace
from support.checks import check_json_fields, load_json
from support.peft import write_peft_adapter
from support.weights import CheckpointError, check_finite, check_shapes


def fail(msg):
    raise CheckpointError(msg)


# --------------------------------------------------------------------------------------------------------------------
# step dirs: train.py's checkpoints, out_dir/step_XXXXXXXX
#
#     .metadata, *.distcp     torch.distributed.checkpoint of {"model": ..., "optim": ...} (names as in model.py)
#     rng_rank{r}.json        each rank's torch (and accelerator) RNG state
#     config.json             ModelArgs fields + "family", as in a checkpoint dir (dcp_to_native exports from it)
#     tokenizer files         copied from the data dir (the writer's copy_tokenizer)
#     train_state.json        written last: step, counters, data position, config, and "files": {name: {"size",
#                             "sha256"}} of every other file; a dir without it is never taken as complete
# Written under .tmp_step_XXXXXXXX and renamed when complete; removed by renaming to .old_step_XXXXXXXX first. Every
# step-dir function takes the processes writing or reading together as a Ranks (one process: the default), so the
# format knows no process group. Errors are CheckpointError.


STEP_DIR = re.compile(r"step_(\d{8})$")
TRAIN_STATE = "train_state.json"
# train_state.json's fields (train.py's checkpoint() writes them), their types and ranges: checked wherever present;
# a resume needs RESUME_FIELDS too
TRAIN_STATE_FIELDS = {"step": (int, "[0, 2**63)"), "files": dict, "best_val_loss": Optional[float],
                      "lora_base": Optional[str], "loss_scaler.scale": (float, "(0, inf)"),
                      "loss_scaler.good_steps": (int, "[0, inf)"), "loss_scaler.skipped": (int, "[0, inf)"),
                      "data.seed": (int, "[0, 2**63)"), "data.epoch": (int, "[0, inf)"),
                      "data.index": (int, "[0, inf)")}
RESUME_FIELDS = ("step", *(k for k in TRAIN_STATE_FIELDS if "." in k))
# what to do when a step dir does not fit: keep_last step dirs stay while the next is written beside them
ROOM_ADVICE = ("free space, or keep fewer step dirs (keep_last={}: a save writes the next beside them before the "
               "oldest goes)")


@dataclass(frozen=True)
class Ranks:
    """The processes that write or read a step dir together: this one's rank, how many, and their collectives
    (train.py passes its process group's barrier and all_gather_object)."""
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    all_gather: Callable[[object], list] = lambda obj: [obj]


def rng_file(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / f"rng_rank{rank}.json"


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns on every save/load without a process group: in one process that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def file_digest(path: Path, sync: bool = False) -> dict:
    """{"size", "sha256"} of a file; sync also fsyncs it, so what the digest describes is on disk."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def fsync_dir(path: Path):
    """Make a rename or a new file in path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(out_dir: Path) -> list[Path]:
    """Complete step dirs, oldest first (temporary names never match)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if STEP_DIR.match(p.name) and (p / TRAIN_STATE).exists()]
    return sorted(found, key=lambda p: p.name)


def remove_step_dir(step_dir: Path):
    """Renamed out of the step_XXXXXXXX namespace first, so a crash halfway through the delete leaves no half dir
    that looks complete (remove_unfinished_step_dirs removes the leftovers)."""
    doomed = step_dir.with_name(f".old_{step_dir.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    step_dir.rename(doomed)
    shutil.rmtree(doomed)


def remove_unfinished_step_dirs(out_dir: Path):
    """What a run killed while saving or pruning left: temporary and half-deleted step dirs."""
    for p in [*Path(out_dir).glob(".tmp_step_*"), *Path(out_dir).glob(".old_step_*")]:
        shutil.rmtree(p, ignore_errors=True)


def write_step_dir(out_dir: Path, step: int, dcp_state: dict, rng: dict, config: dict, train_state: dict, *,
                   copy_tokenizer=None, keep_last: int = 0, ranks: Ranks = Ranks(), on_event=None,
                   need: Optional[int] = None) -> Path:
    """Write out_dir/step_XXXXXXXX: every file into a temporary dir, then the size and sha256 of each into
    train_state.json, which is written last; then one rename, then keep_last pruning (0 keeps all). A crash at any
    point leaves either the previous step dirs alone or this one complete. Every rank calls it with its own DCP
    shards and RNG; rank 0 writes config, tokenizer (copy_tokenizer(dir) copies its files there) and manifest.
    on_event(name, step) is called at "save" (files written, not renamed) and "saved" (renamed, not pruned). A full
    disk or a lost mount: CheckpointError naming the last complete step dir (a full disk: with the bytes the step
    dir needs, `need` or the newest one's, and the bytes free)."""
    final, tmp = Path(out_dir) / f"step_{step:08d}", Path(out_dir) / f".tmp_step_{step:08d}"
    bad = [e for e in ranks.all_gather(_finite_or_why(dcp_state.get("model", {}), final)) if e]
    if bad:  # every rank refuses together
        last = last_good_step_dir(out_dir)
        fail(f"{bad[0]}; " + (f"the last good checkpoint is {last}" if last else "no good checkpoint was written"))
    try:
        _write_step_files(tmp, dcp_state, rng, config, copy_tokenizer, ranks)
        if on_event:
            on_event("save", step)
        # each rank hashes (and fsyncs) a share of the files; the manifest goes into train_state.json
        names = sorted(p.name for p in tmp.iterdir())
        mine = {n: file_digest(tmp / n, sync=True) for n in names[ranks.rank::ranks.world_size]}
        manifest = {k: v for part in ranks.all_gather(mine) for k, v in part.items()}
        if ranks.rank == 0:
            _publish_step_dir(tmp, final, {**train_state, "files": manifest})
            if on_event:
                on_event("saved", step)
            shutil.rmtree(final.with_name(f".old_{final.name}"), ignore_errors=True)
            for old in step_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
                remove_step_dir(old)
    except (OSError, dcp.api.CheckpointException) as e:
        full = diskspace.is_full(e, tmp)  # before the partial dir goes: a writer may only have left it no room
        if isinstance(e, dcp.api.CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        shutil.rmtree(tmp, ignore_errors=True)
        last = last_good_step_dir(out_dir)
        newest = step_dirs(out_dir)
        why = (diskspace.message(final, need or (diskspace.tree_bytes(newest[-1]) if newest else None),
                                 diskspace.free_bytes(out_dir), diskspace.mount_of(out_dir),
                                 ROOM_ADVICE.format(keep_last)) if full else
               f"{tmp}: writing the checkpoint failed ({type(e).__name__}: {(str(e) or '?').splitlines()[0]})")
        raise CheckpointError(why + "; " + (f"the last good checkpoint is {last}" if last else
                                            "no good checkpoint was written")) from None
    ranks.barrier()
    return final


def _finite_or_why(model_state: dict, where) -> Optional[str]:
    try:
        check_finite(model_state, where)
    except CheckpointError as e:
        return str(e)
    return None


def last_good_step_dir(out_dir) -> Optional[Path]:
    """The newest step dir of out_dir that verifies against its manifest (its weights were finite when written: no
    other is ever written), or None: what "the last good checkpoint" names."""
    return newest_step_dir(out_dir, verify_step_dir)[0]


def newest_step_dir(out_dir, read) -> tuple[Optional[Path], object]:
    """(the newest step dir of out_dir that read(step_dir) reads without a CheckpointError, what read returned), or
    (None, None)."""
    for step_dir in reversed(step_dirs(out_dir)):
        try:
            return step_dir, read(step_dir)
        except CheckpointError:
            continue
    return None, None


def _write_step_files(tmp: Path, dcp_state: dict, rng: dict, config: dict, copy_tokenizer, ranks: Ranks):
    if ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    with quiet_dcp():
        dcp.save(dcp_state, checkpoint_id=tmp, no_dist=ranks.world_size == 1)
    rng_file(tmp, ranks.rank).write_text(json.dumps(rng))
    if ranks.rank == 0:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if copy_tokenizer:
            copy_tokenizer(tmp)
    ranks.barrier()


def _publish_step_dir(tmp: Path, final: Path, train_state: dict):
    """train_state.json last, then the rename that makes the step dir complete; durable at each step."""
    with open(tmp / TRAIN_STATE, "w") as f:
        f.write(json.dumps(train_state, indent=2))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a rerun of this step (after a resume): the old one goes once the new one is in place
        final.rename(final.with_name(f".old_{final.name}"))
    os.rename(tmp, final)
    fsync_dir(final.parent)


def read_train_state(step_dir: Path, required=("step",)) -> dict:
    """train_state.json of a step dir: a JSON object with the step (and the other fields in required), every field of
    TRAIN_STATE_FIELDS of its type and range, and a manifest whose every entry is a plain file name of the step dir
    (never a path out of it) with its size and sha256. CheckpointError names what is wrong."""
    file = Path(step_dir) / TRAIN_STATE
    state = load_json(file, CheckpointError)
    check_json_fields(state, TRAIN_STATE_FIELDS, file, CheckpointError, required=required)
    named = STEP_DIR.match(Path(step_dir).name)
    if named and int(named[1]) != state["step"]:
        fail(f"{file}: step={state['step']}, but the dir is {Path(step_dir).name}")
    for name, want in state.get("files", {}).items():
        if name in ("", ".", "..") or name != Path(name).name or "\0" in name:
            fail(f"{file}: files: {name!r}: expected a file name in {step_dir} (no directories)")
        if not isinstance(want, dict):
            fail(f"{file}: files: {name}: expected an object with size and sha256, got {json.dumps(want)[:60]}")
        check_json_fields(want, {"size": (int, "[0, inf)"), "sha256": str}, f"{file}: files: {name}",
                          CheckpointError, required=("size", "sha256"))
        if not re.fullmatch(r"[0-9a-f]{64}", want["sha256"]):
            fail(f"{file}: files: {name}: sha256={want['sha256']!r}: expected 64 hex digits")
    return state


def verify_step_dir(step_dir: Path, ranks: Ranks = Ranks(), required=("step",)) -> dict:
    """train_state.json of a step dir (read_train_state) whose files all have the size and sha256 recorded when it
    was written; else CheckpointError naming the file and what is wrong. Each rank hashes a share; every rank gets the
    same verdict."""
    state = read_train_state(step_dir, required)
    manifest = state.get("files", {})  # step dirs written before manifests have none: nothing to check against
    problems = []
    for name in sorted(manifest)[ranks.rank::ranks.world_size]:
        path, want = Path(step_dir) / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {want['size']} (truncated?)")
        elif file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the one recorded when it was written (corrupted)")
    problems = [p for part in ranks.all_gather(problems) for p in part]
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return state


def read_step_dir(step_dir: Path, dcp_state: dict, rank: int = 0, no_dist: bool = True) -> tuple[dict, dict | None]:
    """Load a step dir's DCP entries into dcp_state (in place, resharded by DCP to whatever shards it holds, safely:
    dcp_load) -> (train_state, this rank's RNG state or None when the saving run had no such rank)."""
    dcp_load(dcp_state, step_dir, no_dist=no_dist)
    rng, file = None, rng_file(step_dir, rank)
    if file.exists():  # {"torch": [state bytes], "device": [...]}: lists of bytes
        rng = load_json(file, CheckpointError)
        for key in ("torch", *(["device"] if "device" in rng else [])):
            if not (isinstance(rng.get(key), list) and all(type(b) is int and 0 <= b < 256 for b in rng[key])):
                fail(f"{file}: {key}: expected a list of bytes (integers 0..255), got {json.dumps(rng.get(key))[:60]}")
    return read_train_state(step_dir), rng


class _DcpMetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint reads .metadata with a bare pickle.load; this one resolves only what DCP writes
    there (its metadata classes, torch dtypes / Size / layouts, paths), so a crafted .metadata cannot run code."""

    def find_class(self, module, name):
        obj = getattr(sys.modules.get(module), name, None) if module in sys.modules else None
        dcp_class = module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)
        torch_value = module == "torch" and (name == "Size" or isinstance(obj, torch.dtype))
        if (dcp_class or torch_value or (module, name) == ("torch.serialization", "_get_layout")
                or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))):
            return obj
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_dcp_metadata(step_dir):
    """CheckpointError for a DCP .metadata that holds anything but DCP's own metadata (SafeDcpReader calls it before
    DCP reads the file)."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401 (registers the classes find_class looks up)
    import torch.distributed.checkpoint.metadata  # noqa: F401

    file = Path(step_dir) / ".metadata"
    try:
        with open(file, "rb") as f:
            _DcpMetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: not a torch.distributed.checkpoint dir ({file.name} not found)") from None
    except Exception as e:  # noqa: BLE001 (a corrupt pickle surfaces as many exception types)
        raise CheckpointError(f"{file}: refused to unpickle: not plain DCP metadata ({type(e).__name__}: {e})") \
            from None


class SafeDcpReader(dcp.FileSystemReader):
    """DCP reads .metadata with a bare pickle.load; this reader first reads it with the allow-list unpickler
    (check_dcp_metadata), so a crafted .metadata is refused before anything of it runs."""

    def read_metadata(self, *args, **kwargs):
        check_dcp_metadata(self.path)
        return super().read_metadata(*args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's own planner unpickles a checkpoint's non-tensor entries (optimiser hyper-parameters) with
    weights_only=False, which runs whatever code a crafted file holds; this one reads plain data only."""

    def load_bytes(self, read_item, value):
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"entry {fqn}: refused to unpickle: it holds more than plain data and could run "
                                  f"code (weights_only=True)") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict, step_dir: Path, no_dist: bool = True):
    """dcp.load, safe on untrusted files (SafeDcpReader, SafeLoadPlanner): the one way step dirs are read, by
    train.py and dcp_to_native. CheckpointError says what failed."""
    check_dcp_metadata(step_dir)  # before DCP's collectives: every rank refuses the same file the same way
    try:
        with quiet_dcp():
            dcp.load(state, storage_reader=SafeDcpReader(str(step_dir)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, dcp.api.CheckpointException) as e:  # CheckpointException wraps each rank's error
        if isinstance(e, dcp.api.CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        why = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
        raise CheckpointError(f"{step_dir}: cannot be loaded: {why}") from None


# --------------------------------------------------------------------------------------------------------------------
# a step dir read for export (convert.py's dcp-to-native, which train.py's export calls)

# prefixes torch.compile, activation checkpointing and FSDP1 add to parameter names
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def read_model_index(step: Path) -> tuple[ModelArgs, dict, dict]:
    """(args, config.json, stored) of a step dir, verified first (verify_step_dir, as resume does) when it has a
    train_state.json; stored maps each native name to (its key under "model", size, dtype). Runs in one process
    without a process group."""
    if (step / TRAIN_STATE).exists():  # a train.py step dir: every file as its manifest recorded it, as resume checks
        verify_step_dir(step)
    try:
        args, cfg = read_config(step)
        metadata = SafeDcpReader(str(step)).read_metadata()
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt .metadata surfaces as many exception types
        fail(f"{step}: not a torch.distributed.checkpoint dir ({type(e).__name__}: {e})")
    stored = {}  # native name -> (key under "model", size, dtype)
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            name = key[len("model."):]
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            stored[name] = (key[len("model."):], tuple(md.size), md.properties.dtype)
    return args, cfg, stored


def read_model(step: Path, stored: dict, shapes: dict, batch_bytes: int):
    """The model tensors of a step dir (checked against shapes first), read through dcp_load, the one safe way step
    dirs are read, in batches of about batch_bytes, so memory stays near one batch whatever the model size."""
    check_shapes({n: s for n, (_, s, _) in stored.items()}, shapes, step)

    def batches():
        batch, size = [], 0
        for name in shapes:
            nbytes = torch.Size(stored[name][1]).numel() * stored[name][2].itemsize
            if batch and size + nbytes > batch_bytes:
                yield batch
                batch, size = [], 0
            batch.append(name)
            size += nbytes
        if batch:
            yield batch

    def tensors():
        for batch in batches():
            want = {stored[n][0]: torch.empty(stored[n][1], dtype=stored[n][2]) for n in batch}
            dcp_load({"model": want}, step)
            for n in batch:
                yield n, want.pop(stored[n][0])

    return tensors()


def write_lora_adapter(step: Path, stored: dict, args: ModelArgs, family: str, path: Path) -> str:
    """A LoRA run's step dir (its adapters beside the frozen, maybe NF4, base): that step's adapters written as a PEFT
    adapter dir at path; returns the base checkpoint dir the run started from, which they merge into."""
    state = read_train_state(step)
    file = step / TRAIN_STATE
    base, cfg = state.get("lora_base"), state.get("config")
    if not base:
        fail(f"{file}: a LoRA run from scratch: no base checkpoint dir (lora_base) to merge its adapters into")
    if not isinstance(cfg, dict):
        fail(f"{file}: config: expected the run's config (lora_alpha, lora_dropout)")
    check_json_fields(cfg, {"lora_alpha": (float, "(0, inf)"), "lora_dropout": (float, "[0, 1)")}, f"{file}: config",
                      CheckpointError, required=("lora_alpha",))
    if not (Path(base) / "config.json").is_file():
        fail(f"{file}: lora_base={base}: the run's base checkpoint dir is not here (its adapters merge into it)")
    names = [n for n in stored if n.endswith((".lora_a", ".lora_b"))]
    want = {stored[n][0]: torch.empty(stored[n][1], dtype=stored[n][2]) for n in names}
    dcp_load({"model": want}, step)
    adapters = {n: want[stored[n][0]] for n in names}
    rank = next(t.size(0) for n, t in adapters.items() if n.endswith(".lora_a"))
    write_peft_adapter(path, adapters, args, family, rank=rank, alpha=cfg["lora_alpha"],
                       dropout=cfg.get("lora_dropout", 0.0), base=base)
    return base
