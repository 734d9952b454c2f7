"""Start or --resume: the checkpoint a run continues, "nothing to do" when it already holds
--epochs epochs, the check that it is this run (options compared), and its state and RNG loaded.
RUN/metrics.jsonl is opened here, once every check has passed."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_shards.hashing import text_seed

from . import distributed as D
from .checkpoint import (CHECKPOINT_FORMAT, LAST_CHECKPOINT, load_checkpoint, load_run_state,
                         run_record, set_rng_state)
from .config import TrainConfig
from .errors import StudentError
from .samplers import seeds_for_epoch

if TYPE_CHECKING:
    from .train import Run

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


def _seeds_of(num_seeds: int | None, cfg: TrainConfig, ckpt: dict) -> list[list[int]]:
    """The seeds of the epochs a checkpoint has trained, had it used `num_seeds`."""
    return [seeds_for_epoch(e, num_seeds, cfg.repeated_aug) for e in range(int(ckpt["epoch"]))]


def _check_same_run(run: Run, ckpt: dict) -> None:
    """The checkpoint's options must be this run's, except RUN_ONLY_OPTIONS, --epochs and a
    --num-seeds that gives the epochs trained the same seeds (recipe and network as resolved)."""
    cfg, record = run.cfg, run_record(run)
    now = {**record.pop("args"), **record}
    saved = {**ckpt["args"], **{k: ckpt[k] for k in record}}
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
               if k not in (*RUN_ONLY_OPTIONS, "epochs", "num_seeds") and saved.get(k) != v]
    old_seeds = saved.get("num_seeds")
    if (old_seeds != cfg.num_seeds
            and _seeds_of(old_seeds, cfg, ckpt) != _seeds_of(cfg.num_seeds, cfg, ckpt)):
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
    load_run_state(run, ckpt)
    epoch, trained_for = int(ckpt["epoch"]), ckpt["args"]["epochs"]
    if trained_for != cfg.epochs:
        run.scheduler.t_initial = cfg.epochs    # timm's state dict holds the old length
        log.note(f"--resume with --epochs {cfg.epochs} (the checkpoint's run had {trained_for}): "
                 f"the cosine schedule now spans {cfg.epochs} epochs, so the lr of epochs "
                 f"{epoch}.. follows the new curve (not what an uninterrupted run of either "
                 "length would use)")
    world_size = ckpt["data"]["world_size"]
    if world_size == ctx.world_size:
        rows = {k: None if v is None else v[ctx.rank] for k, v in ckpt["rng"].items()}
        set_rng_state(rows, ctx.device)
    else:
        log.note(f"--resume: world size {world_size} -> {ctx.world_size}; the data is dealt "
                 "differently and RNG reseeded, so the run will not match an uninterrupted one")
        torch.manual_seed(derived_seed(cfg.seed, "resume", epoch, ctx.rank))
    log.note(f"resumed from {run.checkpoint}: epoch {epoch}, step {ckpt['global_step']}")
    return epoch, int(ckpt["global_step"]), dict(ckpt["metrics"])
