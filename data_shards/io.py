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
import warnings
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
    Failures raise `error` naming the file, saying in our words what it is (never torch's advice,
    which suggests unpickling), with `advice` appended."""
    try:
        with warnings.catch_warnings():        # torch's note on pickle protocols is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle.UnpicklingError for objects, RuntimeError for junk, ...
        raise error(f"cannot read {path} as weights: it is {describe_file(path)}; expected a PyTorch checkpoint "
                    "of tensors and plain values (read with weights_only=True: pickled objects are refused, "
                    "never run)" + (f"; {advice}" if advice else "")) from None


def describe_file(path: str | os.PathLike) -> str:
    """What a file that is not a weights-only checkpoint looks like, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    text = head.lstrip()
    if not head:
        return "an empty file"
    if text[:1] in (b"{", b"["):
        return "a JSON file"
    if head[:4] == b"PAR1":
        return "a Parquet file"
    if head[:4] == b"PK\x03\x04":
        return "a PyTorch checkpoint holding pickled objects besides tensors and plain values, or a " \
            "damaged one" if b"data.pkl" in head else "a zip file that is not a PyTorch checkpoint"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle of objects other than tensors and plain values (a legacy PyTorch file, or any pickle)"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "a binary file of unknown format"


DEVICE_FORM = "auto, cpu, cuda or cuda:N"


def check_device_name(device: str) -> str:
    """`device` if it reads as DEVICE_FORM (whether this machine has it is resolve_device's question)."""
    name = str(device)
    kind, _, index = name.partition(":")
    if name != "auto" and not (kind in ("cpu", "cuda") and (not index or (index.isdigit() and kind == "cuda"))):
        raise DeviceError(f"--device {name!r} is not a device: expected {DEVICE_FORM}")
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> this rank's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if not isinstance(device, torch.device):
        check_device_name(device)
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
