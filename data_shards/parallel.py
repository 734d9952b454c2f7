"""An ordered, bounded parallel map for make-shards' read + decode-validation."""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from functools import partial
from itertools import islice
from typing import Callable, Iterable, Iterator


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def ordered_chunk_map(fn: Callable[[list], list], items: Iterable, workers: int, ref: Callable = lambda x: x,
                      chunk: int = 16, window_per_worker: int = 4, **kwargs) -> Iterator[tuple]:
    """Yield (item, result) in the order of `items` (lazy or not); fn maps a list of ref(item) to
    a list of results. At most `workers * window_per_worker` chunks are in flight, so memory is
    bounded (Pool.imap queues every result not yet taken). workers <= 1 runs in this process."""
    fn = partial(fn, **kwargs) if kwargs else fn
    items = iter(items)
    chunks = iter(lambda: list(islice(items, chunk)), [])
    if workers <= 1:
        for c in chunks:
            yield from zip(c, fn([ref(x) for x in c]))
        return
    # fork: workers only read files and decode with PIL; no start-up imports, shared pages.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers) as pool:
        def submit(c: list) -> tuple:
            return c, pool.apply_async(fn, ([ref(x) for x in c],))

        pending = deque(submit(c) for c in islice(chunks, workers * window_per_worker))
        while pending:
            c, result = pending.popleft()
            results = result.get()
            for nxt in islice(chunks, 1):
                pending.append(submit(nxt))
            yield from zip(c, results)
