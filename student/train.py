"""Train a student (stage two), DeiT's recipe through timm, as DeiT's main.py / engine.py:
`setup`, then per epoch `train_one_epoch`, `evaluate`, save (RUN/checkpoint.pt and a line of
RUN/metrics.jsonl). One process or torchrun (DDP, same options); `--resume`: checkpoint.py."""
from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_shards import AugRecipe, ShardSet
from data_shards.devices import autocast
from data_shards.faults import crash_point

from . import distributed as D
from .checkpoint import (LAST_CHECKPOINT, checkpoint_to_resume, nothing_to_do, save_run,
                         start_or_resume)
from .config import TrainConfig
from .data import ItemStream, train_batches
from .errors import StudentError
from .evaluate import evaluate_heads
from .losses import DistillationLoss
from .metrics import EpochMeter, Logger, digest_coverage
from .models import StudentConfig, create_student, init_from_checkpoint, is_distilled
from .samplers import plan_epoch
from .teachers import CachedTeacher, OnlineTeacher, check_seed_schedule, resolve_teacher


@dataclass
class Run:
    """What one training holds: its data, teacher, student and optimisation state."""
    cfg: TrainConfig
    ctx: D.DistContext
    log: Logger
    checkpoint: Path
    shard_set: ShardSet
    val_set: ShardSet | None
    recipe: AugRecipe
    teacher: CachedTeacher | OnlineTeacher | None
    num_seeds: int | None
    model: torch.nn.Module
    student: StudentConfig                  # as built: the shards' classes, the recipe's size
    precision: str                          # autocast precision (data_shards.devices.PRECISIONS)
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    criterion: DistillationLoss
    train_model: torch.nn.Module            # as the step calls it: DDP-wrapped and/or compiled

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.ctx.world_size


