"""Student checkpoints: the run's state (each thing once; layout in DESIGN.md), tensors and
primitives only, read with torch.load(weights_only=True). Written next to the destination and
renamed over it (os.replace): a crash while saving leaves the previous checkpoint intact.
Format 1 (before issue 21) is still read for evaluation and its weights, not resumed.
Start or --resume: the checkpoint a run continues (options compared), its state and RNG loaded;
RUN/metrics.jsonl is opened once every check has passed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_shards.files import atomic_path, load_weights_only, owner_gone
from data_shards.hashing import text_seed

from . import distributed as D
from .errors import StudentError
from .models import SIZE_OPTIONS
from .samplers import seeds_for_epoch

if TYPE_CHECKING:
    from .config import TrainConfig
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
    for tmp in path.parent.glob(f".{path.name}@*.tmp"):     # half-written by dead writers here
        if owner_gone(tmp):
            tmp.unlink(missing_ok=True)
    with atomic_path(path, crash="checkpoint-written") as tmp:
        torch.save(state, tmp)


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


# Options a checkpoint stores resolved instead: as "recipe" and as the network (arch, model_kwargs).
RESOLVED_OPTIONS = ("recipe", "aug", "model", *SIZE_OPTIONS, "model_kwargs")


def run_record(run: Run) -> dict:
    """What a checkpoint records of a run's setup: its options (args), the network, the recipe."""
    args = {k: v for k, v in run.cfg.to_dict().items() if k not in RESOLVED_OPTIONS}
    return {"args": args, **run.student.network(), "recipe": run.recipe.to_dict()}


def save_run(run: Run, next_epoch: int, global_step: int, metrics: dict) -> None:
    """RUN/checkpoint.pt after an epoch (rank 0 writes; every rank's RNG state is gathered)."""
    ctx = run.ctx
    # every rank's RNG states (uint8 tensors), so drop path and dropout continue exactly
    cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
    rng_rows = {k: None if v is None else D.all_gather_rows(v, ctx)
                for k, v in {"torch": torch.get_rng_state(), "cuda": cuda}.items()}
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


# Options a resumed run may change (they do not change what an epoch computes); others must match.
RUN_ONLY_OPTIONS = ("out", "teacher_model", "teacher_batch_size", "teacher_channels_last",
                    "soft_tail_limit", "workers", "reuse_seeds", "compile", "val_shards",
                    "eval_batch_size", "resume", "log_interval", "device", "progress")


def derived_seed(*parts) -> int:
    return text_seed("|".join(map(str, parts))) & (2**63 - 1)


def checkpoint_to_resume(cfg: TrainConfig) -> dict | None:
    """With --resume, RUN/checkpoint.pt if there is one (read once); refused when it holds more
    epochs than --epochs (a run cannot be cut back) or has the previous layout."""
    path = Path(cfg.out) / LAST_CHECKPOINT
    if not (cfg.resume and path.exists()):
        return None
    ckpt = load_checkpoint(path)
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise StudentError(f"--resume: {path} is a {ckpt['format']!r} checkpoint, written before "
                           "the checkpoint layout and the replay algorithm changed, so its run "
                           "cannot be continued exactly; train into another --out (--init-from "
                           "takes its weights; evaluate and --teacher-online still read it)")
    if int(ckpt["epoch"]) > cfg.epochs:
        raise StudentError(f"--resume: {path} has trained {ckpt['epoch']} epochs, more than "
                           f"--epochs {cfg.epochs}; pass --epochs {ckpt['epoch']} or more, or use "
                           "another --out")
    return ckpt


def nothing_to_do(cfg: TrainConfig, ckpt: dict, ctx: D.DistContext) -> dict:
    """The summary of a --resume whose checkpoint is at --epochs: nothing trained or written."""
    path = Path(cfg.out) / LAST_CHECKPOINT
    if ctx.is_main:
        print(f"train-student: --resume: {path} already holds {ckpt['epoch']} epoch(s) of --epochs "
              f"{cfg.epochs}: nothing left to do (pass a larger --epochs to train further)",
              file=sys.stderr, flush=True)
    return {"checkpoint": str(path), "epochs": cfg.epochs, "first_epoch": int(ckpt["epoch"]),
            "epochs_trained": 0, "nothing_to_do": True, "global_step": int(ckpt["global_step"]),
            "metrics": dict(ckpt["metrics"]), "world_size": ctx.world_size}


