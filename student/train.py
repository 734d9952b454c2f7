"""Train a student (stage two): DeiT's recipe through timm, one readable loop.

    deit-pipeline train-student --shards TRAIN --cache CACHE --out RUN --distillation-type hard
    torchrun --standalone --nproc_per_node 8 -m pipeline train-student ...   (DDP, same options)

Teacher targets come from a cache (`--cache`), from a teacher run live on the same replayed
batches (`--teacher-online`), or nowhere (`--distillation-type none`: plain supervised
training, e.g. of a teacher). Images always come from `data_shards.replay_slice` work items,
finished on the training device (`data_shards.finish_item`).

As DeiT's main.py / engine.py: setup, then per epoch `train_one_epoch`, evaluate, save.
Every epoch ends with an atomic checkpoint RUN/checkpoint.pt (see checkpoint.py) and a JSON
line in RUN/metrics.jsonl; `--resume` continues from it exactly (optimizer, scheduler, EMA,
RNG of every rank, next epoch).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_shards import AugRecipe, ShardSet
from data_shards.devices import autocast
from data_shards.files import write_text_atomic
from data_shards.hashing import text_seed
from data_shards.faults import crash_point

from . import distributed as D
from .checkpoint import LAST_CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import plan_epoch, train_batches
from .schedule import check_seed_budget, epochs_supported, seeds_for_epoch
from .errors import StudentError
from .evaluate import evaluate_heads
from .losses import DistillationLoss
from .models import StudentConfig, create_student, init_from_checkpoint, is_distilled
from .teachers import CachedTeacher, OnlineTeacher, load_online_teacher

METRICS_FILE = "metrics.jsonl"
# Checkpoints store the student's options inline under these (CLI) names: {stored name: StudentConfig field}.
STUDENT_OPTIONS = {"model": "model", "img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim",
                   "depth": "depth", "num_heads": "num_heads", "model_kwargs": "model_kwargs",
                   "drop_path": "drop_path_rate"}
# Options a resumed run may change (they do not change what an epoch computes); all others must match.
RUN_ONLY_OPTIONS = ("out", "teacher_model", "teacher_batch_size", "teacher_channels_last", "soft_tail_limit", "workers",
                    "reuse_seeds",
                    "compile", "val_shards", "eval_batch_size", "resume", "log_interval", "device", "progress")


class TrainingError(StudentError):
    """Training cannot go on (non-finite loss, ...); the message says what to do."""


@dataclass
class TrainConfig:
    """Every option of train-student; stored as plain primitives (flat, see to_dict) in each checkpoint."""
    shards: str
    out: str
    # teacher
    cache: str | None = None
    teacher_online: str | None = None          # timm name or checkpoint path
    teacher_model: str | None = None           # architecture of a checkpoint that does not record it
    teacher_topk: int = 10                     # online only (a cache brings its own K / full mode)
    teacher_full_logits: bool = False
    teacher_precision: str = "fp32"
    teacher_batch_size: int = 64               # online: cache-teacher's --batch-size, for identical targets
    teacher_channels_last: bool | None = None  # online: None = off, cache-teacher's default
    recipe: dict | None = None                 # AugRecipe fields (a cache brings its own)
    num_seeds: int | None = None               # without a cache: seeds cycle every S epochs if given
    # student (its num_classes is ignored: the shards' class count is used)
    student: StudentConfig = field(default_factory=StudentConfig)
    init_from: str | None = None
    # loss
    distillation_type: str = "hard"
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    soft_tail_limit: float = 0.25              # refuse soft targets whose unrepresented tail mass exceeds this
    # optimisation (DeiT defaults)
    epochs: int = 300
    batch_size: int = 64                       # per process
    lr: float | None = None                    # default 5e-4 * global batch / 512
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    opt: str = "adamw"
    opt_eps: float = 1e-8
    clip_grad: float | None = None
    ema_decay: float | None = None             # DeiT: 0.99996 (kept, not used for eval)
    amp: str = "auto"                          # auto (bf16 on GPU, none on CPU) | none | bf16 | fp16
    seed: int = 0
    repeated_aug: int = 3                      # DeiT's repeated augmentation (student/schedule.py)
    reuse_seeds: bool = False
    max_steps_per_epoch: int | None = None     # cap for smoke runs and benchmarks
    # run
    workers: int = 2
    compile: bool = False                      # torch.compile the student (timm train.py's --torchcompile)
    val_shards: str | None = None
    eval_batch_size: int = 128
    resume: bool = False
    log_interval: int = 20
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict:
        """Flat primitives: the student's options inline (STUDENT_OPTIONS), as checkpoints store them."""
        out = {}
        for name, value in asdict(self).items():
            out |= {k: value[f] for k, f in STUDENT_OPTIONS.items()} if name == "student" else {name: value}
        return out

    def check(self) -> None:
        """The ranges train-student parses its options with, for callers that build a TrainConfig
        themselves: StudentError naming the first option out of range, before any work."""
        whole = [("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                 ("--teacher-topk", self.teacher_topk, 1), ("--teacher-batch-size", self.teacher_batch_size, 1),
                 ("--repeated-aug", self.repeated_aug, 1), ("--eval-batch-size", self.eval_batch_size, 1),
                 ("--log-interval", self.log_interval, 1), ("--num-seeds", self.num_seeds, 1),
                 ("--max-steps-per-epoch", self.max_steps_per_epoch, 1), ("--workers", self.workers, 0),
                 ("--warmup-epochs", self.warmup_epochs, 0), ("--seed", self.seed, 0)]
        for option, value, low in whole:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise StudentError(f"{option} must be a whole number >= {low}, got {value!r}")
        unit, positive, non_negative = ((lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: v > 0, "> 0"),
                                        (lambda v: v >= 0, ">= 0"))
        numbers = [("--distillation-alpha", self.distillation_alpha, unit),
                   ("--soft-tail-limit", self.soft_tail_limit, unit), ("--ema-decay", self.ema_decay, unit),
                   ("--distillation-tau", self.distillation_tau, positive),
                   ("--drop-path", self.student.drop_path_rate, (lambda v: 0 <= v < 1, "in [0, 1)")),
                   ("--lr", self.lr, positive), ("--clip-grad", self.clip_grad, positive),
                   ("--min-lr", self.min_lr, non_negative), ("--warmup-lr", self.warmup_lr, non_negative),
                   ("--weight-decay", self.weight_decay, non_negative)]
        for option, value, (ok, form) in numbers:
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if value is not None and not (finite and ok(value)):
                raise StudentError(f"{option} must be a number {form}, got {value!r}")
        if self.recipe is not None:
            try:
                AugRecipe.from_dict(self.recipe)
            except (TypeError, ValueError) as exc:
                raise StudentError(f"recipe: {exc}") from None
        if self.distillation_type not in ("none", "soft", "hard"):
            raise StudentError(f"--distillation-type must be none, soft or hard, "
                               f"got {self.distillation_type!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Read to_dict()'s flat form (a checkpoint's "args"); unknown keys are ignored."""
        student = StudentConfig(**{f: d[k] for k, f in STUDENT_OPTIONS.items() if k in d})
        known = {f.name for f in fields(cls)} - {"student"}
        return cls(student=student, **{k: v for k, v in d.items() if k in known})


def _amp_precision(amp: str, device: torch.device) -> str:
    """--amp -> a data_shards.io precision name ("auto": bf16 on GPU, none on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise StudentError(f"--amp must be auto, none, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise StudentError("--amp fp16 needs a GPU; use --amp bf16 or none on the CPU")
    return amp


def _derived_seed(*parts) -> int:
    return text_seed("|".join(map(str, parts))) & (2**63 - 1)


class Logger:
    """JSON lines to RUN/metrics.jsonl and notes to stderr, from rank 0 only. Lines are held until
    `open()` (the run passed its checks and starts), so a refused run writes nothing into RUN."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / METRICS_FILE, enabled
        self._held: list[dict] | None = []

    def open(self) -> None:
        """Create RUN and write the lines held so far; from now on lines go straight to the file."""
        held, self._held = self._held or [], None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for record in held:
            self.metrics(record)

    def metrics(self, record: dict) -> None:
        if self._held is not None:
            self._held.append(record)
        elif self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"train-student: {message}", file=sys.stderr, flush=True)
            self.metrics({"event": "note", "message": message})

    def truncate_from_epoch(self, epoch: int) -> None:
        """On resume, drop the lines of the epochs that are about to be run again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("epoch", -1) < epoch]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- setup

def resolve_teacher(cfg: TrainConfig, shard_set: ShardSet, device: torch.device, log: Logger):
    """-> (recipe, teacher source or None, number of seeds or None)."""
    wants_teacher = cfg.distillation_type != "none"
    if cfg.cache and cfg.teacher_online:
        raise StudentError("give either --cache or --teacher-online, not both")
    if wants_teacher and not (cfg.cache or cfg.teacher_online):
        raise StudentError(f"--distillation-type {cfg.distillation_type} needs teacher targets: pass --cache CACHE "
                           "(from cache-teacher) or --teacher-online NAME_OR_CHECKPOINT; or use --distillation-type none")
    if cfg.cache:
        return _cached_teacher(cfg, shard_set, device, log)
    recipe = AugRecipe.from_dict(cfg.recipe) if cfg.recipe is not None else AugRecipe(input_size=cfg.student.img_size or 224)
    if not wants_teacher:
        if cfg.teacher_online:
            log.note("--distillation-type none: --teacher-online is not used")
        return recipe, None, cfg.num_seeds
    teacher = load_online_teacher(cfg.teacher_online, shard_set.num_classes, device, cfg.teacher_model)
    log.note(f"online teacher {teacher.teacher_info['name']} (weights sha256 {teacher.teacher_info['weights_sha256'][:12]}), "
             f"top-{cfg.teacher_topk}{' + full logits' if cfg.teacher_full_logits else ''}, {cfg.teacher_precision}")
    return recipe, OnlineTeacher(teacher, cfg.teacher_topk, cfg.teacher_full_logits, cfg.teacher_precision,
                                 cfg.teacher_batch_size, cfg.teacher_channels_last), cfg.num_seeds


def _cached_teacher(cfg: TrainConfig, shard_set: ShardSet, device: torch.device, log: Logger):
    from teacher_cache.cache import TeacherCache
    cache = TeacherCache.open(cfg.cache)
    # a recipe the user asked for has to be the cache's
    recipe = AugRecipe.from_dict(cfg.recipe) if cfg.recipe is not None else cache.recipe
    cache.check_compatible(shard_set, recipe)
    if cfg.num_seeds is not None and cfg.num_seeds != cache.num_seeds:
        raise StudentError(f"--num-seeds {cfg.num_seeds} differs from the cache's {cache.num_seeds} seeds; "
                           "drop --num-seeds (a cache decides it)")
    if cfg.distillation_type == "none":
        log.note("--distillation-type none: the cache only decides the recipe and seeds; its targets are unused")
        return recipe, None, cache.num_seeds
    if cfg.distillation_type == "soft":
        log.note(check_soft_targets(cache, cfg.distillation_tau, cfg.soft_tail_limit))
    return recipe, CachedTeacher(cache, device=device), cache.num_seeds


def check_soft_targets(cache, tau: float, limit: float) -> str:
    """Refuse soft distillation when the cache cannot represent τ: when the mean tail mass at τ
    (which bounds the total variation to the exact soft target, teacher_cache.targets.soft_tail_mass)
    exceeds `limit`, measured on the first unit. Returns the note to log otherwise.
    Default limit 0.25: in bench/bench_soft_targets.py, bounds up to ~0.2 kept the soft loss's gradient
    cosine to the exact one >= 0.97 (mean, trained-like student); at ~0.35-0.6 it fell to 0.93-0.26."""
    from teacher_cache.targets import soft_tail_mass
    mass = soft_tail_mass(cache.read(0, 0), cache.num_classes, tau)
    fix = (f"re-cache with a larger --topk or --store-logits full, use a lower --distillation-tau, or pass "
           f"--soft-tail-limit 1 to train anyway")
    where = f"{cache.root} (top-{cache.topk} of {cache.num_classes} classes)"
    if mass is None:
        raise StudentError(f"soft distillation at τ={tau:g}: {where} has no tail summary (made before it existed), "
                           f"so the soft target's tail mass at τ != 1 is unknown; {fix}")
    bound = float(mass.mean())
    if bound > limit:
        raise StudentError(f"soft distillation at τ={tau:g}: in {where}, {bound:.1%} of the soft target's mass "
                           f"(mean over shard 0, seed 0) lies in classes whose values are not stored, above "
                           f"--soft-tail-limit {limit:g}; the rebuilt target may differ from the exact one by up to "
                           f"that much in total variation; {fix}")
    return (f"soft targets at τ={tau:g} from {where}: total variation to the exact target <= {bound:.3f} "
            f"(mean tail mass, shard 0 seed 0)")


def check_seed_schedule(cfg: TrainConfig, recipe: AugRecipe, num_seeds: int | None, log: Logger) -> None:
    if cfg.repeated_aug < 1:
        raise StudentError(f"--repeated-aug must be >= 1, got {cfg.repeated_aug}")
    if cfg.repeated_aug > 1 and cfg.repeated_aug != recipe.pairing_seeds:
        raise StudentError(f"--repeated-aug {cfg.repeated_aug} needs a recipe whose pairing_seeds is {cfg.repeated_aug} "
                           f"(this one shares a mixing order between {recipe.pairing_seeds} seeds, so an image's copies "
                           "could not share a step); use --repeated-aug 1 or that many pairing seeds in the recipe")
    if not num_seeds:
        return                         # no cache and no --num-seeds: a new seed group every R epochs
    r, cached = cfg.repeated_aug, bool(cfg.cache)
    if num_seeds < r:
        raise StudentError(f"--repeated-aug {r} needs at least {r} seeds (one group), "
                           f"{'the cache' if cached else '--num-seeds'} has {num_seeds}; "
                           + ("grow the cache (cache-teacher --seeds N)" if cached else "raise --num-seeds")
                           + " or use --repeated-aug 1")
    held = f"a cache of {num_seeds} seeds" if cached else f"--num-seeds {num_seeds}"
    log.note(f"{held} serves {epochs_supported(num_seeds, r)} epochs at --repeated-aug {r} before a "
             f"{'record' if cached else '(image, seed) pair'} is used twice")
    if note := check_seed_budget(cfg.epochs, num_seeds, r, cfg.reuse_seeds, cached=cached):
        log.note(note)


def build_student(cfg: TrainConfig, num_classes: int, recipe: AugRecipe, log: Logger):
    config = replace(cfg.student, num_classes=num_classes, model_kwargs=dict(cfg.student.model_kwargs))
    distilled_training = cfg.distillation_type != "none"
    model = create_student(config, distilled_training)
    # A ViT is built for one input size: follow the recipe's unless --img-size says otherwise.
    grid_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if grid_size is not None and config.img_size is None and tuple(grid_size) != (recipe.input_size,) * 2:
        config.img_size = recipe.input_size
        model = create_student(config, distilled_training)
    if grid_size is not None and config.img_size not in (None, recipe.input_size):
        raise StudentError(f"--img-size {config.img_size} differs from the recipe's input size {recipe.input_size}; "
                           "make them equal (--input-size sets the recipe's)")
    if cfg.init_from:
        for note in init_from_checkpoint(model, cfg.init_from):
            log.note(f"--init-from {cfg.init_from}: {note}")
    if distilled_training and not is_distilled(model):
        log.note(f"{config.model} has no distillation token: it distils through its only head")
    return model, config


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
    student: StudentConfig
    precision: str                          # autocast precision (data_shards.io.PRECISIONS)
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    criterion: DistillationLoss
    train_model: torch.nn.Module            # as the step calls it: DDP-wrapped and/or compiled (weights shared)
    resumed: dict | None = None             # the checkpoint --resume continues, until restore() takes it

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.ctx.world_size


def setup(cfg: TrainConfig, ctx: D.DistContext) -> Run:
    """Everything a run needs, every input checked; nothing is written yet (the Logger holds its lines)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise StudentError(f"--out {out} exists and is not a folder")
    log = Logger(out, ctx.is_main)
    checkpoint = out / LAST_CHECKPOINT
    if checkpoint.exists() and not cfg.resume:
        raise StudentError(f"{out} already holds a checkpoint ({checkpoint}); pass --resume to continue it "
                           "or choose another --out")
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
    train_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model
    if cfg.compile:          # as timm's train.py: compile the (DDP-wrapped) module
        train_model = torch.compile(train_model)
    return Run(cfg, ctx, log, checkpoint, shard_set, val_set, recipe, teacher, num_seeds, model, student, precision,
               lr, *optimisation, train_model)


def create_optimisation(cfg: TrainConfig, model: torch.nn.Module, lr: float, precision: str, device: torch.device):
    """-> (optimizer, scheduler, scaler, EMA or None, criterion), DeiT's through timm."""
    # timm: no weight decay on 1-D params (biases, norms) nor on model.no_weight_decay() (pos_embed, tokens)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
    # timm warns that a 1-epoch cosine "will have no effect": true, and no news to a 1-epoch run
    quiet = _DropLogMessage("Cosine annealing scheduler will have no effect")
    logging.getLogger(CosineLRScheduler.__module__).addFilter(quiet)
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr,
                                      warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)
    finally:
        logging.getLogger(CosineLRScheduler.__module__).removeFilter(quiet)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    return optimizer, scheduler, scaler, ema, DistillationLoss(cfg.distillation_type, cfg.distillation_alpha,
                                                               cfg.distillation_tau)


