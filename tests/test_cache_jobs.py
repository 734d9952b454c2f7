"""Stage one as cluster jobs: crashes resume, concurrent jobs agree, the SLURM array covers every unit once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cache_fixtures import (REPO, SEEDS, SEEDS_PER_UNIT, TEACHER_ARCH, all_at_once, assert_same_cache,
                            cache_options, cli_args, job_summaries, leftovers)
from cli_runner import CLI, run_cli
from teacher_cache import CacheError, CacheOptions, TeacherCache, build, cache_teacher
from teacher_cache.options import resolve_job
from teacher_cache.layout import Unit, all_units, select_units
from teacher_cache.locks import lock_is_stale, try_lock
from teacher_cache.manifest import create_or_match_manifest

NUM_UNITS = 18           # 9 shards x seed blocks {0, 1}, {2}


class SimulatedCrash(RuntimeError):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, small_shards, teacher_checkpoint, reference_cache,
                                                          monkeypatch):
    out = tmp_path / "crashed"
    finish = build._JobRun._finish

    def crash_after_five(run, slot):           # the job dies right after its fifth unit's commit
        finish(run, slot)
        if run.committed == 5:
            raise SimulatedCrash("power cut")

    monkeypatch.setattr(build._JobRun, "_finish", crash_after_five)
    with pytest.raises(SimulatedCrash):
        cache_teacher(cache_options(small_shards, out, teacher_checkpoint))
    monkeypatch.undo()
    assert len(TeacherCache.open(out).missing_units()) == NUM_UNITS - 5
    assert leftovers(out) == []          # the crash path released its locks and scratch
    # The rerun needs only --shards/--out: everything else comes from the manifest.
    summary = cache_teacher(CacheOptions(small_shards, out, progress=False, log=lambda m: None, device="cpu",
                                         batch_size=16))
    assert summary["units_computed"] == NUM_UNITS - 5
    assert_same_cache(reference_cache, out)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_completes_identically(tmp_path, small_shards, teacher_checkpoint, reference_cache):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_args(small_shards, out, teacher_checkpoint), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "units").glob("*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)        # no cleanup at all: a lock and maybe a scratch dir stay
    proc.wait()
    done = len(list((out / "units").glob("*.json")))
    assert 3 <= done < NUM_UNITS
    rerun = run_cli(cli_args(small_shards, out, teacher_checkpoint, "--json"), process=True)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["units_computed"] == NUM_UNITS - done       # the dead job's lock was taken over
    assert_same_cache(reference_cache, out)
    assert leftovers(out) == []                                # its scratch was cleaned


@pytest.mark.slow
def test_concurrent_jobs_with_different_indices_equal_one_job(tmp_path, small_shards, teacher_checkpoint,
                                                              reference_cache):
    out = tmp_path / "two_jobs"
    procs = [subprocess.Popen(cli_args(small_shards, out, teacher_checkpoint, "--num-jobs", "2", "--job-index", str(i),
                                       "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    summaries = job_summaries(procs)
    assert sorted(s["units_computed"] for s in summaries) == [9, 9]
    assert_same_cache(reference_cache, out)
    assert leftovers(out) == []


@pytest.mark.slow
def test_two_jobs_with_the_same_index_compute_each_unit_once(tmp_path, small_shards, teacher_checkpoint,
                                                             reference_cache):
    out = tmp_path / "twins"
    procs = [subprocess.Popen(cli_args(small_shards, out, teacher_checkpoint, "--num-jobs", "1", "--job-index", "0",
                                       "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    summaries = job_summaries(procs)
    # Locks: no unit was computed twice, none was lost, and the cache is exactly the reference.
    assert sum(s["units_computed"] for s in summaries) == NUM_UNITS
    assert_same_cache(reference_cache, out)
    assert leftovers(out) == []


@pytest.mark.slow
def test_slurm_array_script_covers_every_unit_exactly_once(tmp_path, small_shards, teacher_checkpoint):
    """Run the example array script with the SLURM variables of each task in turn (no scheduler). TEACHER is
    unset: the checkpoint's recorded architecture is used (the script used to pass the default timm name)."""
    out = tmp_path / "slurm"
    checkpoint = tmp_path / "teacher.pth"
    torch.save({**torch.load(teacher_checkpoint, weights_only=True), "arch": TEACHER_ARCH}, checkpoint)
    env = {"SHARDS": str(small_shards), "CACHE": str(out),
           "TEACHER_CHECKPOINT": str(checkpoint), "SEEDS": str(SEEDS), "PRECISION": "fp32",
           "BATCH_SIZE": "16", "WORKERS": "0",
           "EXTRA_ARGS": f"--seeds-per-unit {SEEDS_PER_UNIT} --input-size 32 --device cpu",
           "PATH": f"{Path(CLI).parent}{os.pathsep}{os.environ['PATH']}",
           # --array=1-3: ids need not start at 0
           "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3"}
    for task_id in (3, 1, 2):
        result = run_cli(["bash", str(REPO / "examples" / "slurm_cache_teacher.sh")],
                         {**env, "SLURM_ARRAY_TASK_ID": str(task_id)})
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert (summary["job_index"], summary["num_jobs"], summary["job_source"]) == (task_id - 1, 3, "SLURM array")
    cache = TeacherCache.open(out)
    assert cache.missing_units() == []
    owner = {}
    for path in (out / "units").glob("*.json"):
        record = json.loads(path.read_text())
        assert record["unit"] not in owner
        owner[record["unit"]] = record["job"]
    units = cache.units()
    assert sorted(owner) == sorted(u.name for u in units)            # every unit, once
    for index in range(3):
        assert {n for n, job in owner.items() if job == f"{index}/3"} == {u.name for u in select_units(units, 3, index)}


