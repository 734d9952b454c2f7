"""The stage-one commands: inspect-cache, verify-cache, refusals and bad input as one clear line."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from cache_fixtures import RECIPE, SEEDS, TEACHER_ARCH, cache_kwargs, cache_options, make_teacher
from cli_runner import CLI, run_cli
from data_shards import ShardSet
from replay_helpers import replay_shard
from teacher_cache import CacheError, CacheOptions, TeacherCache, cache_teacher
from teacher_cache.layout import LOGITS, TOPK_INDICES, TOPK_LOGPROBS, storage_shard_path
from teacher_cache.store import commit_unit


@pytest.fixture
def cache_copy(tmp_path, reference_cache):
    dest = tmp_path / "copy"
    shutil.copytree(reference_cache, dest)
    return dest


def test_inspect_cache_reports_units_bytes_and_teacher_quality(reference_cache, small_shards):
    result = run_cli([CLI, "inspect-cache", reference_cache, "--json"])
    assert result.returncode == 0, result.output
    info = json.loads(result.stdout)
    assert info["units"] == {"total": 18, "done": 18, "missing": 0, "missing_names": [], "locks_present": [],
                             "damaged": 0}
    assert info["damage"] == [] and info["fix"] is None
    assert info["records"] == {"done": 354 * SEEDS, "total": 354 * SEEDS}
    bpr = info["bytes_per_record"]
    assert 0 < bpr["arrays"] < bpr["total"] and bpr["arrays"] <= 32
    assert info["bytes"]["arrays"] == sum(info["bytes"]["per_array"].values())

    # Recompute the label statistics independently, from replay_shard's own partner and lambda.
    cache = TeacherCache.open(reference_cache)
    shard_set = ShardSet.open(small_shards)
    top1 = dominant = mass = 0.0
    for shard in range(shard_set.num_shards):
        for seed in range(SEEDS):
            pred = cache.read(shard, seed)
            for r in replay_shard(shard_set.read_shard(shard), seed, RECIPE):
                p = int(pred.label[r.position])
                top1 += p == r.label
                dominant += p == (r.label if r.lam >= 0.5 else r.partner_label)
                mass += float(pred.topk_logprobs[r.position].double().exp().sum())
    n = 354 * SEEDS
    q = info["teacher_quality"]
    assert q["records_checked"] == n
    assert q["top1_vs_label"] == pytest.approx(top1 / n, abs=1e-6)
    assert q["agreement_with_dominant_label"] == pytest.approx(dominant / n, abs=1e-6)
    assert q["mean_topk_mass"] == pytest.approx(mass / n, abs=1e-5)
    assert [row["seed"] for row in info["per_seed"]] == list(range(SEEDS))

    text = run_cli([CLI, "inspect-cache", reference_cache])
    assert text.returncode == 0
    assert "18/18 done" in text.output and "B/record" in text.output and "per seed" in text.output
    assert "soft targets exact at any τ" in text.output        # top-10 of 10 classes
    assert set(info["soft_target_tv_bound_by_tau"].values()) == {0.0}


def test_inspect_cache_counts_the_units_of_seeds_it_did_not_sample(reference_cache):
    from teacher_cache.inspection import inspect_cache
    info = inspect_cache(reference_cache, max_label_records=1)      # labels read from one (shard, seed) only
    sampled = [row for row in info["per_seed"] if row["records_checked"]]
    assert len(sampled) == 1 and len(info["per_seed"]) == SEEDS
    assert [row["units_done"] for row in info["per_seed"]] == [info["shards"]["num_shards"]] * SEEDS   # all done


def test_inspect_cache_lists_missing_units(tmp_path, small_shards, teacher_checkpoint):
    out = tmp_path / "partial"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, max_units=4))
    info = json.loads(run_cli([CLI, "inspect-cache", out, "--json"]).stdout)
    assert (info["units"]["done"], info["units"]["missing"]) == (4, 14)
    assert info["records"]["done"] == 4 * 40 * 2          # the first four units: shards 0-3, seeds 0-1
    assert "shard-000004_seeds-000000-000001" in info["units"]["missing_names"]


def test_verify_cache_passes_on_a_good_cache(reference_cache, small_shards):
    result = run_cli([CLI, "verify-cache", reference_cache, "--shards", small_shards, "--samples", 40, "--json"])
    assert result.returncode == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["records"] == 40 and report["argmax_agreement"] == 1.0
    assert report["max_logprob_diff"] == 0.0            # same machine, same precision: bit-identical
    # 9 digests (3 at the start of each third of the mixing order) per (shard, seed) checked
    assert report["digests_checked"] == 9 * report["pairs"] and not report["digest_mismatches"]
    assert report["pairs"] == len({tuple(p) for p in report["pairs_checked"]})           # distinct pairs
    assert report["files_checked"] == 18 * 2 and not report["file_hash_mismatches"]     # every unit, both arrays
    assert report["complete"] and report["units_missing"] == 0 and report["damaged_units"] == []


def test_verify_cache_fails_when_stored_argmax_is_wrong(cache_copy, small_shards):
    """Rewrite every unit properly (valid files, matching hashes) but with the top-1 and the top-10 class
    swapped: only the recomputation can notice; it is a real mismatch, which fails at any threshold."""
    cache = TeacherCache.open(cache_copy)
    for unit in cache.units():
        record = cache.unit_record(unit)
        rows = slice(unit.shard * 40, unit.shard * 40 + 40)
        buffers = {}
        for name in cache.array_names:
            import zarr
            arr = zarr.open_array(str(cache_copy / "arrays.zarr" / name), mode="r")
            buffers[name] = np.asarray(arr[unit.seed_start:unit.seed_stop, rows])
        buffers[TOPK_INDICES][..., [0, -1]] = buffers[TOPK_INDICES][..., [-1, 0]]
        commit_unit(cache_copy, unit, 40, buffers, {k: v for k, v in record.items() if k != "files"})
    result = run_cli([CLI, "verify-cache", cache_copy, "--shards", small_shards, "--samples", 16])
    assert result.returncode == 1, result.output
    assert "argmax agreement 0.00%" in result.output and "FAILED" in result.output
    assert "real mismatches 16 (always fail), near-ties 0" in result.output
    lenient = run_cli([CLI, "verify-cache", cache_copy, "--shards", small_shards, "--samples", 16, "--min-agreement", 0])
    assert lenient.returncode == 1 and "real mismatches 16" in lenient.output, lenient.output


@pytest.mark.parametrize("edit", ["changed", "dropped"])
def test_verify_cache_fails_when_recorded_digests_were_edited(cache_copy, small_shards, edit):
    """Every unit record keeps valid files but each seed's recorded digests are edited: one digest
    changed (the teacher saw other pixels), or one dropped (a digest position not recorded). Only
    the replay can tell; verify-cache names the sample and exits 1."""
    edited = set()
    for path in sorted((cache_copy / "units").glob("*.json")):
        record = json.loads(path.read_text())
        for seed, digests in record["digests"].items():
            key = sorted(digests)[4]     # one of the 9 (3 at the start of each third of the order)
            if edit == "changed":
                digests[key] = "0" * 32
            else:
                del digests[key]
            edited.add(f"{key}@seed{seed}")
        path.write_text(json.dumps(record))
    args = [CLI, "verify-cache", cache_copy, "--shards", small_shards, "--samples", 8]
    result = run_cli([*args, "--json"])
    assert result.returncode == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"] and report["argmax_agreement"] == 1.0
    assert not report["file_hash_mismatches"] and report["pairs"] == 1
    assert report["digests_checked"] == 9
    assert len(report["digest_mismatches"]) == 1 and set(report["digest_mismatches"]) <= edited
    if edit == "changed":
        text = run_cli(args)
        assert text.returncode == 1 and "replay digests 8/9 match" in text.output, text.output


def test_verify_cache_max_logprob_diff_bounds_the_stored_values(cache_copy, small_shards):
    """Every unit rewritten properly with its top-k log-probs shifted by 0.01 (argmax and files
    consistent): only --max-logprob-diff notices; without it the cache passes (argmax agreement is
    all it asks)."""
    import zarr
    cache = TeacherCache.open(cache_copy)
    for unit in cache.units():
        record = cache.unit_record(unit)
        rows = slice(unit.shard * 40, unit.shard * 40 + 40)
        arrays = {name: zarr.open_array(str(cache_copy / "arrays.zarr" / name), mode="r")
                  for name in cache.array_names}
        buffers = {name: np.asarray(array[unit.seed_start:unit.seed_stop, rows])
                   for name, array in arrays.items()}
        buffers[TOPK_LOGPROBS] = buffers[TOPK_LOGPROBS] - np.float16(0.01)
        unfiled = {k: v for k, v in record.items() if k != "files"}
        commit_unit(cache_copy, unit, 40, buffers, unfiled)
    args = [CLI, "verify-cache", cache_copy, "--shards", small_shards, "--samples", 8, "--json"]
    lenient = json.loads(run_cli(args).stdout)
    assert lenient["ok"] and lenient["argmax_agreement"] == 1.0
    assert 0.005 < lenient["max_logprob_diff"] < 0.02
    strict = run_cli([*args, "--max-logprob-diff", 0.001])
    assert strict.returncode == 1 and not json.loads(strict.stdout)["ok"], strict.output


def test_verify_cache_fails_on_a_changed_storage_file(cache_copy, small_shards):
    cache = TeacherCache.open(cache_copy)
    for unit in cache.units():                      # change every unit so any sample sees it
        path = storage_shard_path(cache_copy, TOPK_LOGPROBS, unit)
        data = bytearray(path.read_bytes())
        data[-30] ^= 0x01                           # inside the shard index: crc catches it on read too
        path.write_bytes(bytes(data))
    result = run_cli([CLI, "verify-cache", cache_copy, "--shards", small_shards, "--samples", 8])
    assert result.returncode == 1, result.output           # damage: reported, exit 1 (bad input is 2)
    assert result.output.count("DAMAGED unit") == 10 and "FAILED" in result.output   # the text shows 10
    assert "sha256 differs" in result.output and "Traceback" not in result.output


def test_verify_cache_fails_on_a_storage_file_swapped_with_another_units(cache_copy, small_shards):
    """A whole valid file in the wrong place decodes fine: only the recorded sha256 can tell."""
    cache = TeacherCache.open(cache_copy)
    for block in (0, 1):                            # rotate the files within each seed block
        paths = [storage_shard_path(cache_copy, TOPK_LOGPROBS, u) for u in cache.units() if u.seed_block == block]
        contents = [p.read_bytes() for p in paths]
        for path, data in zip(paths, contents[1:] + contents[:1]):
            path.write_bytes(data)
    result = run_cli([CLI, "verify-cache", cache_copy, "--shards", small_shards, "--samples", 8, "--json"])
    assert result.returncode == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"] and len(report["damaged_units"]) == len(report["file_hash_mismatches"]) == 18
    assert report["records"] == 0          # no intact unit is left to recompute
    assert "delete the record" in report["fix"] and "UNIT.json of each damaged unit" in report["fix"]


def test_verify_cache_refuses_other_weights(reference_cache, small_shards, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": make_teacher(seed=9).state_dict()}, other)
    result = run_cli([CLI, "verify-cache", reference_cache, "--shards", small_shards, "--teacher-checkpoint", other])
    assert result.returncode == 2 and "teacher weights" in result.output and "differ" in result.output


@pytest.mark.parametrize("change, expected", [
    (dict(topk=5), r"top-k K: cache has 10, this run has 5"),
    (dict(seeds=2), r"holds 3 seeds \(0\.\.2\); --seeds 2 would shrink it"),        # a larger --seeds grows it
    (dict(batch_size=8), r"--batch-size \(batch composition changes GPU results\): cache has 16, this run has 8"),
    (dict(channels_last=True), r"--channels-last: cache has False, this run has True"),
    (dict(recipe=dataclasses.replace(RECIPE, hflip=0.0)), r"recipe hflip: cache 0.5, this run 0.0"),
    (dict(store_logits="full"), r"--store-logits: cache has 'topk', this run has 'full'"),
    (dict(teacher_checkpoint="OTHER"), r"teacher weights \(sha256 of the state dict\): cache has"),
    (dict(shards="OTHER"), r"shards content hash: cache has"),
])
def test_rerun_with_different_settings_is_refused(cache_copy, small_shards, other_shards, teacher_checkpoint,
                                                  tmp_path, change, expected):
    other = tmp_path / "other.pth"
    torch.save({"model": make_teacher(seed=5).state_dict()}, other)
    kwargs = cache_kwargs(teacher_checkpoint=teacher_checkpoint)
    kwargs.update(change)
    if kwargs["teacher_checkpoint"] == "OTHER":
        kwargs["teacher_checkpoint"] = other
    shards = other_shards if kwargs.pop("shards", None) == "OTHER" else small_shards
    before = sorted(p.name for p in (cache_copy / "units").iterdir())
    with pytest.raises(CacheError, match=expected):
        cache_teacher(CacheOptions(shards, cache_copy, **kwargs))
    assert sorted(p.name for p in (cache_copy / "units").iterdir()) == before


def test_a_rerun_differing_in_several_settings_names_each_before_loading_the_teacher(
        cache_copy, small_shards, teacher_checkpoint, monkeypatch):
    """README: a rerun with other settings is "refused before the teacher is loaded, naming every
    difference"."""
    import teacher_cache.build as build

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the settings were compared")

    monkeypatch.setattr(build, "load_teacher", no_teacher)
    kwargs = cache_kwargs(teacher_checkpoint=teacher_checkpoint, topk=5, batch_size=8,
                          channels_last=True, store_logits="full",
                          recipe=dataclasses.replace(RECIPE, hflip=0.0))
    before = sorted(p.name for p in (cache_copy / "units").iterdir())
    with pytest.raises(CacheError) as refused:
        cache_teacher(CacheOptions(small_shards, cache_copy, **kwargs))
    for expected in ("top-k K: cache has 10, this run has 5",
                     "--batch-size (batch composition changes GPU results): cache has 16, this run "
                     "has 8",
                     "--channels-last: cache has False, this run has True",
                     "--store-logits: cache has 'topk', this run has 'full'",
                     "recipe hflip: cache 0.5, this run 0.0"):
        assert expected in str(refused.value)
    assert sorted(p.name for p in (cache_copy / "units").iterdir()) == before


