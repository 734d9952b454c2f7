"""Existing WebDataset tars as a make-shards source, indexed in place: each tar is one shard as
it is (the manifest records each image's offset and nbytes, metadata the tar's absolute path).
Samples keep the tars' order, so class mixing within a shard relies on the tars having been
written shuffled (as ImageNet's are). Samples are grouped as webdataset groups them. Skipped and
listed: samples without exactly one jpg/jpeg/png/webp member, without a readable `cls`, or whose
key was already seen; members other than image, `cls` and `json`. Refused: a class index beyond
the --classes file."""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from .shards import iter_members
from .sources import Candidate, Skipped, SourceError, in_val_split

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
COMPANION_MEMBERS = ("cls", "json")


def is_tar_source(source: str) -> bool:
    """A brace pattern, a .tar file, or a folder holding .tar files (and no class folders)."""
    if source == "digits":
        return False
    if "{" in source or source.endswith(".tar"):
        return True
    folder = Path(source)
    return folder.is_dir() and any(p.suffix == ".tar" and p.is_file() for p in folder.iterdir())


def expand_tar_source(source: str) -> list[Path]:
    """The tars of `source`, absolute, in order (brace expansion order, or sorted names)."""
    folder = Path(source)
    if "{" not in source and folder.is_dir():
        if any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
            raise SourceError(f"source folder {folder} holds both .tar files and sub-folders; point --source "
                              "at the tars (a folder or a brace pattern) or at an ImageFolder tree")
        paths = sorted(p for p in folder.iterdir() if p.suffix == ".tar")
    else:
        paths = [Path(p) for p in braceexpand(source)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SourceError(f"{len(missing)} tar(s) of {source} not found, e.g. {', '.join(missing[:3])}")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise SourceError(f"source {source} names the same tar more than once")
    return resolved


def read_classes_file(path) -> list[str]:
    """Class names, one per line; line i names class index i."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read --classes file {path}: {exc}") from None
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise SourceError(f"--classes file {path} must hold one non-empty class name per line")
    if len(set(names)) != len(names):
        raise SourceError(f"--classes file {path} names a class twice")
    return names


@dataclass
class TarIndexer:
    """Lists the usable samples of the tars lazily and gives each its shard and position."""
    tars: list[Path]
    classes: list[str] | None
    split: str
    val_fraction: float
    skipped: list[Skipped]
    shard_names: list[str] = field(default_factory=list, init=False)  # the tars used, in shard order
    _seen: set[str] = field(default_factory=set, init=False)
    _current: str | None = field(default=None, init=False)
    _position: int = field(default=0, init=False)

    def candidates(self) -> Iterator[Candidate]:
        """Samples with one image and a valid cls, in tar order (images not read yet)."""
        for tar in self.tars:
            try:
                with open(tar, "rb") as handle:
                    for key, members in _group_samples(tar, self.skipped):
                        cand = self._candidate(tar, handle, key, members)
                        if cand is not None and (self.val_fraction <= 0
                                                 or in_val_split(key, self.val_fraction) == (self.split == "val")):
                            yield cand
            except (OSError, tarfile.TarError) as exc:
                self.skipped.append(Skipped(str(tar), f"cannot read tar ({exc}); its remaining samples are skipped"))

    def _candidate(self, tar: Path, handle: BinaryIO, key: str, members: dict[str, tuple[int, int]]
                   ) -> Candidate | None:
        origin = f"{tar}:{key}"
        for ext in sorted(set(members) - set(IMAGE_MEMBERS) - set(COMPANION_MEMBERS)):
            self.skipped.append(Skipped(f"{origin}.{ext}", "not an image, cls or json member (ignored)"))
        images = [ext for ext in IMAGE_MEMBERS if ext in members]
        reason, duplicate = None, key in self._seen
        self._seen.add(key)
        if duplicate:
            reason = "duplicate key (its first occurrence is kept)"
        elif len(images) != 1:
            reason = (f"{len(images)} image members ({', '.join(images)})" if images
                      else f"no image member ({'/'.join(IMAGE_MEMBERS)})")
        elif "cls" not in members:
            reason = "no .cls member (class index)"
        elif (label := _read_label(handle, *members["cls"])) is None:
            reason = ".cls is not a class index (an integer as text)"
        elif self.classes is not None and label >= len(self.classes):
            # refused, not skipped: a short classes file would silently drop its missing classes
            raise SourceError(f"{origin}: class index {label} is outside the --classes file's "
                              f"{len(self.classes)} classes (indices 0..{len(self.classes) - 1}); the "
                              "file must name every class index the tars use, one line per index")
        elif label < 0:
            reason = f"negative class index {label}"
        if reason is not None:
            self.skipped.append(Skipped(origin, reason))
            return None
        ext = images[0]
        offset, nbytes = members[ext]
        return Candidate(key, label, f"{origin}.{ext}", (str(tar), offset, nbytes, ext))

    def place(self, cand: Candidate) -> tuple[int, int]:
        """(shard, position) of the next usable sample; call in candidate order."""
        tar = cand.ref[0]
        if tar != self._current:
            self._current, self._position = tar, 0
            self.shard_names.append(tar)
        self._position += 1
        return len(self.shard_names) - 1, self._position - 1

    def unused_tars(self) -> list[Skipped]:
        used = set(self.shard_names)
        return [Skipped(str(t), "no usable sample; not used as a shard") for t in self.tars if str(t) not in used]


def _group_samples(tar: Path, skipped: list[Skipped]) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample: consecutive members sharing a key, as webdataset groups."""
    key, members = None, {}
    for name, offset, size in iter_members(tar):
        prefix, ext = base_plus_ext(name)
        if prefix is None:
            skipped.append(Skipped(f"{tar}:{name}", "member name has no extension (not part of a sample)"))
            continue
        if prefix != key:
            if key is not None:
                yield key, members
            key, members = prefix, {}
        members[ext.lower()] = (offset, size)
    if key is not None:
        yield key, members


def _read_label(handle: BinaryIO, offset: int, size: int) -> int | None:
    if size > 32:
        return None
    handle.seek(offset)
    try:
        return int(handle.read(size).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
