"""Writing and reading WebDataset shards with a Parquet manifest and JSON metadata.

One output folder holds one split:
    shard-000000.tar ...   webdataset tars; members KEY.jpg|png|... and KEY.cls
    manifest.parquet       key, label, shard, position, nbytes, ext, sha256 (one row per image)
    metadata.json          classes, counts per class and shard, content_hash, skipped files

Samples are ordered by sha256(key) before sharding, so every shard mixes classes (Mixup
partners are drawn within a shard) and the order does not depend on the file system.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from .sources import SourceError, SourceImage, Skipped, iter_source

FORMAT_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_FILE = "manifest.parquet"
METADATA_FILE = "metadata.json"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("shard", pa.int32()), ("position", pa.int32()),
    ("nbytes", pa.int64()), ("ext", pa.string()), ("sha256", pa.string()),
])


class ShardsError(ValueError):
    """A shard folder is missing, incomplete or inconsistent."""


def _sort_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def manifest_hash(table: pa.Table) -> str:
    """Content hash of a manifest: every row's key, label, place, size and image hash."""
    h = hashlib.sha256()
    cols = [table.column(name).to_pylist() for name in MANIFEST_SCHEMA.names]
    for row in zip(*cols):
        h.update(("\t".join(str(v) for v in row) + "\n").encode("utf-8"))
    return h.hexdigest()


