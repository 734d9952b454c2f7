"""The shard-set format (WebDataset tars + Parquet manifest + JSON metadata) and reading it.

One output folder of make-shards (data_shards/writer.py) holds one split:
    shard-000000.tar ...   webdataset tars; members KEY.jpg|png|... and KEY.cls
    manifest.parquet       key, label, shard, position, nbytes, ext, sha256, offset (one row per
                           image; offset = where its bytes start inside the tar)
    metadata.json          classes, counts per class and shard, content_hash, skipped files

A shard set may instead index existing WebDataset tars in place (metadata "external_shards"):
then metadata's shard names are the absolute paths of those tars.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .tar_members import member_offsets

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


def hash_manifest_rows(h: "hashlib._Hash", rows: Iterable[tuple]) -> None:
    """Feed rows (values in CONTENT_COLUMNS order) into a content hash."""
    for row in rows:
        h.update(("\t".join(str(v) for v in row) + "\n").encode("utf-8"))


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

    def __post_init__(self):
        shards = self.metadata["shards"]    # the description, read once
        self.num_classes, self.content_hash = int(self.metadata["num_classes"]), self.metadata["content_hash"]
        self.num_shards, self.shard_counts = len(shards), [s["count"] for s in shards]
        self.rows_per_shard = int(self.metadata["shard_size"])

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
                hint = ("the indexed WebDataset tars were moved or deleted; re-run make-shards on them"
                        if metadata.get("external_shards") else "re-run make-shards")
                raise ShardsError(f"shard {root / shard['name']} listed in {meta_path} is missing; {hint}")
        return cls(root, metadata, manifest)

    def shard_path(self, shard: int) -> Path:
        return self.root / self.metadata["shards"][shard]["name"]

    def read_shard(self, shard: int) -> list[ShardSample]:
        """All samples of one shard, in shard order, each checked against the manifest."""
        return self.read_samples(shard, None)

    def read_samples(self, shard: int, positions: Iterable[int] | None) -> list[ShardSample]:
        """The samples at `positions` (None: all) of one shard, in the order asked: one seek each,
        each checked against the manifest's sha256 (a changed shard is refused, not replayed)."""
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
                                          f"(size or sha256){self._first_difference(shard, rows)}; the shard was "
                                          "truncated, edited or replaced - re-run make-shards")
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
            order = pc.sort_indices(self.manifest, [("shard", "ascending"), ("position", "ascending")])
            shards = self.manifest.column("shard").take(order).to_numpy()
            self._row_order = (order, np.searchsorted(shards, np.arange(self.num_shards + 1)))
        order, starts = self._row_order
        table = self.manifest.take(order.slice(starts[shard], starts[shard + 1] - starts[shard]))
        rows = {name: table.column(name).to_pylist() for name in table.column_names}
        if rows["position"] != list(range(len(rows["position"]))) or len(rows["key"]) != self.shard_counts[shard]:
            raise ShardsError(f"{self.root / MANIFEST_FILE}: shard {shard} has positions that are not "
                              f"0..{self.shard_counts[shard] - 1} (metadata count); re-run make-shards")
        return rows

    def _first_difference(self, shard: int, rows: dict[str, list]) -> str:
        """For an error message: the first image member of a make-shards tar that is not the
        manifest's (scanned from the tar's headers once a read has failed)."""
        if self.metadata.get("external_shards"):
            return ""
        try:
            found = [name for name in member_offsets(self.shard_path(shard)) if not name.endswith(".cls")]
        except (OSError, tarfile.TarError):
            return " (the tar cannot be read)"
        for position, (key, ext) in enumerate(zip(rows["key"], rows["ext"])):
            name, expected = (found[position] if position < len(found) else None), f"{key}.{ext}"
            if name != expected:
                return f"; image member {position} of the tar is {name!r}, the manifest says {expected!r}"
        return ""

    def _offsets(self, shard: int, rows: dict[str, list]) -> list[int]:
        """Data offset of each sample's image (scanned once from the headers of shard sets written
        before the manifest had an `offset` column)."""
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
