"""Zarr storage of a cache: creating the arrays, committing one unit atomically, growing a cache by
seeds (cache.py reads).

Commit of a unit: its region is written into a private zarr array under CACHE/tmp/ with a copy of
the real array's zarr.json (so zarr writes one storage-shard file per array), fsynced and
os.replace'd into arrays.zarr; then units/<unit>.json is written aside and renamed: from this
moment the unit exists. A job killed before leaves a unit that is simply not done; the rerun
overwrites whatever files it had renamed.

Growth (`cache-teacher --seeds S2` on a cache of S1 < S2 seeds) adds the seed generation S1..S2-1
(layout.py; DESIGN.md, "Growing by seeds") in two idempotent steps under one lock file (the
unit-lock rules): create the generation's array metadata, then replace manifest.json (the commit
point). A job killed between them leaves unreferenced metadata that the next growth reuses; the
manifest is read again under the lock, so concurrent jobs growing one cache to S2 grow it once.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import zarr
from zarr.storage import LocalStore

from data_shards.faults import crash_point
from data_shards.files import fsync_file, owned_name, owner_gone
from data_shards.hashing import file_sha256

from .errors import CacheError
from .layout import (ARRAYS_DIR, LOGITS, MANIFEST_FILE, TAIL_LOGSUMEXP, TMP_DIR, UNITS_DIR,
                     SeedGeneration, Unit, all_units, array_path, compressors, storage_shard_path,
                     unit_json_path)
from .locks import try_lock
from .manifest import read_manifest, seed_generations, write_json_atomic


def ensure_arrays(root: Path, specs: dict[str, dict], array_dir: str = "") -> None:
    """Create arrays.zarr and its arrays (metadata only) unless present; idempotent across jobs.
    array_dir: the seed generation's sub-group (layout.SeedGeneration.dir). Each job builds the
    metadata in private scratch space and renames the zarr.json files into place; all jobs produce
    the same bytes, so the last rename wins harmlessly."""
    arrays_root = Path(root) / ARRAYS_DIR
    if all((array_path(root, name, array_dir) / "zarr.json").exists() for name in specs) and \
            (arrays_root / "zarr.json").exists():
        check_array_metadata(root, specs, array_dir)
        return
    scratch = private_dir(root, "create-arrays")
    try:
        group = zarr.open_group(LocalStore(scratch / ARRAYS_DIR), mode="w", zarr_format=3)
        parent = group.create_group(array_dir) if array_dir else group
        for name, spec in specs.items():
            fill = float("nan") if spec["fill_value"] == "NaN" else spec["fill_value"]
            last_dim = {LOGITS: "class", TAIL_LOGSUMEXP: "tau"}.get(name, "rank")
            parent.create_array(name, shape=tuple(spec["shape"]), dtype=spec["dtype"],
                                chunks=tuple(spec["chunks"]), shards=tuple(spec["shards"]),
                                compressors=compressors(spec["dtype"]), fill_value=fill,
                                dimension_names=("aug_seed", "row", last_dim))
        # Parents first: a reader never finds an array inside a group without metadata; the root
        # group's metadata never changes once written.
        rels = [f"{array_dir}/zarr.json"] if array_dir else []
        if not (arrays_root / "zarr.json").exists():
            rels.insert(0, "zarr.json")
        for rel in rels + [str(Path(array_dir, name, "zarr.json")) for name in specs]:
            (arrays_root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / ARRAYS_DIR / rel, arrays_root / rel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check_array_metadata(root, specs, array_dir)


def check_array_metadata(root: Path, specs: dict[str, dict], array_dir: str = "") -> None:
    for name, spec in specs.items():
        path = array_path(root, name, array_dir) / "zarr.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"cannot read {path}: {exc}; the cache is damaged - recreate it") from None
        inner = meta["codecs"][0]["configuration"]["chunk_shape"] if meta.get("codecs") else None
        got = (meta.get("shape"), meta.get("data_type"),
               meta["chunk_grid"]["configuration"]["chunk_shape"], inner)
        want = (spec["shape"], spec["dtype"], spec["shards"], spec["chunks"])    # lists, as JSON
        if got != want:
            raise CacheError(f"{path} describes shape/dtype/shards/chunks {got}, the manifest "
                             f"implies {want}; the cache is damaged - recreate it")


def private_dir(root: Path, purpose: str) -> Path:
    """A scratch folder under CACHE/tmp named after its owner (host, pid), for cleanup."""
    path = Path(root) / TMP_DIR / owned_name(purpose)
    path.mkdir(parents=True)
    return path


def clean_leftovers(root: Path, stale_after: float) -> int:
    """Remove what killed jobs left: scratch folders and half-written JSON of dead owners (same
    host) or older than `stale_after`, and lock files of units that are done. Returns how many."""
    root, removed = Path(root), 0
    candidates = list((root / TMP_DIR).iterdir()) if (root / TMP_DIR).is_dir() else []
    candidates += list(root.glob(".*.tmp"))
    units_dir = root / UNITS_DIR
    names = os.listdir(units_dir) if units_dir.is_dir() else []     # one listing, also for ImageNet
    candidates += [units_dir / n for n in names if n.startswith(".") and n.endswith(".tmp")]
    for path in candidates:
        if not owner_gone(path, stale_after):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    done = {n[:-len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")}
    for n in names:         # locks of committed units, whose holder died before unlocking
        if ".lock." in n and not n.startswith(".") and n.split(".lock.")[0] in done:
            (units_dir / n).unlink(missing_ok=True)
            removed += 1
    return removed


def commit_unit(root: Path, unit: Unit, rows_per_shard: int, buffers: dict[str, np.ndarray],
                record: dict) -> dict:
    """Atomically add `unit` (buffers[array] has shape (len(unit.seeds), rows_per_shard, width)) to
    the cache; returns the unit record written to units/<unit>.json (with the file digests added)."""
    root = Path(root)
    scratch = private_dir(root, unit.name)
    try:
        staged = {name: _stage(root, scratch, unit, name, data, rows_per_shard)
                  for name, data in buffers.items()}
        crash_point("commit-staged")
        for name, (src, _) in staged.items():
            dest = storage_shard_path(root, name, unit)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            crash_point("commit-renamed-one")
        crash_point("commit-renamed")
        record = {**record, "files": {name: info for name, (_, info) in staged.items()}}
        (root / UNITS_DIR).mkdir(exist_ok=True)
        write_json_atomic(unit_json_path(root, unit), record)   # the commit point
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stage(root: Path, scratch: Path, unit: Unit, name: str, data: np.ndarray,
           rows_per_shard: int) -> tuple[Path, dict]:
    """Write the unit's region of array `name` into a private copy of the array (the same
    zarr.json, in the cache's layout inside `scratch`); returns the one storage-shard file zarr
    wrote, fsynced, and its record (path, sha256, bytes)."""
    folder = array_path(scratch, name, unit.array_dir)
    folder.mkdir(parents=True)
    shutil.copyfile(array_path(root, name, unit.array_dir) / "zarr.json", folder / "zarr.json")
    arr = zarr.open_array(LocalStore(folder), mode="r+")
    arr[unit.local_seeds, unit.shard * rows_per_shard:(unit.shard + 1) * rows_per_shard] = data
    staged = storage_shard_path(scratch, name, unit)
    if not staged.is_file():
        raise CacheError(f"zarr did not write the expected storage shard "
                         f"{staged.relative_to(folder)} for {unit}; this zarr ({zarr.__version__}) "
                         f"lays files out differently")
    fsync_file(staged)
    return staged, {"path": str(staged.relative_to(scratch)), "sha256": file_sha256(staged),
                    "bytes": staged.stat().st_size}


LOCK_POLL_SECONDS = 0.05
# What locks.try_lock needs of a unit (its name): the lock file is units/grow.lock.<generation>.
_GROWTH_LOCK = SimpleNamespace(name="grow")


def check_not_shrinking(root: Path, manifest: dict, seeds: int) -> None:
    held = int(manifest["seeds"])
    if seeds < held:
        raise CacheError(f"teacher cache {root} holds {held} seeds (0..{held - 1}); --seeds "
                         f"{seeds} would shrink it, and a cache never shrinks. Train with fewer "
                         "epochs instead (train-student at --repeated-aug R uses seeds "
                         "R*(e//R)..R*(e//R)+R-1 in epoch e, so E epochs read the seeds below "
                         "R*ceil(E/R)), or omit --seeds to resume the cache as it is")


def grow_cache(root: Path, seeds: int, specs_for: Callable[[SeedGeneration], dict],
               stale_after: float) -> dict:
    """Make the cache at `root` hold `seeds` seeds; returns the manifest in force afterwards.
    specs_for(generation) gives the arrays' specs for a generation (layout.array_specs)."""
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
        units = all_units(int(manifest["shards"]["num_shards"]), seeds,
                          int(manifest["seeds_per_unit"]), generations)
        grown = {**manifest, "seeds": seeds,
                 "seed_generations": [[g.start, g.stop] for g in generations],
                 "units": {**manifest["units"], "count": len(units)},
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
    while (lock := try_lock(root, _GROWTH_LOCK, stale_after, job="grow")) is None:
        if time.time() > deadline:
            raise CacheError(f"{root / UNITS_DIR}/grow.lock.* has been held for over "
                             f"{2 * stale_after:.0f}s by a live job; if no cache-teacher runs on "
                             "this cache, delete the file and rerun")
        time.sleep(LOCK_POLL_SECONDS)
    return lock
