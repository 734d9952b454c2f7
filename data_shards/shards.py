"""The shard-set format and reading it. One folder of make-shards (writer.py) holds one split:
    shard-000000.tar ...   webdataset tars; members KEY.jpg|png|... and KEY.cls
    manifest.parquet       key, label, shard, position, nbytes, ext, sha256, offset (one row per
                           image; offset = where its bytes start inside the tar)
    metadata.json          classes, counts per class and shard, content_hash, skipped files
With "external_shards" in metadata, the shard names are absolute paths of WebDataset tars
indexed in place. Each image's data offset is recorded, so a reader fetches a few samples with
one seek each instead of streaming the whole shard."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_FILE = "manifest.parquet"
METADATA_FILE = "metadata.json"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("shard", pa.int32()), ("position", pa.int32()),
    ("nbytes", pa.int64()), ("ext", pa.string()), ("sha256", pa.string()), ("offset", pa.int64())])


class ShardsError(ValueError):
    """A shard folder is missing, incomplete or inconsistent."""


def hash_manifest_rows(h: "hashlib._Hash", rows: Iterable[tuple]) -> None:
    """Feed rows (the manifest's columns up to sha256) into a content hash: the samples and their
    order, not where the bytes sit (shard sets written before `offset` existed keep their hash)."""
    for row in rows:
        h.update(("\t".join(str(v) for v in row) + "\n").encode("utf-8"))


class SampleTarWriter:
    """One tar of webdataset samples: `webdataset.TarWriter`'s bytes, plus where each member's data
    starts. mtime 0 and a fixed owner make the bytes a function of the content alone."""

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> dict[str, int]:
        """Append one sample (members by extension); return each member's data offset."""
        offsets = {}
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0.0, 0o444
            info.uname = info.gname = "deit"
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE   # whole blocks
            offsets[ext] = self._tar.offset - padded
        return offsets

    def close(self) -> None:
        self._tar.close()
        self._file.close()


def iter_members(path: str | os.PathLike) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar, in order, from headers only
    (tarfile seeks over member data in "r:" mode: about 1 KB read per member)."""
    with tarfile.open(Path(path), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                yield info.name, info.offset_data, info.size
            tar.members = []  # headers only as we go: a large tar's member list would grow


def member_offsets(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of every regular file in a tar."""
    return {name: (offset, size) for name, offset, size in iter_members(path)}


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
        meta = self.metadata    # the description, read once
        self.num_classes, self.content_hash = int(meta["num_classes"]), meta["content_hash"]
        self.num_shards, self.shard_counts = len(meta["shards"]), [s["count"] for s in meta["shards"]]
        self.rows_per_shard = int(meta["shard_size"])

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
        offsets, path, samples = self._offsets(shard, rows), self.shard_path(shard), []
        positions = range(len(rows["key"])) if positions is None else positions
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
        """Data offset of each sample's image (older manifests: scanned once from the tar headers)."""
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
