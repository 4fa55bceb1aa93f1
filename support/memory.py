"""support/memory.py: memory budgeting for generation. Used by sample.py (a model refused before loading when it
cannot fit; --prompt_file's batch size) and support/batching.py (the server's KV-cache budget); what it adds: the bytes
of a KV cache and of the next-token logits, and how many cache positions the device's available memory allows.
"""
import torch

import model as model_lib
import support.device


class MemoryBudgetError(Exception):
    """A model that does not fit in the device's available memory (one line: what, how much, what to try)."""


def kv_bytes(args, positions, itemsize) -> int:
    """Bytes of a KV cache of `positions` (rows x columns): a key and a value per layer and kv head."""
    return 2 * args.n_layers * args.kv_heads * args.head_dim * positions * itemsize


def logits_bytes(args, rows, itemsize) -> int:
    """Bytes of the next-token logits of `rows` rows: one position each (a prefill builds its last position's only,
    model.Transformer's last_only), out of the head in the model's dtype and as the fp32 copy sampling reads."""
    return rows * args.vocab_size * (itemsize + 4)


def check_memory(args, device, dtype, ckpt):
    """Refuse (MemoryBudgetError), before loading, a model whose weights, one sequence's KV cache and its next-token
    logits exceed the device's available memory (counted on the meta device: nothing allocated)."""
    with torch.device("meta"):
        n = model_lib.Transformer(args).num_params()
    itemsize = dtype.itemsize
    need = n * itemsize + kv_bytes(args, args.max_seq_len, itemsize) + logits_bytes(args, 1, itemsize)
    available = support.device.available_memory(device)
    if available is not None and need > available:
        raise MemoryBudgetError(f"--ckpt={ckpt}: {n / 1e9:.2f}B parameters in {str(dtype)[6:]} need "
                                f"{need / 2**30:.1f} GiB on {device}, which has {available / 2**30:.1f} GiB available (try --dtype=bfloat16)")


def kv_budget(model, max_batch, device, columns=None) -> int:
    """The KV-cache positions (rows x columns) generation may hold: half the memory available with the model loaded,
    less each row's next-token logits (logits_bytes), at least one whole context (check_memory saw to that), at most
    max_batch of them. columns: every row's length where it is known (a prompt file's batches), each row's logits
    counted beside its columns; else (a server's rows grow) max_batch rows' logits are set aside."""
    a = model.args
    itemsize = next(model.parameters()).dtype.itemsize
    per_position, per_row = kv_bytes(a, 1, itemsize), logits_bytes(a, 1, itemsize)
    available, most = support.device.available_memory(device), max_batch * a.max_seq_len
    if available is None:
        return most
    if columns:
        positions = available // 2 // (columns * per_position + per_row) * columns
    else:
        positions = (available // 2 - max_batch * per_row) // per_position
    return max(a.max_seq_len, min(most, positions))
