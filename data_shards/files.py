"""Files of every stage: owned temporary names (whose writer may be dead), atomic writes, and
weights-only checkpoint loading with an error that says what a refused file is."""
from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

import torch

from .faults import crash_point


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True         # alive, or PermissionError: alive under another user


def owned_name(stem: str, suffix: str = "") -> str:
    """STEM@HOST@PID@TOKEN+SUFFIX: leftovers of dead jobs can be told from running ones' files."""
    return f"{stem}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:12]}{suffix}"


def owner_gone(path: Path, stale_after: float | None = None, now: float | None = None) -> bool:
    """An owned_name() whose creator is dead (same host) or older than stale_after seconds."""
    parts = Path(path).name.removesuffix(".tmp").rsplit("@", 3)
    if len(parts) != 4:
        return False
    _, host, pid, _ = parts
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return True
    if stale_after is None:
        return False
    try:
        return (now or time.time()) - Path(path).stat().st_mtime > stale_after
    except FileNotFoundError:
        return False


def temp_path(path: Path) -> Path:
    """Where `path` is written aside before the rename: .NAME@HOST@PID@TOKEN.tmp next to it."""
    return path.with_name(owned_name("." + path.name, ".tmp"))


def out_folder(path: str | os.PathLike, option: str, error: type[Exception]) -> Path:
    """`path` as a Path; `error` naming `option` when it exists and is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{option} {path} exists and is not a folder")
    return path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, crash: str | None = None):
    """Yield a temporary path to write; then fsync it and rename it over `path`, so readers see
    the old file or the whole new one. `crash` names the crash point between fsync and rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        if crash:
            crash_point(crash)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, crash: str | None = None) -> None:
    with atomic_path(path, crash) as tmp:
        tmp.write_text(text)


def load_weights_only(path: str | os.PathLike, error: type[Exception] = ValueError, advice: str = ""):
    """torch.load(path, weights_only=True) on the CPU (pickled objects refused, never run); failing,
    `error` names the file and says what it is (never torch's advice to unpickle), + `advice`."""
    try:
        with warnings.catch_warnings():        # torch's note on pickle protocols is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle.UnpicklingError for objects, RuntimeError for junk, ...
        raise error(f"cannot read {path} as weights: it is {describe_file(path)}; expected a PyTorch "
                    "checkpoint of tensors and plain values (read with weights_only=True: pickled "
                    "objects are refused, never run)" + (f"; {advice}" if advice else "")) from None


def describe_file(path: str | os.PathLike) -> str:
    """What a file that is not a weights-only checkpoint looks like, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not head:
        return "an empty file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head[:4] == b"PAR1":
        return "a Parquet file"
    if head[:4] == b"PK\x03\x04":
        return ("a PyTorch checkpoint holding pickled objects besides tensors and plain values, or a "
                "damaged one" if b"data.pkl" in head else "a zip file that is not a PyTorch checkpoint")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle of objects other than tensors and plain values (a legacy PyTorch file, or any pickle)"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "a binary file of unknown format"
