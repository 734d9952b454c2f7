"""Training and evaluation batches: a plan's work items (student/samplers.py) replayed by loader
workers, finished on the device (`finish_item`), with their teacher targets. Workers return uint8
items in plan order, so the stream does not depend on their number."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from data_shards import (AugRecipe, ReplayItem, ShardSet, decode_image, eval_image, finish_item,
                         mixed_targets)
from data_shards.items import WorkItem, replay_item
from teacher_cache.targets import TeacherTargets

from .errors import DataPlanError
from .samplers import EpochPlan


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
    # batch_size=None: items come as they are. Own generator: a DataLoader draws its worker base
    # seed from the global RNG otherwise, shifting drop path's random stream by --workers.
    return iter(DataLoader(_ItemDataset(shard_set, items, recipe), batch_size=None,
                           num_workers=workers, prefetch_factor=2 if workers else None,
                           pin_memory=pin_memory, generator=torch.Generator().manual_seed(0)))


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
