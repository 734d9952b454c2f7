"""sha256 of text and files, and integer seeds from it: the hashing helpers of every stage."""
from __future__ import annotations

import hashlib
import os


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_seed(text: str, nbytes: int = 8, byteorder: str = "little") -> int:
    """An integer seed from the first `nbytes` bytes of sha256(text)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:nbytes], byteorder)


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
