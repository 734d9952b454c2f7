"""Growing a cache by seeds: new seeds become new units, committed files are never touched, shrinking is refused.

The reference cache has 3 seeds in units of 2 (blocks {0, 1}, {2}): 3 is not a multiple of
the unit size, the case where growing must not reopen the short last block.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from cache_fixtures import (GROWN, SEEDS, all_at_once, assert_grown_like, assert_same_cache, assert_untouched,
                            cache_options, cli_args, copy_cache, copy_to_grow, file_states, job_summaries, leftovers)
from cli_runner import CLI, run_cli
from teacher_cache import CacheError, CacheOptions, TeacherCache, cache_teacher
from teacher_cache.store import grow_cache
from teacher_cache.inspection import inspect_cache
from teacher_cache.layout import SeedGeneration, array_specs
from teacher_cache.verification import verify_cache

NEW_UNITS = 9            # 9 shards x the new block {3, 4}


@pytest.fixture(scope="session")
def direct_cache(tmp_path_factory, small_shards, teacher_checkpoint) -> Path:
    """A cache computed with 5 seeds from the start: what every grown cache must read back."""
    out = tmp_path_factory.mktemp("direct5") / "cache"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, seeds=GROWN))
    return out


def assert_reads_like(cache_root: Path, direct_root: Path) -> None:
    grown, direct = TeacherCache.open(cache_root), TeacherCache.open(direct_root)
    assert grown.num_seeds == direct.num_seeds == GROWN
    for shard in range(grown.num_shards):
        for seed in range(GROWN):
            a, b = grown.read(shard, seed), direct.read(shard, seed)
            assert torch.equal(a.topk_indices, b.topk_indices) and torch.equal(a.topk_logprobs, b.topk_logprobs)
            assert grown.unit_digests(shard, seed) == direct.unit_digests(shard, seed)


@pytest.mark.slow
def test_growth_adds_new_units_and_never_rewrites_a_committed_file(tmp_path, small_shards, teacher_checkpoint,
                                                                   reference_cache, direct_cache):
    out = copy_cache(reference_cache, tmp_path / "cache")
    before = file_states(out)
    summary = cache_teacher(cache_options(small_shards, out, teacher_checkpoint, seeds=GROWN))
    assert summary["units_computed"] == NEW_UNITS and summary["units_total"] == 18 + NEW_UNITS
    assert_untouched(before, out)
    assert_reads_like(out, direct_cache)            # seeds 3, 4 hold what a 5-seed cache holds
    cache = TeacherCache.open(out)
    assert cache.seed_generations == [SeedGeneration(0, SEEDS), SeedGeneration(SEEDS, GROWN)]
    assert cache.missing_units() == [] and leftovers(out) == []
    new_unit = cache.unit_for(0, 4)
    assert (new_unit.seed_start, new_unit.seed_stop, new_unit.seed_block) == (3, 5, 0)
    assert cache.unit_for(0, 2).seeds == range(2, 3)                  # the short block stays short
    info = inspect_cache(out)
    assert info["seeds"] == GROWN and (info["units"]["total"], info["units"]["done"]) == (27, 27)
    assert info["records"]["done"] == info["records"]["total"] == 354 * GROWN
    assert info["bytes"]["arrays"] > inspect_cache(reference_cache)["bytes"]["arrays"]
    report = verify_cache(out, small_shards, samples=32, device="cpu", seed=3)
    assert report["ok"] and {s for _, s in report["pairs_checked"]} & {3, 4}, report


@pytest.mark.slow
def test_growth_resumes_and_splits_into_jobs_like_a_first_run(tmp_path, small_shards, teacher_checkpoint,
                                                              reference_cache, grown_reference):
    out = copy_cache(reference_cache, tmp_path / "cache")
    # Job 0 of 2 grows the cache and stops after one unit (a time limit) ...
    first = cache_teacher(cache_options(small_shards, out, teacher_checkpoint, seeds=GROWN, num_jobs=2, job_index=0,
                                        max_units=1))
    assert first["units_computed"] == 1 and len(TeacherCache.open(out).missing_units()) == NEW_UNITS - 1
    # ... then both jobs resume it with only --shards/--out: seeds and the rest come from the manifest.
    done = [cache_teacher(CacheOptions(small_shards, out, num_jobs=2, job_index=i, progress=False, log=lambda m: None,
                          device="cpu"))["units_computed"] for i in (0, 1)]
    assert sum(done) == NEW_UNITS - 1
    assert_same_cache(grown_reference, out)


def test_a_smaller_seed_count_is_refused(tmp_path, small_shards, teacher_checkpoint, reference_cache):
    out = copy_cache(reference_cache, tmp_path / "cache")
    before = file_states(out)
    with pytest.raises(CacheError, match=r"holds 3 seeds \(0\.\.2\); --seeds 2 would shrink it, and a cache never "
                                         r"shrinks\. Train with fewer epochs instead"):
        cache_teacher(cache_options(small_shards, out, teacher_checkpoint, seeds=2))
    result = run_cli(cli_args(small_shards, out, teacher_checkpoint) + ["--seeds", "1"], process=True)
    assert result.returncode == 2 and "a cache never shrinks" in result.stderr, result.stderr
    assert file_states(out) == before


def test_jobs_growing_one_cache_at_once_add_one_generation(tmp_path, small_shards, reference_cache):
    out = copy_cache(reference_cache, tmp_path / "cache")
    shard_count = TeacherCache.open(out).num_shards

    def specs_for(gen):
        return array_specs(gen.stop - gen.start, shard_count, 40, 10, 10, 2, False)

    results, errors = all_at_once(lambda i: grow_cache(out, GROWN, specs_for, stale_after=60), 6)
    assert not errors
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed_generations"] == [[0, SEEDS], [SEEDS, GROWN]] and len(manifest["grown"]) == 1
    assert all(r["seed_generations"] == manifest["seed_generations"] for r in results)
    assert grow_cache(out, GROWN, specs_for, stale_after=60) == manifest           # idempotent
    assert leftovers(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [["0/2", "1/2"], ["0/1", "0/1"]], ids=["two-indices", "same-index-twins"])
def test_concurrent_growing_jobs_equal_one_job(tmp_path, small_shards, teacher_checkpoint, reference_cache,
                                               grown_reference, jobs):
    out, before, args = copy_to_grow(reference_cache, tmp_path, small_shards, teacher_checkpoint)
    procs = [subprocess.Popen(args + ["--num-jobs", job.split("/")[1], "--job-index", job.split("/")[0], "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    summaries = job_summaries(procs)
    assert sum(s["units_computed"] for s in summaries) == NEW_UNITS
    assert_grown_like(grown_reference, out, before)


@pytest.mark.slow
def test_train_student_uses_the_grown_seeds(tmp_path, small_shards, reference_cache, grown_reference):
    """Epochs 3 and 4 read seeds 3 and 4, which only the growth added."""

    def train(cache, out):
        return run_cli([CLI, "train-student", "--shards", str(small_shards), "--cache", str(cache), "--out", str(out),
                        "--distillation-type", "hard", "--model", "deit_tiny_distilled_patch16_224",
                        "--patch-size", "8", "--embed-dim", "48", "--depth", "2", "--num-heads", "3",
                        "--epochs", str(GROWN), "--repeated-aug", "1", "--batch-size", "32", "--warmup-epochs", "0", "--workers", "0",
                        "--no-progress", "--device", "cpu", "--max-steps-per-epoch", "1"], {"OMP_NUM_THREADS": "1"})

    refused = train(reference_cache, tmp_path / "short")
    assert refused.returncode == 2 and "the cache holds 3" in refused.stderr, refused.stderr
    grown = train(grown_reference, tmp_path / "run")
    assert grown.returncode == 0, grown.stderr
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e.get("event") == "epoch"] == list(range(GROWN))