def start_or_resume(run: Run, ckpt: dict | None) -> tuple[int, int, dict]:
    """-> (first epoch, global step, last metrics): from `ckpt` (--resume), else a fresh start."""
    cfg, ctx, log = run.cfg, run.ctx, run.log
    torch.manual_seed(derived_seed(cfg.seed, "rank", ctx.rank))   # drop path differs across ranks
    if ckpt is not None:
        start_epoch, global_step, metrics = _restore(run, ckpt)
        log.open()
        log.truncate_from_epoch(start_epoch)
        log.metrics({"event": "resume", "epoch": start_epoch, "global_step": global_step})
        return start_epoch, global_step, metrics
    log.open()
    if cfg.resume:
        log.note(f"--resume: no checkpoint in {cfg.out} yet, starting from epoch 0")
    log.metrics({"event": "start", "world_size": ctx.world_size, "device": str(ctx.device),
                 "lr": run.lr, "global_batch": run.global_batch,
                 "recipe_fingerprint": run.recipe.fingerprint(), "student": run.student.to_dict(),
                 "num_seeds": run.num_seeds})
    return 0, 0, {}


def _check_same_run(run: Run, ckpt: dict) -> None:
    """The checkpoint's options must be this run's, except RUN_ONLY_OPTIONS, --epochs and a
    --num-seeds that gives the epochs trained the same seeds (recipe and network as resolved)."""
    cfg, record = run.cfg, run_record(run)
    now = {**record.pop("args"), **record}
    saved = {**ckpt["args"], **{k: ckpt[k] for k in record}}
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
               if k not in (*RUN_ONLY_OPTIONS, "epochs", "num_seeds") and saved.get(k) != v]
    old_seeds, r = saved.get("num_seeds"), cfg.repeated_aug     # the epochs trained: same seeds?
    if old_seeds != cfg.num_seeds and any(seeds_for_epoch(e, old_seeds, r)
                                          != seeds_for_epoch(e, cfg.num_seeds, r)
                                          for e in range(int(ckpt["epoch"]))):
        changed.append(f"num_seeds: checkpoint {old_seeds!r}, now {cfg.num_seeds!r} (the epochs "
                       "trained would have used other seeds)")
    if changed:
        raise StudentError(f"--resume from {run.checkpoint}: options differ from the checkpoint's "
                           "run (" + "; ".join(changed) + "); rerun with the checkpoint's options "
                           "or use another --out")


def _restore(run: Run, ckpt: dict) -> tuple[int, int, dict]:
    """Load the checkpoint into the run, once _check_same_run passes. A changed --epochs stretches
    the cosine (noted); another world size deals the data differently (RNG reseeded, noted)."""
    ctx, cfg, log = run.ctx, run.cfg, run.log
    _check_same_run(run, ckpt)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    epoch, trained_for = int(ckpt["epoch"]), ckpt["args"]["epochs"]
    if trained_for != cfg.epochs:
        run.scheduler.t_initial = cfg.epochs    # timm's state dict holds the old length
        log.note(f"--resume with --epochs {cfg.epochs} (the checkpoint's run had {trained_for}): "
                 f"the cosine schedule now spans {cfg.epochs} epochs, so the lr of epochs "
                 f"{epoch}.. follows the new curve (not what an uninterrupted run of either "
                 "length would use)")
    world_size = ckpt["data"]["world_size"]
    if world_size == ctx.world_size:
        torch.set_rng_state(ckpt["rng"]["torch"][ctx.rank])
        if ctx.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][ctx.rank], ctx.device)
    else:
        log.note(f"--resume: world size {world_size} -> {ctx.world_size}; the data is dealt "
                 "differently and RNG reseeded, so the run will not match an uninterrupted one")
        torch.manual_seed(derived_seed(cfg.seed, "resume", epoch, ctx.rank))
    log.note(f"resumed from {run.checkpoint}: epoch {epoch}, step {ckpt['global_step']}")
    return epoch, int(ckpt["global_step"]), dict(ckpt["metrics"])
