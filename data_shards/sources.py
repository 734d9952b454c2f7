"""Image sources for make-shards: an ImageFolder tree or scikit-learn's digits, listed as
`Candidate`s (stable key, class index, where the bytes are) without reading them, so the writer
fixes the order from the keys alone, then streams the bytes. `check_candidates` (in worker
processes) reads and fully decodes each once; the bytes are kept as they are."""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .hashing import text_seed

# PIL format name -> the extension written into the shard (webdataset decodes by extension).
FORMAT_EXTENSION = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
                    "WEBP": "webp", "PPM": "ppm"}
# Largest image accepted (pixels): ImageNet's largest is ~ 1e8 / 10; past this, almost surely
# a decompression bomb or a scan that takes minutes per epoch.
MAX_PIXELS = 178_956_970
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
    """A stable key from a path relative to the source root: webdataset splits member names at
    the first dot, so dots and unsafe characters become '_'; a short hash of the path keeps
    keys unique when two paths sanitise to the same string."""
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
