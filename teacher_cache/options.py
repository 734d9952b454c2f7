"""cache-teacher's options: what a cache is computed with (CacheOptions), completed from an
existing cache or the defaults and checked before any work starts (resolve_settings), and which
job this one is (resolve_job)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

from data_shards import AugRecipe, ShardSet

from .errors import CacheError
from .layout import CACHE_ENTRIES, MANIFEST_FILE, SeedGeneration, array_specs
from .locks import DEFAULT_STALE_AFTER
from .manifest import MANIFEST_DEFAULTS, build_manifest, with_defaults
from .teacher import DEFAULT_TEACHER

DEFAULT_TOPK = 10
DEFAULT_SEEDS_PER_UNIT = 10
DEFAULT_BATCH_SIZE = MANIFEST_DEFAULTS["batch_size"]


@dataclass
class CacheOptions:
    """One cache-teacher call. The options that decide the numbers (seeds .. channels_last) left as
    None take the existing cache's values (so resuming needs only shards/out), or the defaults for a
    new cache; a `seeds` larger than the existing cache's grows it (store.grow_cache), a smaller one is
    refused."""
    shards: str | os.PathLike
    out: str | os.PathLike
    seeds: int | None = None
    topk: int | None = None
    store_logits: str | None = None
    seeds_per_unit: int | None = None
    precision: str | None = None
    recipe: AugRecipe | None = None
    teacher: str | None = None
    teacher_checkpoint: str | os.PathLike | None = None
    teacher_kwargs: dict | None = None
    batch_size: int | None = None
    channels_last: bool | None = None
    # the rest: how this job runs (not recorded)
    device: str = "auto"
    num_jobs: int | None = None
    job_index: int | None = None
    workers: int = 0
    max_units: int | None = None
    lock_stale_after: float = DEFAULT_STALE_AFTER
    progress: bool = True
    log: Callable[[str], None] = print

    @property
    def store_full(self) -> bool:
        return self.store_logits == "full"

    def specs_for(self, shard_set: ShardSet, gen: SeedGeneration) -> dict:
        """The arrays of seed generation `gen` (layout.array_specs); on resolved options."""
        return array_specs(gen.stop - gen.start, shard_set.num_shards, shard_set.rows_per_shard,
                           shard_set.num_classes, self.topk, self.seeds_per_unit, self.store_full)

    def manifest(self, shard_set: ShardSet, teacher_info: dict) -> dict:
        return build_manifest(self, shard_set, teacher_info,
                              self.specs_for(shard_set, SeedGeneration(0, self.seeds)))


def resolve_settings(shard_set: ShardSet, existing: dict | None, opts: CacheOptions) -> CacheOptions:
    """The options, completed from the existing cache or the defaults; checked before any work starts."""
    old = with_defaults(existing) if existing is not None else {}

    def pick(name, default):
        value = getattr(opts, name)
        return value if value is not None else old.get(name, default)

    seeds = pick("seeds", None)
    if seeds is None:
        raise CacheError("--seeds S is required to create a cache (the number of augmentation "
                         "seeds, e.g. one per student epoch)")
    store_logits = pick("store_logits", "topk")
    if store_logits not in ("topk", "full"):
        raise CacheError(f"--store-logits must be 'topk' or 'full', got {store_logits!r}")
    settings = replace(
        opts, seeds=int(seeds), topk=int(pick("topk", DEFAULT_TOPK)), store_logits=store_logits,
        seeds_per_unit=int(pick("seeds_per_unit", min(int(seeds), DEFAULT_SEEDS_PER_UNIT))),
        precision=pick("precision", "fp32"),
        recipe=opts.recipe if opts.recipe is not None else _recorded_recipe(old),
        batch_size=int(pick("batch_size", DEFAULT_BATCH_SIZE)),
        channels_last=bool(pick("channels_last", False)), **_resolve_teacher(opts, old))
    for option, value in (("--batch-size", settings.batch_size), ("--seeds", settings.seeds),
                          ("--seeds-per-unit", settings.seeds_per_unit)):
        if value < 1:
            raise CacheError(f"{option} must be >= 1, got {value}")
    if not 1 <= settings.topk <= shard_set.num_classes:
        raise CacheError(f"--topk {settings.topk} must be between 1 and the class count "
                         f"{shard_set.num_classes}")
    return replace(settings, seeds_per_unit=min(settings.seeds_per_unit, settings.seeds))


def _recorded_recipe(old: dict) -> AugRecipe:
    """The existing cache's recipe (DeiT's for a new cache)."""
    try:
        return AugRecipe.from_dict(old.get("recipe", {}))
    except (TypeError, ValueError) as exc:
        raise CacheError(f"the existing cache's manifest.json holds a recipe that is not valid "
                         f"({exc})") from None


def _resolve_teacher(opts: CacheOptions, old: dict) -> dict:
    """Teacher name, checkpoint and constructor arguments: as given, else the existing cache's (its
    checkpoint must still be there), else timm's pretrained DEFAULT_TEACHER."""
    name, checkpoint, kwargs = opts.teacher, opts.teacher_checkpoint, opts.teacher_kwargs
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CacheError(f"teacher checkpoint {checkpoint} not found")
    recorded = old.get("teacher", {})
    if name is None and checkpoint is None and old:
        checkpoint = recorded.get("checkpoint")
        kwargs = kwargs if kwargs is not None else recorded.get("model_kwargs")
        if checkpoint and not Path(checkpoint).is_file():
            raise CacheError(f"the cache's teacher checkpoint {checkpoint} is gone; "
                             "pass --teacher-checkpoint PATH (the same weights)")
    if name is None:
        name = recorded["name"] if old else (DEFAULT_TEACHER if checkpoint is None else None)
    return {"teacher": name, "teacher_checkpoint": None if checkpoint is None else str(checkpoint),
            "teacher_kwargs": kwargs}


