"""cache_teacher: compute the teacher's outputs for every (sample, aug seed) as resumable jobs.

A job takes its round-robin share of the units (layout.py), skips the ones already done, locks each
one it computes (locks.py) and commits it atomically (store.py): rerunning resumes, N jobs fill the
cache N times faster, a larger --seeds first grows it (store.grow_cache). Stage two's data path
(DESIGN.md): loader workers replay the locked units' work items (teacher batches) from a shared
queue as uint8, so all are busy whatever the unit count; the main process finishes each on the
teacher's device, runs the teacher and commits a unit once all its items are in.

Determinism: a batch never spans two (shard, seed) pairs and always holds the same consecutive
replayed images (mixing order), so a unit's numbers do not depend on which job, worker or rerun
computed it, nor on the order items arrive in; committing a unit twice writes the same bytes.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data_shards import (AugRecipe, ReplayItem, ShardSet, WorkItem, finish_item, replay_item,
                         tensor_digest, unit_items)
from data_shards.devices import device_kind, resolve_device
from data_shards.faults import crash_point
from data_shards.files import atomic_path, out_folder
from data_shards.items import digest_positions

from .errors import CacheError
from .layout import INDEX_FILE, MANIFEST_FILE, UNITS_DIR, Unit, all_units, select_units, unit_json_path
from .locks import HEARTBEAT_SECONDS, LockKeeper, try_lock
from .manifest import create_or_match_manifest, read_manifest, refuse_differences, seed_generations
from .options import (CacheOptions, JobSlot, check_job_options, refuse_foreign_folder, resolve_job,
                      resolve_settings)
from .store import check_not_shrinking, clean_leftovers, commit_unit, ensure_arrays, grow_cache
from .teacher import check_precision, load_teacher, teacher_forward


@dataclass
class UnitItem:
    """One teacher batch of a locked unit, replayed (uint8) by a loader worker (or inline)."""
    unit_slot: int
    item: ReplayItem
    worker_pid: int

    def pin_memory(self) -> "UnitItem":
        """Called by the DataLoader (pin_memory=True on CUDA): faster host-to-GPU copies."""
        self.item = self.item.pin_memory()
        return self


def finish_batch(item: ReplayItem, recipe: AugRecipe, device: torch.device | str,
                 count: int) -> tuple[torch.Tensor, dict[str, str]]:
    """A teacher batch's finished images on `device`, and the digests of those of its samples at
    the (shard, seed)'s digest positions (data_shards.items.digest_positions; `count` samples)."""
    images = finish_item(item, recipe, device)
    positions = digest_positions(count, recipe.pairing_seeds)
    digests = {item.keys[k - item.start]: tensor_digest(images[k - item.start])
               for k in positions if item.start <= k < item.stop}
    return images, digests


class _QueuedItems(torch.utils.data.IterableDataset):
    """DataLoader workers take (unit slot, work item) tasks from a queue fed by the main process
    (which holds the units' locks): every worker has work whatever the unit count."""

    def __init__(self, shards_root: str, recipe: dict, tasks):
        self.shards_root, self.recipe, self.tasks = shards_root, recipe, tasks

    def __iter__(self):
        shard_set, recipe = ShardSet.open(self.shards_root), AugRecipe.from_dict(self.recipe)
        return replay_tasks(shard_set, recipe, iter(self.tasks.get, None))


def replay_tasks(shard_set: ShardSet, recipe: AugRecipe,
                 tasks: Iterable[tuple[int, WorkItem]]) -> Iterator[UnitItem]:
    """(unit slot, work item) tasks -> their replayed teacher batches, in this process."""
    keys_cache: dict[int, list[str]] = {}
    for slot, work in tasks:
        yield UnitItem(slot, replay_item(shard_set, work, recipe, keys_cache), os.getpid())



