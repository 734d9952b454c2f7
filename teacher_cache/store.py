"""Zarr storage of a cache: creating the arrays, committing one unit atomically (cache.py reads).

Commit protocol of a unit (see DESIGN.md):
  1. write the unit's region into a private zarr array under CACHE/tmp/ whose zarr.json is
     a copy of the real array's (same metadata -> same chunk grid and encoding), so zarr
     writes exactly one storage-shard file per array;
  2. fsync it and os.replace it onto arrays.zarr/[<generation>/]<array>/c/<block>/<shard>/0 (atomic;
     <generation> is the sub-group of seeds added by a growth, layout.SeedGeneration.dir);
  3. write units/<unit>.json aside and rename it: from this moment the unit exists.
A job killed anywhere before 3 leaves a unit that is simply not done; the rerun
overwrites whatever files it had renamed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from data_shards.faults import crash_point
from data_shards.files import fsync_file, owned_name, owner_gone
from data_shards.hashing import file_sha256

from .errors import CacheError
from .layout import (ARRAYS_DIR, LOGITS, TAIL_LOGSUMEXP, TMP_DIR, UNITS_DIR, Unit, array_path,
                     compressors,
                     storage_shard_path, unit_json_path)
from .manifest import write_json_atomic


def ensure_arrays(root: Path, specs: dict[str, dict], array_dir: str = "") -> None:
    """Create arrays.zarr and its arrays (metadata only) unless present; idempotent across jobs.

    array_dir: the seed generation's sub-group ("" for the first generation,
    layout.SeedGeneration.dir). Each job builds the metadata in private scratch space and renames
    the zarr.json files into place; all jobs produce the same bytes, so the last rename wins
    harmlessly. """
    arrays_root = Path(root) / ARRAYS_DIR
    if all((array_path(root, name, array_dir) / "zarr.json").exists() for name in specs) \
            and (arrays_root / "zarr.json").exists():
        check_array_metadata(root, specs, array_dir)
        return
    scratch = private_dir(root, "create-arrays")
    try:
        group = zarr.open_group(LocalStore(scratch / ARRAYS_DIR), mode="w", zarr_format=3)
        parent = group.create_group(array_dir) if array_dir else group
        for name, spec in specs.items():
            parent.create_array(name, shape=tuple(spec["shape"]), dtype=spec["dtype"],
                                chunks=tuple(spec["chunks"]),
                                shards=tuple(spec["shards"]),
                                compressors=compressors(spec["dtype"]),
                                fill_value=float("nan") if spec["fill_value"] == "NaN" else spec["fill_value"],
                                dimension_names=("aug_seed", "row",
                                                 {LOGITS: "class", TAIL_LOGSUMEXP: "tau"}.get(name,
                                                                                              "rank")))
        # Parents first: a reader never finds an array inside a group without metadata.
        rels = [f"{array_dir}/zarr.json"] if array_dir else []
        # the root group's metadata never changes once written
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
        # JSON and array_specs: lists
        want = (spec["shape"], spec["dtype"], spec["shards"], spec["chunks"])
        if got != want:
            raise CacheError(f"{path} describes shape/dtype/shards/chunks {got}, the manifest "
                             f"implies {want}; "
                             "the cache is damaged - recreate it")


def private_dir(root: Path, purpose: str) -> Path:
    """A scratch folder under CACHE/tmp named after its owner (host, pid), for cleanup."""
    path = Path(root) / TMP_DIR / owned_name(purpose)
    path.mkdir(parents=True)
    return path


def clean_leftovers(root: Path, stale_after: float) -> int:
    """Remove what killed jobs left: scratch folders and half-written JSON of dead owners (same
    host) or older than `stale_after`, and lock files of units that are done. Returns how many."""
    root = Path(root)
    removed = 0
    candidates = list((root / TMP_DIR).iterdir()) if (root / TMP_DIR).is_dir() else []
    candidates += list(root.glob(".*.tmp"))
    units_dir = root / UNITS_DIR
    # one listing, also for ImageNet
    names = os.listdir(units_dir) if units_dir.is_dir() else []
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
    for n in names:
        if ".lock." in n and not n.startswith(".") and n.split(".lock.")[0] in done:
            # the unit was committed; its holder died before unlocking
            (units_dir / n).unlink(missing_ok=True)
            removed += 1
    return removed


def commit_unit(root: Path, unit: Unit, rows_per_shard: int, buffers: dict[str, np.ndarray], record: dict) -> dict:
    """Atomically add `unit` (buffers[array] has shape (len(unit.seeds), rows_per_shard, width)) to
    the cache.

    Returns the unit record written to units/<unit>.json (with the file digests added).
    """
    root = Path(root)
    scratch = private_dir(root, unit.name)
    try:
        staged = {name: _stage(root, scratch, unit, name, data, rows_per_shard) for name, data in buffers.items()}
        files = {name: info for name, (_, info) in staged.items()}
        crash_point("commit-staged")
        for name, (src, _) in staged.items():
            dest = storage_shard_path(root, name, unit)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            crash_point("commit-renamed-one")
        crash_point("commit-renamed")
        record = {**record, "files": files}
        (root / UNITS_DIR).mkdir(exist_ok=True)
        write_json_atomic(unit_json_path(root, unit), record)   # the commit point
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stage(root: Path, scratch: Path, unit: Unit, name: str, data: np.ndarray, rows_per_shard: int) -> tuple[Path, dict]:
    """Write the unit's region of array `name` into a private copy of the array (the same
    zarr.json); returns the one storage-shard file zarr wrote, fsynced, and its record (path,
    sha256, bytes)."""
    # the cache's layout, inside the scratch folder
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
