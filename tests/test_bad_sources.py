"""make-shards on hostile sources: skip and list what cannot be used, handle what can."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo_paths
from data_shards import AugRecipe, ShardSet, decode_image, make_shards
from replay_helpers import augment_seeds


def save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture
def hostile_source(tmp_path) -> Path:
    root = tmp_path / "src"
    china = Image.open(sample_photo_paths()[0]).convert("RGB")
    small = china.resize((64, 48))
    china_bytes = sample_photo_paths()[0].read_bytes()
    # usable, in odd modes
    save(small.convert("CMYK"), root / "a_odd" / "cmyk.jpg", format="JPEG")
    save(Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257), root / "a_odd" / "sixteen_bit.png")
    save(small.convert("P", palette=Image.Palette.ADAPTIVE), root / "a_odd" / "palette.png")
    save(small.convert("RGBA"), root / "a_odd" / "alpha.png")
    save(china.resize((4000, 3000)), root / "b_big" / "large_but_fine.jpg", format="JPEG", quality=50)
    # unusable
    (root / "b_big" / "truncated.jpg").write_bytes(china_bytes[:5000])
    (root / "b_big" / "zero.jpg").write_bytes(b"")
    (root / "b_big" / "text.jpg").write_text("GIF89a? no, just text pretending to be a jpeg\n")
    save(Image.new("L", (20000, 10000)), root / "b_big" / "bomb.png", optimize=True)  # 2e8 pixels
    (root / "b_big" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    os.mkfifo(root / "b_big" / "pipe.jpg")  # reading it would block forever
    return root


def test_hostile_source_skips_and_lists(hostile_source, capsys):
    out = hostile_source.parent / "shards"
    meta = make_shards(str(hostile_source), out, progress=False)
    skipped = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {"truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "dangling.jpg", "pipe.jpg"}
    assert "too large" in skipped["bomb.png"] and "0 bytes" in skipped["zero.jpg"]
    assert "cannot read" in skipped["dangling.jpg"] and "cannot read" in skipped["pipe.jpg"]
    assert meta["num_samples"] == 5 and meta["counts_per_class"] == [4, 1]
    err = capsys.readouterr().err
    assert all(name in err for name in skipped)
    # Everything kept decodes to RGB and augments.
    shard_set = ShardSet.open(out)
    for sample in shard_set.read_shard(0):
        assert decode_image(sample.data).mode == "RGB"
        (image,) = augment_seeds(sample.data, sample.key, [0], AugRecipe(input_size=64))
        assert image.shape == (3, 64, 64) and bool(image.isfinite().all())


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_file_is_skipped(tmp_path, monkeypatch, workers):
    """A file that may not be read (EACCES) is skipped and listed. Tests run as root here and in
    CI, and root reads a file whatever its mode, so besides chmod 0 the denial is raised where
    make-shards reads (Path.read_bytes, in its forked workers too)."""
    root = tmp_path / "src"
    save(Image.open(sample_photo_paths()[0]).resize((32, 32)), root / "c" / "ok.png")
    save(Image.open(sample_photo_paths()[1]).resize((32, 32)), root / "c" / "locked.png")
    locked = root / "c" / "locked.png"
    locked.chmod(0)
    read_bytes = Path.read_bytes

    def denied_to_everyone(path: Path) -> bytes:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied_to_everyone)
    meta = make_shards(str(root), tmp_path / "out", progress=False, workers=workers)
    assert [(Path(s["path"]).name, s["reason"]) for s in meta["skipped"]] == [
        ("locked.png", "cannot read file (Permission denied)")]
    assert meta["num_samples"] == 1