def test_job_slots_from_flags_and_environment():
    assert (resolve_job(4, 2, env={}).index, resolve_job(4, 2, env={}).count) == (2, 4)
    slot = resolve_job(env={"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
                            "SLURM_ARRAY_TASK_STEP": "1"})
    assert (slot.index, slot.count, slot.source) == (2, 3, "SLURM array")
    slot = resolve_job(env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
                            "SLURM_ARRAY_TASK_STEP": "2"})
    assert (slot.index, slot.count) == (2, 3)
    slot = resolve_job(env={"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (slot.index, slot.count, slot.source) == (5, 8, "torchrun RANK/WORLD_SIZE")
    assert (resolve_job(env={}).index, resolve_job(env={}).count) == (0, 1)
    with pytest.raises(CacheError, match="go together"):
        resolve_job(4, None, env={})
    with pytest.raises(CacheError, match=r"job index 4 is not in 0\.\.3"):
        resolve_job(4, 4, env={})
    with pytest.raises(CacheError, match="SLURM_ARRAY_TASK_ID=5 is not on the array's grid"):
        resolve_job(env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
                         "SLURM_ARRAY_TASK_STEP": "2"})


@pytest.mark.parametrize("num_jobs", [1, 2, 5, 7, 40])
def test_job_shares_partition_the_units(num_jobs):
    units = all_units(num_shards=9, num_seeds=23, seeds_per_unit=5)
    shares = [select_units(units, num_jobs, i) for i in range(num_jobs)]
    flat = [u for share in shares for u in share]
    assert sorted(flat) == sorted(units) and len(flat) == len(set(flat))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert units[-1].seeds == range(20, 23)        # the last seed block is partial


def test_manifest_is_created_once_when_jobs_start_together(tmp_path):
    wanted = {"format": "deit-pipeline teacher cache", "format_version": 1, "seeds": 3, "topk": 10,
              "teacher": {"name": "t", "weights_sha256": "a" * 64}}
    results, errors = all_at_once(
        lambda i: create_or_match_manifest(tmp_path / "cache", {**wanted, "created_by": i}), 8)
    assert not errors
    assert sum(created for _, created in results) == 1
    on_disk = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert all(manifest == on_disk for manifest, _ in results)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["manifest.json"]     # no temporaries left
    with pytest.raises(CacheError, match=r"top-k K: cache has 10, this run has 5"):
        create_or_match_manifest(tmp_path / "cache", {**wanted, "topk": 5})


def test_unit_locks_exclusive_stale_and_lost(tmp_path):
    root = tmp_path
    (root / "units").mkdir()
    unit = Unit(0, 3, 0, 2)
    first = try_lock(root, unit, stale_after=60)
    assert first is not None and first.generation == 0
    assert try_lock(root, unit, stale_after=60) is None              # held by a live process (us)
    # A holder on this host whose pid is gone is stale at once.
    dead = subprocess.Popen(["true"])
    dead.wait()
    first.path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert lock_is_stale(first.path, stale_after=60)
    second = try_lock(root, unit, stale_after=60)
    assert second is not None and second.generation == 1            # taken over, the old file kept
    assert not first.still_held() and second.still_held()
    first.release()                                                  # a loser must not remove anything
    assert second.path.exists()
    # No heartbeat for longer than stale_after (any host) is stale too.
    second.path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    old = time.time() - 120
    os.utime(second.path, (old, old))
    assert lock_is_stale(second.path, stale_after=60) and not lock_is_stale(second.path, stale_after=600)
    second.release()
    assert list((root / "units").iterdir()) == []                    # released top-down, nothing left


def test_leftovers_of_dead_jobs_are_cleaned_and_live_ones_kept(tmp_path):
    from data_shards.files import owned_name
    from teacher_cache.store import clean_leftovers
    root = tmp_path
    (root / "tmp").mkdir()
    (root / "units").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    dead_scratch = root / "tmp" / f"shard-000001_seeds-000000-000001@{host}@{dead.pid}@abc"
    dead_scratch.mkdir()
    (dead_scratch / "half-written").write_bytes(b"x")
    dead_json = root / "units" / f".shard-000001_seeds-000000-000001.json@{host}@{dead.pid}@abc.tmp"
    dead_json.write_text("{")
    live_scratch = root / "tmp" / owned_name("shard-000002_seeds-000000-000001")      # ours: alive
    live_scratch.mkdir()
    done_unit = Unit(0, 3, 0, 2)
    (root / "units" / f"{done_unit.name}.json").write_text("{}")
    (root / "units" / f"{done_unit.name}.lock.0").write_text("{}")       # died between commit and unlock
    pending = Unit(0, 4, 0, 2)
    (root / "units" / f"{pending.name}.lock.0").write_text(json.dumps({"host": host, "pid": os.getpid()}))
    assert clean_leftovers(root, stale_after=3600) == 3
    assert not dead_scratch.exists() and not dead_json.exists()
    assert not (root / "units" / f"{done_unit.name}.lock.0").exists()
    assert live_scratch.exists() and (root / "units" / f"{pending.name}.lock.0").exists()