class UnitAccumulator:
    """In-memory targets of one unit until every record has arrived."""

    def __init__(self, unit: Unit, count: int, rows_per_shard: int, specs: dict[str, dict]):
        self.unit, self.count = unit, count
        self.expected, self.received, self.items = count * len(unit.seeds), 0, 0
        self.worker_pids: set[int] = set()       # processes that replayed its items (recorded)
        self.digests: dict[str, dict[str, str]] = {}
        self.started = time.time()
        self.buffers = {name: np.full((len(unit.seeds), rows_per_shard, spec["shape"][2]),
                                      np.nan if spec["fill_value"] == "NaN" else 0, dtype=spec["dtype"])
                        for name, spec in specs.items()}

    def add(self, item: ReplayItem, digests: dict[str, str], targets, worker_pid: int) -> None:
        s = item.aug_seed - self.unit.seed_start
        pos = item.positions.numpy()
        for name, buffer in self.buffers.items():     # array names are TeacherTargets field names
            buffer[s, pos] = getattr(targets, name).numpy().astype(buffer.dtype)
        if digests:
            self.digests.setdefault(str(item.aug_seed), {}).update(digests)
        self.received, self.items = self.received + len(pos), self.items + 1
        self.worker_pids.add(worker_pid)


def write_index(root: Path, shard_set: ShardSet) -> None:
    """index.parquet: key, label, shard, position, row (row = shard * rows_per_shard + position)."""
    path = root / INDEX_FILE
    if path.exists():
        try:
            if pq.read_metadata(path).num_rows == shard_set.manifest.num_rows:
                return
        except (OSError, pa.ArrowException):
            pass                                    # damaged: rewrite below
    columns = {name: shard_set.manifest.column(name) for name in ("key", "label", "shard", "position")}
    row = (columns["shard"].to_numpy().astype(np.int64) * shard_set.rows_per_shard
           + columns["position"].to_numpy())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({**columns, "row": pa.array(row, pa.int64())}), tmp, compression="zstd")



def cache_teacher(opts: CacheOptions) -> dict:
    """Compute this job's share of the cache at `opts.out`; returns a summary dict."""
    check_job_options(opts)
    root = out_folder(opts.out, "--out", CacheError)
    shard_set = ShardSet.open(opts.shards)
    existing = read_manifest(root) if (root / MANIFEST_FILE).exists() else None
    if existing is None:
        refuse_foreign_folder(root)
    s = resolve_settings(shard_set, existing, opts)
    if existing is not None:
        check_not_shrinking(root, existing, s.seeds)
    job = resolve_job(opts.num_jobs, opts.job_index)
    device = resolve_device(opts.device)
    check_precision(s.precision, device)
    # refuse early (before loading the teacher) on anything but the teacher weights
    if existing is not None:
        known = {**existing["teacher"], "name": s.teacher or existing["teacher"]["name"]}
        refuse_differences(root, existing, s.manifest(shard_set, known))
    source = ' from ' + s.teacher_checkpoint if s.teacher_checkpoint else ' (timm pretrained)'
    opts.log(f"cache-teacher: loading teacher {s.teacher or '(from checkpoint)'}{source} on {device}")
    model = load_teacher(s.teacher, s.teacher_checkpoint, num_classes=shard_set.num_classes,
                         device=device, model_kwargs=s.teacher_kwargs)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    manifest, created = create_or_match_manifest(root, s.manifest(shard_set, model.teacher_info))
    units = _open_storage(root, shard_set, s, manifest)
    mine = select_units(units, job.count, job.index)
    pending = [u for u in mine if not unit_json_path(root, u).exists()]
    todo = pending if opts.max_units is None else pending[:opts.max_units]
    records = sum(shard_set.shard_counts[u.shard] * len(u.seeds) for u in todo)
    opts.log(f"cache-teacher: {job}: {len(mine)} of {len(units)} units are this job's, "
             f"{len(mine) - len(pending)} already done, {len(todo)} to compute ({records} images x "
             f"seeds){' [new cache]' if created else ''}")
    specs = s.specs_for(shard_set, seed_generations(manifest)[0])
    run = _JobRun(root, shard_set, specs, model, device, job, s)
    started = time.time()
    with tqdm(total=records, unit="img", unit_scale=True, desc=f"cache-teacher {run.job_label}",
              disable=not opts.progress, smoothing=0.1) as bar:
        run.execute(todo, bar)
    return _summary(run, units, mine, time.time() - started)