def make_shards(source: str, out: str | os.PathLike, split: str = "train", shard_size: int = 1000,
                val_fraction: float | None = None, overwrite: bool = False,
                allow_empty_classes: bool = False, progress: bool = True) -> dict:
    """Write `source` (ImageFolder path or "digits") as webdataset shards into `out`.

    Returns the metadata dict (also written to out/metadata.json). The folder is built
    aside and renamed into place, so a failure never leaves a half-written shard set.
    """
    if split not in ("train", "val"):
        raise SourceError(f"--split must be 'train' or 'val', got {split!r}")
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    if val_fraction is None:
        val_fraction = 0.2 if source == "digits" else 0.0
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SourceError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SourceError(f"output folder {out} is not empty; pass --overwrite to replace it")

    skipped: list[Skipped] = []
    classes, images, n_candidates = iter_source(source, split, val_fraction, skipped)
    if n_candidates == 0:
        raise SourceError(f"source {source} has no image files for split {split!r}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rows = _write_sorted(images, tmp, shard_size, n_candidates, progress)
        for s in skipped:
            print(f"make-shards: skipped {s.origin}: {s.reason}", file=sys.stderr)
        if not rows["key"]:
            raise SourceError(f"source {source} has no usable images for split {split!r} "
                              f"({len(skipped)} files skipped)")
        counts = [0] * len(classes)
        for label in rows["label"]:
            counts[label] += 1
        empty = [classes[i] for i, c in enumerate(counts) if c == 0]
        if empty and not allow_empty_classes:
            raise SourceError(f"class folder(s) with no usable image in split {split!r}: "
                              f"{', '.join(empty)}; add images, remove the folder(s), or pass "
                              "--allow-empty-classes to keep their class index without samples")
        table = pa.table(rows, schema=MANIFEST_SCHEMA)
        pq.write_table(table, tmp / MANIFEST_FILE, compression="zstd")
        n_shards = max(rows["shard"]) + 1
        shard_counts = [0] * n_shards
        for s in rows["shard"]:
            shard_counts[s] += 1
        metadata = {
            "format_version": FORMAT_VERSION,
            "source": source if source == "digits" else str(Path(source).resolve()),
            "split": split,
            "val_fraction": val_fraction,
            "classes": classes,
            "num_classes": len(classes),
            "num_samples": len(rows["key"]),
            "counts_per_class": counts,
            "shard_size": shard_size,
            "shards": [{"name": SHARD_PATTERN % i, "count": c} for i, c in enumerate(shard_counts)],
            "content_hash": manifest_hash(table),
            "skipped": [{"path": s.origin, "reason": s.reason} for s in skipped],
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        return metadata
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_sorted(images: Iterator[SourceImage], folder: Path, shard_size: int, total: int,
                  progress: bool) -> dict[str, list]:
    """Validate, order by sha256(key) and write images; return the manifest columns."""
    usable = sorted(tqdm(images, total=total, desc="make-shards: reading", unit="img",
                         disable=not progress),
                    key=lambda im: _sort_key(im.key))
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    seen: set[str] = set()
    # mtime=0 and fixed owner make the tar bytes a function of the content alone.
    with wds.ShardWriter(str(folder / SHARD_PATTERN), maxcount=shard_size, maxsize=1 << 62,
                         verbose=0, mtime=0.0, user="deit", group="deit", mode=0o444) as sink:
        for i, im in enumerate(tqdm(usable, desc="make-shards: writing", unit="img", disable=not progress)):
            if im.key in seen:
                raise SourceError(f"duplicate key {im.key!r} (from {im.origin})")
            seen.add(im.key)
            sink.write({"__key__": im.key, im.ext: im.data, "cls": str(im.label).encode("ascii")})
            rows["key"].append(im.key)
            rows["label"].append(im.label)
            rows["shard"].append(i // shard_size)
            rows["position"].append(i % shard_size)
            rows["nbytes"].append(len(im.data))
            rows["ext"].append(im.ext)
            rows["sha256"].append(hashlib.sha256(im.data).hexdigest())
    return rows


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ShardSample:
    key: str
    label: int
    data: bytes
    shard: int
    position: int


@dataclass
class ShardSet:
    """A folder written by make_shards: metadata, manifest and shard paths."""
    root: Path
    metadata: dict = field(repr=False)
    manifest: pa.Table = field(repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ShardSet":
        root = Path(root)
        meta_path = root / METADATA_FILE
        if not meta_path.is_file():
            raise ShardsError(f"{meta_path} not found: {root} is not a shard folder "
                              "(create one with `deit-pipeline make-shards`)")
        try:
            metadata = json.loads(meta_path.read_text())
            manifest = pq.read_table(root / MANIFEST_FILE)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ShardsError(f"cannot read the metadata/manifest of {root}: {exc}; "
                              "re-run make-shards") from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ShardsError(f"{meta_path}: format_version {metadata.get('format_version')} "
                              f"is not {FORMAT_VERSION}; re-run make-shards")
        for shard in metadata["shards"]:
            if not (root / shard["name"]).is_file():
                raise ShardsError(f"shard {root / shard['name']} listed in {meta_path} is missing")
        return cls(root, metadata, manifest)

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def content_hash(self) -> str:
        return self.metadata["content_hash"]

    @property
    def num_shards(self) -> int:
        return len(self.metadata["shards"])

    @property
    def shard_counts(self) -> list[int]:
        return [s["count"] for s in self.metadata["shards"]]

    @property
    def rows_per_shard(self) -> int:
        return int(self.metadata["shard_size"])

    def shard_path(self, shard: int) -> Path:
        return self.root / self.metadata["shards"][shard]["name"]

    def read_shard(self, shard: int) -> list[ShardSample]:
        """All samples of one shard, in shard order, checked against the manifest."""
        path = self.shard_path(shard)
        samples = []
        # Members are read as bytes by suffix; their names are never used as file paths.
        dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None,
                                 workersplitter=None, empty_check=False)
        try:
            for position, sample in enumerate(dataset):
                image_ext = [k for k in sample if k not in ("__key__", "__url__", "__local_path__", "cls")]
                if len(image_ext) != 1 or "cls" not in sample:
                    raise ShardsError(f"{path}: sample {sample.get('__key__')!r} has members "
                                      f"{sorted(sample)}; expected one image and a .cls")
                samples.append(ShardSample(sample["__key__"], int(sample["cls"]),
                                           sample[image_ext[0]], shard, position))
        except (tarfile.TarError, OSError, ValueError) as exc:
            if isinstance(exc, ShardsError):
                raise
            raise ShardsError(f"cannot read shard {path}: {exc}; re-run make-shards") from None
        expected = self.shard_counts[shard]
        if len(samples) != expected:
            raise ShardsError(f"shard {path} holds {len(samples)} samples, metadata says {expected}; "
                              "the shard is truncated or was replaced - re-run make-shards")
        manifest_keys = self.shard_keys(shard)
        for sample, key in zip(samples, manifest_keys):
            if sample.key != key:
                raise ShardsError(f"shard {path}: sample {sample.position} is {sample.key!r}, the manifest says "
                                  f"{key!r}; the shard was replaced or edited - re-run make-shards")
        return samples

    def shard_keys(self, shard: int) -> list[str]:
        """Keys of one shard in position order, from the manifest."""
        if not hasattr(self, "_keys_by_shard"):
            by_shard: dict[int, list[tuple[int, str]]] = {}
            for key, s, pos in zip(self.manifest.column("key").to_pylist(), self.manifest.column("shard").to_pylist(),
                                   self.manifest.column("position").to_pylist()):
                by_shard.setdefault(s, []).append((pos, key))
            self._keys_by_shard = {s: [k for _, k in sorted(v)] for s, v in by_shard.items()}
        return self._keys_by_shard.get(shard, [])
