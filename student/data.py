"""Training data per epoch: work items (slices of replayed units) + teacher targets, cut into batches.

Seed schedule (DESIGN.md): with R = 1 epoch e uses augmentation seed e mod S (S = the cache's seeds;
unbounded without a cache unless given) and streams every image once; DeiT's repeated augmentation
(R > 1) is planned by student/schedule.py.

R = 1: a *unit* is one shard replayed for one seed, in its mixing order. A rank's epoch is a list of
units, their samples back to back cut into batches. Shards are dealt to ranks after a per-epoch shuffle,
and every rank runs min over ranks of samples // batch steps, from the shard metadata alone (no
communication, no DDP hang on uneven shards). The stream is replayed as *work items* (shard, seed,
start, stop) cut where its batches end (with an online teacher: at the teacher's batches, as
cache-teacher ran them): at most one batch, so every loader worker has work and holds an item, not a
shard. Workers return uint8 items in plan order, finished on the device (`finish_item`): the stream
depends on (shards, recipe, seed, epoch, rank, world size, batch size), not on the number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from data_shards import AugRecipe, ReplayItem, ShardSet, decode_image, eval_image, finish_item, mixed_targets
from data_shards.items import WorkItem, replay_item, unit_items  # noqa: F401 (re-exported)
from teacher_cache.targets import TeacherTargets

from .schedule import DataPlanError, plan_rng, seeds_for_epoch
from .schedule import plan_epoch as plan_repeated_epoch


def deal_shards(num_shards: int, world_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Shards of each rank for this epoch: a seeded shuffle (same on every rank), dealt round-robin."""
    if num_shards < world_size:
        raise DataPlanError(f"{num_shards} shard(s) cannot feed {world_size} ranks (a rank would get no data); "
                            "re-run make-shards with a smaller --shard-size or use fewer processes")
    order = [int(i) for i in plan_rng("shard-order", seed, epoch).permutation(num_shards)]
    return [order[rank::world_size] for rank in range(world_size)]


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    aug_seeds: list[int]
    items: list[WorkItem]               # this rank's replayed slices of units (shard, aug seed), in stream order
    steps: int                          # the same on every rank
    samples_per_rank: list[int]         # available samples of every rank (for the log)


def plan_epoch(shard_set: ShardSet, epoch: int, batch_size: int, rank: int, world_size: int, seed: int,
               num_seeds: int | None, repeated_aug: int = 1, max_steps: int | None = None,
               teacher_batch_size: int | None = None) -> EpochPlan:
    """This rank's units and work items. With `teacher_batch_size` (online teacher) items are the
    teacher's batches of each unit (the last may run past the epoch's end; the surplus is dropped)."""
    if repeated_aug > 1:
        return _plan_repeated(shard_set, epoch, batch_size, rank, world_size, seed, num_seeds, repeated_aug,
                              max_steps)
    seeds = seeds_for_epoch(epoch, num_seeds)
    dealt = deal_shards(shard_set.num_shards, world_size, epoch, seed)
    counts = shard_set.shard_counts
    samples = [sum(counts[s] for s in shards) * len(seeds) for shards in dealt]
    steps = min(samples) // batch_size
    if steps == 0:
        raise DataPlanError(f"a rank holds only {min(samples)} samples this epoch, fewer than --batch-size "
                            f"{batch_size}; lower --batch-size or use fewer processes")
    if max_steps is not None:
        steps = min(steps, max_steps)
    items, needed, offset = [], steps * batch_size, 0
    for aug_seed in seeds:
        for shard in dealt[rank]:
            if offset >= needed:
                break            # surplus units of the richer ranks are never replayed
            n, start = counts[shard], 0
            while start < n and offset < needed:
                if teacher_batch_size:
                    stop = min(n, start + teacher_batch_size)
                else:   # up to the end of the current batch, the unit, or the epoch
                    stop = min(n, start + batch_size - offset % batch_size, start + needed - offset)
                items.append(WorkItem(shard, aug_seed, start, stop))
                offset += stop - start
                start = stop
    return EpochPlan(epoch, seeds, items, steps, samples)


def _plan_repeated(shard_set: ShardSet, epoch: int, batch_size: int, rank: int, world_size: int, seed: int,
                   num_seeds: int | None, repeated_aug: int, max_steps: int | None) -> EpochPlan:
    """DeiT's repeated augmentation (student/schedule.py): each step's pieces become work items.
    An online teacher runs on these items (not on cache-teacher's batches): its targets can differ
    from a cache's in the last bits where the teacher's arithmetic depends on the batch."""
    plan = plan_repeated_epoch(shard_set.shard_counts, epoch, batch_size, rank, world_size, seed, num_seeds,
                               repeated_aug, max_steps)
    items = [item for step in plan.steps for item in step]
    steps = len(plan.steps)
    return EpochPlan(epoch, plan.aug_seeds, items, steps, [steps * batch_size] * world_size)


