"""DeiT's repeated augmentation plan: which (image, seed) every rank sees at every step."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from student.errors import DataPlanError
from student.samplers import (check_seed_budget, epoch_segments, epochs_supported, repeated_steps,
                              seeds_for_epoch)

COUNTS = [37, 50, 41, 29]          # uneven shards, as make-shards leaves the last one


def samples(pieces):
    """(shard, mixing-order position, seed) of every sample of a step, in batch order."""
    return [(p.shard, k, p.aug_seed) for p in pieces for k in range(p.start, p.stop)]


def test_seed_groups_and_budget():
    assert [seeds_for_epoch(e, 9, 3) for e in range(7)] == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[6, 7, 8]]
    assert seeds_for_epoch(9, 9, 3) == [0, 1, 2]               # wraps only after every group
    assert [seeds_for_epoch(e, 4, 1) for e in range(5)] == [[0], [1], [2], [3], [0]]
    assert seeds_for_epoch(7, None, 3) == [6, 7, 8]              # no cache: unbounded
    assert epochs_supported(10, 3) == 9 and epochs_supported(10, 1) == 10
    assert check_seed_budget(9, 10, 3, reuse_seeds=False) is None
    with pytest.raises(DataPlanError, match="need 12 augmentation seeds, the cache holds 10 .it serves 9 epoch"):
        check_seed_budget(10, 10, 3, reuse_seeds=False)
    assert "repeat every 9" in check_seed_budget(10, 10, 3, reuse_seeds=True)
    with pytest.raises(DataPlanError, match="at least 3 cached seeds"):
        seeds_for_epoch(0, 2, 3)


@pytest.mark.parametrize("batch", [12, 16])
def test_one_rank_copies_share_a_batch(batch):
    steps = repeated_steps(COUNTS, epoch=0, batch_size=batch, rank=0, world_size=1, seed=0, num_seeds=9,
                           repeated_aug=3)
    assert seeds_for_epoch(0, 9, 3) == [0, 1, 2]
    assert sum(b - a for _, a, b in epoch_segments(COUNTS, 0, 3, 0)) == sum(n // 3 for n in COUNTS)
    assert {p.aug_seed for pieces in steps for p in pieces} == {0, 1, 2}
    for pieces in steps:
        step = samples(pieces)
        assert len(step) == batch
        per_image = Counter((shard, k) for shard, k, _ in step)
        # every image of the step appears under each seed of the group, except the copies truncated
        # to fit the batch (3 * ceil(B / 3) - B of them, each the last seed's copy of an image)
        truncated = 3 * -(-batch // 3) - batch
        assert sorted(per_image.values()) == [2] * truncated + [3] * (len(per_image) - truncated)
        assert all({s for sh, k, s in step if (sh, k) == image} <= {0, 1, 2} for image in per_image)


def test_two_ranks_copies_in_the_same_step_on_different_ranks():
    plans = [repeated_steps(COUNTS, 0, 24, rank, 2, seed=0, num_seeds=6, repeated_aug=3) for rank in range(2)]
    assert len(plans[0]) == len(plans[1]) > 0
    for step in range(len(plans[0])):
        ranks = [samples(p[step]) for p in plans]
        assert [len(r) for r in ranks] == [24, 24]
        images = Counter((sh, k) for r in ranks for sh, k, _ in r)
        assert set(images.values()) == {3}                     # 48 = 16 images x 3 seeds, all in this step
        # the first seed's copies are on rank 0, the last seed's on rank 1
        assert {s for _, _, s in ranks[0][:16]} == {0} and {s for _, _, s in ranks[1][-16:]} == {2}


@pytest.mark.parametrize("world_size,repeats", [(1, 3), (2, 3), (1, 1), (2, 1)])
def test_no_record_used_twice_before_all_used_once(world_size, repeats):
    num_seeds = 6
    used = Counter()
    for epoch in range(epochs_supported(num_seeds, repeats)):
        for rank in range(world_size):
            for pieces in repeated_steps(COUNTS, epoch, 8, rank, world_size, seed=3, num_seeds=num_seeds,
                                         repeated_aug=repeats):
                used.update(samples(pieces))
    assert max(used.values()) == 1
    records = sum(COUNTS) * num_seeds
    # unused: each epoch's last partial step and <= R-1 truncated copies a step
    assert len(used) >= records * 0.8


def test_one_rank_without_repeats_is_every_image_once():
    steps = repeated_steps(COUNTS, epoch=4, batch_size=10, rank=0, world_size=1, seed=1, num_seeds=3)
    assert {p.aug_seed for pieces in steps for p in pieces} == {1}
    seen = [x for pieces in steps for x in samples(pieces)]
    assert len(seen) == len(set(seen)) == (sum(COUNTS) // 10) * 10
    # pieces are runs of a mixing order: at most one piece per shard change or step
    assert all(len(pieces) <= 2 for pieces in steps)


def test_plan_is_a_pure_function_and_epochs_differ():
    a = repeated_steps(COUNTS, 1, 8, 1, 2, seed=0, num_seeds=9, repeated_aug=3)
    assert a == repeated_steps(COUNTS, 1, 8, 1, 2, seed=0, num_seeds=9, repeated_aug=3)
    b = repeated_steps(COUNTS, 0, 8, 1, 2, seed=0, num_seeds=9, repeated_aug=3)
    assert samples(a[0]) != samples(b[0])
    with pytest.raises(DataPlanError, match="fewer than one global batch"):
        repeated_steps([5], 0, 8, 0, 1, seed=0, num_seeds=3, repeated_aug=3)


def test_repeated_plan_feeds_training_batches_with_copies_together(digits_shards):
    """The data path replays the plan's pieces: every batch holds each image under its group's seeds."""
    from collections import Counter as _Counter

    from _student_helpers import RECIPE, single_thread

    from data_shards import ShardSet
    from student.data import train_batches
    from student.samplers import plan_epoch

    train_set = ShardSet.open(digits_shards["train"])
    plan = plan_epoch(train_set.shard_counts, epoch=1, batch_size=30, rank=0, world_size=1, seed=0, num_seeds=6,
                           repeated_aug=3, max_steps=2)
    assert plan.aug_seeds == [0, 1, 2] and plan.steps == 2
    with single_thread():
        batches = list(train_batches(train_set, plan, RECIPE, 30, workers=2))
    assert len(batches) == 2
    for batch in batches:
        assert batch.images.shape[0] == 30
        assert set(_Counter(batch.keys).values()) == {3}          # 10 images x 3 copies
        for key in set(batch.keys):                               # copies differ (own seed each)
            copies = batch.images[[i for i, k in enumerate(batch.keys) if k == key]]
            assert not torch.equal(copies[0], copies[1])


def first_reads(plans) -> dict[tuple[int, int], tuple[int, int]]:
    """(shard, seed) -> (first step that reads it, on any rank; the smallest position read then)."""
    first: dict[tuple[int, int], tuple[int, int]] = {}
    for step in range(len(plans[0])):
        for plan in plans:
            for piece in plan[step]:
                unit = (piece.shard, piece.aug_seed)
                if unit not in first or first[unit][0] == step:
                    first[unit] = (step, min(piece.start, first.get(unit, (step, piece.start))[1]))
    return first


@pytest.mark.parametrize("repeats", [2, 3, 4])
def test_every_unit_a_run_reads_is_first_read_at_a_digest_position(repeats):
    """The digest positions (data_shards.items.digest_positions) cover every unit a plan reads:
    the first piece of each (shard, seed), in the first step that reads it, holds a recorded
    position, for every part of the group (epochs g*R+j, a resume included), world size and batch
    size, tiny shards too."""
    from data_shards.items import digest_positions
    counts = COUNTS + [2, 4, 5, 3]
    for world_size in (1, 2, 3, 4):
        for batch in (1, 2, 5, 7, 12, 16):
            for epoch in range(2 * repeats):
                try:
                    plans = [repeated_steps(counts, epoch, batch, rank, world_size, seed=1,
                                            num_seeds=3 * repeats, repeated_aug=repeats)
                             for rank in range(world_size)]
                except DataPlanError:
                    continue
                for (shard, seed), (step, start) in first_reads(plans).items():
                    piece_stop = min(p.stop for plan in plans for p in plan[step]
                                     if (p.shard, p.aug_seed, p.start) == (shard, seed, start))
                    recorded = digest_positions(counts[shard], repeats)
                    where = (world_size, batch, epoch, shard, seed)
                    assert any(start <= k < piece_stop for k in recorded), where
