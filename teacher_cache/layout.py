"""Where things live in a cache folder, and how the work is cut into units (DESIGN.md, cache layout).

A unit is one shard × one range of `seeds_per_unit` augmentation seeds: in every array exactly one
storage shard of the zarr sharding codec, one file `arrays.zarr/<array>/c/<seed_block>/<shard>/0`
(zarr 3 default chunk keys, checked against the installed zarr by the tests), so a unit is
committed by renaming one file per array into place. The seeds each run added (a seed generation)
have their own arrays, so growing a cache never rewrites a committed file (store.grow_cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from .targets import TAIL_TAUS

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
ARRAYS_DIR = "arrays.zarr"
UNITS_DIR = "units"
TMP_DIR = "tmp"          # private scratch space of running jobs (same file system, for os.replace)
CACHE_ENTRIES = (ARRAYS_DIR, INDEX_FILE, MANIFEST_FILE, UNITS_DIR, TMP_DIR)

TOPK_INDICES = "topk_indices"
TOPK_LOGPROBS = "topk_logprobs"
LOGITS = "logits"
TAIL_LOGSUMEXP = "tail_logsumexp"   # array names = TeacherTargets field names


@dataclass(frozen=True)
class SeedGeneration:
    """Seeds start..stop-1, added by one run (the first one, or one growth); they have their own arrays."""
    start: int
    stop: int

    @property
    def dir(self) -> str:
        """Sub-folder of arrays.zarr holding this generation's arrays ("" for the first generation)."""
        return "" if self.start == 0 else f"seeds-{self.start:06d}-{self.stop - 1:06d}"


@dataclass(frozen=True, order=True)
class Unit:
    """One work unit: shard `shard`, aug seeds seed_start .. seed_stop-1; seed_block counts within its generation."""
    seed_block: int
    shard: int
    seed_start: int
    seed_stop: int
    generation: SeedGeneration | None = field(default=None, compare=False)   # None: from seed 0

    @property
    def array_dir(self) -> str:
        return self.generation.dir if self.generation is not None else ""

    @property
    def local_seeds(self) -> slice:
        """The unit's seeds as indices into its generation's arrays."""
        offset = self.generation.start if self.generation is not None else 0
        return slice(self.seed_start - offset, self.seed_stop - offset)

    @property
    def name(self) -> str:
        return f"shard-{self.shard:06d}_seeds-{self.seed_start:06d}-{self.seed_stop - 1:06d}"

    @property
    def seeds(self) -> range:
        return range(self.seed_start, self.seed_stop)

    def __str__(self) -> str:
        return f"{self.name} (shard {self.shard}, seeds {self.seed_start}..{self.seed_stop - 1})"


def all_units(num_shards: int, num_seeds: int, seeds_per_unit: int,
              generations: list[SeedGeneration] | None = None) -> list[Unit]:
    """Every unit, sorted by (first seed, shard): early seeds finish first, so stage two can start.
    Seed blocks start afresh at each generation's first seed."""
    units = []
    for gen in generations or [SeedGeneration(0, num_seeds)]:
        for block, start in enumerate(range(gen.start, gen.stop, seeds_per_unit)):
            stop = min(start + seeds_per_unit, gen.stop)
            units.extend(Unit(block, shard, start, stop, gen) for shard in range(num_shards))
    return units


def unit_of(shard: int, aug_seed: int, num_seeds: int, seeds_per_unit: int,
            generations: list[SeedGeneration] | None = None) -> Unit:
    gen = next(g for g in generations or [SeedGeneration(0, num_seeds)] if g.start <= aug_seed < g.stop)
    block = (aug_seed - gen.start) // seeds_per_unit
    start = gen.start + block * seeds_per_unit
    return Unit(block, shard, start, min(start + seeds_per_unit, gen.stop), gen)


def select_units(units: list[Unit], num_jobs: int, job_index: int) -> list[Unit]:
    """Job `job_index` of `num_jobs` takes every num_jobs-th unit of the sorted list (round-robin):
    every job gets early seed blocks first, and the last shard (often shorter) does not all land
    on one job."""
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise ValueError(f"job index {job_index} is not in 0..{num_jobs - 1}")
    return sorted(units, key=lambda u: (u.seed_start, u.shard))[job_index::num_jobs]


def storage_shard_path(root: Path, array: str, unit: Unit) -> Path:
    """The one file holding `unit` in `array` (chunk grid = storage shards (seeds_per_unit, rows, K|C))."""
    return array_path(root, array, unit.array_dir) / "c" / str(unit.seed_block) / str(unit.shard) / "0"


def array_path(root: Path, array: str, array_dir: str = "") -> Path:
    """Folder of `array` of the seed generation stored under `array_dir` ("" for the first)."""
    return Path(root) / ARRAYS_DIR / array_dir / array


def unit_json_path(root: Path, unit: Unit) -> Path:
    return Path(root) / UNITS_DIR / f"{unit.name}.json"


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned type that holds every class index (uint8 up to 256 classes)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{num_classes} classes do not fit a uint32 index")


def array_specs(num_seeds: int, num_shards: int, rows_per_shard: int, num_classes: int, topk: int,
                seeds_per_unit: int, store_full: bool) -> dict[str, dict]:
    """Shape, dtype, inner chunk and storage shard of each array (see DESIGN.md)."""
    rows = num_shards * rows_per_shard
    # (dtype, width, fill value); NaN fill: a chunk never written reads as NaN, which reading refuses
    arrays = {TOPK_INDICES: (index_dtype(num_classes).name, topk, 0),
              TOPK_LOGPROBS: ("float16", topk, "NaN")}
    if store_full:
        arrays[LOGITS] = ("float16", num_classes, "NaN")
    elif topk < num_classes:      # the tail's log-sum-exp at TAIL_TAUS, for soft targets at any τ
        arrays[TAIL_LOGSUMEXP] = ("float16", len(TAIL_TAUS), "NaN")
    return {name: dict(dtype=dtype, fill_value=fill, shape=[num_seeds, rows, width],
                       chunks=[1, rows_per_shard, width], shards=[seeds_per_unit, rows_per_shard, width])
            for name, (dtype, width, fill) in arrays.items()}


def compressors(dtype: str) -> list:
    """Per inner chunk: blosc-zstd level 9 with byte shuffle (groups the fp16 high bytes; a no-op
    for uint8), then crc32c so a damaged chunk raises instead of decoding to wrong numbers.
    Chosen by measurement on digits (bench/bench_cache_teacher.py --sections storage,codecs):
    19.7 B/record at K=10 against 20.8 (zstd level 5), 22.2 (bitshuffle or no shuffle) and
    22.2 (plain zstd, no blosc)."""
    return [BloscCodec(cname="zstd", clevel=9, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
            Crc32cCodec()]