def _open_storage(root: Path, shard_set: ShardSet, s: CacheOptions, manifest: dict) -> list[Unit]:
    """Index, arrays and units folder in place, leftovers of dead jobs cleaned, the cache grown to
    `s.seeds` if asked; returns every unit of the cache."""
    specs_for = partial(s.specs_for, shard_set)
    write_index(root, shard_set)
    first = seed_generations(manifest)[0]
    ensure_arrays(root, specs_for(first), first.dir)
    (root / UNITS_DIR).mkdir(exist_ok=True)
    clean_leftovers(root, s.lock_stale_after)
    if s.seeds > int(manifest["seeds"]):
        s.log(f"cache-teacher: growing {root} from {manifest['seeds']} to {s.seeds} seeds")
        manifest = grow_cache(root, s.seeds, specs_for, s.lock_stale_after)
    check_not_shrinking(root, manifest, s.seeds)     # another job may have grown it further
    generations = seed_generations(manifest)
    for gen in generations[1:]:                       # checks the metadata the growth created
        ensure_arrays(root, specs_for(gen), gen.dir)
    return all_units(shard_set.num_shards, s.seeds, s.seeds_per_unit, generations)


def _summary(run: "_JobRun", units: list[Unit], mine: list[Unit], seconds: float) -> dict:
    """The job's summary dict, also logged as one line."""
    root, job = run.root, run.job
    done_mine = sum(unit_json_path(root, u).exists() for u in mine)
    summary = {
        "cache": str(root), "job_index": job.index, "num_jobs": job.count, "job_source": job.source,
        "units_total": len(units), "units_this_job": len(mine), "units_computed": run.committed,
        "units_skipped_locked": [u.name for u in run.skipped_locked],
        "units_lost_lock": [u.name for u in run.lost],
        "units_this_job_done": done_mine, "units_this_job_missing": len(mine) - done_mine,
        "records_computed": run.records, "seconds": round(seconds, 3),
        "records_per_s": round(run.records / seconds, 1) if seconds > 0 else None,
        "teacher_seconds": round(run.teacher_seconds, 3), "device": str(run.device),
        "precision": run.opts.precision,
        "cache_units_done": sum(unit_json_path(root, u).exists() for u in units),
    }
    run.opts.log(f"cache-teacher: {job}: computed {run.committed} unit(s), {run.records} images x "
                 f"seeds in {seconds:.1f}s ({summary['records_per_s']} /s; teacher forward "
                 f"{run.teacher_seconds:.1f}s); this job's units done {done_mine}/{len(mine)}; "
                 f"whole cache {summary['cache_units_done']}/{len(units)} units"
                 + (f"; {len(run.skipped_locked)} unit(s) held by another live job"
                    if run.skipped_locked else ""))
    return summary