class _DropLogMessage(logging.Filter):
    """Drops log records holding `text`; every other record passes."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training; returns a summary. Works under torchrun or as one process.
    A --resume whose checkpoint already holds cfg.epochs epochs does nothing ("nothing_to_do")."""
    cfg.check()
    ctx = D.init_distributed(cfg.device)
    try:
        resumed = _checkpoint_to_resume(cfg)
        if resumed is not None and int(resumed["epoch"]) >= cfg.epochs:
            return _nothing_to_do(cfg, resumed, ctx)
        run = setup(cfg, ctx)
        run.resumed = resumed
        start_epoch, global_step, metrics = resume_or_start(run)
        digests = Counter()            # digest checks of the epochs this process runs (all ranks)
        for epoch in range(start_epoch, cfg.epochs):
            metrics, global_step = train_one_epoch(run, epoch, global_step)
            if run.val_set is not None:
                metrics["val"] = evaluate(run)
            save(run, epoch + 1, global_step, metrics)
            run.log.metrics(metrics)
            digests.update(metrics.get("digests", {}))
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


def _checkpoint_to_resume(cfg: TrainConfig) -> dict | None:
    """With --resume, RUN/checkpoint.pt if there is one (read once); refused when it holds more epochs
    than --epochs (a run cannot be cut back)."""
    path = Path(cfg.out) / LAST_CHECKPOINT
    if not (cfg.resume and path.exists()):
        return None
    ckpt = load_checkpoint(path)
    if int(ckpt["epoch"]) > cfg.epochs:
        raise StudentError(f"--resume: {path} has trained {ckpt['epoch']} epochs, more than --epochs "
                           f"{cfg.epochs}; pass --epochs {ckpt['epoch']} or more, or use another --out")
    return ckpt


