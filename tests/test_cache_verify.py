"""verify-cache recomputes records in the batches that produced them, and tells near-ties from real mismatches."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cache_fixtures import cache_options
from teacher_cache import cache_teacher
from teacher_cache import teacher as teacher_module
from teacher_cache import verification
from teacher_cache.verification import classify, verify_cache


@pytest.fixture
def batch_dependent_teacher(monkeypatch):
    """Every teacher call adds 5x the batch's mean pixel to class 0's logit: like bf16 on a GPU (only much
    stronger), a record's numbers depend on which images share its batch."""
    original = teacher_module.teacher_logits

    def logits_of_batch(model, images, precision="fp32", channels_last=False):
        logits = original(model, images, precision, channels_last)
        logits[:, 0] += 5.0 * images.float().mean().item()
        return logits

    monkeypatch.setattr(teacher_module, "teacher_logits", logits_of_batch)       # cache-teacher's path
    monkeypatch.setattr(verification, "teacher_logits", logits_of_batch)         # verify-cache's path


@pytest.mark.slow
def test_records_are_recomputed_in_their_original_batches(tmp_path, small_shards, teacher_checkpoint,
                                                          batch_dependent_teacher, monkeypatch):
    out = tmp_path / "cache"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, batch_size=7, topk=3))   # a tail of 7 classes
    report = verify_cache(out, small_shards, samples=48, device="cpu")
    assert report["ok"] and report["argmax_agreement"] == 1.0 and report["max_logprob_diff"] == 0.0, report
    assert report["max_tail_logsumexp_diff"] == 0.0, report
    assert report["batch_sizes"] == [7] and report["channels_last"] == [False]
    assert report["near_ties"] == report["mismatches"] == 0
    # Control: the same check in other batches (what verify-cache did before) does not reproduce the cache.
    monkeypatch.setattr(verification, "unit_batch_settings", lambda cache, unit: (16, False))
    # (argmax flips depend on the images; the log-prob bound does not: held to 0.01, as above)
    other = verify_cache(out, small_shards, samples=48, device="cpu", max_logprob_diff=0.01)
    assert not other["ok"] and other["max_logprob_diff"] > 0.01, other
    assert other["max_tail_logsumexp_diff"] > 0.01, other


def test_near_ties_and_real_mismatches_on_constructed_records():
    tol = 0.05
    indices = torch.tensor([2, 0, 1])
    stored = torch.tensor([-0.69, -0.70, -3.0])            # class 2 first, class 0 a hair behind
    recomputed = torch.tensor([-0.70, -3.0, -0.69, -9.0])  # class 2 still first
    assert classify(indices, stored, recomputed, tol) == "match"
    flipped = torch.tensor([-0.68, -3.0, -0.70, -9.0])     # class 0 now first by 0.02 nats: a near-tie
    assert classify(indices, stored, flipped, tol) == "near-tie"
    assert classify(indices, stored, flipped, tolerance=0.01) == "mismatch"
    far = torch.tensor([-0.2, -3.0, -1.8, -9.0])           # class 0 first by 1.6 nats: real
    assert classify(indices, stored, far, tol) == "mismatch"
    # A tampered record is never a near-tie: its stored top-1 (class 1) is far behind in the recomputation ...
    assert classify(torch.tensor([1, 0, 2]), stored, recomputed, tol) == "mismatch"
    # ... even when the tampered class is close, if the stored value is not that class's value.
    close = torch.tensor([-0.68, -0.70, -3.5, -9.0])
    assert classify(torch.tensor([1, 0, 2]), torch.tensor([-0.2, -0.70, -3.0]), close, tol) == "mismatch"
    assert classify(torch.tensor([1, 0, 2]), torch.tensor([-0.69, -0.70, -3.0]), close, tol) == "near-tie"