def check_job_options(opts: CacheOptions) -> None:
    """The options of how this job runs, as the CLI parses them (for callers that do not go through it)."""
    if opts.workers < 0:
        raise CacheError(f"--workers must be >= 0, got {opts.workers}")
    if opts.max_units is not None and opts.max_units < 0:
        raise CacheError(f"--max-units must be >= 0, got {opts.max_units}")
    if not opts.lock_stale_after > 0:
        raise CacheError(f"--lock-stale-after must be > 0 seconds, got {opts.lock_stale_after}")
    if opts.teacher_kwargs is not None and not isinstance(opts.teacher_kwargs, dict):
        raise CacheError(f"--teacher-kwargs must be a JSON object, got {opts.teacher_kwargs!r}")


def refuse_foreign_folder(root: Path) -> None:
    """A new cache goes into a new or empty folder (or one where another job is creating it), never
    among someone's files (hidden ones, such as the jobs' temporaries, are ignored)."""
    if not root.is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in CACHE_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise CacheError(f"--out {root} holds no teacher cache (no {MANIFEST_FILE}) but other "
                         f"files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                         "choose a new or empty folder for the cache")


@dataclass(frozen=True)
class JobSlot:
    index: int
    count: int
    source: str        # where the numbers came from, for the log

    def __str__(self) -> str:
        return f"job {self.index} of {self.count} ({self.source})"


def resolve_job(num_jobs: int | None = None, job_index: int | None = None,
                env: Mapping[str, str] | None = None) -> JobSlot:
    """Which job am I? Flags first, then torchrun, then a SLURM array, then SLURM tasks, else 0 of 1."""
    env = os.environ if env is None else env
    if (num_jobs is None) != (job_index is None):
        raise CacheError("--num-jobs and --job-index go together: give both or neither")
    if num_jobs is not None:
        slot = JobSlot(job_index, num_jobs, "--num-jobs/--job-index")
    elif "WORLD_SIZE" in env and "RANK" in env:
        slot = JobSlot(_int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun RANK/WORLD_SIZE")
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # Array ids need not start at 0 (--array=1-100) and may be strided (--array=0-98:2).
        first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        offset = _int(env, "SLURM_ARRAY_TASK_ID") - first
        if step < 1 or offset % step:
            raise CacheError(f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} is not on the "
                             f"array's grid (min {first}, step {step}); pass --num-jobs/--job-index "
                             "instead")
        slot = JobSlot(offset // step, _int(env, "SLURM_ARRAY_TASK_COUNT"), "SLURM array")
    elif _int(env, "SLURM_NTASKS", default=1) > 1 and "SLURM_PROCID" in env:
        slot = JobSlot(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), "SLURM tasks")
    else:
        slot = JobSlot(0, 1, "single job")
    if slot.count < 1 or not 0 <= slot.index < slot.count:
        raise CacheError(f"job index {slot.index} is not in 0..{slot.count - 1} (from {slot.source})")
    return slot


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    """env[name] as an integer; one that is not raises CacheError, or gives `default` if there is one."""
    try:
        return int(env[name] if default is None else env.get(name, default))
    except ValueError:
        if default is not None:
            return default
        raise CacheError(f"environment variable {name}={env[name]!r} is not an integer") from None
