"""The per-epoch data plan and stream: seed schedule, dealing shards to ranks, batching, cache reads."""
from __future__ import annotations

import pytest
import torch
from _student_helpers import RECIPE, single_thread

from data_shards import ShardSet, tensor_digest
from student.data import (DataPlanError, aug_seeds_for_epoch, check_seed_budget, deal_shards, plan_epoch,
                          replay_unit, train_batches)
from student.teachers import CachedTeacher, ReplayMismatchError
from teacher_cache.targets import TeacherTargets


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def train_set(digits_shards) -> ShardSet:
    return ShardSet.open(digits_shards["train"])     # 6 shards: 5 x 250 + 1 x 193


def test_seed_schedule_is_epoch_mod_seeds():
    assert [aug_seeds_for_epoch(e, 3) for e in range(5)] == [[0], [1], [2], [0], [1]]
    assert aug_seeds_for_epoch(2, 10, repeated_aug=3) == [6, 7, 8]
    assert aug_seeds_for_epoch(3, 10, repeated_aug=3) == [9, 0, 1]
    assert aug_seeds_for_epoch(7, None) == [7]          # no cache: every epoch a fresh seed


def test_more_epochs_than_seeds_is_refused_unless_reuse():
    assert check_seed_budget(3, 3, 1, reuse_seeds=False) is None
    with pytest.raises(DataPlanError, match="--reuse-seeds"):
        check_seed_budget(4, 3, 1, reuse_seeds=False)
    with pytest.raises(DataPlanError, match="2 seed"):
        check_seed_budget(2, 3, 2, reuse_seeds=False)
    assert "repeat" in check_seed_budget(4, 3, 1, reuse_seeds=True)
    assert check_seed_budget(1000, None, 1, reuse_seeds=False) is None


def test_shards_are_dealt_the_same_on_every_rank_and_reshuffled_per_epoch():
    a, b = deal_shards(6, 2, epoch=0, seed=0), deal_shards(6, 2, epoch=0, seed=0)
    assert a == b and sorted(a[0] + a[1]) == list(range(6))
    assert any(deal_shards(6, 2, epoch=e, seed=0) != a for e in range(1, 5))
    with pytest.raises(DataPlanError, match="cannot feed 7 ranks"):
        deal_shards(6, 7, epoch=0, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_gets_the_same_number_of_steps_on_uneven_shards(train_set, world_size):
    for epoch in range(3):
        plans = [plan_epoch(train_set, epoch, 64, rank, world_size, seed=0, num_seeds=3) for rank in range(world_size)]
        samples = plans[0].samples_per_rank
        assert {p.steps for p in plans} == {min(samples) // 64}
        if world_size == 2:
            assert len(set(samples)) == 2          # uneven (one shard holds 193), yet equal steps
        shards = [s for p in plans for s, _ in p.units]
        assert len(shards) == len(set(shards))     # no shard on two ranks
        assert {seed for p in plans for _, seed in p.units} == {epoch % 3}


def test_surplus_units_are_not_replayed(train_set):
    plan = plan_epoch(train_set, 0, 32, 0, 1, seed=0, num_seeds=None, max_steps=3)
    assert plan.steps == 3 and len(plan.units) == 1      # 96 samples fit in the first shard


def test_batches_do_not_depend_on_worker_count(train_set):
    plan = plan_epoch(train_set, 1, 100, 0, 1, seed=0, num_seeds=2, max_steps=4)   # crosses a unit boundary
    inline = list(train_batches(train_set, plan, RECIPE, 100, workers=0))
    pooled = list(train_batches(train_set, plan, RECIPE, 100, workers=2))
    assert len(inline) == len(pooled) == 4
    for a, b in zip(inline, pooled):
        assert a.keys == b.keys and len(a.keys) == 100
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert len(set(inline[2].keys) | set(inline[3].keys)) == 200
    # soft targets: each row sums to one, mixes at most two classes
    assert torch.allclose(inline[0].targets.sum(dim=1), torch.ones(100))


class FakeCache:
    """Records reads; label = shard position % 10 so alignment can be checked."""

    def __init__(self, shard_set: ShardSet, digests: dict | None = None):
        self.root, self.shard_set, self.reads, self.digests = "fake-cache", shard_set, [], digests or {}

    def read(self, shard: int, aug_seed: int) -> TeacherTargets:
        self.reads.append((shard, aug_seed))
        n = self.shard_set.shard_counts[shard]
        positions = torch.arange(n)
        return TeacherTargets(torch.stack([positions % 10, (positions + 1) % 10], dim=1),
                              torch.full((n, 2), -1.0))

    def unit_digests(self, shard: int, aug_seed: int) -> dict:
        return self.digests.get((shard, aug_seed), {})


def test_one_cache_read_per_unit_and_targets_follow_the_samples(train_set):
    position = dict(zip(train_set.manifest.column("key").to_pylist(), train_set.manifest.column("position").to_pylist()))
    cache = FakeCache(train_set)
    plan = plan_epoch(train_set, 0, 64, 0, 1, seed=0, num_seeds=2)
    seen = 0
    for batch in train_batches(train_set, plan, RECIPE, 64, CachedTeacher(cache)):
        assert batch.teacher.label.tolist() == [position[k] % 10 for k in batch.keys]
        seen += len(batch.keys)
    assert seen == plan.steps * 64
    assert cache.reads == plan.units and len(set(cache.reads)) == len(cache.reads)


def test_a_replayed_image_that_differs_from_the_recorded_digest_stops(train_set):
    unit = replay_unit(train_set, 2, 1, RECIPE)
    good = {unit.keys[0]: tensor_digest(unit.images[0]), unit.keys[1]: tensor_digest(unit.images[1])}
    teacher = CachedTeacher(FakeCache(train_set, {(2, 1): good}))
    teacher.unit_targets(unit)
    assert teacher.digests_checked == 2
    bad = dict(good, **{unit.keys[1]: "0" * 32})
    with pytest.raises(ReplayMismatchError, match=f"{unit.keys[1]}.*shard 2, aug seed 1"):
        CachedTeacher(FakeCache(train_set, {(2, 1): bad})).unit_targets(unit)
