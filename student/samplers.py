"""The epoch planner (DeiT's samplers.py): which (image, aug seed) samples each rank trains on
at each step, as work items. Semantics table and reasons: DESIGN.md, "Training semantics".

Seed groups: epochs g*R .. g*R+R-1 use seeds g*R .. g*R+R-1 (modulo the S // R cached groups).
R = 1: shards dealt to ranks, every rank runs min over ranks of samples // batch steps (from the
metadata: no DDP hang on uneven shards), items cut where batches end. R > 1 (RASampler): epoch j
of a group takes part j of every shard's mixing order; an image's copies share a step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.hashing import text_seed
from data_shards.items import WorkItem, order_part

from .errors import DataPlanError


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    aug_seeds: list[int]
    items: list[WorkItem]          # this rank's slices of (shard, aug seed), in stream order
    steps: int                     # the same on every rank
    samples_per_rank: list[int]    # available samples of every rank (for the log)


def epochs_supported(num_seeds: int, repeated_aug: int) -> int:
    """Epochs a cache of S seeds serves at R repeats before a record is used twice: R * (S // R)."""
    return repeated_aug * (num_seeds // repeated_aug)


def seeds_for_epoch(epoch: int, num_seeds: int | None, repeated_aug: int = 1) -> list[int]:
    """The seed group of this epoch: g*R .. g*R+R-1, g = epoch // R (modulo the cached groups)."""
    group = epoch // repeated_aug
    if num_seeds:
        groups = num_seeds // repeated_aug
        if groups == 0:
            raise DataPlanError(f"--repeated-aug {repeated_aug} needs at least {repeated_aug} "
                                f"cached seeds, the cache holds {num_seeds}; grow it with "
                                f"cache-teacher --seeds {repeated_aug}")
        group %= groups
    return [group * repeated_aug + r for r in range(repeated_aug)]


def check_seed_budget(epochs: int, num_seeds: int | None, repeated_aug: int, reuse_seeds: bool,
                      cached: bool = True) -> str | None:
    """Refuse (reuse_seeds: describe) a run using a record twice (`cached`: a cache's seeds)."""
    if not num_seeds:
        return None
    supported = epochs_supported(num_seeds, repeated_aug)
    if epochs <= supported:
        return None
    needed = -(-epochs // repeated_aug) * repeated_aug          # whole seed groups
    held = f"the cache holds {num_seeds}" if cached else f"--num-seeds is {num_seeds}"
    message = (f"{epochs} epoch(s) at --repeated-aug {repeated_aug} need {needed} augmentation "
               f"seeds, {held} (it serves {supported} epoch(s))")
    if not reuse_seeds:
        more = (f"grow the cache (cache-teacher --seeds {needed})" if cached
                else f"pass --num-seeds {needed}")
        raise DataPlanError(message + f"; {more}, train fewer epochs, or pass --reuse-seeds to "
                            "cycle through the seeds")
    repeats = "records" if cached else "seeds"
    return message + f"; --reuse-seeds: {repeats} repeat every {supported} epoch(s)"


def plan_rng(*parts: object) -> np.random.Generator:
    """Seeded by the text "deit-pipeline|part|...": the same on every rank."""
    seed = text_seed("|".join(["deit-pipeline", *map(str, parts)]), 16)
    return np.random.Generator(np.random.PCG64(seed))


def deal_shards(num_shards: int, world_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Shards of each rank this epoch: a seeded shuffle (same on every rank), dealt round-robin."""
    if num_shards < world_size:
        raise DataPlanError(f"{num_shards} shard(s) cannot feed {world_size} ranks (a rank would "
                            "get no data); re-run make-shards with a smaller --shard-size or use "
                            "fewer processes")
    order = [int(i) for i in plan_rng("shard-order", seed, epoch).permutation(num_shards)]
    return [order[rank::world_size] for rank in range(world_size)]


def plan_epoch(shard_counts: list[int], epoch: int, batch_size: int, rank: int, world_size: int,
               seed: int, num_seeds: int | None, repeated_aug: int = 1,
               max_steps: int | None = None, teacher_batch_size: int | None = None) -> EpochPlan:
    """This rank's work items. `teacher_batch_size` (online teacher, R = 1): items are the
    teacher's batches of each unit (surplus past the epoch's end dropped). With R > 1 it runs on
    the steps' pieces: targets may then differ from a cache's in the last bits."""
    if repeated_aug > 1:
        steps = repeated_steps(shard_counts, epoch, batch_size, rank, world_size, seed, num_seeds,
                               repeated_aug, max_steps)
        return EpochPlan(epoch, seeds_for_epoch(epoch, num_seeds, repeated_aug),
                         [item for step in steps for item in step], len(steps),
                         [len(steps) * batch_size] * world_size)
    seeds = seeds_for_epoch(epoch, num_seeds)              # R = 1: shards dealt to ranks
    dealt = deal_shards(len(shard_counts), world_size, epoch, seed)
    samples = [sum(shard_counts[s] for s in shards) * len(seeds) for shards in dealt]
    steps = min(samples) // batch_size
    if steps == 0:
        raise DataPlanError(f"a rank holds only {min(samples)} samples this epoch, fewer than "
                            f"--batch-size {batch_size}; lower --batch-size or use fewer processes")
    if max_steps is not None:
        steps = min(steps, max_steps)
    items, needed, offset = [], steps * batch_size, 0
    for aug_seed in seeds:
        for shard in dealt[rank]:
            if offset >= needed:
                break            # surplus units of the richer ranks are never replayed
            n, start = shard_counts[shard], 0
            while start < n and offset < needed:
                if teacher_batch_size:
                    stop = min(n, start + teacher_batch_size)
                else:   # up to the end of the current batch, the unit, or the epoch
                    stop = min(n, start + batch_size - offset % batch_size, start + needed - offset)
                items.append(WorkItem(shard, aug_seed, start, stop))
                offset += stop - start
                start = stop
    return EpochPlan(epoch, seeds, items, steps, samples)


def epoch_segments(shard_counts: list[int], epoch: int, repeated_aug: int,
                   seed: int) -> list[tuple[int, int, int]]:
    """The epoch's images: part (epoch mod R) of every shard's mixing order (order_part of
    data_shards.items, whose starts stage one's digests cover), shards shuffled per group."""
    group, part = divmod(epoch, repeated_aug)
    order = plan_rng("schedule", "shards", seed, group).permutation(len(shard_counts))
    segments = [(int(s), *order_part(shard_counts[s], part, repeated_aug)) for s in order]
    return [(shard, start, stop) for shard, start, stop in segments if stop > start]


def _take(segments: list[tuple[int, int, int]], first: int, count: int) -> list[tuple]:
    """Images [first, first+count) of the segments, as sub-segments (none when count <= 0)."""
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


def repeated_steps(shard_counts: list[int], epoch: int, batch_size: int, rank: int, world_size: int,
                   seed: int, num_seeds: int | None, repeated_aug: int = 1,
                   max_steps: int | None = None) -> list[list[WorkItem]]:
    """This rank's pieces of the epoch, step by step, in batch order (the R > 1 plan; any R)."""
    seeds = seeds_for_epoch(epoch, num_seeds, repeated_aug)
    segments = epoch_segments(shard_counts, epoch, repeated_aug, seed)
    images = sum(stop - start for _, start, stop in segments)
    per_step = -(-batch_size * world_size // repeated_aug)      # images per step (rounded up)
    steps = images // per_step
    if steps == 0:
        raise DataPlanError(f"epoch {epoch} holds {images} images x {repeated_aug} repeat(s), "
                            f"fewer than one global batch ({world_size} rank(s) x --batch-size "
                            f"{batch_size}); lower --batch-size, use fewer processes or "
                            "--repeated-aug 1")
    if max_steps is not None:
        steps = min(steps, max_steps)
    lo, hi = rank * batch_size, (rank + 1) * batch_size    # this rank's seed-major samples
    plan = []
    for step in range(steps):
        step_segments = _take(segments, step * per_step, per_step)
        pieces = []
        for j, aug_seed in enumerate(seeds):
            first, last = max(lo - j * per_step, 0), min(hi - j * per_step, per_step)
            pieces += [WorkItem(shard, aug_seed, a, b)
                       for shard, a, b in _take(step_segments, first, last - first)]
        plan.append(pieces)
    return plan
