"""The per-epoch data plan and stream: seed schedule, dealing shards to ranks, batching, cache reads."""
from __future__ import annotations

import pytest
import torch
from _student_helpers import RECIPE, one_thread  # noqa: F401 (autouse)

import tracemalloc

from data_shards import ShardSet, finish_item, make_shards, tensor_digest
from data_shards.items import WorkItem, replay_item
from student.data import train_batches
from student.errors import DataPlanError, ReplayMismatchError
from student.samplers import check_seed_budget, deal_shards, plan_epoch, seeds_for_epoch
from student.teachers import CachedTeacher
from teacher_cache.targets import TeacherTargets


@pytest.fixture(scope="module")
def train_set(digits_shards) -> ShardSet:
    return ShardSet.open(digits_shards["train"])     # 6 shards: 5 x 250 + 1 x 193


def test_seed_schedule_is_epoch_mod_seeds():
    assert [seeds_for_epoch(e, 3) for e in range(5)] == [[0], [1], [2], [0], [1]]
    assert seeds_for_epoch(7, None) == [7]          # no cache: every epoch a fresh seed
    # repeated augmentation: seed groups (test_student_schedule.py)
    assert [seeds_for_epoch(e, 10, repeated_aug=3) for e in (2, 3, 9)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_more_epochs_than_seeds_is_refused_unless_reuse():
    assert check_seed_budget(3, 3, 1, reuse_seeds=False) is None
    with pytest.raises(DataPlanError, match="--reuse-seeds"):
        check_seed_budget(4, 3, 1, reuse_seeds=False)
    with pytest.raises(DataPlanError, match="serves 2 epoch"):
        check_seed_budget(3, 3, 2, reuse_seeds=False)      # seed groups {0, 1}; seed 2 alone is no group
    assert "repeat" in check_seed_budget(4, 3, 1, reuse_seeds=True)
    assert check_seed_budget(1000, None, 1, reuse_seeds=False) is None


def test_shards_are_dealt_the_same_on_every_rank_and_reshuffled_per_epoch():
    a, b = deal_shards(6, 2, epoch=0, seed=0), deal_shards(6, 2, epoch=0, seed=0)
    assert a == b and sorted(a[0] + a[1]) == list(range(6))
    assert any(deal_shards(6, 2, epoch=e, seed=0) != a for e in range(1, 5))
    with pytest.raises(DataPlanError, match="cannot feed 7 ranks"):
        deal_shards(6, 7, epoch=0, seed=0)


def units(plan) -> list[tuple[int, int]]:
    """The (shard, aug seed) units a plan replays, in stream order."""
    return list(dict.fromkeys((item.shard, item.aug_seed) for item in plan.items))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_gets_the_same_number_of_steps_on_uneven_shards(train_set, world_size):
    for epoch in range(3):
        plans = [plan_epoch(train_set.shard_counts, epoch, 64, rank, world_size, seed=0, num_seeds=3)
                 for rank in range(world_size)]
        samples = plans[0].samples_per_rank
        assert {p.steps for p in plans} == {min(samples) // 64}
        if world_size == 2:
            assert len(set(samples)) == 2          # uneven (one shard holds 193), yet equal steps
        shards = [s for p in plans for s, _ in units(p)]
        assert len(shards) == len(set(shards))     # no shard on two ranks
        assert {seed for p in plans for _, seed in units(p)} == {epoch % 3}


def test_surplus_units_are_not_replayed(train_set):
    plan = plan_epoch(train_set.shard_counts, 0, 32, 0, 1, seed=0, num_seeds=None, max_steps=3)
    assert plan.steps == 3 and len(units(plan)) == 1      # 96 samples fit in the first shard


def test_batches_do_not_depend_on_worker_count(train_set):
    plan = plan_epoch(train_set.shard_counts, 1, 100, 0, 1, seed=0, num_seeds=2, max_steps=4)   # crosses a unit boundary
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
        self.recipe, self.shard_counts = RECIPE, shard_set.shard_counts

    def read(self, shard: int, aug_seed: int) -> TeacherTargets:
        self.reads.append((shard, aug_seed))
        n = self.shard_set.shard_counts[shard]
        positions = torch.arange(n)
        return TeacherTargets(torch.stack([positions % 10, (positions + 1) % 10], dim=1),
                              torch.full((n, 2), -1.0))

    def unit_digests(self, shard: int, aug_seed: int) -> dict:
        return self.digests.get((shard, aug_seed), {})


class UncheckedTeacher(CachedTeacher):
    """The cached teacher without its digest check (FakeCache records none): reads and rows only."""

    def check_digests(self, item, images):
        pass


def test_one_cache_read_per_unit_and_targets_follow_the_samples(train_set):
    position = dict(zip(train_set.manifest.column("key").to_pylist(), train_set.manifest.column("position").to_pylist()))
    cache = FakeCache(train_set)
    plan = plan_epoch(train_set.shard_counts, 0, 64, 0, 1, seed=0, num_seeds=2)
    seen = 0
    for batch in train_batches(train_set, plan, RECIPE, 64, UncheckedTeacher(cache)):
        assert batch.teacher.label.tolist() == [position[k] % 10 for k in batch.keys]
        seen += len(batch.keys)
    assert seen == plan.steps * 64
    assert cache.reads == units(plan) and len(set(cache.reads)) == len(cache.reads)


def test_a_replayed_image_that_differs_from_the_recorded_digest_stops(train_set):
    """Shard 2 holds 250 samples: with pairing_seeds 3 its digest positions are 0-2, 83-85 and
    166-168 (the first three of each third of the mixing order, where --repeated-aug 3 epochs
    start)."""
    item = replay_item(train_set, WorkItem(2, 1, 82, 92), RECIPE)    # holds 83-85 (second third)
    images = finish_item(item, RECIPE)
    good = {item.keys[i]: tensor_digest(images[i]) for i in (1, 2, 3)}
    teacher = CachedTeacher(FakeCache(train_set, {(2, 1): good}))
    teacher.item_targets(item, images)
    assert teacher.digests_checked == 3 and teacher.units_checked == teacher.units_seen == {(2, 1)}
    later = replay_item(train_set, WorkItem(2, 1, 86, 96), RECIPE)   # no digest position here
    teacher.item_targets(later, finish_item(later, RECIPE))
    assert teacher.digests_checked == 3
    bad = dict(good, **{item.keys[2]: "0" * 32})
    with pytest.raises(ReplayMismatchError, match=f"{item.keys[2]}.*shard 2, aug seed 1"):
        CachedTeacher(FakeCache(train_set, {(2, 1): bad})).item_targets(item, images)
    # recorded samples that are not where this replay puts them: another shard set or recipe
    with pytest.raises(ReplayMismatchError,
                       match="position 83 of shard 2 seed 1 holds .* did not record"):
        CachedTeacher(FakeCache(train_set, {(2, 1): {"nope": "0" * 32}})).item_targets(item, images)


def test_items_are_batch_sized_slices_that_cover_the_stream(train_set):
    plan = plan_epoch(train_set.shard_counts, 0, 100, 0, 1, seed=0, num_seeds=2)
    assert sum(i.stop - i.start for i in plan.items) == plan.steps * 100
    assert all(0 < i.stop - i.start <= 100 for i in plan.items)
    assert [(i.shard, i.aug_seed) for i in plan.items if i.start == 0] == units(plan)
    offset = 0
    for item in plan.items:     # no item crosses a batch boundary
        assert offset // 100 == (offset + item.stop - item.start - 1) // 100
        offset += item.stop - item.start
    online = plan_epoch(train_set.shard_counts, 0, 100, 0, 1, seed=0, num_seeds=2, teacher_batch_size=32)
    assert all(i.start % 32 == 0 and i.stop - i.start <= 32 for i in online.items)


def _worker_peak_bytes(shard_set: ShardSet, item: WorkItem) -> tuple[int, int]:
    replay_item(shard_set, item, RECIPE)          # warm caches (manifest sort, RandAugment parse)
    tracemalloc.start()
    replayed = replay_item(shard_set, item, RECIPE)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, replayed.nbytes()


def test_a_workers_memory_does_not_grow_with_the_shard_size(tmp_path):
    peaks = {}
    for size in (50, 400):
        out = tmp_path / f"shards-{size}"
        make_shards("digits", out, shard_size=size, progress=False)
        shard_set = ShardSet.open(out)
        assert shard_set.shard_counts[0] == size
        peaks[size] = _worker_peak_bytes(shard_set, WorkItem(0, 0, 0, 32))
    (small_peak, small_item), (big_peak, big_item) = peaks[50], peaks[400]
    assert small_item == big_item                          # the same 32 samples' worth of uint8 pixels
    # 8x the shard adds only its manifest rows (keys for the mixing order), far less than one item;
    # the old per-shard path returned all 400 images as float32 (16x the item here).
    assert big_peak < small_peak + small_item


def test_a_samples_image_does_not_depend_on_the_batch_size(train_set):
    def by_key(batch_size, teacher_batch_size=None):
        plan = plan_epoch(train_set.shard_counts, 0, batch_size, 0, 1, seed=0, num_seeds=2, max_steps=120 // batch_size,
                          teacher_batch_size=teacher_batch_size)
        return {key: tensor_digest(image) for batch in train_batches(train_set, plan, RECIPE, batch_size)
                for key, image in zip(batch.keys, batch.images)}
    reference = by_key(40)
    for other in (by_key(24), by_key(40, teacher_batch_size=16)):
        common = set(reference) & set(other)
        assert len(common) >= 96 and all(reference[k] == other[k] for k in common)
