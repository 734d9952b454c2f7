"""Fixtures and helpers for the stage-one tests (imported by tests/test_cache_*.py).

Real data only: scikit-learn's digits as shards, and small timm teachers that the tests
build and save themselves (no downloads). Input size 32 and shards of 40 images keep a
whole cache under a couple of seconds while giving many units (a partial last shard and
a partial last seed block included).
"""
from __future__ import annotations

import hashlib
import shutil
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import CLI
from data_shards import AugRecipe, make_shards

TEACHER_ARCH = "test_efficientnet"
RECIPE = AugRecipe(input_size=32)
SEEDS = 3
SEEDS_PER_UNIT = 2
GROWN = 5                 # seeds of the grown reference cache (3 -> 5: the short block {2} stays as it is)
REPO = Path(__file__).resolve().parents[1]


def make_teacher(seed: int = 0, arch: str = TEACHER_ARCH, num_classes: int = 10) -> torch.nn.Module:
    """A randomly initialised small timm convnet; the head is scaled so its predictions vary."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(30.0)
    return model


def cache_kwargs(**overrides) -> dict:
    base = dict(teacher=TEACHER_ARCH, seeds=SEEDS, seeds_per_unit=SEEDS_PER_UNIT, recipe=RECIPE, batch_size=16,
                device="cpu", progress=False, log=lambda msg: None)
    base.update(overrides)
    return base


def cache_options(shards, out, teacher_checkpoint, **overrides):
    """The options of the tests' caches (cli_args() is the same on the command line)."""
    from teacher_cache import CacheOptions
    return CacheOptions(shards, out, teacher_checkpoint=teacher_checkpoint, **cache_kwargs(**overrides))


def cli_args(shards, out, checkpoint, *extra, seeds: int = SEEDS) -> list[str]:
    """The cache-teacher command line equivalent to cache_kwargs()."""
    return [CLI, "cache-teacher", "--shards", str(shards), "--out", str(out), "--teacher", TEACHER_ARCH,
            "--teacher-checkpoint", str(checkpoint), "--seeds", str(seeds), "--seeds-per-unit", str(SEEDS_PER_UNIT),
            "--input-size", "32", "--batch-size", "16", "--device", "cpu", "--no-progress", *extra]


def cache_snapshot(root: Path) -> dict:
    """Everything that must be identical between two computations of the same cache:
    the storage files' bytes, the arrays' values, and each unit's digests and file hashes."""
    import zarr
    root = Path(root)
    files = {}
    for folder, _, names in os.walk(root / "arrays.zarr"):
        for name in names:
            path = Path(folder) / name
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    arrays = {}
    for name in ("topk_indices", "topk_logprobs", "logits"):
        if (root / "arrays.zarr" / name).is_dir():
            arrays[name] = np.asarray(zarr.open_array(str(root / "arrays.zarr" / name), mode="r")[:])
    units = {}
    for path in sorted((root / "units").glob("*.json")):
        record = json.loads(path.read_text())
        units[path.stem] = {"digests": record["digests"], "files": record["files"], "count": record["count"]}
    return {"files": files, "arrays": arrays, "units": units}


def assert_same_cache(a: Path, b: Path) -> None:
    sa, sb = cache_snapshot(a), cache_snapshot(b)
    assert sa["units"].keys() == sb["units"].keys()
    assert sa["units"] == sb["units"]
    assert sa["files"] == sb["files"]
    assert sa["arrays"].keys() == sb["arrays"].keys()
    for name in sa["arrays"]:
        np.testing.assert_array_equal(sa["arrays"][name], sb["arrays"][name])


def job_summaries(procs) -> list[dict]:
    """Wait for concurrent `cache-teacher --json` processes; each must succeed; their JSON summaries."""
    summaries = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    return summaries


def leftovers(root: Path) -> list[str]:
    """Scratch folders, half-written files and lock files a finished run should not leave."""
    root = Path(root)
    out = [p for p in (root / "tmp").glob("*")] if (root / "tmp").is_dir() else []
    out += list(root.glob(".*")) + list((root / "units").glob(".*")) + list((root / "units").glob("*.lock.*"))
    return sorted(str(p) for p in out)


def digits_val_shards(tmp_path_factory, shard_size: int) -> Path:
    root = tmp_path_factory.mktemp(f"cache_shards_{shard_size}") / "val"
    make_shards("digits", root, split="val", shard_size=shard_size, progress=False)
    return root


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """Digits' val split (354 images) in shards of 40: 9 shards, the last one with 34."""
    return digits_val_shards(tmp_path_factory, 40)


@pytest.fixture(scope="session")
def other_shards(tmp_path_factory) -> Path:
    """Same images, other shard size: another content hash."""
    return digits_val_shards(tmp_path_factory, 50)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """The test teacher saved in DeiT's format: {'model': state_dict}."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": make_teacher().state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, small_shards, teacher_checkpoint) -> Path:
    """One uninterrupted single-job run: what every other way of computing must reproduce."""
    from teacher_cache import cache_teacher
    out = tmp_path_factory.mktemp("reference") / "cache"
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint))
    return out


def file_states(root: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, inode and mtime of every file: equal states mean the file was neither changed nor replaced."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


def assert_untouched(before: dict, root: Path) -> None:
    """Every file of `before` except the manifest (growth's commit point) is still the same file, same bytes."""
    after = file_states(root)
    for rel, state in before.items():
        if rel != "manifest.json":
            assert after.get(rel) == state, f"{rel} was rewritten by the growth"


def copy_to_grow(reference: Path, tmp_path: Path, shards: Path, checkpoint: Path) -> tuple[Path, dict, list[str]]:
    """A copy of `reference`, its file states, and the cache-teacher command line growing it to GROWN seeds."""
    out = copy_cache(reference, tmp_path / "cache")
    return out, file_states(out), cli_args(shards, out, checkpoint, seeds=GROWN)


def assert_grown_like(reference: Path, out: Path, before: dict) -> None:
    """A grown cache: nothing committed before the growth changed, it equals `reference`, no leftovers."""
    assert_untouched(before, out)
    assert_same_cache(reference, out)
    assert leftovers(out) == []


def all_at_once(call, count: int) -> tuple[list, list[Exception]]:
    """call(i) for i < count in threads released together; returns (results, exceptions raised)."""
    barrier, results, errors = threading.Barrier(count), [], []

    def run(i):
        barrier.wait()
        try:
            results.append(call(i))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def copy_cache(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="session")
def grown_reference(tmp_path_factory, small_shards, teacher_checkpoint, reference_cache) -> Path:
    """The reference cache grown from 3 to 5 seeds by one uninterrupted job."""
    from teacher_cache import cache_teacher
    out = copy_cache(reference_cache, tmp_path_factory.mktemp("grown") / "cache")
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, seeds=GROWN))
    return out
