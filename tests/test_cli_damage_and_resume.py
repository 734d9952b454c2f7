"""Damaged caches through verify-cache / inspect-cache (every unit's files checked, damage reported
with exit code 1, never a generic error), and --resume across epoch counts: extended, finished,
cut back."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from _student_helpers import TINY_DEIT
from cache_fixtures import cache_options, file_states
from cli_runner import CLI, run_cli
from teacher_cache import TeacherCache, cache_teacher
from teacher_cache.layout import TOPK_INDICES, TOPK_LOGPROBS, storage_shard_path, unit_json_path


@pytest.fixture
def damaged_cache(tmp_path, reference_cache):
    """The reference cache with one unit of each kind of damage, and one unit not computed."""
    root = tmp_path / "cache"
    shutil.copytree(reference_cache, root)
    cache = TeacherCache.open(root)
    units = {u.name: u for u in cache.units()}
    names = sorted(units)
    corrupted, gone, no_file, garbled, truncated = names[0], names[3], names[5], names[7], names[9]
    path = storage_shard_path(root, TOPK_LOGPROBS, units[corrupted])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40                   # same size, a chunk whose crc no longer matches
    path.write_bytes(bytes(data))
    unit_json_path(root, units[gone]).unlink()     # not computed (a missing unit)
    storage_shard_path(root, TOPK_INDICES, units[no_file]).unlink()
    unit_json_path(root, units[garbled]).write_text("{ not json")
    path = storage_shard_path(root, TOPK_LOGPROBS, units[truncated])
    path.write_bytes(path.read_bytes()[:-100])
    return root, {"corrupted": corrupted, "gone": gone, "no_file": no_file, "garbled": garbled,
                  "truncated": truncated}


def test_verify_cache_finds_every_damage_at_any_sample_count(damaged_cache, small_shards):
    """The issue's case: at --samples 64 a corrupted chunk and a deleted unit passed (exit 0). Every unit's
    files are now checked whatever --samples; the damage exits 1 (bad input is 2)."""
    root, bad = damaged_cache
    before = file_states(root)
    result = run_cli([CLI, "verify-cache", root, "--shards", small_shards, "--samples", 1, "--device", "cpu",
                      "--json"])
    assert result.returncode == 1, result.output
    report = json.loads(result.stdout)
    damaged = {d["unit"]: d["problem"] for d in report["damaged_units"]}
    assert set(damaged) == {bad["corrupted"], bad["no_file"], bad["garbled"], bad["truncated"]}
    assert "sha256 differs" in damaged[bad["corrupted"]] and "is missing" in damaged[bad["no_file"]]
    assert "unreadable" in damaged[bad["garbled"]] and "bytes were committed" not in damaged[bad["corrupted"]]
    assert "were committed" in damaged[bad["truncated"]]
    assert report["missing_units"] == [bad["gone"]] and not report["complete"] and not report["ok"]
    assert report["units_done"] == 17 and report["files_checked"] == 17 * 2
    assert report["records"] >= 1 and report["mismatches"] == 0       # the intact units recompute exactly
    assert "delete the record" in report["fix"]
    text = run_cli([CLI, "verify-cache", root, "--shards", small_shards, "--samples", 1, "--device", "cpu"])
    assert text.returncode == 1 and "Traceback" not in text.output
    assert f"missing unit (not computed yet): {bad['gone']}" in text.output
    assert text.output.count("DAMAGED unit") == 4 and text.output.rstrip().endswith("FAILED")
    assert file_states(root) == before                           # verification changes nothing


def test_verify_cache_counts_distinct_pairs(reference_cache, small_shards):
    """The issue's "300 records over 38 pairs" counted one pair per batch picked (28 distinct)."""
    result = run_cli([CLI, "verify-cache", reference_cache, "--shards", small_shards, "--samples", 240,
                      "--device", "cpu", "--json"])
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["records"] == 240, result.output
    assert report["pairs"] == len(report["pairs_checked"]) == len({tuple(p) for p in report["pairs_checked"]})
    assert report["pairs"] <= 9 * 3 and report["digests_checked"] == 9 * report["pairs"]   # 9 digests a pair


