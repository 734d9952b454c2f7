"""Student checkpoints: the run's state (each thing once; layout in DESIGN.md), tensors and
primitives only, read with torch.load(weights_only=True). Written next to the destination and
renamed over it (os.replace): a crash while saving leaves the previous checkpoint intact.
Format 1 (before issue 21) is still read for evaluation and its weights, not resumed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_shards.files import atomic_path, load_weights_only, owner_gone

from . import distributed as D
from .errors import StudentError

if TYPE_CHECKING:
    from .train import Run

CHECKPOINT_FORMAT = "deit-pipeline/student-checkpoint/2"
READ_FORMATS = (CHECKPOINT_FORMAT, "deit-pipeline/student-checkpoint/1")
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
        raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold tensors and "
                        "primitives only")


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
    """Delete half-written temporaries (io.temp_path) of dead writers on this host."""
    for tmp in path.parent.glob(f".{path.name}@*.tmp"):
        if owner_gone(tmp):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = load_weights_only(path, StudentError, "evaluate --checkpoint and --resume read the "
                              "RUN/checkpoint.pt that train-student writes")
    if not isinstance(state, dict) or state.get("format") not in READ_FORMATS:
        found = (f"format {state.get('format')!r}" if isinstance(state, dict) and "format" in state
                 else "no format field" if isinstance(state, dict) else f"a {type(state).__name__}")
        raise StudentError(f"{path} is not a train-student checkpoint ({found}; train-student "
                           f"writes {CHECKPOINT_FORMAT!r} as RUN/checkpoint.pt); other weights "
                           "are read by --init-from (train-student) or as a teacher")
    return state


# ----------------------------------------------------------------------------- the run's state

# Options a checkpoint stores resolved instead: as "recipe" and as the network (arch, model_kwargs).
RESOLVED_OPTIONS = ("recipe", "aug", "model", "img_size", "patch_size", "embed_dim", "depth",
                    "num_heads", "model_kwargs")


def run_record(run: Run) -> dict:
    """What a checkpoint records of a run's setup: its options (args), the network, the recipe."""
    args = {k: v for k, v in run.cfg.to_dict().items() if k not in RESOLVED_OPTIONS}
    return {"args": args, **run.student.network(), "recipe": run.recipe.to_dict()}


def save_run(run: Run, next_epoch: int, global_step: int, metrics: dict) -> None:
    """RUN/checkpoint.pt after an epoch (rank 0 writes; every rank's RNG state is gathered)."""
    ctx = run.ctx
    # every rank's RNG state, so drop path continues exactly
    rng_rows = {k: None if v is None else D.all_gather_rows(v, ctx)
                for k, v in rng_state(ctx.device).items()}
    if ctx.is_main:
        save_checkpoint(run.checkpoint, {
            "model": run.model.state_dict(), **run_record(run),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "epoch": next_epoch, "global_step": global_step, "rng": rng_rows,
            "data": {"world_size": ctx.world_size,
                     "shards_content_hash": run.shard_set.content_hash, "cache": run.cfg.cache},
            "metrics": json.loads(json.dumps(metrics)),
        })
    D.barrier(ctx)


def load_run_state(run: Run, ckpt: dict) -> None:
    """The checkpoint's weights and optimisation state into the run (its RNG: see resume.py)."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])


# ----------------------------------------------------------------------------- RNG

def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's RNG states as uint8 tensors (drop path and dropout draw from them)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
