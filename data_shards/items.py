"""Work items: slices (shard, seed, start, stop) of a shard's seeded mixing order, replayed alone.

Both stages replay their data as items: stage two (student.data) cuts them where its batches
end, stage one (teacher_cache.build) uses the teacher's batches. A worker reads only the slice's
samples (`ShardSet.read_samples`, one seek each) and returns the uint8 `ReplayItem`; the
consumer finishes it on its device (`finish_item`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .augment import AugRecipe, ReplayItem, mixing_order, replay_slice, slice_positions
from .shards import ShardSet


@dataclass(frozen=True)
class WorkItem:
    """Samples order[start:stop] of shard `shard`'s mixing order for seed `aug_seed`."""
    shard: int
    aug_seed: int
    start: int
    stop: int


def replay_item(shard_set: ShardSet, item: WorkItem, recipe: AugRecipe,
                keys_cache: dict[int, list[str]] | None = None) -> ReplayItem:
    """Read only the slice's samples (one seek each) and replay them (uint8, unfinished)."""
    keys_cache = {} if keys_cache is None else keys_cache
    if item.shard not in keys_cache:
        keys_cache.clear()       # one shard's keys at a time: memory independent of the shard count
        keys_cache[item.shard] = shard_set.shard_keys(item.shard)
    keys = keys_cache[item.shard]
    order = mixing_order(keys, item.aug_seed, recipe)
    positions = slice_positions(keys, item.aug_seed, recipe, item.start, item.stop, order)
    samples = shard_set.read_samples(item.shard, positions)
    return replay_slice(samples, item.aug_seed, recipe, item.start, item.stop, keys, order)


def order_part(n: int, part: int, parts: int) -> tuple[int, int]:
    """Positions [start, stop) of part `part` of `parts` of a mixing order of n samples.

    DeiT's repeated augmentation (student/schedule.py) trains epoch j of a seed group on part j
    of every shard's mixing order; stage one records digests at the start of each part."""
    return part * n // parts, (part + 1) * n // parts


def digest_positions(n: int, parts: int) -> list[int]:
    """Mixing-order positions of a (shard, seed) whose finished images stage one records as
    digests: the first `parts` positions of each of the `parts` parts (order_part); parts =
    recipe.pairing_seeds.

    Why these cover every unit a training run reads (the run, not each rank; DESIGN.md):
      * R = 1 (`--repeated-aug 1`): a rank's units are replayed from position 0, the first digest
        position (the unit's first item starts there; DDP deals whole units to ranks).
      * R > 1 (R = pairing_seeds, checked by train-student): epoch j of a group reads part j of each
        shard's order, a segment of the epoch's sequence; a step takes the next P = ceil(W*B/R)
        images seed-major and truncates to W*B, which drops at most R-1 images at the step's end,
        all of the group's last seed. So a unit's first read in an epoch is at its part's start, or
        (the start dropped) at the next step's first image, at most R-1 positions later; a part
        shorter than R is recorded whole. Steps cut by `steps = images // P` or
        --max-steps-per-epoch only leave units unread. Each epoch is planned alone and a resume
        starts at an epoch boundary.
    Under DDP the rank that reads a unit's first piece checks it while assembling that step's batch;
    other ranks may read later pieces of the unit, in that step at the earliest (a failed check
    raises before the rank's forward, so that step's gradient all-reduce, and so the optimizer
    step, never completes).
    """
    positions: list[int] = []
    for part in range(parts):
        start, stop = order_part(n, part, parts)
        positions += range(start, min(stop, start + parts))
    return positions


def unit_items(n: int, shard: int, aug_seed: int, size: int) -> list[WorkItem]:
    """A whole unit (n samples) as consecutive items of `size` samples: the teacher's batches."""
    return [WorkItem(shard, aug_seed, start, min(n, start + size)) for start in range(0, n, size)]