def test_inspect_cache_reports_the_damage(damaged_cache):
    root, bad = damaged_cache
    result = run_cli([CLI, "inspect-cache", root, "--json"])
    assert result.returncode == 1, result.output
    info = json.loads(result.stdout)
    damage = {d["unit"]: d["problem"] for d in info["damage"]}
    # stat-level damage everywhere, and the corrupted chunk because the label sample reads every pair
    assert set(damage) == {bad["corrupted"], bad["no_file"], bad["garbled"], bad["truncated"]}
    assert "cannot be decoded" in damage[bad["corrupted"]]
    assert info["units"]["missing"] == 1 and info["units"]["damaged"] == 4
    assert info["teacher_quality"]["records_checked"] > 0                 # the rest is still measured
    text = run_cli([CLI, "inspect-cache", root])
    assert text.returncode == 1 and "DAMAGED (listed below)" in text.output and "Traceback" not in text.output
    assert bad["no_file"] in text.output and "fix          delete the record" in text.output


def test_a_partial_cache_fails_verification_unless_allowed(tmp_path, small_shards, teacher_checkpoint):
    """A cache still being computed: its missing units are listed; it fails (a training would stop at the
    first missing unit) unless --allow-incomplete."""
    out = tmp_path / "partial"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, max_units=3))
    args = [CLI, "verify-cache", out, "--shards", small_shards, "--samples", 4, "--device", "cpu"]
    strict = run_cli(args)
    assert strict.returncode == 1 and "15 missing" in strict.output and "FAILED" in strict.output
    assert "to compute the missing units" in strict.output
    allowed = run_cli([*args, "--allow-incomplete"])
    assert allowed.returncode == 0 and "(allowed: --allow-incomplete)" in allowed.output, allowed.output


def test_verify_cache_on_a_cache_with_no_unit_yet(tmp_path, small_shards, teacher_checkpoint):
    out = tmp_path / "empty"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, max_units=0))
    result = run_cli([CLI, "verify-cache", out, "--shards", small_shards, "--device", "cpu"])
    assert result.returncode == 1 and "units 0/18 computed" in result.output and "no record recomputed" in result.output


# ----------------------------------------------------------------------------- resume across epochs

def test_resume_extends_finishes_and_refuses_cutting_back(tmp_path, small_shards, caplog):
    run = tmp_path / "run"
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_DEIT.items()]
    args = [CLI, "train-student", "--shards", small_shards, "--out", run, "--distillation-type", "none",
            "--batch-size", 32, "--max-steps-per-epoch", 1, "--warmup-epochs", 0, "--workers", 0,
            "--no-progress", "--device", "cpu", *tiny, "--num-seeds", 3]
    first = run_cli([*args, "--epochs", 1])
    assert first.returncode == 0, first.output
    assert "Cosine annealing scheduler will have no effect" not in caplog.text + first.output   # timm, 1 epoch
    assert "a cache of" not in first.output and "--num-seeds 3 serves 3 epochs" in first.output
    checkpoint = run / "checkpoint.pt"
    before = file_states(run)

    done = run_cli([*args, "--epochs", 1, "--resume"])
    assert done.returncode == 0 and "nothing to do" in done.output and "trained" not in done.output, done.output
    assert file_states(run) == before                        # nothing rewritten

    longer = run_cli([*args, "--epochs", 2, "--resume"])
    assert longer.returncode == 0, longer.output
    assert "trained 1 epoch(s) (epochs 1..1, resumed)" in longer.output
    assert "cosine schedule now spans 2 epochs" in longer.output
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2 and ckpt["scheduler"]["t_initial"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line.get("event") == "epoch"] == [0, 1]

    after = file_states(run)
    shorter = run_cli([*args, "--epochs", 1, "--resume"])
    assert shorter.returncode == 2 and "has trained 2 epochs, more than --epochs 1" in shorter.output
    assert file_states(run) == after

    over = run_cli([*args, "--epochs", 4, "--resume"])             # 4 epochs need 3 * ceil(4/3) = 6 seeds
    assert over.returncode == 2 and "--num-seeds is 3" in over.output and "pass --num-seeds 6" in over.output
    assert file_states(run) == after
    more_seeds = run_cli([*args[:-1], 6, "--epochs", 4, "--resume"])    # the epochs trained keep their seeds
    assert more_seeds.returncode == 0 and "trained 2 epoch(s) (epochs 2..3, resumed)" in more_seeds.output, \
        more_seeds.output
