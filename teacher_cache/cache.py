"""Reading a teacher cache: the API stage two uses.

    cache = TeacherCache.open(path)
    cache.check_compatible(shard_set, recipe)        # CacheError naming what differs
    targets = cache.read(shard, aug_seed)            # TeacherTargets, position order, one read
    cache.unit_digests(shard, aug_seed)              # {key: tensor_digest} recorded at compute time

Every failure is a CacheError naming the unit and the command that fixes it; zarr's own
exceptions never leave this module.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from zarr.storage import LocalStore

from data_shards import AugRecipe
from data_shards.hashing import file_sha256

from .errors import CacheError
from .layout import (INDEX_FILE, LOGITS, TAIL_LOGSUMEXP, TOPK_INDICES, TOPK_LOGPROBS, UNITS_DIR,
                     Unit, all_units, array_path, storage_shard_path, unit_json_path, unit_of)
from .manifest import (library_versions, other_algorithm_message, read_manifest, recipe_differences,
                       seed_generations)
from .targets import TeacherTargets


class TeacherCache:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        shards = manifest["shards"]         # the description, read once (a format-checked manifest)
        self.num_seeds, self.seeds_per_unit = int(manifest["seeds"]), int(manifest["seeds_per_unit"])
        self.topk, self.num_classes = int(manifest["topk"]), int(manifest["num_classes"])
        self.has_logits = manifest["store_logits"] == "full"
        self.num_shards, self.rows_per_shard = int(shards["num_shards"]), int(shards["rows_per_shard"])
        self.shard_counts = list(shards["shard_counts"])
        self.array_names = list(manifest["arrays"])   # caches before the tail summary lack its array
        self._arrays, self._arrays_pid = {}, None
        self._done, self._records = set(), {}         # done unit names, unit records read

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TeacherCache":
        root = Path(path)
        if not root.is_dir():
            raise CacheError(f"teacher cache {root} not found (create it with `deit-pipeline "
                             f"cache-teacher`)")
        return cls(root, read_manifest(root))

    @property
    def recipe(self) -> AugRecipe:
        try:
            return AugRecipe.from_dict(self.manifest["recipe"])
        except (TypeError, ValueError) as exc:
            raise CacheError(f"{self.root / 'manifest.json'}: its recipe is not valid ({exc})") from None

    @property
    def seed_generations(self):
        """[SeedGeneration]: the seed ranges each run added (one unless the cache was grown)."""
        return seed_generations(self.manifest)

    def units(self) -> list[Unit]:
        return all_units(self.num_shards, self.num_seeds, self.seeds_per_unit, self.seed_generations)

    def unit_for(self, shard: int, aug_seed: int) -> Unit:
        if not 0 <= shard < self.num_shards:
            raise CacheError(f"shard {shard} is not in this cache (it has shards 0..{self.num_shards - 1})")
        if not 0 <= aug_seed < self.num_seeds:
            raise CacheError(f"aug seed {aug_seed} is not in this cache (it has seeds "
                             f"0..{self.num_seeds - 1}); grow it with `deit-pipeline cache-teacher "
                             f"--shards SHARDS --out {self.root} --seeds N`")
        return unit_of(shard, aug_seed, self.num_seeds, self.seeds_per_unit, self.seed_generations)

    def is_done(self, unit: Unit) -> bool:
        if unit.name not in self._done and unit_json_path(self.root, unit).exists():
            self._done.add(unit.name)        # done never goes back: one stat per unit
        return unit.name in self._done

    def done_units(self) -> list[Unit]:
        return [u for u in self.units() if self.is_done(u)]

    def missing_units(self) -> list[Unit]:
        return [u for u in self.units() if not self.is_done(u)]

    def unit_record(self, unit: Unit) -> dict:
        """The unit's JSON (status, digests, file hashes)."""
        if unit.name not in self._records:
            path = unit_json_path(self.root, unit)
            try:
                self._records[unit.name] = json.loads(path.read_text())
            except FileNotFoundError:
                raise self._not_done(unit) from None
            except (OSError, ValueError) as exc:
                raise CacheError(f"{path} is unreadable ({exc}); delete it and {self.fix_command()}") from None
        return self._records[unit.name]

    def unit_file_problems(self, unit: Unit, hash_files: bool = True) -> dict[str, str]:
        """{array or 'record': what is wrong} for a done unit: its record unreadable, a storage file
        missing, of another size than recorded, or (hash_files) of another sha256. Empty when it is
        intact."""
        try:
            files = self.unit_record(unit)["files"]
        except CacheError as exc:
            return {"record": str(exc)}
        except (KeyError, TypeError):
            return {"record": f"{unit_json_path(self.root, unit)} lists no storage files"}
        problems = {}
        for name in self.array_names:
            info = files.get(name) if isinstance(files, dict) else None
            path = storage_shard_path(self.root, name, unit)
            if not isinstance(info, dict):
                problems[name] = f"the unit record has no entry for {name}"
            elif not path.is_file():
                problems[name] = f"{path} is missing"
            elif path.stat().st_size != info.get("bytes", path.stat().st_size):
                problems[name] = f"{path} holds {path.stat().st_size} bytes, {info['bytes']} were committed"
            elif hash_files and file_sha256(path) != info.get("sha256"):
                problems[name] = f"{path} changed since it was committed (sha256 differs)"
        return problems

    def compute_command(self) -> str:
        """The command that completes this cache (unset options are taken from the manifest)."""
        return (f"`deit-pipeline cache-teacher --shards {shlex.quote(self.manifest['shards']['path'])}"
                f" --out {shlex.quote(str(self.root))}`")

    def fix_command(self) -> str:
        return f"run {self.compute_command()} to compute it"

    def repair_advice(self, damaged: bool) -> str:
        """What to do about damaged units (their records must go: a unit with a record counts as
        done) or missing ones."""
        if not damaged:
            return f"run {self.compute_command()} to compute the missing units"
        return (f"delete the record {self.root / UNITS_DIR}/UNIT.json of each damaged unit, then run "
                f"{self.compute_command()} to recompute them")

    def _not_done(self, unit: Unit) -> CacheError:
        return CacheError(f"teacher cache {self.root}: unit {unit} is not computed yet; "
                          f"{self.fix_command()}")

    def _damaged(self, unit: Unit, what: str) -> CacheError:
        return CacheError(f"teacher cache {self.root}: unit {unit} is damaged ({what}); delete "
                          f"{unit_json_path(self.root, unit)} and {self.fix_command()}")

    def check_compatible(self, shard_set, recipe: AugRecipe | None = None) -> None:
        """Raise CacheError naming every difference between this cache and (shard_set, recipe)."""
        shards, diffs = self.manifest["shards"], []
        if shard_set.content_hash != shards["content_hash"]:
            diffs.append(f"shards content hash: cache {shards['content_hash'][:12]}… "
                         f"({shards.get('path')}), shards {shard_set.content_hash[:12]}… "
                         f"({shard_set.root})")
        if shard_set.num_classes != self.num_classes:
            diffs.append(f"class count: cache {self.num_classes}, shards {shard_set.num_classes}")
        if shard_set.num_shards != self.num_shards or shard_set.rows_per_shard != self.rows_per_shard:
            diffs.append(f"shard layout: cache {self.num_shards} shards of {self.rows_per_shard}, "
                         f"shards {shard_set.num_shards} of {shard_set.rows_per_shard}")
        if recipe is not None and recipe.fingerprint() != self.manifest["recipe_fingerprint"]:
            message = other_algorithm_message(self.root, self.manifest)
            if message is not None:
                raise CacheError(message)
            detail = recipe_differences(self.manifest, {"recipe": recipe.to_dict(),
                                                        "library_versions": library_versions(recipe)})
            diffs.append(f"augmentation recipe fingerprint: cache "
                         f"{self.manifest['recipe_fingerprint'][:12]}…, this run "
                         f"{recipe.fingerprint()[:12]}…" + "".join("; " + d.strip() for d in detail))
        if diffs:                 # one line (the CLI's errors are one line each)
            raise CacheError(f"teacher cache {self.root} does not match: " + "; ".join(diffs) +
                             ". Use the shards and recipe the cache was computed from, or compute "
                             "a cache for these with `deit-pipeline cache-teacher`")

    def _array(self, name: str, array_dir: str = ""):
        if self._arrays_pid != os.getpid():      # re-open after fork (DataLoader workers)
            self._arrays, self._arrays_pid = {}, os.getpid()
        if (array_dir, name) not in self._arrays:
            store = LocalStore(array_path(self.root, name, array_dir), read_only=True)
            self._arrays[(array_dir, name)] = zarr.open_array(store, mode="r")
        return self._arrays[(array_dir, name)]

    def read(self, shard: int, aug_seed: int) -> TeacherTargets:
        """Teacher targets of every sample of `shard` for `aug_seed`, in shard position order."""
        unit = self.unit_for(shard, aug_seed)
        if not self.is_done(unit):
            raise self._not_done(unit)
        start = shard * self.rows_per_shard
        rows = slice(start, start + self.shard_counts[shard])
        local_seed = unit.local_seeds.start + aug_seed - unit.seed_start   # in its generation's arrays
        data = {}
        for name in self.array_names:
            if not (path := storage_shard_path(self.root, name, unit)).is_file():
                raise self._damaged(unit, f"{path} is missing")
            try:
                data[name] = np.asarray(self._array(name, unit.array_dir)[local_seed, rows])
            except Exception as exc:  # zarr/numcodecs raise ValueError, RuntimeError, OSError...
                raise self._damaged(unit, f"{name} chunk for seed {aug_seed} cannot be decoded: "
                                          f"{exc}") from None
        for name in (TOPK_LOGPROBS, LOGITS, TAIL_LOGSUMEXP):
            if name in data and not np.isfinite(data[name]).all():
                raise self._damaged(unit, f"{name} for seed {aug_seed} holds unwritten (NaN) rows")
        indices = torch.from_numpy(data[TOPK_INDICES].astype(np.int64))
        if indices.numel() and int(indices.max()) >= self.num_classes:
            raise self._damaged(unit, f"class index {int(indices.max())} >= {self.num_classes}")
        floats = {name: torch.from_numpy(data[name].astype(np.float32)) for name in data if name != TOPK_INDICES}
        return TeacherTargets(topk_indices=indices, **floats)

    def unit_digests(self, shard: int, aug_seed: int) -> dict[str, str]:
        """{key: tensor_digest(replayed image)} recorded for the first samples of (shard, seed)."""
        unit = self.unit_for(shard, aug_seed)
        return dict(self.unit_record(unit)["digests"][str(aug_seed)])

    def read_index(self) -> pa.Table:
        """key, label, shard, position, row for every sample."""
        path = self.root / INDEX_FILE
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise CacheError(f"cannot read {path}: {exc}; {self.fix_command()} (it rewrites the "
                             f"index)") from None

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.root)!r}, teacher={self.manifest['teacher']['name']!r}, "
                f"seeds={self.num_seeds}, topk={self.topk}, classes={self.num_classes})")
