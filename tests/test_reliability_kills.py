"""Killed processes (a real SIGKILL at a known place) lose nothing: reruns complete the work and
the result equals an uninterrupted run's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cache_fixtures import (GROWN, SEEDS, assert_grown_like, assert_same_cache, assert_untouched, cli_args,
                            copy_to_grow, leftovers)
from cli_runner import CLI, run_cli
from _student_helpers import TIMING_FIELDS
from data_shards.faults import ENV

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- stage two

def train_args(shards, cache, out) -> list[str]:
    return [CLI, "train-student", "--shards", str(shards), "--cache", str(cache), "--out", str(out),
            "--distillation-type", "hard", "--model", "deit_tiny_distilled_patch16_224", "--patch-size", "8",
            "--embed-dim", "48", "--depth", "2", "--num-heads", "3", "--epochs", "3", "--batch-size", "32",
            "--lr", "1e-3", "--warmup-epochs", "1", "--workers", "1", "--log-interval", "2", "--no-progress",
            "--device", "cpu", "--max-steps-per-epoch", "5"]


def epoch_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in TIMING_FIELDS}
            for x in lines if x.get("event") == "epoch"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, small_shards, reference_cache) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(train_args(small_shards, reference_cache, out), {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("crash_at", ["train-step:8", "checkpoint-written:2"])
def test_killed_training_resumes_to_the_same_weights(tmp_path, small_shards, reference_cache, uninterrupted_run,
                                                     crash_at):
    """train-step:8 dies mid epoch 1; checkpoint-written:2 dies while writing epoch 1's checkpoint."""
    out = tmp_path / "run"
    args = train_args(small_shards, reference_cache, out)
    killed = run_cli(args, {ENV: crash_at, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1                     # the last complete checkpoint, never the half-written one
    if crash_at.startswith("checkpoint"):
        assert list(out.glob(".checkpoint.pt@*.tmp")), "the killed writer's temporary file should be there"
    resumed = run_cli(args + ["--resume"], {"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob(".checkpoint.pt@*.tmp"))   # cleaned up
    assert epoch_lines(out) == epoch_lines(uninterrupted_run)
    final, reference = (torch.load(p / "checkpoint.pt", weights_only=True)["model"] for p in (out, uninterrupted_run))
    assert final.keys() == reference.keys()
    for name in final:
        assert torch.equal(final[name], reference[name]), name


# ----------------------------------------------------------------------------- stage one

# Three places cover the protocol (store.commit_unit): before anything is renamed, between the
# renames of one unit's arrays, and between the unit record's write and its rename.
@pytest.mark.parametrize("crash_at", [
    "teacher-batch:5",          # mid-unit, between two teacher batches
    "commit-renamed-one:3",     # one array's storage shard renamed in, the other not (a torn unit)
    "json-written:2",           # unit record written aside, not yet renamed
])
def test_killed_cache_teacher_completes_identically(tmp_path, small_shards, teacher_checkpoint, reference_cache,
                                                    crash_at):
    from teacher_cache import TeacherCache

    out = tmp_path / "cache"
    killed = run_cli(cli_args(small_shards, out, teacher_checkpoint), {ENV: crash_at})
    assert killed.returncode == -9, killed.stderr
    cache = TeacherCache.open(out)
    done, missing = cache.done_units(), cache.missing_units()
    assert missing, "the crash should have left work undone"
    for unit in done:                     # whatever a reader can see is complete and correct
        for seed in unit.seeds:
            reference = TeacherCache.open(reference_cache).read(unit.shard, seed)
            got = cache.read(unit.shard, seed)
            assert torch.equal(got.topk_indices, reference.topk_indices)
            assert torch.equal(got.topk_logprobs, reference.topk_logprobs)
    for unit in missing[:1]:
        with pytest.raises(Exception, match="not computed yet"):
            cache.read(unit.shard, unit.seed_start)
    rerun = run_cli(cli_args(small_shards, out, teacher_checkpoint), process=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_cache(reference_cache, out)
    assert leftovers(out) == []


# Growing a cache (3 -> 5 seeds) dies: before the new arrays' metadata is referenced, while the
# manifest's replacement is written aside, mid-unit, and in a torn unit commit. Nothing committed
# before the growth changes, and the rerun ends equal to an uninterrupted growth.
@pytest.mark.parametrize("crash_at", [
    "grow-arrays-created:1",    # new generation's array metadata in place, manifest not yet replaced
    "json-written:1",           # the grown manifest written aside, not yet renamed (growth's commit point)
    "teacher-batch:4",          # mid-unit of the new seeds
    "commit-renamed-one:3",     # a torn unit of the new seeds
])
def test_killed_growth_completes_identically(tmp_path, small_shards, teacher_checkpoint, reference_cache,
                                            grown_reference, crash_at):
    from teacher_cache import TeacherCache

    out, before, args = copy_to_grow(reference_cache, tmp_path, small_shards, teacher_checkpoint)
    killed = run_cli(args, {ENV: crash_at})
    assert killed.returncode == -9, killed.stderr
    assert_untouched(before, out)
    seeds_after_kill = TeacherCache.open(out).num_seeds
    assert seeds_after_kill == (SEEDS if crash_at.startswith(("grow", "json")) else GROWN)
    rerun = run_cli(args, process=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_grown_like(grown_reference, out, before)
