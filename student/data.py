"""Training and evaluation batches: a plan's work items (student/samplers.py) replayed by loader
workers, finished on the device (`finish_item`), with their teacher targets. Workers return uint8
items in plan order, so the stream does not depend on their number."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from data_shards import (AugRecipe, ReplayItem, ShardSet, decode_image, eval_image, finish_item,
                         mixed_targets)
from data_shards.items import WorkItem, replay_item
from teacher_cache.targets import TeacherTargets

from .errors import DataPlanError
from .samplers import EpochPlan


class _Replay(Dataset):
    """Replays the work item it is given as index, so a DataLoader's sampler can be any stream
    of work items and its workers return them in that order."""

    def __init__(self, shard_set: ShardSet, recipe: AugRecipe):
        self.shard_set, self.recipe = shard_set, recipe
        self._keys: dict[int, list[str]] = {}

    def __getitem__(self, item: WorkItem) -> ReplayItem:
        return replay_item(self.shard_set, item, self.recipe, self._keys)


def _loader(shard_set: ShardSet, items: Iterable[WorkItem], recipe: AugRecipe, workers: int,
            pin_memory: bool) -> DataLoader:
    # batch_size=None: items come as they are. Own generator: a DataLoader draws its worker base
    # seed from the global RNG otherwise, shifting drop path's random stream by --workers.
    return DataLoader(_Replay(shard_set, recipe), batch_size=None, sampler=items,
                      num_workers=workers, prefetch_factor=2 if workers else None,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


def iter_items(shard_set: ShardSet, items: list[WorkItem], recipe: AugRecipe,
               workers: int = 0, pin_memory: bool = False) -> Iterator[ReplayItem]:
    """The items replayed in plan order by `workers` processes (0: in this one)."""
    workers = max(0, min(workers, len(items)))
    return iter(_loader(shard_set, items, recipe, workers, pin_memory))


def needed_items(plan: EpochPlan, batch_size: int) -> list[WorkItem]:
    """The plan's items up to the one that completes its last batch (the rest are surplus)."""
    need, held = plan.steps * batch_size, 0
    for count, item in enumerate(plan.items, 1):
        held += item.stop - item.start
        if held >= need:
            return plan.items[:count]
    return plan.items


class ItemStream:
    """Every epoch's items through one DataLoader whose workers live for the whole run, so the
    first items of epoch e+1 are replayed while epoch e ends (evaluation, checkpoint): the same
    items in the same order as one loader per epoch, without a worker start per epoch."""

    def __init__(self, shard_set: ShardSet, recipe: AugRecipe, plan_for: Callable[[int], EpochPlan],
                 epochs: range, batch_size: int, workers: int = 0, pin_memory: bool = False):
        self.plan_for, self.epochs, self.batch_size = plan_for, epochs, batch_size
        self._plans: dict[int, EpochPlan] = {}
        self._items = iter(_loader(shard_set, self._work_items(), recipe, workers, pin_memory))

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan, made once for the loop and the loader (which runs up to one ahead)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = self.plan_for(epoch)
        return self._plans[epoch]

    def _work_items(self) -> Iterator[WorkItem]:
        for epoch in self.epochs:
            yield from needed_items(self.plan(epoch), self.batch_size)

    def epoch_items(self, epoch: int) -> Iterator[ReplayItem]:
        """This epoch's replayed items; epochs must be taken in order, each to its end."""
        for _ in needed_items(self.plan(epoch), self.batch_size):
            yield next(self._items)

    def close(self) -> None:
        self._items = None         # the DataLoader iterator's end stops its workers


@dataclass
class TrainBatch:
    images: torch.Tensor               # (B, 3, H, W) float32, finished, on the training device
    targets: torch.Tensor              # (B, C) mixed, smoothed true-label targets, on the device
    teacher: TeacherTargets | None     # on the device (the teacher sources put them there)
    keys: list[str]


def train_batches(shard_set: ShardSet, plan: EpochPlan, recipe: AugRecipe, batch_size: int,
                  teacher=None, workers: int = 0, pin_memory: bool = False,
                  device: torch.device | str = "cpu",
                  items: Iterable[ReplayItem] | None = None) -> Iterator[TrainBatch]:
    """Exactly plan.steps batches of batch_size samples for this rank, finished on `device`; targets
    from `teacher.item_targets(item, images)` (student/teachers.py) when a teacher is given.
    `items`: the plan's replayed items from a run's ItemStream (default: a loader of their own)."""
    pending: list[TrainBatch] = []
    held, done = 0, 0
    if items is None:
        items = iter_items(shard_set, needed_items(plan, batch_size), recipe, workers, pin_memory)
    for item in items:
        images = finish_item(item, recipe, device)
        # dense targets built on the device from (pinned) labels: no per-step host sync or big copy
        targets = mixed_targets(item.labels.to(device, non_blocking=True),
                                item.partner_labels.to(device, non_blocking=True),
                                item.lam.to(device, non_blocking=True), shard_set.num_classes,
                                recipe.smoothing)
        teacher_targets = teacher.item_targets(item, images) if teacher else None
        pending.append(TrainBatch(images, targets, teacher_targets, item.keys))
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
        raise DataPlanError(f"epoch {plan.epoch}: the items gave {done} batches, the plan needs "
                            f"{plan.steps}; a shard holds fewer samples than its metadata says - "
                            "re-run make-shards")


def _concat(parts: list[TrainBatch]) -> TrainBatch:
    if len(parts) == 1:
        return parts[0]
    teacher = None if parts[0].teacher is None else TeacherTargets.cat([p.teacher for p in parts])
    return TrainBatch(torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]),
                      teacher, [k for p in parts for k in p.keys])


def _rows(batch: TrainBatch, rows: slice) -> TrainBatch:
    teacher = None if batch.teacher is None else batch.teacher.select(rows)
    return TrainBatch(batch.images[rows], batch.targets[rows], teacher, batch.keys[rows])


def eval_batches(shard_set: ShardSet, recipe: AugRecipe, batch_size: int,
                 shards: list[int] | None = None) -> Iterator[tuple]:
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
