"""Which (image, aug seed) samples each rank trains on at each step: DeiT's repeated augmentation.

DeiT (RASampler, 3 repeats): an epoch is about N samples; each selected image appears R times
with different augmentations, its copies in the same step (one batch with one process, different
ranks with several), so about N/R distinct images are seen per epoch. Here each copy is a cached
record (image, aug seed), and the plan guarantees that no record is used twice before every
cached record has been used once:

  * seed groups: epochs e = g*R .. g*R+R-1 use the seeds g*R .. g*R+R-1 (group g, modulo the
    S // R groups a cache of S seeds holds), so a cache of S seeds serves R * (S // R) epochs;
  * within a group, every shard's mixing order (shared by the R seeds of the group, recipe field
    `pairing_seeds`) is cut into R parts; epoch j of the group takes part j of every shard, in a
    shard order shuffled once per group: over the group's R epochs every image is used under
    every seed of the group exactly once;
  * the epoch's images are a sequence of segments (shard, start, stop) of mixing orders. Step t
    takes the next P = ceil(W*B / R) images; its samples are seed-major (all P images under the
    group's first seed, then the second, ...), truncated to the global batch W*B (at most R-1
    records a step go unused), and rank r takes samples [r*B, (r+1)*B). So the copies of an image
    are in one batch when W = 1 and on different ranks when W >= R, always in the same step, and
    each rank's samples are runs of consecutive images of a mixing order (a run's mixing partners
    are in the run: replay costs one extra image per run, not one per sample).
With R = 1 this is plain epochs: epoch e uses seed e mod S, every image once.
Without a cache the seeds are unbounded (num_seeds None): group g uses seeds g*R .. g*R+R-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.hashing import text_seed
from data_shards.items import WorkItem, order_part

from .errors import StudentError


class DataPlanError(StudentError):
    """The requested epochs / ranks / batch size do not fit the shards or the cache."""


def epochs_supported(num_seeds: int, repeated_aug: int) -> int:
    """Epochs a cache of S seeds serves at R repeats before a record is used twice: R * (S // R)."""
    return repeated_aug * (num_seeds // repeated_aug)


def seeds_for_epoch(epoch: int, num_seeds: int | None, repeated_aug: int = 1) -> list[int]:
    """The seed group of this epoch: g*R .. g*R+R-1, g = epoch // R (modulo the cached groups)."""
    group = epoch // repeated_aug
    if num_seeds:
        groups = num_seeds // repeated_aug
        if groups == 0:
            raise DataPlanError(f"--repeated-aug {repeated_aug} needs at least {repeated_aug} cached seeds, "
                                f"the cache holds {num_seeds}; grow it with cache-teacher --seeds {repeated_aug}")
        group %= groups
    return [group * repeated_aug + r for r in range(repeated_aug)]


def check_seed_budget(epochs: int, num_seeds: int | None, repeated_aug: int, reuse_seeds: bool,
                      cached: bool = True) -> str | None:
    """Refuse (or, with reuse_seeds, describe) a run that would use a cached record twice (`cached`:
    the seeds are a cache's, else --num-seeds')."""
    if not num_seeds:
        return None
    supported = epochs_supported(num_seeds, repeated_aug)
    if epochs <= supported:
        return None
    needed = -(-epochs // repeated_aug) * repeated_aug          # whole seed groups
    held = f"the cache holds {num_seeds}" if cached else f"--num-seeds is {num_seeds}"
    message = (f"{epochs} epoch(s) at --repeated-aug {repeated_aug} need {needed} augmentation seeds, {held} "
               f"(it serves {supported} epoch(s))")
    if not reuse_seeds:
        more = f"grow the cache (cache-teacher --seeds {needed})" if cached else f"pass --num-seeds {needed}"
        raise DataPlanError(message + f"; {more}, train fewer epochs, or pass --reuse-seeds to cycle through the "
                            "seeds")
    repeats = "records" if cached else "seeds"
    return message + f"; --reuse-seeds: {repeats} repeat every {supported} epoch(s)"


def plan_rng(*parts: object) -> np.random.Generator:
    """Seeded by the text "deit-pipeline|part|...": the same on every rank."""
    return np.random.Generator(np.random.PCG64(text_seed("|".join(["deit-pipeline", *map(str, parts)]), 16)))


def epoch_segments(shard_counts: list[int], epoch: int, repeated_aug: int, seed: int) -> list[tuple[int, int, int]]:
    """The epoch's images: part (epoch mod R) of every shard's mixing order (order_part of
    data_shards.items, whose starts stage one's digests cover), shards shuffled per group."""
    group, part = divmod(epoch, repeated_aug)
    order = plan_rng("schedule", "shards", seed, group).permutation(len(shard_counts))
    segments = []
    for shard in (int(s) for s in order):
        start, stop = order_part(shard_counts[shard], part, repeated_aug)
        if stop > start:
            segments.append((shard, start, stop))
    return segments


def _take(segments: list[tuple[int, int, int]], first: int, count: int) -> list[tuple[int, int, int]]:
    """Images [first, first+count) of the segment sequence, as sub-segments (none when count <= 0)."""
    out, offset = [], 0
    for shard, start, stop in segments:
        n = stop - start
        lo, hi = max(first, offset), min(first + count, offset + n)
        if lo < hi:
            out.append((shard, start + lo - offset, start + hi - offset))
        offset += n
        if offset >= first + count:
            break
    return out


@dataclass(frozen=True)
class RepeatedPlan:
    epoch: int
    aug_seeds: list[int]
    steps: list[list[WorkItem]]       # this rank's pieces, step by step, in batch order
    images: int                       # distinct images of the epoch (all ranks)


def plan_epoch(shard_counts: list[int], epoch: int, batch_size: int, rank: int, world_size: int, seed: int,
               num_seeds: int | None, repeated_aug: int = 1, max_steps: int | None = None) -> RepeatedPlan:
    seeds = seeds_for_epoch(epoch, num_seeds, repeated_aug)
    segments = epoch_segments(shard_counts, epoch, repeated_aug, seed)
    images = sum(stop - start for _, start, stop in segments)
    global_batch = batch_size * world_size
    per_step = -(-global_batch // repeated_aug)
    steps = images // per_step
    if steps == 0:
        raise DataPlanError(f"epoch {epoch} holds {images} images x {repeated_aug} repeat(s), fewer than one global "
                            f"batch ({world_size} rank(s) x --batch-size {batch_size}); lower --batch-size, use "
                            "fewer processes or --repeated-aug 1")
    if max_steps is not None:
        steps = min(steps, max_steps)
    lo, hi = rank * batch_size, (rank + 1) * batch_size       # this rank's slice of the seed-major samples
    plan = []
    for step in range(steps):
        step_segments = _take(segments, step * per_step, per_step)
        pieces = []
        for j, aug_seed in enumerate(seeds):
            first, last = max(lo - j * per_step, 0), min(hi - j * per_step, per_step)
            pieces += [WorkItem(shard, aug_seed, a, b) for shard, a, b in _take(step_segments, first, last - first)]
        plan.append(pieces)
    return RepeatedPlan(epoch, seeds, plan, images)
