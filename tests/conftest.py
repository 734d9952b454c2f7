"""Shared fixtures: real data only (scikit-learn's digits and its two sample JPEG photos)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def sample_photo_paths() -> list[Path]:
    """scikit-learn's bundled JPEG photos (china.jpg, flower.jpg)."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [folder / "china.jpg", folder / "flower.jpg"]


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> dict[str, Path]:
    """Digits as train/val shard folders (shard size 250 -> several shards per split)."""
    from data_shards import make_shards

    root = tmp_path_factory.mktemp("digits_shards")
    out = {}
    for split in ("train", "val"):
        make_shards("digits", root / split, split=split, shard_size=250, progress=False)
        out[split] = root / split
    return out


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """An ImageFolder tree with the two sample photos, one class each."""
    root = tmp_path / "photos"
    for photo in sample_photo_paths():
        (root / photo.stem).mkdir(parents=True)
        shutil.copyfile(photo, root / photo.stem / photo.name)
    return root


# Stage one's session fixtures (tests/cache_fixtures.py: small_shards, other_shards,
# teacher_checkpoint, reference_cache), registered here so every test_cache_* module shares one copy.
from cache_fixtures import (grown_reference, other_shards, reference_cache, small_shards,  # noqa: E402,F401
                            teacher_checkpoint)



# `pytest -m "not slow"` is the development loop's unit subset (README); CI runs everything.
# A test is `slow` when it uses one of these fixtures, directly or through another fixture ...
EXPENSIVE_FIXTURES = {
    "reference_cache": "stage one over 9 shards x 3 seeds",
    "grown_reference": "reference_cache grown to more seeds",
    "direct_cache": "a second cache built in-process (test_cache_growth)",
    "uninterrupted_run": "a whole CLI cache run in a subprocess (test_reliability_kills)",
    "student_checkpoint": "trains a student (test_reliability_caches)",
    "setup": "digits shards + teacher + 2-seed cache (test_student_train)",
    "wds_tars": "writes three WebDataset tars of PNGs, for every test (test_make_shards_wds)",
}
# ... or when it is listed here: measured at >= 3.5 s (all its parameters together) with
# `pytest -m "not slow" --durations=0` on 2 loaded cores; mostly CLI subprocesses, worker pools,
# whole-shard replays and exhaustive Pillow / timm comparisons.
MEASURED_SLOW = {
    "test_make_shards.py::test_cli_exit_codes",
    "test_make_shards.py::test_a_killed_or_failed_overwrite_leaves_the_old_output_whole",
    "test_make_shards.py::test_deterministic_bytes",
    "test_make_shards.py::test_worker_count_does_not_change_the_bytes",
    "test_make_shards.py::test_shard_sets_without_offset_column_still_read",
    "test_make_shards.py::test_tampered_member_refused",
    "test_replay_fast.py::test_a_fast_recipe_cache_verifies_and_is_refused_on_another_kernel_class",
    "test_replay.py::test_identical_across_workers_batches_and_order",
    "test_replay.py::test_fresh_process_and_photo_digest",
    "test_replay.py::test_any_cut_into_slices_gives_the_whole_shard",
    "test_cli_damage_and_resume.py::test_a_partial_cache_fails_verification_unless_allowed",
    "test_cli_damage_and_resume.py::test_resume_extends_finishes_and_refuses_cutting_back",
    "test_device_geometry.py::test_geometry_ops_are_bit_identical_to_timm",
    "test_device_geometry.py::test_resized_crop_is_bit_identical_to_pillow_crop_then_resize",
    "test_device_geometry.py::test_geometry_ops_do_not_depend_on_the_batch",
    "test_device_geometry.py::test_resized_crop_does_not_depend_on_the_batch",
    "test_device_geometry.py::test_rotate_special_angles_match_pillow",
    "test_device_geometry.py::test_decode_resized_crops_equals_decode_then_crop",
    "test_device_colour.py::test_lut_ops_match_timm_at_every_reachable_argument",
    "test_device_colour.py::test_enhance_ops_match_timm_over_the_factor_range",
    "test_cache_teacher_loading.py::test_teacher_forward_encodes_and_handles_precision",
    "test_cache_teacher_loading.py::test_local_checkpoint_formats_load_the_same_weights",
    "test_student_data.py::test_a_workers_memory_does_not_grow_with_the_shard_size",
    "test_student_data.py::test_one_cache_read_per_unit_and_targets_follow_the_samples",
    "test_student_data.py::test_batches_do_not_depend_on_worker_count",
    "test_cache_build.py::test_full_logit_mode_stores_fp16_logits",
    "test_cache_build.py::test_one_unit_keeps_every_worker_busy",
    "test_cache_build.py::test_read_refuses_missing_and_damaged_units",
    "test_cache_cli.py::test_inspect_cache_lists_missing_units",
    "test_finish_exact.py::test_erasing_and_mixing_equal_numpy_float32_arithmetic",
    "test_student_losses.py::test_soft_targets_from_topk_against_a_full_logit_cache",
    "test_bad_sources.py::test_hostile_source_skips_and_lists",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        uses = set(getattr(item, "fixturenames", ()))
        if name in MEASURED_SLOW or EXPENSIVE_FIXTURES.keys() & uses:
            item.add_marker(pytest.mark.slow)
