"""Small helpers every stage shares: hashing, atomic files, process liveness, weights-only
loading, devices and precision. data_shards is the first stage, so any stage may import this.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import socket
import time
import uuid
from pathlib import Path

import torch

from .faults import crash_point  # noqa: F401  (the crash points live here too: one import for callers)

PRECISIONS = {"fp32": None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide."""


# ----------------------------------------------------------------------------- hashing

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


# ----------------------------------------------------------------------------- owned files, atomic writes

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_name(stem: str, suffix: str = "") -> str:
    """A name that records its creator, STEM@HOST@PID@TOKEN+SUFFIX, so leftovers of dead jobs
    can be told from the files of running ones ('@' never appears in host names)."""
    return f"{stem}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:12]}{suffix}"


def owner_gone(path: Path, stale_after: float | None = None, now: float | None = None) -> bool:
    """True for an owned_name() whose creator is dead (same host) or older than stale_after seconds."""
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


# ----------------------------------------------------------------------------- torch

def load_weights_only(path: str | os.PathLike, error: type[Exception] = ValueError, advice: str = ""):
    """torch.load(path, weights_only=True) on the CPU: pickled objects are refused, never run.
    Failures raise `error` naming the file, with `advice` appended."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for objects, RuntimeError for junk, ...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise error(f"cannot read {path} with torch.load(weights_only=True): {reason}"
                    + (f"; {advice}" if advice else "")) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> this rank's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is None:   # plain "cuda": this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def device_kind(device: str | torch.device) -> str:
    """What kind of device computes on `device`, as unit records note it: for CUDA the GPU's name
    and compute capability ("cuda NVIDIA H200 sm_90"), for the CPU its architecture and torch's
    kernel capability ("cpu x86_64 AVX2"). A model's float results may differ between kinds."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    if device.type == "cpu":
        return f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return device.type


def recorded_device_kind(record: dict) -> str:
    """The device kind a record was computed on; records written before kinds were noted give
    only their device type ("cuda", "cpu"), which `same_device_kind` matches on the type alone
    ("": no device noted at all)."""
    return record.get("device_kind") or str(record.get("device") or "").split(":")[0]


def same_device_kind(recorded: str, current: str) -> bool:
    """Whether `current` (a device_kind) is the kind `recorded` names; a bare type matches its type,
    and an unknown kind ("") counts as the same (the strict case)."""
    if " " in recorded:
        return recorded == current
    return not recorded or recorded == current.split(" ")[0]


def autocast(device: torch.device, precision: str | torch.dtype | None):
    """Autocast context: fp32 / none / None mean none; bf16 on CUDA or CPU; fp16 on CUDA only."""
    dtype = PRECISIONS[precision] if isinstance(precision, str) else precision
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
