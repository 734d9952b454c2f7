"""Training data per epoch: replayed shards (+ teacher targets), cut into equal-sized batches.

Seed schedule (DESIGN.md): epoch e uses augmentation seed e mod S, S = seeds in the cache;
with repeated augmentation R, epoch e uses seeds e*R .. e*R+R-1 (mod S) and so streams every
image R times. Without a cache S is unbounded unless given (an online teacher can see any seed).

A *unit* is one shard replayed for one seed: `replay_shard` yields its samples in the seeded
mixing order, and the teacher targets of the unit come from ONE batched cache read. An epoch
on a rank is a list of units; the rank's sample stream is the units' samples back to back,
cut into batches of `batch_size`. Shards are dealt to ranks after a per-epoch shuffle shared by
all ranks, and every rank runs the same number of steps: min over ranks of samples // batch,
computed from the shard metadata alone (no communication, no DDP hang on uneven shards).
The stream depends only on (shards, recipe, seed, epoch, rank, world size, batch size), not on
the number of loader workers: workers replay whole units, which arrive in plan order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_shards import AugRecipe, ShardSet, decode_image, eval_image, mixed_targets, replay_shard
from teacher_cache.targets import TeacherTargets

from .errors import StudentError


class DataPlanError(StudentError):
    """The requested epochs / ranks / batch size do not fit the shards or the cache."""


# ----------------------------------------------------------------------------- the schedule

def aug_seeds_for_epoch(epoch: int, num_seeds: int | None, repeated_aug: int = 1) -> list[int]:
    """Seeds e*R .. e*R+R-1, modulo S when the seeds are limited (a cache holds S of them)."""
    seeds = [epoch * repeated_aug + r for r in range(repeated_aug)]
    return [s % num_seeds for s in seeds] if num_seeds else seeds


def check_seed_budget(epochs: int, num_seeds: int | None, repeated_aug: int, reuse_seeds: bool) -> str | None:
    """Refuse (or, with reuse_seeds, describe) a run that needs more seeds than cached."""
    needed = epochs * repeated_aug
    if not num_seeds or needed <= num_seeds:
        return None
    message = (f"{epochs} epoch(s) x {repeated_aug} seed(s) per epoch need {needed} augmentation seeds, "
               f"the cache holds {num_seeds}")
    if not reuse_seeds:
        raise DataPlanError(message + "; compute more seeds with cache-teacher, train fewer epochs, "
                            "or pass --reuse-seeds to cycle through the cached ones (epoch e uses seed e mod S)")
    return message + f"; --reuse-seeds: seeds repeat every {num_seeds // repeated_aug or 1} epoch(s)"


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    digest = hashlib.sha256(f"deit-pipeline|shard-order|{seed}|{epoch}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def deal_shards(num_shards: int, world_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Shards of each rank for this epoch: a seeded shuffle (same on every rank), dealt round-robin."""
    if num_shards < world_size:
        raise DataPlanError(f"{num_shards} shard(s) cannot feed {world_size} ranks (a rank would get no data); "
                            "re-run make-shards with a smaller --shard-size or use fewer processes")
    order = [int(i) for i in _epoch_rng(seed, epoch).permutation(num_shards)]
    return [order[rank::world_size] for rank in range(world_size)]


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    aug_seeds: list[int]
    units: list[tuple[int, int]]        # (shard, aug seed) of this rank, in stream order
    steps: int                          # the same on every rank
    samples_per_rank: list[int]         # available samples of every rank (for the log)


def plan_epoch(shard_set: ShardSet, epoch: int, batch_size: int, rank: int, world_size: int, seed: int,
               num_seeds: int | None, repeated_aug: int = 1, max_steps: int | None = None) -> EpochPlan:
    seeds = aug_seeds_for_epoch(epoch, num_seeds, repeated_aug)
    dealt = deal_shards(shard_set.num_shards, world_size, epoch, seed)
    counts = shard_set.shard_counts
    samples = [sum(counts[s] for s in shards) * len(seeds) for shards in dealt]
    steps = min(samples) // batch_size
    if steps == 0:
        raise DataPlanError(f"a rank holds only {min(samples)} samples this epoch, fewer than --batch-size "
                            f"{batch_size}; lower --batch-size or use fewer processes")
    if max_steps is not None:
        steps = min(steps, max_steps)
    units, needed = [], steps * batch_size
    for aug_seed in seeds:
        for shard in dealt[rank]:
            if needed <= 0:
                break            # surplus units of the richer ranks are never replayed
            units.append((shard, aug_seed))
            needed -= counts[shard]
    return EpochPlan(epoch, seeds, units, steps, samples)


# ----------------------------------------------------------------------------- units