def _nothing_to_do(cfg: TrainConfig, ckpt: dict, ctx: D.DistContext) -> dict:
    """The summary of a --resume whose checkpoint is already at --epochs: nothing trained or written."""
    path = Path(cfg.out) / LAST_CHECKPOINT
    if ctx.is_main:
        print(f"train-student: --resume: {path} already holds {ckpt['epoch']} epoch(s) of --epochs "
              f"{cfg.epochs}: nothing left to do (pass a larger --epochs to train further)",
              file=sys.stderr, flush=True)
    return {"checkpoint": str(path), "epochs": cfg.epochs, "first_epoch": int(ckpt["epoch"]),
            "epochs_trained": 0, "nothing_to_do": True, "global_step": int(ckpt["global_step"]),
            "metrics": dict(ckpt["metrics"]), "world_size": ctx.world_size}


def digest_coverage(teacher: CachedTeacher, ctx: D.DistContext) -> dict:
    """The cached teacher's digest checks since the last call (an epoch), over all ranks: digests
    compared, (shard, seed) units read, and those whose digests were checked. A unit counts as
    checked when any rank checked it: a rank may read later pieces of a unit whose first piece
    another rank checked (in that step at the earliest): the run, not each rank, checks a unit."""
    seen, checked, verified = teacher.take_coverage()
    cache = teacher.cache
    flags = torch.zeros(2, cache.num_shards, cache.num_seeds, dtype=torch.float64)
    for row, units in enumerate((seen, checked)):
        for shard, seed in units:
            flags[row, shard, seed] = 1
    counts = torch.cat([flags.flatten(), torch.tensor([float(verified)], dtype=torch.float64)])
    total = D.all_reduce_sum(counts.to(ctx.device), ctx).cpu()
    read, checked_any = total[:-1].view(2, -1) > 0
    return {"verified": int(total[-1]), "units_read": int(read.sum()),
            "units_checked": int((read & checked_any).sum())}


