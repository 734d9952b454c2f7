"""Tar members at known byte offsets: write webdataset samples, find and read member data.

make-shards records where each image's bytes start inside its tar, so a reader can fetch a
few samples with one seek each instead of streaming the whole shard.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterator

BLOCK = tarfile.BLOCKSIZE


def _padded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class SampleTarWriter:
    """One tar of webdataset samples, the bytes `webdataset.TarWriter` writes (member order,
    headers, padding), which does not tell where a member's data starts. mtime 0 and a fixed
    owner make the bytes a function of the content alone."""

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
            offsets[ext] = self._tar.offset - _padded(len(data))
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
