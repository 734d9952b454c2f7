"""Stage one computes exactly the teacher's outputs on the replayed images, laid out as designed."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr

from cache_fixtures import RECIPE, SEEDS, SEEDS_PER_UNIT, cache_options, leftovers, make_teacher
from data_shards import ShardSet, tensor_digest
from replay_helpers import replay_shard
from teacher_cache import CacheError, TeacherCache, cache_teacher, encode_teacher_logits
from teacher_cache.layout import all_units, storage_shard_path


def teacher_on(replayed, model, store_full=False, topk=10, batch=16):
    """Run the teacher on batches of `batch` consecutive replayed images (16 = the cache's
    batching), encode; returned in shard position order."""
    with torch.no_grad():
        logits = torch.cat([model(torch.stack([r.image for r in replayed[i:i + batch]]))
                            for i in range(0, len(replayed), batch)])
    order = torch.tensor([r.position for r in replayed]).argsort()
    return encode_teacher_logits(logits, topk, store_full).select(order)


def direct_targets(shard_set, shard, seed, model, store_full=False, topk=10):
    """The reference: replay the shard (the only image path), run the teacher, encode."""
    replayed = list(replay_shard(shard_set.read_shard(shard), seed, RECIPE))
    return teacher_on(replayed, model, store_full, topk), replayed


def test_stored_targets_equal_a_direct_teacher_forward(reference_cache, small_shards):
    cache = TeacherCache.open(reference_cache)
    shard_set = ShardSet.open(small_shards)
    model = make_teacher()
    assert cache.missing_units() == []
    labels_seen = set()
    for shard in range(shard_set.num_shards):
        for seed in range(SEEDS):
            want, replayed = direct_targets(shard_set, shard, seed, model)
            got = cache.read(shard, seed)
            assert len(got) == shard_set.shard_counts[shard]
            assert torch.equal(got.topk_indices, want.topk_indices)
            assert torch.equal(got.topk_logprobs, want.topk_logprobs)
            assert got.logits is None
            if shard % 4 == 0:   # one image at a time: same argmax, log-probs within fp16 rounding
                alone = teacher_on(replayed, model, batch=1)
                assert torch.equal(got.label, alone.label)
                torch.testing.assert_close(got.topk_logprobs, alone.topk_logprobs, rtol=0, atol=4e-3)
            labels_seen.update(got.label.tolist())
            # The digests recorded at compute time: the first 3 images of each third of the mixing
            # order (pairing_seeds 3: where --repeated-aug 3 epochs start reading a unit).
            n = len(replayed)
            positions = [p * n // 3 + i for p in range(3) for i in range(3)]
            expected = {replayed[k].key: tensor_digest(replayed[k].image) for k in positions}
            assert cache.unit_digests(shard, seed) == expected
    assert len(labels_seen) > 3          # the teacher is not constant: the comparison means something


def test_storage_layout_is_one_file_per_unit_and_array(reference_cache, small_shards):
    """Verified against the installed zarr: each unit is exactly one storage-shard file per array."""
    cache = TeacherCache.open(reference_cache)
    units = all_units(cache.num_shards, SEEDS, SEEDS_PER_UNIT)
    assert len(units) == 9 * 2                   # 9 shards x seed blocks {0,1}, {2}
    expected = {storage_shard_path(reference_cache, name, u) for name in cache.array_names for u in units}
    present = {p for p in (reference_cache / "arrays.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"}
    assert present == expected
    meta = json.loads((reference_cache / "arrays.zarr" / "topk_indices" / "zarr.json").read_text())
    assert meta["data_type"] == "uint8"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [SEEDS_PER_UNIT, 40, 10]
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, 40, 10]
    arr = zarr.open_array(str(reference_cache / "arrays.zarr" / "topk_logprobs"), mode="r")
    assert arr.dtype == np.float16 and arr.shape == (SEEDS, 9 * 40, 10)
    # The partial last shard: rows past its 34 samples were never written.
    assert np.isnan(arr[0, 8 * 40 + 34:]).all() and not np.isnan(arr[0, 8 * 40:8 * 40 + 34]).any()
    assert leftovers(reference_cache) == []
    index = cache.read_index()
    assert index.num_rows == 354
    rows = index.column("row").to_numpy()
    np.testing.assert_array_equal(rows, index.column("shard").to_numpy() * 40 + index.column("position").to_numpy())


def test_full_logit_mode_stores_fp16_logits(tmp_path, small_shards, teacher_checkpoint):
    out = tmp_path / "full"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, seeds=1, store_logits="full", topk=3))
    cache = TeacherCache.open(out)
    assert cache.has_logits and cache.topk == 3
    shard_set = ShardSet.open(small_shards)
    model = make_teacher()
    for shard in (0, 8):
        want, _ = direct_targets(shard_set, shard, 0, model, store_full=True, topk=3)
        got = cache.read(shard, 0)
        assert got.logits.shape == (shard_set.shard_counts[shard], 10)
        assert torch.equal(got.logits, want.logits)
        assert torch.equal(got.topk_indices, want.topk_indices)
        assert torch.equal(got.topk_logprobs, want.topk_logprobs)
        # the label (argmax of fp32 logits) has the largest fp16 logit (fp16 rounding can tie)
        assert torch.equal(got.logits.gather(1, got.label[:, None])[:, 0], got.logits.max(1).values)
        # log-probs are consistent with the stored logits
        lp = torch.log_softmax(got.logits, 1).gather(1, got.topk_indices)
        torch.testing.assert_close(lp, got.topk_logprobs, rtol=0, atol=2e-2)


@pytest.mark.slow
def test_workers_produce_the_same_cache(tmp_path, small_shards, teacher_checkpoint, reference_cache):
    from cache_fixtures import assert_same_cache
    out = tmp_path / "workers"
    summary = cache_teacher(cache_options(small_shards, out, teacher_checkpoint, workers=2))
    assert summary["units_computed"] == 18
    assert_same_cache(reference_cache, out)
    assert leftovers(out) == []


def test_read_refuses_missing_and_damaged_units(tmp_path, small_shards, teacher_checkpoint):
    out = tmp_path / "partial"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, max_units=3))
    cache = TeacherCache.open(out)
    missing = cache.missing_units()
    assert len(missing) == 18 - 3
    with pytest.raises(CacheError, match=r"shard-000003_seeds-000000-000001 .* not computed.*deit-pipeline cache-teacher"):
        cache.read(3, 1)
    with pytest.raises(CacheError, match="aug seed 7 is not in this cache"):
        cache.read(0, 7)
    done = [u for u in cache.units() if cache.is_done(u)]
    first = done[0]
    cache.read(first.shard, first.seed_start)            # fine before the damage
    path = storage_shard_path(out, "topk_logprobs", first)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{first.name} .*damaged.*topk_logprobs.*delete .*{first.name}.json"):
        TeacherCache.open(out).read(first.shard, first.seed_start)
    second = done[1]
    storage_shard_path(out, "topk_indices", second).unlink()
    with pytest.raises(CacheError, match=rf"{second.name} .*damaged.*missing"):
        TeacherCache.open(out).read(second.shard, second.seed_start)


def test_check_compatible_names_what_differs(reference_cache, small_shards, other_shards):
    cache = TeacherCache.open(reference_cache)
    cache.check_compatible(ShardSet.open(small_shards), RECIPE)
    with pytest.raises(CacheError, match="shards content hash"):
        cache.check_compatible(ShardSet.open(other_shards), RECIPE)
    with pytest.raises(CacheError, match=r"recipe fingerprint(.|\n)*recipe reprob: cache 0.25, this run 0.0"):
        cache.check_compatible(ShardSet.open(small_shards), dataclasses.replace(RECIPE, reprob=0.0))
    assert cache.recipe == RECIPE and cache.num_seeds == SEEDS and cache.topk == 10 and cache.num_classes == 10


def test_one_unit_keeps_every_worker_busy(tmp_path, small_shards, teacher_checkpoint):
    """Work items are teacher batches, not units: with a single unit to compute, both workers
    replay its items, and the unit is the same as computed in the main process."""
    from cache_fixtures import cache_snapshot
    snapshots = {}
    for workers in (2, 0):
        out = tmp_path / f"w{workers}"
        summary = cache_teacher(cache_options(small_shards, out, teacher_checkpoint, workers=workers, batch_size=4,
                                              max_units=1))
        assert summary["units_computed"] == 1
        (record_path,) = (out / "units").glob("*.json")
        record = json.loads(record_path.read_text())
        assert record["items"] == SEEDS_PER_UNIT * 40 // 4          # a shard of 40 images, batches of 4
        assert len(record["worker_pids"]) == max(workers, 1)
        snapshots[workers] = cache_snapshot(out)
    assert snapshots[2]["files"] == snapshots[0]["files"]
    assert snapshots[2]["units"] == snapshots[0]["units"]          # replay digests included


def test_a_damaged_or_short_index_is_rewritten_by_a_rerun(tmp_path, reference_cache, small_shards,
                                                         teacher_checkpoint):
    """index.parquet's readers say "rerun cache-teacher (it rewrites the index)": a rerun over a
    cache whose units are all done rewrites an unreadable index, and one with missing rows, as the
    first run wrote it."""
    import shutil
    import pyarrow.parquet as pq
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    index = out / "index.parquet"
    reference = pq.read_table(reference_cache / "index.parquet")
    for damage in (lambda: index.write_bytes(b"PAR1 not parquet"),
                   lambda: pq.write_table(reference.slice(0, 10), index)):
        damage()
        if index.read_bytes().startswith(b"PAR1 not"):
            with pytest.raises(CacheError, match="index.parquet.*it rewrites the index"):
                TeacherCache.open(out).read_index()
        cache_teacher(cache_options(small_shards, out, teacher_checkpoint))
        assert pq.read_table(index).equals(reference)
