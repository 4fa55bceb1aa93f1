"""
Worker processes for prepare.py's tokenizing: items grouped into chunks, and chunks mapped over a process pool with
results in input order.

Used by prepare.py (tokenize_into, encode_chunk in each worker). What it adds: bounded read-ahead (at most
2 * workers chunks in flight), so that memory stays bounded and the output does not depend on the number of workers.
"""

from collections import deque


def chunked(items, max_chars=1 << 20, max_items=1024):
    """Group items into chunks of about max_chars characters (one chunk is one task for a worker)."""
    chunk, chars = [], 0
    for item in items:
        chunk.append(item)
        chars += len(item.text) if item.text is not None else item.nbytes
        if chars >= max_chars or len(chunk) >= max_items:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def ordered_map(fn, chunks, workers, init_worker, initargs):
    """fn over chunks in order, with at most 2 * workers chunks in flight (Pool.imap would read ahead unbounded);
    init_worker(*initargs) runs once in each process first."""
    if workers <= 1:
        init_worker(*initargs)
        for chunk in chunks:
            yield chunk, fn(chunk)
        return
    import multiprocessing as mp
    with mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=initargs) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(fn, (chunk,))))
            if len(pending) >= 2 * workers:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()