def setup(cfg: TrainConfig, ctx: D.DistContext) -> Run:
    """Everything a run needs, every input checked; nothing written yet (the Logger holds lines)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise StudentError(f"--out {out} exists and is not a folder")
    log = Logger(out, ctx.is_main)
    checkpoint = out / LAST_CHECKPOINT
    if checkpoint.exists() and not cfg.resume:
        raise StudentError(f"{out} already holds a checkpoint ({checkpoint}); pass --resume to "
                           "continue it or choose another --out")
    shard_set = ShardSet.open(cfg.shards)
    recipe, teacher, num_seeds = resolve_teacher(cfg, shard_set, ctx.device, log)
    check_seed_schedule(cfg, recipe, num_seeds, log)
    val_set = ShardSet.open(cfg.val_shards) if cfg.val_shards else None
    torch.manual_seed(cfg.seed)            # same initial weights on every rank
    model, student = build_student(cfg, shard_set.num_classes, recipe, log)
    model.to(ctx.device)
    precision = _amp_precision(cfg.amp, ctx.device)
    lr = cfg.lr if cfg.lr is not None else 5e-4 * cfg.batch_size * ctx.world_size / 512
    optimisation = create_optimisation(cfg, model, lr, precision, ctx.device)
    train_model = model if not ctx.distributed else DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:          # as timm's train.py: compile the (DDP-wrapped) module
        train_model = torch.compile(train_model)
    return Run(cfg, ctx, log, checkpoint, shard_set, val_set, recipe, teacher, num_seeds, model,
               student, precision, lr, *optimisation, train_model)


def build_student(cfg: TrainConfig, num_classes: int, recipe: AugRecipe, log: Logger):
    config = replace(cfg.student, num_classes=num_classes,
                     model_kwargs=dict(cfg.student.model_kwargs))
    distilled_training = cfg.distillation_type != "none"
    model = create_student(config, distilled_training)
    # A ViT is built for one input size: follow the recipe's unless --img-size says otherwise.
    grid_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = recipe.input_size
    if grid_size is not None and config.img_size is None and tuple(grid_size) != (size, size):
        config.img_size = size
        model = create_student(config, distilled_training)
    if grid_size is not None and config.img_size not in (None, size):
        raise StudentError(f"--img-size {config.img_size} differs from the recipe's input size "
                           f"{size}; make them equal (--input-size sets the recipe's)")
    if cfg.init_from:
        for note in init_from_checkpoint(model, cfg.init_from):
            log.note(f"--init-from {cfg.init_from}: {note}")
    if distilled_training and not is_distilled(model):
        log.note(f"{config.model} has no distillation token: it distils through its only head")
    return model, config


def _amp_precision(amp: str, device: torch.device) -> str:
    """--amp -> a data_shards.devices precision name ("auto": bf16 on GPU, none on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise StudentError(f"--amp must be auto, none, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise StudentError("--amp fp16 needs a GPU; use --amp bf16 or none on the CPU")
    return amp


def create_optimisation(cfg: TrainConfig, model: torch.nn.Module, lr: float, precision: str,
                        device: torch.device):
    """-> (optimizer, scheduler, scaler, EMA or None, criterion), DeiT's through timm."""
    # timm: no weight decay on 1-D params (biases, norms), nor on model.no_weight_decay() (tokens)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    eps=cfg.opt_eps)
    # timm warns that a 1-epoch cosine "will have no effect": true, and no news to a 1-epoch run
    timm_log = logging.getLogger(CosineLRScheduler.__module__)
    warning = "Cosine annealing scheduler will have no effect"
    quiet = lambda record: warning not in record.getMessage()  # noqa: E731
    timm_log.addFilter(quiet)
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr,
                                      warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr)
    finally:
        timm_log.removeFilter(quiet)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    loss = DistillationLoss(cfg.distillation_type, cfg.distillation_alpha, cfg.distillation_tau)
    return optimizer, scheduler, scaler, ema, loss


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training; returns a summary. Works under torchrun or as one process.
    A --resume whose checkpoint already holds cfg.epochs epochs does nothing ("nothing_to_do")."""
    cfg.check()
    ctx = D.init_distributed(cfg.device)
    try:
        resumed = checkpoint_to_resume(cfg)
        if resumed is not None and int(resumed["epoch"]) >= cfg.epochs:
            return nothing_to_do(cfg, resumed, ctx)
        run = setup(cfg, ctx)
        start_epoch, global_step, metrics = start_or_resume(run, resumed)
        stream = item_stream(run, range(start_epoch, cfg.epochs))
        digests = Counter()            # digest checks of the epochs this process runs (all ranks)
        for epoch in range(start_epoch, cfg.epochs):
            metrics, global_step = train_one_epoch(run, stream, epoch, global_step)
            if run.val_set is not None:
                metrics["val"] = evaluate(run)
            save_run(run, epoch + 1, global_step, metrics)
            run.log.metrics(metrics)
            digests.update(metrics.get("digests", {}))
        stream.close()
    finally:
        D.close_distributed()
    if isinstance(run.teacher, CachedTeacher):
        run.log.note(f"cache: {run.teacher.unit_reads} batched unit reads on this rank; over "
                     f"all ranks, {digests['verified']} image digests verified, and the digests "
                     f"of {digests['units_checked']} of the {digests['units_read']} (shard, seed) "
                     "units read checked (counted per epoch)")
    return {"checkpoint": str(run.checkpoint), "epochs": cfg.epochs, "first_epoch": start_epoch,
            "epochs_trained": cfg.epochs - start_epoch, "nothing_to_do": False,
            "global_step": global_step, "metrics": metrics, "world_size": ctx.world_size,
            "digests": dict(digests)}


def item_stream(run: Run, epochs: range) -> ItemStream:
    """This rank's items of all `epochs`, replayed by --workers processes that live for the run."""
    cfg, ctx = run.cfg, run.ctx
    online = isinstance(run.teacher, OnlineTeacher)
    plan_for = partial(plan_epoch, run.shard_set.shard_counts, batch_size=cfg.batch_size,
                       rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                       num_seeds=run.num_seeds, repeated_aug=cfg.repeated_aug,
                       max_steps=cfg.max_steps_per_epoch,
                       teacher_batch_size=cfg.teacher_batch_size if online else None)
    return ItemStream(run.shard_set, run.recipe, plan_for, epochs, cfg.batch_size, cfg.workers,
                      pin_memory=ctx.device.type == "cuda")


def train_one_epoch(run: Run, stream: ItemStream, epoch: int, global_step: int) -> tuple[dict, int]:
    """One epoch of steps; -> (the epoch's metrics line, global step after it)."""
    cfg, ctx, device = run.cfg, run.ctx, run.ctx.device
    plan = stream.plan(epoch)
    run.scheduler.step(epoch)              # lr of this epoch (timm: per-epoch cosine with warm-up)
    lr = run.optimizer.param_groups[0]["lr"]
    run.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = EpochMeter(device)
    batches = train_batches(run.shard_set, plan, run.recipe, cfg.batch_size, run.teacher,
                            device=device, items=stream.epoch_items(epoch))
    bar = tqdm(total=plan.steps, desc=f"epoch {epoch}", unit="step", file=sys.stderr, leave=False,
               disable=not (ctx.is_main and cfg.progress))
    for step, batch in enumerate(meter.timed(batches)):
        meter.add(train_step(run, batch, global_step), step)
        global_step += 1
        crash_point("train-step")
        bar.update(1)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == plan.steps:
            mean, steps_per_s = meter.close_window(run, epoch, step)
            run.log.metrics({"event": "train", "epoch": epoch, "step": step + 1,
                             "global_step": global_step, "lr": lr, "loss": mean[0],
                             "loss_base": mean[1], "loss_distill": mean[2],
                             "samples_per_s": steps_per_s * run.global_batch})
            bar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{lr:.2e}")
    bar.close()
    metrics = meter.epoch_metrics(run, plan, epoch, lr)
    if isinstance(run.teacher, CachedTeacher):
        metrics["digests"] = digest_coverage(run.teacher, ctx)
    return metrics, global_step


def train_step(run: Run, batch, global_step: int):
    """Forward (autocast), DeiT's loss, backward, (clip), optimizer step, EMA; -> the loss parts."""
    with autocast(run.ctx.device, run.precision):
        outputs = run.train_model(batch.images)   # batches (teacher targets too) are on the device
    loss = run.criterion(outputs, batch.targets, batch.teacher)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss.total).backward()
    if run.cfg.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.model, step=global_step)
    return loss


def evaluate(run: Run) -> dict:
    """Val accuracy per head; shards dealt to ranks, counts summed."""
    ctx = run.ctx
    shards = list(range(ctx.rank, run.val_set.num_shards, ctx.world_size))
    counts, names = evaluate_heads(run.model, run.val_set, run.recipe, run.cfg.eval_batch_size,
                                   ctx.device, shards, run.precision)
    counts = D.all_reduce_sum(counts.to(ctx.device), ctx).cpu()
    n = int(counts[0, 2].item())
    return {name: {"top1": counts[i, 0].item() / max(n, 1), "top5": counts[i, 1].item() / max(n, 1)}
            for i, name in enumerate(names)} | {"num_samples": n}
