"""
A conversation's turns and their limits: --max_source_len / --max_target_len, each turn's prompt and reply cut apart.

Used by prepare.py (encode_sample, after the chat template has given a conversation's ids and loss mask). What it
adds: the turns read back from the loss mask, and LLaMA-Efficient-Tuning's per-turn limits counted in stats.
"""


def split_turns(ids, mask):
    """A conversation's (ids, reply mask) -> [(prompt ids, reply ids)]: each turn is a run of prompt tokens (mask 0,
    the system prompt and bos go with the first) and the run of reply tokens after it (mask 1, its end token last)."""
    turns, i, n = [], 0, len(ids)
    while i < n:
        j = i
        while j < n and not mask[j]:
            j += 1
        k = j
        while k < n and mask[k]:
            k += 1
        turns.append((ids[i:j], ids[j:k]))
        i = k
    return turns


def limit_turns(ids, mask, max_source, max_target, stats):
    """Cut each turn's prompt and reply separately, as LLaMA-Efficient-Tuning's preprocess_supervised_dataset (July
    2023) does with max_source_length / max_target_length: a prompt keeps its first max_source tokens (bos counts,
    the tail goes, its assistant marker too); a reply keeps its first max_target - 1 tokens and its end token (eos);
    with both limits, the turn that would take the conversation past max_source + max_target is dropped, and every
    turn after it. 0 = no limit."""
    out_ids, out_mask = [], []
    turns = split_turns(ids, mask)
    for n, (source, target) in enumerate(turns):
        if max_source and len(source) > max_source:
            source = source[:max_source]
            stats["max_source_len_cuts"] += 1
        if max_target and len(target) > max_target:
            target = target[:max_target - 1] + target[-1:]
            stats["max_target_len_cuts"] += 1
        if max_source and max_target and len(out_ids) + len(source) + len(target) > max_source + max_target:
            stats["max_len_turns_dropped"] += len(turns) - n
            break
        out_ids += source + target
        out_mask += [0] * len(source) + [1] * len(target)
    return out_ids, out_mask
