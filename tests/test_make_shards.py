"""make-shards on real data: round trip, determinism, bad input."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_runner import CLI, run_cli
from conftest import sample_photo_paths
from data_shards import ShardSet, ShardsError, SourceError, make_shards


def all_samples(shard_set: ShardSet):
    return [s for i in range(shard_set.num_shards) for s in shard_set.read_shard(i)]


def test_digits_round_trip(digits_shards):
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val = ShardSet.open(digits_shards["train"]), ShardSet.open(digits_shards["val"])
    samples = all_samples(train) + all_samples(val)
    assert len(samples) == len(digits.images) == 1797
    assert train.metadata["num_samples"] + val.metadata["num_samples"] == 1797
    assert 0.15 < val.metadata["num_samples"] / 1797 < 0.25
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    for s in samples:
        index = int(s.key.split("_")[1])
        assert s.label == digits.target[index]
        decoded = np.asarray(Image.open(io.BytesIO(s.data)))
        np.testing.assert_array_equal(decoded, np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    # Manifest agrees with the shards, row by row.
    manifest = pq.read_table(digits_shards["train"] / "manifest.parquet").to_pylist()
    by_key = {s.key: s for s in all_samples(train)}
    for row in manifest:
        s = by_key[row["key"]]
        assert (row["label"], row["shard"], row["position"], row["nbytes"]) == (s.label, s.shard, s.position, len(s.data))
        assert row["sha256"] == hashlib.sha256(s.data).hexdigest()
    assert train.shard_counts == [250] * (train.num_shards - 1) + [len(manifest) - 250 * (train.num_shards - 1)]
    assert sum(train.metadata["counts_per_class"]) == len(manifest)


def test_shards_mix_classes(digits_shards):
    first = ShardSet.open(digits_shards["train"]).read_shard(0)
    assert len({s.label for s in first}) == 10  # ordered by key hash, not by class


def test_photos_keep_original_bytes(photo_folder):
    out = photo_folder.parent / "shards"
    meta = make_shards(str(photo_folder), out, progress=False)
    assert meta["classes"] == ["china", "flower"] and meta["num_samples"] == 2
    samples = {s.label: s for s in all_samples(ShardSet.open(out))}
    for label, photo in enumerate(sample_photo_paths()):
        assert samples[label].data == photo.read_bytes()


def test_deterministic_bytes(tmp_path, photo_folder):
    def digest_folder(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    make_shards("digits", tmp_path / "a", shard_size=400, progress=False)
    make_shards("digits", tmp_path / "b", shard_size=400, progress=False)
    assert digest_folder(tmp_path / "a") == digest_folder(tmp_path / "b")
    make_shards(str(photo_folder), tmp_path / "c", progress=False)
    make_shards(str(photo_folder), tmp_path / "d", progress=False)
    assert digest_folder(tmp_path / "c") == digest_folder(tmp_path / "d")


def test_content_hash_covers_the_pixels(tmp_path, photo_folder):
    """Same file names, classes and order, other pixels: another content hash (what a cache is
    checked against), whether the bytes differ in size or not."""
    other = tmp_path / "other"
    shutil.copytree(photo_folder, other)
    for path in other.rglob("*.jpg"):
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, format="JPEG")
    same_size = tmp_path / "same_size"
    shutil.copytree(photo_folder, same_size)
    path = next(same_size.rglob("china.jpg"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01          # one bit of entropy-coded data: same size, still decodes
    path.write_bytes(bytes(data))
    hashes = set()
    for source in (photo_folder, other, same_size):
        meta = make_shards(str(source), tmp_path / f"shards-{source.name}", progress=False)
        assert meta["num_samples"] == 2 and meta["counts_per_class"] == [1, 1]
        keys = ShardSet.open(tmp_path / f"shards-{source.name}").manifest.column("key").to_pylist()
        hashes.add((meta["content_hash"], tuple(keys)))
    assert len({h for h, _ in hashes}) == 3 and len({k for _, k in hashes}) == 1


def test_bad_files_are_skipped_and_listed(photo_folder, capsys):
    china = (photo_folder / "china" / "china.jpg").read_bytes()
    (photo_folder / "china" / "truncated.jpg").write_bytes(china[: len(china) // 3])
    (photo_folder / "china" / "empty.jpg").write_bytes(b"")
    (photo_folder / "flower" / "notes.jpg").write_text("this is not an image\n")
    out = photo_folder.parent / "shards"
    meta = make_shards(str(photo_folder), out, progress=False)
    assert meta["num_samples"] == 2 and meta["counts_per_class"] == [1, 1]
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert "0 bytes" in reasons["empty.jpg"]
    assert json.loads((out / "metadata.json").read_text())["skipped"] == meta["skipped"]
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "notes.jpg" in err


def test_empty_source_and_empty_class_refused(tmp_path, photo_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class sub-folders"):
        make_shards(str(tmp_path / "empty"), tmp_path / "out", progress=False)
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        make_shards(str(tmp_path / "empty"), tmp_path / "out", progress=False)
    (photo_folder / "zebra").mkdir()
    (photo_folder / "zebra" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SourceError, match="zebra"):
        make_shards(str(photo_folder), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()  # nothing half-written
    meta = make_shards(str(photo_folder), tmp_path / "out3", allow_empty_classes=True, progress=False)
    assert meta["classes"] == ["china", "flower", "zebra"] and meta["counts_per_class"] == [1, 1, 0]


def test_existing_output_refused_unless_overwrite(tmp_path, photo_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SourceError, match="--overwrite"):
        make_shards(str(photo_folder), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    make_shards(str(photo_folder), out, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "metadata.json").exists()


def test_a_killed_or_failed_overwrite_leaves_the_old_output_whole(tmp_path, photo_folder):
    """--overwrite builds the new set aside: killed after building it (before it replaces the old
    one), or failing on bad input, make-shards leaves the old output as it was."""
    from data_shards.faults import ENV

    def files(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    out = tmp_path / "out"
    old = make_shards("digits", out, shard_size=400, progress=False)
    before = files(out)
    args = [CLI, "make-shards", "--source", str(photo_folder), "--out", str(out), "--overwrite",
            "--workers", "1"]
    killed = run_cli(args, {ENV: "make-shards-built:1"})
    assert killed.returncode == -9, killed.output
    assert files(out) == before and ShardSet.open(out).metadata == old
    (photo_folder / "zebra").mkdir()         # an empty class: refused after listing the source
    with pytest.raises(SourceError, match="zebra"):
        make_shards(str(photo_folder), out, overwrite=True, progress=False)
    assert files(out) == before
    (photo_folder / "zebra").rmdir()
    assert make_shards(str(photo_folder), out, overwrite=True, progress=False)["num_samples"] == 2


def test_cli_exit_codes(tmp_path, photo_folder):
    exe = [CLI]
    ok = run_cli(exe + ["make-shards", "--source", str(photo_folder), "--out", str(tmp_path / "s")], process=True)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 2 images of 2 classes" in ok.stdout
    bad = run_cli(exe + ["make-shards", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "t")],
                  process=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_read_samples_by_offset(digits_shards):
    shard_set = ShardSet.open(digits_shards["train"])
    whole = shard_set.read_shard(1)
    positions = [249, 0, 17, 17, 123, 3]
    picked = shard_set.read_samples(1, positions)
    assert picked == [whole[p] for p in positions]  # same key, label, bytes, place; order as asked
    rows = pq.read_table(digits_shards["train"] / "manifest.parquet").to_pylist()
    places = {(r["shard"], r["offset"]) for r in rows}
    assert len(places) == len(rows) and all(o % 512 == 0 for _, o in places)  # distinct tar data blocks


def test_tampered_member_refused(tmp_path):
    make_shards("digits", tmp_path / "s", shard_size=400, progress=False)
    shard_set = ShardSet.open(tmp_path / "s")
    victim = shard_set.read_shard(2)[5]
    row = next(r for r in pq.read_table(tmp_path / "s" / "manifest.parquet").to_pylist() if r["key"] == victim.key)
    with open(shard_set.shard_path(2), "r+b") as f:  # flip one byte of that image's data
        f.seek(row["offset"] + 40)
        byte = f.read(1)
        f.seek(row["offset"] + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert len(shard_set.read_samples(2, [4, 6])) == 2  # its neighbours still read
    for read in (lambda: shard_set.read_samples(2, [0, 5]), lambda: shard_set.read_shard(2)):
        with pytest.raises(ShardsError, match=rf"sample 5 \({victim.key!r}\).*re-run make-shards"):
            read()
    with open(shard_set.shard_path(3), "r+b") as f:  # a truncated shard is refused too
        f.truncate(2048)
    with pytest.raises(ShardsError, match="shard-000003.tar"):
        ShardSet.open(tmp_path / "s").read_shard(3)


def test_shard_sets_without_offset_column_still_read(tmp_path):
    """Shard sets written before the manifest had `offset`: offsets come from the tar headers."""
    make_shards("digits", tmp_path / "s", shard_size=400, progress=False)
    expected = [ShardSet.open(tmp_path / "s").read_shard(i) for i in range(4)]
    manifest_path = tmp_path / "s" / "manifest.parquet"
    pq.write_table(pq.read_table(manifest_path).drop(["offset"]), manifest_path)
    old = ShardSet.open(tmp_path / "s")
    assert [old.read_shard(i) for i in range(4)] == expected
    assert old.read_samples(3, [39, 2]) == [expected[3][39], expected[3][2]]
    (tmp_path / "s" / "shard-000001.tar").write_bytes((tmp_path / "s" / "shard-000000.tar").read_bytes())
    with pytest.raises(ShardsError, match="shard-000001.tar has no member .*re-run make-shards"):
        ShardSet.open(tmp_path / "s").read_shard(1)


def test_worker_count_does_not_change_the_bytes(tmp_path, photo_folder):
    """Parallel decode-validation streams the same bytes, in the same order, as one process."""
    flower = (photo_folder / "flower" / "flower.jpg").read_bytes()
    for i in range(6):  # a few more images and bad files, so chunks and skips interleave
        Image.open(io.BytesIO(flower)).resize((40 + i, 30)).save(photo_folder / "flower" / f"small{i}.png")
    (photo_folder / "china" / "cut.jpg").write_bytes(flower[:3000])
    (photo_folder / "china" / "empty.jpg").write_bytes(b"")

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    results = {}
    for workers in (1, 2):
        make_shards("digits", tmp_path / f"d{workers}", shard_size=300, workers=workers, progress=False)
        meta = make_shards(str(photo_folder), tmp_path / f"p{workers}", shard_size=3, workers=workers, progress=False)
        results[workers] = (digests(tmp_path / f"d{workers}"), digests(tmp_path / f"p{workers}"))
    assert results[1] == results[2]
    assert len(results[1][1]) == 2 + 3  # manifest, metadata and 8 images in 3 shards
    assert meta["num_samples"] == 8 and [Path(s["path"]).name for s in meta["skipped"]] == ["cut.jpg", "empty.jpg"]
