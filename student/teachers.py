"""Where the teacher targets of a replayed unit come from: the cache, or the teacher run live.

Both return `TeacherTargets` for every sample of the unit, in the unit's (mixing) order, and
both go through `teacher_cache.targets.encode_teacher_logits` (via stage one's
`teacher_forward`), so a cached run and an online run see the same numbers.
"""
from __future__ import annotations

from data_shards import tensor_digest
from teacher_cache.errors import CacheError
from teacher_cache.targets import TeacherTargets
from teacher_cache.teacher import teacher_forward

from .data import ReplayedUnit


class ReplayMismatchError(CacheError):
    """A replayed image differs from the one the teacher saw when the cache was computed."""


class CachedTeacher:
    """One batched `cache.read(shard, seed)` per unit; recorded image digests checked on the way."""

    def __init__(self, cache):
        self.cache = cache
        self.units_read = 0
        self.digests_checked = 0

    def unit_targets(self, unit: ReplayedUnit) -> TeacherTargets:
        self.check_digests(unit)
        targets = self.cache.read(unit.shard, unit.aug_seed)      # position order, one read
        self.units_read += 1
        return targets.select(unit.positions)

    def check_digests(self, unit: ReplayedUnit) -> None:
        """Compare the replayed images of the samples whose digest stage one recorded."""
        recorded = self.cache.unit_digests(unit.shard, unit.aug_seed)
        index = {key: i for i, key in enumerate(unit.keys)}
        for key, digest in recorded.items():
            if key not in index:
                raise ReplayMismatchError(
                    f"cache {self.cache.root}: sample {key!r} recorded for shard {unit.shard} seed {unit.aug_seed} "
                    "is not in that shard here; the cache was computed from other shards - recompute it "
                    "or pass the shards it was made from")
            found = tensor_digest(unit.images[index[key]])
            if found != digest:
                raise ReplayMismatchError(
                    f"replayed image of {key!r} (shard {unit.shard}, aug seed {unit.aug_seed}) has digest {found}, "
                    f"the cache recorded {digest}: this machine's augmentation differs from the one the teacher saw "
                    "(library versions? see the cache manifest's library_versions); training would use "
                    "targets of other images - recompute the cache here or train where it was computed")
            self.digests_checked += 1


class OnlineTeacher:
    """The teacher run live on the unit's replayed images, batched as stage one batches them."""

    def __init__(self, model, topk: int, store_full: bool = False, precision: str = "fp32", batch_size: int = 256):
        self.model, self.topk, self.store_full = model, topk, store_full
        self.precision, self.batch_size = precision, batch_size

    def unit_targets(self, unit: ReplayedUnit) -> TeacherTargets:
        parts = [teacher_forward(self.model, unit.images[i:i + self.batch_size], self.topk, self.store_full,
                                 self.precision) for i in range(0, len(unit.keys), self.batch_size)]
        return TeacherTargets.cat(parts)