@dataclass
class ReplayedUnit:
    """One shard replayed for one seed, in mixing order."""
    shard: int
    aug_seed: int
    keys: list[str]
    positions: torch.Tensor       # (n,) int64 position in the shard (row of the cache read)
    labels: torch.Tensor          # (n,) int64
    partner_labels: torch.Tensor  # (n,) int64
    lam: torch.Tensor             # (n,) float32
    images: torch.Tensor          # (n, 3, H, W) float32, mixed and augmented

    def pin_memory(self) -> "ReplayedUnit":
        """Called by DataLoader(pin_memory=True): page-locked images copy to the GPU asynchronously."""
        self.images = self.images.pin_memory()
        return self


def replay_unit(shard_set: ShardSet, shard: int, aug_seed: int, recipe: AugRecipe) -> ReplayedUnit:
    replayed = list(replay_shard(shard_set.read_shard(shard), aug_seed, recipe))
    return ReplayedUnit(
        shard, aug_seed, [r.key for r in replayed],
        torch.tensor([r.position for r in replayed], dtype=torch.int64),
        torch.tensor([r.label for r in replayed], dtype=torch.int64),
        torch.tensor([r.partner_label for r in replayed], dtype=torch.int64),
        torch.tensor([r.lam for r in replayed], dtype=torch.float32),
        torch.stack([r.image for r in replayed]))


class _UnitDataset(Dataset):
    """Map-style over a plan's units, so DataLoader workers return them in plan order."""

    def __init__(self, shard_set: ShardSet, units: list[tuple[int, int]], recipe: AugRecipe):
        self.shard_set, self.units, self.recipe = shard_set, units, recipe

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> ReplayedUnit:
        shard, aug_seed = self.units[index]
        return replay_unit(self.shard_set, shard, aug_seed, self.recipe)


def _as_is(unit: ReplayedUnit) -> ReplayedUnit:
    return unit


def iter_units(shard_set: ShardSet, units: list[tuple[int, int]], recipe: AugRecipe,
               workers: int = 0, pin_memory: bool = False) -> Iterator[ReplayedUnit]:
    if workers <= 0:
        for shard, aug_seed in units:
            yield replay_unit(shard_set, shard, aug_seed, recipe)
        return
    loader = DataLoader(_UnitDataset(shard_set, units, recipe), batch_size=None, shuffle=False,
                        num_workers=min(workers, len(units)) or 1, collate_fn=_as_is, prefetch_factor=1,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
    # (own generator: a DataLoader draws its worker base seed from the global RNG otherwise, which
    # would shift drop path's random stream by the worker setting)
    yield from loader


# ----------------------------------------------------------------------------- batches

class TeacherSource(Protocol):
    """Teacher targets for every sample of a unit, in the unit's (mixing) order."""

    def unit_targets(self, unit: ReplayedUnit) -> TeacherTargets: ...


@dataclass
class TrainBatch:
    images: torch.Tensor               # (B, 3, H, W)
    targets: torch.Tensor              # (B, C) mixed, smoothed true-label targets
    teacher: TeacherTargets | None
    keys: list[str]


def train_batches(shard_set: ShardSet, plan: EpochPlan, recipe: AugRecipe, batch_size: int,
                  teacher: TeacherSource | None = None, workers: int = 0,
                  pin_memory: bool = False) -> Iterator[TrainBatch]:
    """Exactly plan.steps batches of batch_size samples for this rank."""
    pending: list[TrainBatch] = []
    held, done = 0, 0
    for unit in iter_units(shard_set, plan.units, recipe, workers, pin_memory):
        targets = mixed_targets(unit.labels, unit.partner_labels, unit.lam, shard_set.num_classes, recipe.smoothing)
        pending.append(TrainBatch(unit.images, targets, teacher.unit_targets(unit) if teacher else None, unit.keys))
        held += len(unit.keys)
        while held >= batch_size and done < plan.steps:
            batch, pending = _split(_concat(pending), batch_size)
            held -= batch_size
            done += 1
            yield batch
        if done == plan.steps:
            return
    if done < plan.steps:
        raise DataPlanError(f"epoch {plan.epoch}: the units gave {done} batches, the plan needs {plan.steps}; "
                            "a shard holds fewer samples than its metadata says - re-run make-shards")


def _concat(parts: list[TrainBatch]) -> TrainBatch:
    if len(parts) == 1:
        return parts[0]
    teacher = None if parts[0].teacher is None else TeacherTargets.cat([p.teacher for p in parts])
    return TrainBatch(torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]), teacher,
                      [k for p in parts for k in p.keys])


def _split(batch: TrainBatch, n: int) -> tuple[TrainBatch, list[TrainBatch]]:
    head = TrainBatch(batch.images[:n], batch.targets[:n],
                      None if batch.teacher is None else batch.teacher.select(slice(0, n)), batch.keys[:n])
    if len(batch.keys) == n:
        return head, []
    tail = TrainBatch(batch.images[n:], batch.targets[n:],
                      None if batch.teacher is None else batch.teacher.select(slice(n, None)), batch.keys[n:])
    return head, [tail]


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
