"""make-shards on existing WebDataset tars (written here with webdataset's own TarWriter): indexed in place."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from cli_runner import CLI, run_cli
from data_shards import AugRecipe, ShardSet, ShardsError, SourceError, make_shards, tensor_digest
from replay_helpers import replay_shard

PER_TAR = 12


def digit_png(index: int) -> tuple[bytes, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG")
    return buf.getvalue(), int(digits.target[index])


@pytest.fixture
def wds_tars(tmp_path) -> dict:
    """Three tars of digits (PNG + cls, some with json), with a bad image, a key without cls,
    a duplicate key, a non-image member and a sample with two images."""
    folder = tmp_path / "wds"
    folder.mkdir()
    expected = {}  # key -> (png bytes, label) of the usable samples, in tar order per tar
    index = 0
    for t in range(3):
        with wds.TarWriter(str(folder / f"train-{t:06d}.tar")) as sink:
            for _ in range(PER_TAR):
                png, label = digit_png(index)
                key = f"sample_{index:05d}"
                sample = {"__key__": key, "png": png, "cls": str(label).encode()}
                if index % 5 == 0:
                    sample["json"] = json.dumps({"index": index}).encode()
                sink.write(sample)
                expected[key] = (png, label, t)
                index += 1
            if t == 0:
                sink.write({"__key__": "bad_image", "png": b"\x89PNG but not really", "cls": b"1"})
                sink.write({"__key__": "no_class", "png": digit_png(500)[0]})
                sink.write({"__key__": "with_notes", "png": digit_png(501)[0], "cls": b"2", "txt": b"a note"})
                expected["with_notes"] = (digit_png(501)[0], 2, 0)
            if t == 1:
                sink.write({"__key__": "two_images", "png": digit_png(502)[0], "jpg": b"x", "cls": b"4"})
            if t == 2:
                sink.write({"__key__": "sample_00003", "png": digit_png(503)[0], "cls": b"7"})  # duplicate key
    return {"folder": folder, "expected": expected}


def test_content_hash_covers_the_labels(tmp_path):
    """Same keys and image bytes, one class index changed: another content hash (the labels are
    part of what a cache and a training are checked against)."""
    hashes = []
    for variant, relabelled in (("a", None), ("b", "sample_00010")):
        tar = tmp_path / variant / "train-000000.tar"
        tar.parent.mkdir()
        with wds.TarWriter(str(tar)) as sink:
            for index in (0, 1, 10, 11):                   # digits 0, 1, 0, 1
                png, label = digit_png(index)
                key = f"sample_{index:05d}"
                cls = 1 - label if key == relabelled else label
                sink.write({"__key__": key, "png": png, "cls": str(cls).encode()})
        meta = make_shards(str(tar), tmp_path / f"shards-{variant}", progress=False)
        assert meta["num_classes"] == 2 and meta["num_samples"] == 4
        hashes.append(meta["content_hash"])
    assert hashes[0] != hashes[1]


def test_tars_indexed_in_place_and_replayed(wds_tars, tmp_path, capsys):
    folder, expected = wds_tars["folder"], wds_tars["expected"]
    out = tmp_path / "index"
    meta = make_shards(str(folder), out, progress=False)
    assert meta["external_shards"] and sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "metadata.json"]
    tars = sorted(folder.glob("*.tar"))
    assert [s["name"] for s in meta["shards"]] == [str(t.resolve()) for t in tars]
    assert [s["count"] for s in meta["shards"]] == [PER_TAR + 1, PER_TAR, PER_TAR]
    assert meta["shard_size"] == PER_TAR + 1 and meta["classes"] == [str(i) for i in range(10)]
    reasons = {s["path"].split(":")[-1]: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == {"bad_image.png", "no_class", "with_notes.txt", "two_images", "sample_00003"}
    assert "not a readable image" in reasons["bad_image.png"] and "no .cls" in reasons["no_class"]
    assert "duplicate key" in reasons["sample_00003"] and "2 image members" in reasons["two_images"]
    err = capsys.readouterr().err
    assert "sample_00003" in err and "single class" not in err  # these tars mix classes

    shard_set = ShardSet.open(out)
    samples = [s for i in range(shard_set.num_shards) for s in shard_set.read_shard(i)]
    assert {s.key: (s.data, s.label, s.shard) for s in samples} == expected
    assert [s.key for s in shard_set.read_shard(0)][:2] == ["sample_00000", "sample_00001"]  # tar order
    assert shard_set.read_samples(1, [5, 0]) == [shard_set.read_shard(1)[5], shard_set.read_shard(1)[0]]
    recipe = AugRecipe(input_size=32)
    first = [(r.key, r.partner_key, tensor_digest(r.image)) for r in replay_shard(shard_set.read_shard(2), 3, recipe)]
    again = [(r.key, r.partner_key, tensor_digest(r.image)) for r in replay_shard(ShardSet.open(out).read_shard(2), 3, recipe)]
    assert first == again and len(first) == PER_TAR


def test_brace_pattern_classes_file_and_workers(wds_tars, tmp_path, capsys):
    folder = wds_tars["folder"]
    by_folder = make_shards(str(folder), tmp_path / "a", workers=1, progress=False)
    pattern = str(folder / "train-{000000..000002}.tar")
    by_pattern = make_shards(pattern, tmp_path / "b", workers=2, progress=False)
    assert by_pattern["content_hash"] == by_folder["content_hash"]
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (tmp_path / "b" / "manifest.parquet").read_bytes()
    train = make_shards(pattern, tmp_path / "tr", val_fraction=0.3, progress=False)
    val = make_shards(pattern, tmp_path / "va", split="val", val_fraction=0.3, allow_empty_classes=True, progress=False)
    keys = [set(ShardSet.open(tmp_path / d).shard_keys(0)) for d in ("a", "tr", "va")]
    assert keys[1] | keys[2] == keys[0] and not keys[1] & keys[2] and keys[2]  # a deterministic split by key
    assert train["num_samples"] + val["num_samples"] == by_folder["num_samples"]
    only_two = make_shards(str(folder / "train-{000001..000002}.tar"), tmp_path / "c", progress=False)
    assert only_two["num_samples"] == 2 * PER_TAR + 1  # sample_00003 of tar 2 is no longer a duplicate

    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(8)) + "\n")  # 8 and 9 fall outside: refused
    with pytest.raises(SourceError, match=r"class index [89] is outside the --classes file's 8 classes"):
        make_shards(pattern, tmp_path / "d", classes_file=names, progress=False)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d@*"))     # nothing left behind
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    meta = make_shards(pattern, tmp_path / "d", classes_file=names, progress=False)
    assert meta["classes"][3] == "digit 3" and meta["num_classes"] == 10
    assert meta["num_samples"] == by_folder["num_samples"]

    with wds.TarWriter(str(tmp_path / "sorted.tar")) as sink:  # one class only: Mixup would never mix classes
        for i in (1, 11, 21):
            png, label = digit_png(i)
            sink.write({"__key__": f"one_{i}", "png": png, "cls": str(label).encode()})
    capsys.readouterr()
    make_shards(str(tmp_path / "sorted.tar"), tmp_path / "g", allow_empty_classes=True, progress=False)
    assert "1 of 1 tars hold a single class" in capsys.readouterr().err
    with pytest.raises(SourceError, match="not found.*train-000003.tar"):
        make_shards(str(folder / "train-{000000..000003}.tar"), tmp_path / "e", progress=False)
    with pytest.raises(SourceError, match="--shard-size"):
        make_shards(pattern, tmp_path / "f", shard_size=10, progress=False)
    with pytest.raises(SourceError, match="holds the source tars"):
        make_shards(str(folder), folder, overwrite=True, progress=False)
    assert len(list(folder.glob("*.tar"))) == 3


def test_changed_or_moved_tars_are_refused(wds_tars, tmp_path):
    folder = wds_tars["folder"]
    make_shards(str(folder), tmp_path / "index", progress=False)
    tar = folder / "train-000001.tar"
    row = next(r for r in pq.read_table(tmp_path / "index" / "manifest.parquet").to_pylist()
               if (r["shard"], r["position"]) == (1, 3))
    data = bytearray(tar.read_bytes())
    data[row["offset"] + 20] ^= 0xFF  # one byte of that sample's image
    tar.write_bytes(bytes(data))
    shard_set = ShardSet.open(tmp_path / "index")
    assert len(shard_set.read_samples(1, [2, 4])) == 2
    with pytest.raises(ShardsError, match=rf"train-000001.tar: sample 3 \({row['key']!r}\).*re-run make-shards"):
        shard_set.read_shard(1)
    tar.rename(folder / "moved.tar")
    with pytest.raises(ShardsError, match="moved or deleted"):
        ShardSet.open(tmp_path / "index")


def test_cli_indexes_tars(wds_tars, tmp_path):
    exe = [CLI, "make-shards"]
    ok = run_cli(exe + ["--source", str(wds_tars["folder"]), "--out", str(tmp_path / "s"), "--workers", "1"],
                 process=True)
    assert ok.returncode == 0, ok.stderr
    assert "indexed in place" in ok.stdout and "skipped 5" in ok.stdout
    bad = run_cli(exe + ["--source", str(Path(wds_tars["folder"]) / "x-{0..1}.tar"), "--out", str(tmp_path / "t")],
                  process=True)
    assert bad.returncode != 0 and "not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_indexed_tars_feed_cache_teacher(wds_tars, tmp_path, teacher_checkpoint):
    """Uneven external shards through stage one: cached, read back, verified by recomputation."""
    from cache_fixtures import SEEDS, cache_options
    from teacher_cache import TeacherCache, cache_teacher
    from teacher_cache.verification import verify_cache

    make_shards(str(wds_tars["folder"]), tmp_path / "index", progress=False)
    cache_teacher(cache_options(tmp_path / "index", tmp_path / "cache", teacher_checkpoint))
    cache, shard_set = TeacherCache.open(tmp_path / "cache"), ShardSet.open(tmp_path / "index")
    assert cache.missing_units() == []
    for shard, count in enumerate(shard_set.shard_counts):
        for seed in range(SEEDS):
            assert len(cache.read(shard, seed)) == count
    report = verify_cache(tmp_path / "cache", tmp_path / "index", samples=8, device="cpu",
                          teacher_checkpoint=str(teacher_checkpoint))
    assert report["ok"] and report["argmax_agreement"] == 1.0