def test_a_cache_written_before_batch_size_was_recorded_still_verifies(tmp_path, reference_cache, small_shards):
    """Older manifests lack batch_size / channels_last / seed_generations: the unit records and documented
    defaults stand in."""
    import json
    out = tmp_path / "old"
    shutil.copytree(reference_cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("batch_size", "channels_last", "seed_generations"):
        manifest.pop(key)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for path in (out / "units").glob("*.json"):
        record = json.loads(path.read_text())
        record.pop("channels_last")
        path.write_text(json.dumps(record))
    report = verify_cache(out, small_shards, samples=24, device="cpu")
    assert report["ok"] and report["batch_sizes"] == [16] and report["channels_last"] == [False], report


@pytest.fixture
def flipped_top_two(monkeypatch):
    """verify-cache's teacher swaps every record's two best logits: each recomputed argmax is the
    cached second class: a near-tie at a wide tolerance (the two log-probs trade places)."""
    original = verification.teacher_logits

    def swapped(model, images, precision="fp32", channels_last=False):
        logits = original(model, images, precision, channels_last)
        top = logits.topk(2, dim=1).indices
        return logits.scatter(1, top, logits.gather(1, top.flip(1)))

    monkeypatch.setattr(verification, "teacher_logits", swapped)


def with_recorded_device(cache, **fields):
    """Rewrite every unit record's device fields (None removes one), as another machine would."""
    for path in (cache / "units").glob("*.json"):
        record = json.loads(path.read_text())
        for key, value in fields.items():
            record.pop(key, None)
            if value is not None:
                record[key] = value
        path.write_text(json.dumps(record))


def test_near_ties_fail_on_the_same_kind_of_device_and_are_expected_on_another(
        tmp_path, reference_cache, small_shards, flipped_top_two):
    from cli_runner import CLI, run_cli
    from data_shards.devices import device_kind

    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    kinds = {json.loads(p.read_text())["device_kind"] for p in (cache / "units").glob("*.json")}
    assert kinds == {device_kind("cpu")}                  # cache-teacher notes its kind of device
    wide = dict(samples=16, device="cpu", near_tie_tolerance=1e3)
    same = verify_cache(cache, small_shards, **wide)
    assert not same["ok"] and same["near_ties"] == same["records"] == 16, same
    assert same["other_kind_records"] == 0 and same["same_kind_agreement"] == 0.0
    assert same["recorded_device_kinds"] == [device_kind("cpu")]

    gpu = "cuda NVIDIA H200 sm_90"
    with_recorded_device(cache, device="cuda:0", device_kind=gpu)          # as if built on a GPU
    other = verify_cache(cache, small_shards, **wide)
    assert other["ok"] and other["other_kind_records"] == other["other_kind_near_ties"] == 16, other
    assert other["argmax_agreement"] == 0.0 and other["same_kind_agreement"] is None
    assert other["digests_checked"] > 0 and other["digest_mismatches"] == []
    # The verdict still rests on real mismatches: at the default tolerance the swaps are too wide.
    assert not verify_cache(cache, small_shards, samples=16, device="cpu")["ok"]
    result = run_cli([CLI, "verify-cache", cache, "--shards", small_shards, "--samples", 16,
                      "--device", "cpu", "--near-tie-tolerance", 1000])
    assert result.returncode == 0, result.output
    assert (f"16 of 16 records recomputed on {device_kind('cpu')}, not on cache-teacher's {gpu}: "
            "their 16 near-ties are expected and do not fail") in result.stdout

    # Records from before device kinds were noted: their device type stands in for the kind.
    with_recorded_device(cache, device="cuda:0", device_kind=None)
    assert verify_cache(cache, small_shards, **wide)["ok"]
    with_recorded_device(cache, device="cpu", device_kind=None)
    assert not verify_cache(cache, small_shards, **wide)["ok"]


@pytest.mark.slow
def test_the_gpu_check_runs_at_toy_sizes_on_the_cpu(tmp_path):
    """bench/gpu_cache_verify.py --smoke: every step of the GPU check (finishing equality,
    cache-teacher and the stage-one ratio, verify-cache on the device and on the CPU), CPU only."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "bench" / "gpu_cache_verify.py"
    run = subprocess.run([sys.executable, str(script), "--smoke", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "the GPU steps run on the CPU and compare the CPU with itself" in run.stdout
    assert "finishing deit: items differing cpu vs cpu: 0/4" in run.stdout
    assert "finishing fast: items differing cpu vs cpu: 0/4" in run.stdout
    result = json.loads((tmp_path / "gpu_cache_verify.json").read_text())
    assert result["smoke"] and result["ratio"] > 0
    assert result["verify"]["device"]["ok"] and result["verify"]["cpu"]["ok"]
    cpu = result["verify"]["cpu"]
    assert cpu["digests_checked"] > 0 and cpu["digest_mismatches"] == []
    assert run.stdout.splitlines()[-1].startswith("| cpu | test_efficientnet | 8 | fp32")


def test_a_unit_record_whose_channels_last_is_null_falls_back_to_the_device_rule(tmp_path,
                                                                                reference_cache):
    """a612b5f: `"channels_last": null` (as a missing key) means the unit was computed before the
    setting was recorded, when it was implicitly on for CUDA: the device decides. A recorded value
    is kept."""
    import json
    from teacher_cache import TeacherCache
    from teacher_cache.verification import unit_batch_settings
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    paths = sorted((out / "units").glob("*.json"))
    cases = [("cuda:0", None), ("cpu", None), ("cuda:1", False), ("cpu", True)]
    for path, (device, flag) in zip(paths, cases):
        record = json.loads(path.read_text())
        record.update(device=device, channels_last=flag)
        path.write_text(json.dumps(record))
    cache = TeacherCache.open(out)
    units = {u.name: u for u in cache.units()}
    settings = [unit_batch_settings(cache, units[path.stem]) for path in paths[:4]]
    assert settings == [(16, True), (16, False), (16, False), (16, True)]
