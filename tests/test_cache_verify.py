"""verify-cache recomputes records in the batches that produced them, and tells near-ties from real mismatches."""
from __future__ import annotations

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
    other = verify_cache(out, small_shards, samples=48, device="cpu")
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
