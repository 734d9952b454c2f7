"""Student checkpoints: atomic, teacher-free, readable with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain primitives only (no pickled objects):
    format, model (state dict), student (StudentConfig dict), args (training options),
    recipe (AugRecipe dict), optimizer, scheduler, scaler, ema (state dicts or None),
    epoch (epochs completed = next epoch to run), global_step,
    rng {"torch": (world, n) uint8 tensor, "cuda": ... or None} (one row per rank),
    data {"next_epoch", "world_size", "shards_content_hash", "cache"}, metrics (last epoch's).
It is written next to its destination and renamed over it (os.replace), so a crash while
saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from data_shards.files import atomic_path, load_weights_only, owner_gone

from .errors import StudentError

CHECKPOINT_FORMAT = "deit-pipeline/student-checkpoint/1"
LAST_CHECKPOINT = "checkpoint.pt"
_PRIMITIVES = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)


def _check_plain(obj, where: str = "checkpoint") -> None:
    """Refuse anything torch.load(weights_only=True) could not read back."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str/int")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PRIMITIVES):
        raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold tensors and primitives only")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically: to a private temporary file, fsync, then os.replace."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **state}
    _check_plain(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with atomic_path(path, crash="checkpoint-written") as tmp:
        torch.save(state, tmp)


def remove_stale_temporaries(path: Path) -> None:
    """Delete half-written temporaries (io.temp_path) of dead writers on this host (never loaded anyway)."""
    for tmp in path.parent.glob(f".{path.name}@*.tmp"):
        if owner_gone(tmp):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = load_weights_only(path, StudentError, "evaluate --checkpoint and --resume read the RUN/checkpoint.pt "
                              "that train-student writes")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = (f"format {state.get('format')!r}" if isinstance(state, dict) and "format" in state
                 else "no format field" if isinstance(state, dict) else f"a {type(state).__name__}")
        raise StudentError(f"{path} is not a train-student checkpoint ({found}; train-student writes "
                           f"{CHECKPOINT_FORMAT!r} as RUN/checkpoint.pt); other weights are read by --init-from "
                           "(train-student) or as a teacher")
    return state


# ----------------------------------------------------------------------------- RNG

def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's RNG states as uint8 tensors (drop path and dropout draw from them)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