def test_cli_refusal_and_bad_arguments_are_one_clear_line(cache_copy, small_shards, teacher_checkpoint, tmp_path):
    base = ["cache-teacher", "--shards", small_shards, "--teacher", TEACHER_ARCH, "--input-size", 32,
            "--device", "cpu", "--no-progress"]
    cases = [
        ([*base, "--out", cache_copy, "--teacher-checkpoint", teacher_checkpoint, "--topk", 3],
         "top-k K: cache has 10, this run has 3"),
        ([*base, "--out", tmp_path / "a", "--teacher-checkpoint", teacher_checkpoint, "--seeds", 2, "--topk", 11],
         "--topk 11 must be between 1 and the class count 10"),
        ([*base, "--out", tmp_path / "b", "--teacher-checkpoint", teacher_checkpoint, "--seeds", 0],
         "Invalid value for '--seeds': 0 is not in the range x>=1"),
        ([*base, "--out", tmp_path / "c", "--teacher-checkpoint", teacher_checkpoint],
         "--seeds S is required"),
        ([*base, "--out", tmp_path / "d", "--teacher-checkpoint", tmp_path / "missing.pth", "--seeds", 2],
         "missing.pth not found"),
        (["cache-teacher", "--shards", small_shards, "--out", tmp_path / "e", "--teacher", "no_such_net",
          "--teacher-checkpoint", teacher_checkpoint, "--seeds", 2, "--device", "cpu"], "unknown teacher 'no_such_net'"),
        ([*base, "--out", tmp_path / "f", "--teacher-checkpoint", teacher_checkpoint, "--seeds", 2, "--precision", "fp16"],
         "fp16 autocast needs a CUDA device"),
        ([*base, "--out", tmp_path / "g", "--teacher-checkpoint", teacher_checkpoint, "--seeds", 2,
          "--num-jobs", 2, "--job-index", 2], "job index 2 is not in 0..1"),
        (["cache-teacher", "--shards", tmp_path / "nowhere", "--out", tmp_path / "h", "--seeds", 2],
         "is not a shard folder"),
        (["inspect-cache", tmp_path / "nowhere"], "not found"),
        (["verify-cache", small_shards, "--shards", small_shards], "manifest.json not found"),
    ]
    for args, message in cases:
        result = run_cli([CLI, *args])
        assert result.returncode == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert result.output.count("Error: ") == 1
    for name in "abcdefgh":                       # refused before creating anything
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_cli_creates_and_resumes_a_cache(tmp_path, small_shards, teacher_checkpoint, reference_cache):
    from cache_fixtures import assert_same_cache
    out = tmp_path / "cli"
    args = ["cache-teacher", "--shards", small_shards, "--out", out, "--teacher", TEACHER_ARCH,
            "--teacher-checkpoint", teacher_checkpoint, "--seeds", SEEDS, "--seeds-per-unit", 2, "--input-size", 32,
            "--batch-size", 16, "--device", "cpu", "--no-progress"]
    first = run_cli([CLI, *args, "--max-units", 5, "--json"])
    assert first.returncode == 0, first.output
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    assert summary["units_computed"] == 5 and summary["units_this_job_missing"] == 13
    # The rest: only --shards/--out (+ the recipe read back from the manifest, as a user may pass it).
    second = run_cli([CLI, "cache-teacher", "--shards", small_shards, "--out", out, "--recipe", out / "manifest.json",
                      "--device", "cpu", "--no-progress"])
    assert second.returncode == 0, second.output
    assert "computed 13 unit(s)" in second.output and "whole cache 18/18 units" in second.output
    assert_same_cache(reference_cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["checkpoint_sha256"] and manifest["recipe"] == RECIPE.to_dict()
    assert {"torch", "timm", "zarr", "numpy"} <= set(manifest["library_versions"])
    assert LOGITS not in manifest["arrays"]