def resume_or_start(run: Run) -> tuple[int, int, dict]:
    """-> (first epoch, global step, last metrics): from the checkpoint with --resume, else a fresh start.
    RUN/metrics.jsonl is opened here, once every check has passed."""
    cfg, ctx, log = run.cfg, run.ctx, run.log
    torch.manual_seed(_derived_seed(cfg.seed, "rank", ctx.rank))   # drop path differs across ranks
    if run.resumed is not None:
        start_epoch, global_step, metrics = restore(run)
        log.open()
        log.truncate_from_epoch(start_epoch)
        log.metrics({"event": "resume", "epoch": start_epoch, "global_step": global_step})
        return start_epoch, global_step, metrics
    log.open()
    if cfg.resume:
        log.note(f"--resume: no checkpoint in {cfg.out} yet, starting from epoch 0")
    log.metrics({"event": "start", "world_size": ctx.world_size, "device": str(ctx.device), "lr": run.lr,
                 "global_batch": run.global_batch, "recipe_fingerprint": run.recipe.fingerprint(),
                 "student": run.student.to_dict(), "num_seeds": run.num_seeds})
    return 0, 0, {}


def train_one_epoch(run: Run, epoch: int, global_step: int) -> tuple[dict, int]:
    """One epoch of steps; -> (the epoch's metrics line, global step after it)."""
    cfg, ctx, device = run.cfg, run.ctx, run.ctx.device
    plan = plan_epoch(run.shard_set, epoch, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, run.num_seeds,
                      cfg.repeated_aug, cfg.max_steps_per_epoch,
                      teacher_batch_size=cfg.teacher_batch_size if isinstance(run.teacher, OnlineTeacher) else None)
    run.scheduler.step(epoch)              # lr of this epoch (timm: per-epoch cosine with warm-up)
    lr = run.optimizer.param_groups[0]["lr"]
    run.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = EpochMeter(device)
    batches = train_batches(run.shard_set, plan, run.recipe, cfg.batch_size, run.teacher, cfg.workers,
                            pin_memory=device.type == "cuda", device=device)
    bar = tqdm(total=plan.steps, desc=f"epoch {epoch}", unit="step", disable=not (ctx.is_main and cfg.progress),
               file=sys.stderr, leave=False)
    for step, batch in enumerate(meter.timed(batches)):
        meter.add(train_step(run, batch, global_step), step)
        global_step += 1
        crash_point("train-step")
        bar.update(1)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == plan.steps:
            mean, steps_per_s = meter.close_window(run, epoch, step)
            run.log.metrics({"event": "train", "epoch": epoch, "step": step + 1, "global_step": global_step, "lr": lr,
                             "loss": mean[0], "loss_base": mean[1], "loss_distill": mean[2],
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
        outputs = run.train_model(batch.images)          # batches (teacher targets too) are on the device already
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


class EpochMeter:
    """An epoch's loss sums (total, base, distill), kept on the device between log points (no host sync
    per step), its first non-finite step, the seconds it waited for data (the rest is compute) and its time."""
    NONE = 2**62                           # first_bad when every step was finite

    def __init__(self, device: torch.device):
        self.epoch_sums = torch.zeros(3, device=device)
        self.sums = torch.zeros(3, device=device)            # of the log window (as steps, start)
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.wait_s, self.epoch_start = 0.0, time.perf_counter()
        self.steps, self.start = 0, time.perf_counter()

    def timed(self, batches):
        """The batches, adding the time spent waiting for each to wait_s."""
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.wait_s += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def add(self, loss, step: int) -> None:
        self.sums += torch.stack([loss.total.detach(), loss.base.detach(), loss.distill.detach()])
        self.first_bad = torch.where(torch.isfinite(loss.total.detach()), self.first_bad,
                                     self.first_bad.clamp(max=step))
        self.steps += 1

    def close_window(self, run: Run, epoch: int, step: int) -> tuple[list[float], float]:
        """-> (mean (total, base, distill) over all ranks' window steps, steps/s); stops on a non-finite loss."""
        stats = D.all_reduce_sum(torch.cat([self.sums, (self.first_bad < self.NONE).float().view(1)]), run.ctx)
        if stats[3].item() > 0:
            _stop_non_finite(epoch, step, int(self.first_bad.item()), run.checkpoint, run.log)
        self.epoch_sums += self.sums
        rate = self.steps / max(time.perf_counter() - self.start, 1e-9)
        mean = (stats[:3] / (self.steps * run.ctx.world_size)).tolist()
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return mean, rate

    def epoch_metrics(self, run: Run, plan, epoch: int, lr: float) -> dict:
        ctx, device, done = run.ctx, run.ctx.device, plan.steps      # train_batches gives all or raises
        epoch_time, wait = time.perf_counter() - self.epoch_start, self.wait_s
        steps_per_rank = D.all_gather_rows(torch.tensor([done], dtype=torch.int64), ctx)[:, 0].tolist()
        totals = (D.all_reduce_sum(self.epoch_sums.clone(), ctx) / (done * ctx.world_size)).tolist()
        return {"event": "epoch", "epoch": epoch, "steps": done, "steps_per_rank": steps_per_rank,
                "samples_per_rank": plan.samples_per_rank, "aug_seeds": plan.aug_seeds,
                "lr": lr, "loss": totals[0], "loss_base": totals[1], "loss_distill": totals[2],
                "epoch_time_s": epoch_time, "samples_per_s": done * run.global_batch / max(epoch_time, 1e-9),
                # data-bound when data_wait_s is a large share of epoch_time_s
                "data_wait_s": wait, "compute_s": max(epoch_time - wait, 0.0),
                "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def _stop_non_finite(epoch: int, step: int, first_bad: int, checkpoint: Path, log: Logger) -> None:
    where = (f"epoch {epoch}, step {first_bad + 1}" if first_bad < EpochMeter.NONE
             else f"epoch {epoch}, at or before step {step + 1} (another rank)")
    kept = (f"the last good checkpoint {checkpoint} is kept (resume with --resume)" if checkpoint.exists()
            else "no checkpoint was written yet")
    message = (f"loss became NaN/inf at {where}; training stopped without saving - {kept}. "
               "Lower --lr, set --clip-grad 1.0, or use --amp bf16 instead of fp16")
    log.metrics({"event": "error", "epoch": epoch, "message": message})
    raise TrainingError(message)



def evaluate(run: Run) -> dict:
    """Val accuracy per head; shards dealt to ranks, counts summed."""
    ctx = run.ctx
    shards = list(range(ctx.rank, run.val_set.num_shards, ctx.world_size))
    counts, names = evaluate_heads(run.model, run.val_set, run.recipe, run.cfg.eval_batch_size, ctx.device, shards,
                                   run.precision)
    counts = D.all_reduce_sum(counts.to(ctx.device), ctx).cpu()
    n = max(int(counts[0, 2].item()), 1)
    return {name: {"top1": counts[i, 0].item() / n, "top5": counts[i, 1].item() / n} for i, name in enumerate(names)} \
        | {"num_samples": int(counts[0, 2].item())}


# ----------------------------------------------------------------------------- checkpoints

def save(run: Run, next_epoch: int, global_step: int, metrics: dict) -> None:
    ctx, cfg = run.ctx, run.cfg
    # every rank's RNG state, so drop path continues exactly
    rng_rows = {k: None if v is None else D.all_gather_rows(v, ctx) for k, v in rng_state(ctx.device).items()}
    if ctx.is_main:
        save_checkpoint(run.checkpoint, {
            "model": run.model.state_dict(), "arch": run.student.model, "student": run.student.to_dict(),
            # arch + model_kwargs let cache-teacher load a teacher trained here (sizes included)
            "model_kwargs": run.student.timm_kwargs(), "args": cfg.to_dict(),
            "recipe": run.recipe.to_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "epoch": next_epoch, "global_step": global_step, "rng": rng_rows,
            "data": {"next_epoch": next_epoch, "world_size": ctx.world_size,
                     "shards_content_hash": run.shard_set.content_hash, "cache": cfg.cache},
            "metrics": json.loads(json.dumps(metrics)),
        })
    D.barrier(ctx)


def _seeds_of(num_seeds: int | None, cfg: TrainConfig, ckpt: dict) -> list[list[int]]:
    """The seeds of the epochs a checkpoint has trained, had it used `num_seeds`."""
    return [seeds_for_epoch(e, num_seeds, cfg.repeated_aug) for e in range(int(ckpt["epoch"]))]


def restore(run: Run) -> tuple[int, int, dict]:
    """Load the checkpoint read by _checkpoint_to_resume into the run; its options must be this run's,
    except RUN_ONLY_OPTIONS, --epochs (the cosine schedule then spans the new count: noted) and a
    --num-seeds that gives the epochs trained the same seeds."""
    ctx, path, cfg = run.ctx, run.checkpoint, run.cfg
    ckpt, run.resumed = run.resumed, None
    saved, now = ckpt["args"], cfg.to_dict()
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
               if k not in (*RUN_ONLY_OPTIONS, "epochs", "num_seeds") and saved.get(k) != v]
    old_seeds = saved.get("num_seeds")
    if old_seeds != cfg.num_seeds and _seeds_of(old_seeds, cfg, ckpt) != _seeds_of(cfg.num_seeds, cfg, ckpt):
        changed.append(f"num_seeds: checkpoint {old_seeds!r}, now {cfg.num_seeds!r} (the epochs trained "
                       "would have used other seeds)")
    if changed:
        raise StudentError(f"--resume from {path}: options differ from the checkpoint's run ("
                           + "; ".join(changed) + "); rerun with the checkpoint's options or use another --out")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if saved.get("epochs") != cfg.epochs:
        run.scheduler.t_initial = cfg.epochs    # timm's state dict holds the old length
        run.log.note(f"--resume with --epochs {cfg.epochs} (the checkpoint's run had {saved.get('epochs')}): "
                     f"the cosine schedule now spans {cfg.epochs} epochs, so the lr of epochs "
                     f"{ckpt['epoch']}.. follows the new curve (not what an uninterrupted run of either "
                     "length would use)")
    if ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    rows = ckpt["rng"]
    if ckpt["data"]["world_size"] == ctx.world_size:
        set_rng_state({k: None if v is None else v[ctx.rank] for k, v in rows.items()}, ctx.device)
    else:
        run.log.note(f"--resume: world size {ckpt['data']['world_size']} -> {ctx.world_size}; the data is dealt "
                     "differently and RNG reseeded, so the run will not match an uninterrupted one")
        torch.manual_seed(_derived_seed(run.cfg.seed, "resume", ckpt["epoch"], ctx.rank))
    run.log.note(f"resumed from {path}: epoch {ckpt['epoch']}, step {ckpt['global_step']}")
    return int(ckpt["epoch"]), int(ckpt["global_step"]), dict(ckpt["metrics"])
