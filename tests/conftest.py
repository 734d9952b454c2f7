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
