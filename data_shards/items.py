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


def unit_items(n: int, shard: int, aug_seed: int, size: int) -> list[WorkItem]:
    """A whole unit (n samples) as consecutive items of `size` samples: the teacher's batches."""
    return [WorkItem(shard, aug_seed, start, min(n, start + size)) for start in range(0, n, size)]
