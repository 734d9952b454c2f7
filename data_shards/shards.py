"""Writing and reading WebDataset shards with a Parquet manifest and JSON metadata.

One output folder holds one split:
    shard-000000.tar ...   webdataset tars; members KEY.jpg|png|... and KEY.cls
    manifest.parquet       key, label, shard, position, nbytes, ext, sha256, offset (one row per
                           image; offset = where its bytes start inside the tar)
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
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from tqdm import tqdm

from .sources import SourceError, SourceImage, Skipped, iter_source
from .tar_members import SampleTarWriter, member_offsets

FORMAT_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_FILE = "manifest.parquet"
METADATA_FILE = "metadata.json"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("shard", pa.int32()), ("position", pa.int32()),
    ("nbytes", pa.int64()), ("ext", pa.string()), ("sha256", pa.string()), ("offset", pa.int64()),
])
# What the content hash covers: the samples and their order, not where the bytes sit in a file
# (shard sets written before `offset` existed keep their hash).
CONTENT_COLUMNS = ("key", "label", "shard", "position", "nbytes", "ext", "sha256")


class ShardsError(ValueError):
    """A shard folder is missing, incomplete or inconsistent."""


def _sort_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def manifest_hash(table: pa.Table) -> str:
    """Content hash of a manifest: every row's key, label, place, size and image hash."""
    h = hashlib.sha256()
    cols = [table.column(name).to_pylist() for name in CONTENT_COLUMNS]
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
    writer = None
    try:
        for i, im in enumerate(tqdm(usable, desc="make-shards: writing", unit="img", disable=not progress)):
            if im.key in seen:
                raise SourceError(f"duplicate key {im.key!r} (from {im.origin})")
            seen.add(im.key)
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = SampleTarWriter(folder / (SHARD_PATTERN % (i // shard_size)))
            offsets = writer.write(im.key, {im.ext: im.data, "cls": str(im.label).encode("ascii")})
            rows["key"].append(im.key)
            rows["label"].append(im.label)
            rows["shard"].append(i // shard_size)
            rows["position"].append(i % shard_size)
            rows["nbytes"].append(len(im.data))
            rows["ext"].append(im.ext)
            rows["sha256"].append(hashlib.sha256(im.data).hexdigest())
            rows["offset"].append(offsets[im.ext])
    finally:
        if writer is not None:
            writer.close()
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
    _row_order: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _scanned_offsets: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        """All samples of one shard, in shard order, each checked against the manifest."""
        return self.read_samples(shard, None)

    def read_samples(self, shard: int, positions: Iterable[int] | None) -> list[ShardSample]:
        """The samples at `positions` (None: all) of one shard, in the order asked: one seek each.

        Every sample's bytes are checked against the manifest's sha256, so a truncated,
        edited or replaced shard is refused rather than silently replayed.
        """
        rows = self._shard_rows(shard)
        offsets = self._offsets(shard, rows)
        path = self.shard_path(shard)
        if positions is None:
            positions = range(len(rows["key"]))
        samples = []
        try:
            with open(path, "rb") as f:
                for position in positions:
                    if not 0 <= position < len(rows["key"]):
                        raise ShardsError(f"shard {path} has {len(rows['key'])} samples; position {position} "
                                          "does not exist")
                    key, nbytes = rows["key"][position], rows["nbytes"][position]
                    f.seek(offsets[position])
                    data = f.read(nbytes)
                    if len(data) != nbytes or hashlib.sha256(data).hexdigest() != rows["sha256"][position]:
                        raise ShardsError(f"shard {path}: sample {position} ({key!r}) does not match the manifest "
                                          "(size or sha256); the shard was truncated, edited or replaced - "
                                          "re-run make-shards")
                    samples.append(ShardSample(key, rows["label"][position], data, shard, position))
        except OSError as exc:
            raise ShardsError(f"cannot read shard {path}: {exc}; re-run make-shards") from None
        return samples

    def shard_keys(self, shard: int) -> list[str]:
        """Keys of one shard in position order, from the manifest."""
        return self._shard_rows(shard)["key"]

    def _shard_rows(self, shard: int) -> dict[str, list]:
        """Manifest columns of one shard in position order (checked to be 0..count-1)."""
        if not 0 <= shard < self.num_shards:
            raise ShardsError(f"{self.root} has {self.num_shards} shards; shard {shard} does not exist")
        if self._row_order is None:
            # One sort of the whole manifest; each shard is then a zero-copy slice.
            order = pa.compute.sort_indices(self.manifest, [("shard", "ascending"), ("position", "ascending")])
            shards = self.manifest.column("shard").take(order).to_numpy()
            self._row_order = (order, np.searchsorted(shards, np.arange(self.num_shards + 1)))
        order, starts = self._row_order
        table = self.manifest.take(order.slice(starts[shard], starts[shard + 1] - starts[shard]))
        rows = {name: table.column(name).to_pylist() for name in table.column_names}
        if rows["position"] != list(range(len(rows["position"]))) or len(rows["key"]) != self.shard_counts[shard]:
            raise ShardsError(f"{self.root / MANIFEST_FILE}: shard {shard} has positions that are not "
                              f"0..{self.shard_counts[shard] - 1} (metadata count); re-run make-shards")
        return rows

    def _offsets(self, shard: int, rows: dict[str, list]) -> list[int]:
        """Data offset of each sample's image; scanned once from the tar headers for shard sets
        written before the manifest had an `offset` column."""
        if "offset" in rows:
            return rows["offset"]
        if shard not in self._scanned_offsets:
            path = self.shard_path(shard)
            try:
                members = member_offsets(path)
            except (OSError, tarfile.TarError) as exc:
                raise ShardsError(f"cannot read shard {path}: {exc}; re-run make-shards") from None
            offsets = []
            for key, ext in zip(rows["key"], rows["ext"]):
                if f"{key}.{ext}" not in members:
                    raise ShardsError(f"shard {path} has no member {key}.{ext} listed in the manifest; "
                                      "the shard was replaced or edited - re-run make-shards")
                offsets.append(members[f"{key}.{ext}"][0])
            self._scanned_offsets[shard] = offsets
        return self._scanned_offsets[shard]