# ----------------------------------------------------------------------------- work items

class _ItemDataset(Dataset):
    """Map-style over a plan's work items, so DataLoader workers return them in plan order."""

    def __init__(self, shard_set: ShardSet, items: list[WorkItem], recipe: AugRecipe):
        self.shard_set, self.items, self.recipe = shard_set, items, recipe
        self._keys: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ReplayItem:
        return replay_item(self.shard_set, self.items[index], self.recipe, self._keys)


def iter_items(shard_set: ShardSet, items: list[WorkItem], recipe: AugRecipe,
               workers: int = 0, pin_memory: bool = False) -> Iterator[ReplayItem]:
    """The items replayed in plan order by `workers` processes (0: in this one)."""
    workers = max(0, min(workers, len(items)))
    # batch_size=None: items come as they are (default_convert leaves a ReplayItem alone). Own generator:
    # a DataLoader draws its worker base seed from the global RNG otherwise, which would shift drop path's
    # random stream by the worker setting.
    return iter(DataLoader(_ItemDataset(shard_set, items, recipe), batch_size=None, num_workers=workers,
                           prefetch_factor=2 if workers else None, pin_memory=pin_memory,
                           generator=torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- batches

@dataclass
class TrainBatch:
    images: torch.Tensor               # (B, 3, H, W) float32, finished, on the training device
    targets: torch.Tensor              # (B, C) mixed, smoothed true-label targets, on the device
    teacher: TeacherTargets | None     # on the device (the teacher sources put them there)
    keys: list[str]


def train_batches(shard_set: ShardSet, plan: EpochPlan, recipe: AugRecipe, batch_size: int,
                  teacher=None, workers: int = 0, pin_memory: bool = False,
                  device: torch.device | str = "cpu") -> Iterator[TrainBatch]:
    """Exactly plan.steps batches of batch_size samples for this rank, finished on `device`; targets
    from `teacher.item_targets(item, images)` (student/teachers.py) when a teacher is given."""
    pending: list[TrainBatch] = []
    held, done = 0, 0
    for item in iter_items(shard_set, plan.items, recipe, workers, pin_memory):
        images = finish_item(item, recipe, device)
        # dense targets built on the device from (pinned) labels: no per-step host sync or big copy
        targets = mixed_targets(item.labels.to(device, non_blocking=True),
                                item.partner_labels.to(device, non_blocking=True),
                                item.lam.to(device, non_blocking=True), shard_set.num_classes, recipe.smoothing)
        pending.append(TrainBatch(images, targets, teacher.item_targets(item, images) if teacher else None,
                                  item.keys))
        held += len(item)
        while held >= batch_size and done < plan.steps:
            whole = _concat(pending)
            batch = _rows(whole, slice(0, batch_size))
            pending = [_rows(whole, slice(batch_size, None))] if held > batch_size else []
            held -= batch_size
            done += 1
            yield batch
        if done == plan.steps:
            break                # rows and items past the epoch's end are surplus
    if done < plan.steps:
        raise DataPlanError(f"epoch {plan.epoch}: the items gave {done} batches, the plan needs {plan.steps}; "
                            "a shard holds fewer samples than its metadata says - re-run make-shards")


def _concat(parts: list[TrainBatch]) -> TrainBatch:
    if len(parts) == 1:
        return parts[0]
    teacher = None if parts[0].teacher is None else TeacherTargets.cat([p.teacher for p in parts])
    return TrainBatch(torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]), teacher,
                      [k for p in parts for k in p.keys])


def _rows(batch: TrainBatch, rows: slice) -> TrainBatch:
    teacher = None if batch.teacher is None else batch.teacher.select(rows)
    return TrainBatch(batch.images[rows], batch.targets[rows], teacher, batch.keys[rows])


# ----------------------------------------------------------------------------- evaluation data

def eval_batches(shard_set: ShardSet, recipe: AugRecipe, batch_size: int,
                 shards: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """(images, labels, keys) with the evaluation transform, shard by shard in shard order."""
    images, labels, keys = [], [], []
    for shard in (range(shard_set.num_shards) if shards is None else shards):
        for sample in shard_set.read_shard(shard):
            images.append(eval_image(decode_image(sample.data), recipe))
            labels.append(sample.label)
            keys.append(sample.key)
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels), keys
                images, labels, keys = [], [], []
    if images:
        yield torch.stack(images), torch.tensor(labels), keys
