"""Image sources for make-shards: an ImageFolder tree or scikit-learn's digits.

A source yields `SourceImage` records (stable key, class index, original encoded
bytes) and collects the files it had to skip, with the reason, so that the shard
writer can report them. Images are validated by fully decoding them once; their
bytes are kept as they are (no re-encoding).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# PIL format name -> the extension written into the shard (webdataset decodes by extension).
FORMAT_EXTENSION = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
                    "WEBP": "webp", "PPM": "ppm"}
# Largest image we accept (pixels): ImageNet's largest is ~ 1e8 / 10; anything past this
# is almost certainly a decompression bomb or a scan that will take minutes per epoch.
MAX_PIXELS = 178_956_970


class SourceError(ValueError):
    """The source cannot be turned into shards (nothing a skip could fix)."""


@dataclass(frozen=True)
class SourceImage:
    key: str           # stable, dot-free webdataset key
    label: int         # class index (sorted class names)
    data: bytes        # original encoded bytes
    ext: str           # extension for the shard member ("jpg", "png", ...)
    origin: str        # where it came from (path or "digits[i]"), for messages


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
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if fmt not in FORMAT_EXTENSION:
        raise ValueError(f"unsupported image format {fmt!r}")
    return FORMAT_EXTENSION[fmt]


def make_key(relative_path: str) -> str:
    """A stable, dot-free key from a path relative to the source root.

    webdataset splits member names at the first dot, so dots (and anything that is not
    a safe filename character) become '_'; a short hash of the original path keeps keys
    unique when two paths sanitise to the same string.
    """
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-{digest}"


def in_val_split(key: str, val_fraction: float) -> bool:
    """Deterministic train/val assignment from the key alone (no RNG, no order dependence)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return (h / 2**64) < val_fraction


@dataclass
class ImageFolderSource:
    root: Path

    def classes(self) -> list[str]:
        if not self.root.is_dir():
            raise SourceError(f"source folder {self.root} does not exist or is not a folder")
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise SourceError(f"source folder {self.root} has no class sub-folders "
                              "(expected ImageFolder layout: ROOT/CLASS_NAME/IMAGE)")
        return classes

    def candidates(self) -> list[tuple[str, int, Path]]:
        """(relative path, label, path) of every file under each class folder, sorted."""
        out = []
        for label, name in enumerate(self.classes()):
            class_dir = self.root / name
            files = []
            for dirpath, dirnames, filenames in os.walk(class_dir, onerror=None):
                dirnames.sort()
                for fn in sorted(filenames):
                    if fn.startswith("."):
                        continue
                    files.append(Path(dirpath) / fn)
            for path in files:
                out.append((path.relative_to(self.root).as_posix(), label, path))
        return out

    def read(self, rel: str, label: int, path: Path) -> SourceImage:
        if not path.is_file():  # a FIFO or device would block or never end; a broken link has no data
            raise ValueError("cannot read file (not a regular file, or a broken link)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read file ({exc.strerror or exc})") from None
        ext = check_image_bytes(data)
        return SourceImage(make_key(rel), label, data, ext, str(path))


def digits_images() -> tuple[list[str], list[SourceImage]]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as lossless PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.clip(np.round(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        # PNG bytes are deterministic for a given Pillow/zlib; the key and label are what matter.
        Image.fromarray(grey, mode="L").save(buf, format="PNG", optimize=False, compress_level=9)
        images.append(SourceImage(f"digit_{i:05d}", int(label), buf.getvalue(), "png", f"digits[{i}]"))
    return [str(d) for d in range(10)], images


def iter_source(source: str, split: str, val_fraction: float,
                skipped: list[Skipped]) -> tuple[list[str], Iterator[SourceImage], int]:
    """Return (class names, iterator of usable images of `split`, number of candidates).

    Unusable files are appended to `skipped` as the iterator runs.
    """
    if source == "digits":
        classes, images = digits_images()
        chosen = [im for im in images if in_val_split(im.key, val_fraction) == (split == "val")]
        return classes, iter(chosen), len(chosen)

    folder = ImageFolderSource(Path(source))
    classes = folder.classes()
    candidates = [c for c in folder.candidates()
                  if val_fraction <= 0 or in_val_split(make_key(c[0]), val_fraction) == (split == "val")]

    def gen() -> Iterator[SourceImage]:
        for rel, label, path in candidates:
            try:
                yield folder.read(rel, label, path)
            except ValueError as exc:
                skipped.append(Skipped(str(path), str(exc)))

    return classes, gen(), len(candidates)
