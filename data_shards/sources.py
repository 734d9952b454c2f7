"""Image sources for make-shards (an ImageFolder tree, scikit-learn's digits, WebDataset tars),
listed as `Candidate`s (key, class index, where the bytes are) without reading them: the writer
fixes the order from the keys, then streams the bytes, read and fully decoded once in worker
processes (`check_candidates`) and kept as they are. Tars are indexed in place, one shard each
in their order (mixing classes within a shard relies on their having been written shuffled, as
ImageNet's are). Skipped and listed: tar samples without exactly one jpg/jpeg/png/webp member,
without a readable `cls`, or whose key was already seen; members other than image, `cls` and
`json`. Refused: a class index beyond the --classes file."""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .hashing import text_seed
from .shards import iter_members

# PIL format name -> the extension written into the shard (webdataset decodes by extension).
FORMAT_EXTENSION = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
                    "WEBP": "webp", "PPM": "ppm"}
# Largest image accepted (pixels): ImageNet's largest is ~ 1e8 / 10; past this, almost surely
# a decompression bomb or a scan that takes minutes per epoch.
MAX_PIXELS = 178_956_970
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")      # of a WebDataset sample, with these companions:
COMPANION_MEMBERS = ("cls", "json")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")   # PIL messages' <.. at 0x..>


class SourceError(ValueError):
    """The source cannot be turned into shards (nothing a skip could fix)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str           # stable, dot-free webdataset key
    label: int         # class index
    origin: str        # where it comes from (path, "digits[i]", "TAR:MEMBER"), for messages
    ref: str | bytes | tuple  # a file path, the bytes themselves, or (tar path, offset, nbytes, ext)


@dataclass(frozen=True, slots=True)
class Checked:
    """What validating a candidate gave: its bytes' extension and hash, or why it is unusable."""
    ext: str | None
    sha256: str | None
    nbytes: int
    data: bytes | None   # None when the caller only indexes (bytes stay where they are)
    error: str | None


@dataclass(frozen=True)
class Skipped:
    origin: str
    reason: str


def check_image_bytes(data: bytes) -> str:
    """Fully decode `data`; return its shard extension or raise ValueError with the reason."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"image too large ({img.width}x{img.height} pixels > {MAX_PIXELS})")
            img.load()  # raises on truncated data
    except ValueError:
        raise
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:   # its message holds the BytesIO's memory address
        raise ValueError("not a readable image (Pillow recognises no image format in it)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ...)
        # without object reprs: metadata.json must not vary by process
        detail = _OBJECT_REPR.sub("the image bytes", str(exc))
        raise ValueError(f"not a readable image ({type(exc).__name__}: {detail})") from None
    if fmt not in FORMAT_EXTENSION:
        raise ValueError(f"unsupported image format {fmt!r}")
    return FORMAT_EXTENSION[fmt]


def make_key(relative_path: str) -> str:
    """A stable key from a path relative to the source root: dots (webdataset splits names at the
    first) and unsafe characters become '_'; a short hash of the path keeps keys unique."""
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-{digest}"


def in_val_split(key: str, val_fraction: float) -> bool:
    """Deterministic train/val assignment from the key alone (no RNG, no order dependence)."""
    return (text_seed(key, byteorder="big") / 2**64) < val_fraction


def folder_classes(root: Path) -> list[str]:
    """An ImageFolder tree's classes: its sub-folders, sorted."""
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"source folder {root} has no class sub-folders "
                          "(expected ImageFolder layout: ROOT/CLASS_NAME/IMAGE)")
    return classes


def folder_candidates(root: str, classes: list[str]) -> list[Candidate]:
    """Every file under each class folder, in sorted path order; nothing is read. Plain strings
    (no Path per file): this list is what make-shards holds per image, so it sets the memory."""
    out = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for fn in sorted(filenames):
                if not fn.startswith("."):
                    path = os.path.join(dirpath, fn)
                    out.append(Candidate(make_key(f"{rel_dir}/{fn}"), label, path, path))
    return out


def _read_ref(ref: str | bytes | tuple) -> bytes:
    if isinstance(ref, bytes):
        return ref
    if isinstance(ref, tuple):  # bytes of a member inside a tar: (path, offset, nbytes, ...)
        path, offset, nbytes = ref[:3]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"cannot read {nbytes} bytes at offset {offset} (tar truncated?)")
        return data
    path = Path(ref)
    if not path.is_file():  # a FIFO or device would block or never end; a broken link has no data
        raise ValueError("cannot read file (not a regular file, or a broken link)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read file ({exc.strerror or exc})") from None


def check_candidates(refs: list, keep_data: bool = True) -> list[Checked]:
    """Read and fully decode each ref (a Candidate.ref); runs in a worker process."""
    out = []
    for ref in refs:
        try:
            data = _read_ref(ref)
            ext = check_image_bytes(data)
        except (ValueError, OSError) as exc:
            out.append(Checked(None, None, 0, None, str(exc)))
        else:
            out.append(Checked(ext, hashlib.sha256(data).hexdigest(), len(data),
                               data if keep_data else None, None))
    return out


def digits_candidates() -> tuple[list[str], list[Candidate]]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as lossless PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.clip(np.round(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        # PNG bytes are deterministic for a given Pillow/zlib; the key and label are what matter.
        Image.fromarray(grey, mode="L").save(buf, format="PNG", optimize=False, compress_level=9)
        images.append(Candidate(f"digit_{i:05d}", int(label), f"digits[{i}]", buf.getvalue()))
    return [str(d) for d in range(10)], images


def list_source(source: str, split: str, val_fraction: float) -> tuple[list[str], list[Candidate]]:
    """(class names, candidates of `split`) of "digits" or an ImageFolder tree; nothing read yet."""
    if source == "digits":
        classes, candidates = digits_candidates()
    else:
        classes = folder_classes(Path(source))
        candidates = folder_candidates(str(Path(source)), classes)
    if val_fraction > 0 or source == "digits":
        candidates = [c for c in candidates if in_val_split(c.key, val_fraction) == (split == "val")]
    return classes, candidates


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
        if not self.shard_names or tar != self.shard_names[-1]:
            self.shard_names.append(tar)
            self._position = 0
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
