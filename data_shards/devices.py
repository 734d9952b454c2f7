"""Devices and precision for every stage: the `--device` rule, this rank's device, the kind of
device a record was computed on, and autocast."""
from __future__ import annotations

import contextlib
import os
import platform

import torch

PRECISIONS = {"fp32": None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_FORM = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide."""


def check_device_name(device: str) -> str:
    """`device` if it reads as DEVICE_FORM (whether this machine has it: resolve_device)."""
    name = str(device)
    kind, _, index = name.partition(":")
    index_ok = not index or (index.isdigit() and kind == "cuda")
    if name != "auto" and not (kind in ("cpu", "cuda") and index_ok):
        raise DeviceError(f"--device {name!r} is not a device: expected {DEVICE_FORM}")
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> this rank's GPU (LOCAL_RANK under torchrun) if CUDA is available, else the CPU."""
    if not isinstance(device, torch.device):
        check_device_name(device)
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is None:   # plain "cuda": this rank's GPU
        rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


def device_kind(device: str | torch.device) -> str:
    """The kind of device, as unit records note it ("cuda NVIDIA H200 sm_90", "cpu x86_64 AVX2"):
    a model's float results may differ between kinds."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    if device.type == "cpu":
        return f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return device.type


def recorded_device_kind(record: dict) -> str:
    """The device kind a record was computed on: older records give only the type ("cuda"),
    which `same_device_kind` matches by type ("": none noted)."""
    return record.get("device_kind") or str(record.get("device") or "").split(":")[0]


def same_device_kind(recorded: str, current: str) -> bool:
    """Whether `current` is the kind `recorded` names (a bare type: by type; "" counts as same)."""
    if " " in recorded:
        return recorded == current
    return not recorded or recorded == current.split(" ")[0]


def autocast(device: torch.device, precision: str | torch.dtype | None):
    """Autocast context: fp32 / none / None mean none; bf16 on CUDA or CPU; fp16 on CUDA only."""
    dtype = PRECISIONS[precision] if isinstance(precision, str) else precision
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
