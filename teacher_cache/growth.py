"""Growing a cache by seeds: `cache-teacher --seeds S2` on a cache of S1 < S2 seeds.

Seeds S1..S2-1 become a new seed generation (layout.py) with its own arrays, so no committed
file is rewritten. The growth commits in two steps, both idempotent:
  1. the generation's array metadata is created (store.ensure_arrays: written aside, renamed);
  2. manifest.json is replaced (written aside, os.replace) with the new seed count and the
     generation appended: from this moment the new units exist as work to do.
A job killed between the two leaves only unreferenced metadata that the next growth reuses.
Both steps run under one lock file (locks.try_lock, same stale rule as unit locks), and the
manifest is read again under it, so concurrent jobs growing one cache (a SLURM array started
with the new --seeds) agree: the first grows, the others find S2 seeds and do nothing.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_shards.faults import crash_point

from .errors import CacheError
from .layout import MANIFEST_FILE, UNITS_DIR, SeedGeneration, all_units
from .locks import try_lock
from .manifest import read_manifest, seed_generations, write_json_atomic
from .store import ensure_arrays

LOCK_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class _GrowthLockName:
    """What locks.try_lock needs of a unit (its name): the lock file is units/grow.lock.<generation>."""
    name: str = "grow"


def check_not_shrinking(root: Path, manifest: dict, seeds: int) -> None:
    held = int(manifest["seeds"])
    if seeds < held:
        raise CacheError(f"teacher cache {root} holds {held} seeds (0..{held - 1}); --seeds "
                         f"{seeds} would shrink "
                         "it, and a cache never shrinks. Train with fewer epochs instead "
                         "(train-student at --repeated-aug R uses seeds R*(e//R)..R*(e//R)+R-1 in "
                         "epoch e, so E epochs read the seeds below R*ceil(E/R)), or omit --seeds "
                         "to resume the cache as it is")


def grow_cache(root: Path, seeds: int, specs_for: Callable[[SeedGeneration], dict],
               stale_after: float) -> dict:
    """Make the cache at `root` hold `seeds` seeds; returns the manifest in force afterwards.

    specs_for(generation) gives the arrays' specs for a generation (layout.array_specs).
    """
    root = Path(root)
    (root / UNITS_DIR).mkdir(exist_ok=True)
    lock = _acquire(root, stale_after)
    try:
        manifest = read_manifest(root)          # under the lock: another job may have grown it
        held = int(manifest["seeds"])
        check_not_shrinking(root, manifest, seeds)
        if seeds == held:
            return manifest
        gen = SeedGeneration(held, seeds)
        ensure_arrays(root, specs_for(gen), gen.dir)
        crash_point("grow-arrays-created")
        generations = seed_generations(manifest) + [gen]
        grown = {**manifest, "seeds": seeds,
                 "seed_generations": [[g.start, g.stop] for g in generations],
                 "units": {**manifest["units"],
                           "count": len(all_units(int(manifest["shards"]["num_shards"]), seeds,
                                                                        int(manifest["seeds_per_unit"]), generations))},
                 "grown": manifest.get("grown", []) + [{
                     "from_seeds": held, "to_seeds": seeds, "arrays": gen.dir,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "by": {"host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv}}]}
        write_json_atomic(root / MANIFEST_FILE, grown)          # the growth's commit point
        return grown
    finally:
        lock.release()


def _acquire(root: Path, stale_after: float):
    """The growth lock; waits while a live job holds it (growing takes milliseconds)."""
    deadline = time.time() + 2 * stale_after + 10
    while (lock := try_lock(root, _GrowthLockName(), stale_after, job="grow")) is None:
        if time.time() > deadline:
            raise CacheError(f"{root / UNITS_DIR}/grow.lock.* has been held for over "
                             f"{2 * stale_after:.0f}s by a "
                             "live job; if no cache-teacher runs on this cache, delete the file "
                             "and rerun")
        time.sleep(LOCK_POLL_SECONDS)
    return lock