@dataclass
class _JobRun:
    """Locks, computes and commits this job's units; with workers, keeps 2 units per worker in flight."""
    root: Path
    shard_set: ShardSet
    specs: dict
    model: torch.nn.Module
    device: torch.device
    job: JobSlot
    opts: CacheOptions                                     # resolved (resolve_settings)
    committed: int = 0
    records: int = 0
    teacher_seconds: float = 0.0
    skipped_locked: list[Unit] = field(default_factory=list)
    lost: list[Unit] = field(default_factory=list)
    pending: list[Unit] = field(default_factory=list)      # not yet locked
    active: dict[int, tuple] = field(default_factory=dict)  # slot -> (unit, lock, accumulator)
    slots: int = 0
    keeper: LockKeeper | None = None
    bar: tqdm | None = None
    tasks: object = None                                   # the workers' queue
    sentinels_sent: bool = False

    @property
    def job_label(self) -> str:
        return f"{self.job.index}/{self.job.count}"

    def execute(self, todo: list[Unit], bar) -> None:
        self.keeper = LockKeeper(interval=min(HEARTBEAT_SECONDS, self.opts.lock_stale_after / 4))
        self.pending, self.bar = list(todo), bar
        try:
            if self.opts.workers == 0:
                self._consume(self._inline_items())
            else:
                self._run_with_workers()
        finally:
            self.keeper.close()        # releases the locks of units not committed (error / interrupt)

    def _next_locked(self) -> tuple[int, list[WorkItem]] | None:
        """Lock the next pending unit and return its slot and teacher batches (work items);
        units done or held elsewhere meanwhile are skipped."""
        while self.pending:
            unit = self.pending.pop(0)
            lock = try_lock(self.root, unit, self.opts.lock_stale_after, job=self.job_label)
            if lock is None:
                if not unit_json_path(self.root, unit).exists():
                    self.skipped_locked.append(unit)
                continue
            self.keeper.add(lock)
            self.slots += 1
            count = self.shard_set.shard_counts[unit.shard]
            acc = UnitAccumulator(unit, count, self.shard_set.rows_per_shard, self.specs)
            self.active[self.slots] = (unit, lock, acc)
            return self.slots, [work for seed in unit.seeds
                                for work in unit_items(count, unit.shard, seed, self.opts.batch_size)]
        return None

    def _inline_items(self) -> Iterator[UnitItem]:
        """Without workers: lock the next unit once the previous one's items are replayed."""
        tasks = ((slot, work) for slot, works in iter(self._next_locked, None) for work in works)
        return replay_tasks(self.shard_set, self.opts.recipe, tasks)

    def _queue(self, task: tuple[int, list[WorkItem]] | None) -> None:
        """Queue a locked unit's items, or (None) tell the workers to stop."""
        items = [None] * self.opts.workers if task is None else [(task[0], w) for w in task[1]]
        for item in items:
            self.tasks.put(item)
        self.sentinels_sent = task is None

    def _run_with_workers(self) -> None:
        mp = torch.multiprocessing
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.tasks = ctx.Queue()
        for _ in range(2 * self.opts.workers):   # units in flight: no worker waits on a commit
            self._queue(self._next_locked())
            if self.sentinels_sent:
                break
        dataset = _QueuedItems(str(self.shard_set.root), self.opts.recipe.to_dict(), self.tasks)
        self._consume(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.opts.workers, in_order=False,
            multiprocessing_context=ctx, pin_memory=self.device.type == "cuda", prefetch_factor=2))

    def _consume(self, arrivals: Iterator[UnitItem]) -> None:
        s = self.opts
        for got in arrivals:
            unit, lock, acc = self.active[got.unit_slot]
            images, digests = finish_batch(got.item, s.recipe, self.device, acc.count)
            t0 = time.perf_counter()
            targets = teacher_forward(self.model, images, s.topk, s.store_full, s.precision,
                                      s.channels_last)
            self.teacher_seconds += time.perf_counter() - t0
            crash_point("teacher-batch")
            acc.add(got.item, digests, targets, got.worker_pid)
            self.bar.update(len(got.item))
            if acc.received == acc.expected:      # the unit's last item
                self._finish(got.unit_slot)

    def _finish(self, slot) -> None:
        unit, lock, acc = self.active.pop(slot)
        if lock.still_held():
            record = self._record(unit, acc)
            commit_unit(self.root, unit, self.shard_set.rows_per_shard, acc.buffers, record)
            self.committed, self.records = self.committed + 1, self.records + acc.expected
            self.bar.set_postfix(units=self.committed, refresh=False)
        else:
            self.lost.append(unit)   # another job broke our lock (we looked dead): let it commit
        self.keeper.discard(lock)
        lock.release()
        if self.tasks is not None and not self.sentinels_sent:     # with workers: the next unit
            self._queue(self._next_locked())

    def _record(self, unit: Unit, acc: UnitAccumulator) -> dict:
        """The unit's JSON record (commit_unit adds its files' sha256)."""
        s = self.opts
        return {"unit": unit.name, "shard": unit.shard, "seeds": [unit.seed_start, unit.seed_stop - 1],
                "status": "done", "count": acc.count, "records": acc.expected, "digests": acc.digests,
                "job": self.job_label, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device),
                "device_kind": device_kind(self.device),      # verify-cache compares its own
                "precision": s.precision, "batch_size": s.batch_size, "channels_last": s.channels_last,
                "items": acc.items,
                "worker_pids": sorted(acc.worker_pids), "started": acc.started, "finished": time.time(),
                "seconds": round(time.time() - acc.started, 3)}
