"""Bad caches: every command that reads one stops with a message naming the problem and the
fix, through the real CLI (cli_runner, in process: no traceback from deep inside zarr)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cache_fixtures import RECIPE, make_teacher
from cli_runner import CLI, run_cli

@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory, small_shards) -> Path:
    """A one-step DeiT trained on the cache's shards (for evaluate --cache)."""
    from student.models import StudentConfig
    from student.train import TrainConfig, train

    out = tmp_path_factory.mktemp("student")
    student = StudentConfig("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                            num_heads=3)
    train(TrainConfig(shards=str(small_shards), out=str(out), student=student, recipe=RECIPE.to_dict(), epochs=1,
                      batch_size=32, warmup_epochs=0, workers=0, progress=False, max_steps_per_epoch=1,
                      distillation_type="none", device="cpu"))
    return out / "checkpoint.pt"


def readers(cache: Path, shards: Path, student: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that reads a cache, with the options that make it read all of it."""
    return {
        "train-student": [CLI, "train-student", "--shards", str(shards), "--cache", str(cache), "--out", str(tmp / "run"),
                          "--model", "deit_tiny_distilled_patch16_224", "--patch-size", "8", "--embed-dim", "48",
                          "--depth", "2", "--num-heads", "3", "--epochs", "3", "--batch-size", "32",
                          "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--device", "cpu"],
        "evaluate": [CLI, "evaluate", "--checkpoint", str(student), "--shards", str(shards), "--cache", str(cache),
                     "--aug-seed", "2", "--device", "cpu"],
        "verify-cache": [CLI, "verify-cache", str(cache), "--shards", str(shards), "--samples", "400",
                         "--device", "cpu"],
        "inspect-cache": [CLI, "inspect-cache", str(cache)],
    }


def assert_clean_failure(result, *needles: str, command: str) -> None:
    text = result.stdout + result.stderr
    assert result.returncode != 0, f"{command} succeeded on a bad cache:\n{text}"
    assert "Traceback" not in text, f"{command} showed a traceback:\n{text}"
    for needle in needles:
        assert needle in text, f"{command}: {needle!r} not in:\n{text}"


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_cache_of_other_shards_refused(tmp_path, reference_cache, other_shards, student_checkpoint):
    cmds = readers(reference_cache, other_shards, student_checkpoint, tmp_path)
    for name in ("train-student", "evaluate", "verify-cache"):
        assert_clean_failure(run_cli(cmds[name]), "shards content hash", "cache-teacher", command=name)


@pytest.mark.slow
def test_missing_unit_named_with_fix(tmp_path, reference_cache, small_shards, student_checkpoint):
    cache = copy_cache(reference_cache, tmp_path / "cache")
    unit_json = sorted((cache / "units").glob("*seeds-000002-000002.json"))[3]
    unit_json.unlink()
    unit_name = unit_json.stem
    cmds = readers(cache, small_shards, student_checkpoint, tmp_path)
    for name in ("train-student", "evaluate"):
        assert_clean_failure(run_cli(cmds[name]), unit_name, "deit-pipeline cache-teacher", command=name)
    # verify-cache checks the records that exist and names what is missing: a failure (exit 1), unless
    # --allow-incomplete (a cache is often verified while jobs still run).
    verify = run_cli(cmds["verify-cache"])
    assert verify.returncode == 1 and f"missing unit (not computed yet): {unit_name}" in verify.stdout, verify.output
    assert run_cli([*cmds["verify-cache"], "--allow-incomplete"]).returncode == 0
    inspect = run_cli(cmds["inspect-cache"] + ["--json"])
    assert inspect.returncode == 0, inspect.stderr  # inspect reports it instead of failing
    assert unit_name in inspect.stdout
    # The fix it names works: rerunning cache-teacher recomputes only that unit.
    rerun = run_cli([CLI, "cache-teacher", "--shards", str(small_shards), "--out", str(cache), "--device", "cpu",
                     "--no-progress"])
    assert rerun.returncode == 0, rerun.stderr
    assert unit_json.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "corrupted", "truncated"])
def test_damaged_chunk_named_with_fix(tmp_path, reference_cache, small_shards, student_checkpoint, damage):
    cache = copy_cache(reference_cache, tmp_path / "cache")
    record = json.loads(sorted((cache / "units").glob("*seeds-000002-000002.json"))[1].read_text())
    target = cache / record["files"]["topk_logprobs"]["path"]
    if damage == "deleted":
        target.unlink()
    elif damage == "corrupted":
        data = bytearray(target.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 16):
            data[i] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    cmds = readers(cache, small_shards, student_checkpoint, tmp_path)
    for name in ("train-student", "evaluate", "verify-cache"):
        assert_clean_failure(run_cli(cmds[name]), record["unit"], "damaged", command=name)


def test_other_recipe_teacher_or_class_count_refused(tmp_path, reference_cache, small_shards, teacher_checkpoint):
    # Another recipe against the cache (train-student --input-size changes the recipe).
    cmds = readers(reference_cache, small_shards, Path("unused"), tmp_path)
    other_recipe = cmds["train-student"] + ["--input-size", "48", "--img-size", "48"]
    assert_clean_failure(run_cli(other_recipe), "recipe", command="train-student")
    # cache-teacher on an existing cache with another teacher / recipe / K.
    import torch

    other_teacher = tmp_path / "other.pth"
    torch.save({"model": make_teacher(seed=1).state_dict()}, other_teacher)
    base = [CLI, "cache-teacher", "--shards", str(small_shards), "--out", str(reference_cache), "--device", "cpu",
            "--no-progress"]
    assert_clean_failure(run_cli(base + ["--teacher-checkpoint", str(other_teacher)]), "teacher", command="teacher")
    assert_clean_failure(run_cli(base + ["--input-size", "48"]), "input_size", command="recipe")
    assert_clean_failure(run_cli(base + ["--topk", "5"]), "top-k", command="topk")
    # A cache whose manifest claims another class count.
    cache = copy_cache(reference_cache, tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["num_classes"] = 12
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(readers(cache, small_shards, Path("unused"), tmp_path)["train-student"])
    assert_clean_failure(result, "class count", command="train-student")


def as_replay_algorithm_2(cache: Path) -> dict:
    """Make `cache`'s manifest what algorithm 2 wrote: no replay_algorithm, that fingerprint."""
    from data_shards.recipe import fingerprint_of, pixel_library_versions

    manifest = json.loads((cache / "manifest.json").read_text())
    libraries = {k: manifest["library_versions"][k] for k in pixel_library_versions(RECIPE)}
    manifest.pop("replay_algorithm")
    manifest["recipe_fingerprint"] = fingerprint_of(manifest["recipe"], libraries, 2)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.slow
def test_cache_of_an_older_replay_algorithm_refused_with_the_command_that_rebuilds_it(
        tmp_path, reference_cache, small_shards, student_checkpoint):
    from cache_fixtures import assert_same_cache
    from teacher_cache.manifest import read_manifest, replay_algorithm

    current = read_manifest(reference_cache)
    assert replay_algorithm(current) == 3 == replay_algorithm({**current, "replay_algorithm": None})
    cache = copy_cache(reference_cache, tmp_path / "cache")
    assert replay_algorithm(as_replay_algorithm_2(cache)) == 2
    cmds = readers(cache, small_shards, student_checkpoint, tmp_path)
    cmds["cache-teacher"] = [CLI, "cache-teacher", "--shards", str(small_shards),
                             "--out", str(cache), "--device", "cpu"]
    lines = []
    for name in ("train-student", "evaluate", "verify-cache", "cache-teacher"):
        result = run_cli(cmds[name])
        assert_clean_failure(result, "made with replay algorithm 2", "3: finishing changed",
                             command=name)
        assert result.returncode == 2
        (line,) = [line for line in result.stderr.splitlines() if "replay algorithm 2" in line]
        lines.append(line)
    assert len(set(lines)) == 1
    # The command it names rebuilds the cache: the same as one this version computes from the start.
    command = lines[0].split("Rebuild it (in a new folder) with: ")[1]
    assert f"--out {cache}-replay3" in command
    import shlex
    rebuilt = run_cli([CLI, *shlex.split(command)[1:]])
    assert rebuilt.returncode == 0, rebuilt.output
    assert_same_cache(reference_cache, Path(f"{cache}-replay3"))
