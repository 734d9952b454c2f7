"""train-student's options: `TrainConfig`, the one home of their defaults (the CLI shows these,
as it shows StudentConfig's), and the ranges they are checked against before any work."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from teacher_cache.targets import DEFAULT_SOFT_TAIL_LIMIT

from .errors import StudentError
from .models import StudentConfig


DEFAULT_TEACHER_TOPK = 10      # the online teacher's K when --teacher-topk is not given


@dataclass
class TrainConfig:
    """Every option of train-student, under the CLI's names (DeiT's defaults)."""
    shards: str
    out: str
    # teacher
    cache: str | None = None
    teacher_online: str | None = None          # timm name or checkpoint path
    teacher_model: str | None = None           # architecture of a checkpoint not recording it
    # online only (a cache brings its own K / full mode); None: full logits for soft distillation
    # (DeiT's), the top DEFAULT_TEACHER_TOPK for hard; given with soft: truncated and guarded
    teacher_topk: int | None = None
    teacher_full_logits: bool = False
    teacher_precision: str = "fp32"
    teacher_batch_size: int = 64               # online: cache-teacher's --batch-size (same targets)
    teacher_channels_last: bool | None = None  # online: None = off, cache-teacher's default
    recipe: dict | None = None                 # AugRecipe fields, missing ones DeiT's / the cache's
    aug: dict = field(default_factory=dict)    # recipe fields set one by one (--aug, --input-size)
    # without a cache: epoch e uses seeds R*g..R*g+R-1, g = (e // R) mod (S // R), R = repeated_aug
    num_seeds: int | None = None
    # student (its num_classes is ignored: the shards' class count is used)
    student: StudentConfig = field(default_factory=StudentConfig)
    init_from: str | None = None
    # loss; distillation_type None: hard with --cache / --teacher-online, none without
    distillation_type: str | None = None
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    soft_tail_limit: float = DEFAULT_SOFT_TAIL_LIMIT  # refuse soft targets whose tail mass exceeds it
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
    amp: str = "auto"                          # auto (bf16 on GPU, none on CPU), none, bf16, fp16
    seed: int = 0
    repeated_aug: int = 3                      # DeiT's repeated augmentation (student/samplers.py)
    reuse_seeds: bool = False
    max_steps_per_epoch: int | None = None     # cap for smoke runs and benchmarks
    # run
    workers: int = 2
    compile: bool = False                      # torch.compile the student (timm's --torchcompile)
    val_shards: str | None = None
    eval_batch_size: int = 128
    resume: bool = False
    log_interval: int = 20
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.distillation_type is None:
            self.distillation_type = "hard" if self.cache or self.teacher_online else "none"

    def to_dict(self) -> dict:
        """Flat primitives, the student's options inline (from_dict's form)."""
        flat = asdict(self)
        student = flat.pop("student")
        del student["num_classes"]
        return flat | student

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Read to_dict()'s flat form (the CLI's options); unknown keys are ignored."""
        options = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "student"}
        return cls(student=StudentConfig.from_dict(d), **options)

    def check(self) -> None:
        """The ranges train-student parses its options with, for callers that build a TrainConfig
        themselves: StudentError naming the first option out of range, before any work."""
        values = {**vars(self), "drop_path": self.student.drop_path_rate}     # under CLI names
        whole = {"epochs": 1, "batch_size": 1, "teacher_topk": 1, "teacher_batch_size": 1,
                 "repeated_aug": 1, "eval_batch_size": 1, "log_interval": 1, "num_seeds": 1,
                 "max_steps_per_epoch": 1, "workers": 0, "warmup_epochs": 0, "seed": 0}
        for name, low in whole.items():
            value, option = values[name], "--" + name.replace("_", "-")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise StudentError(f"{option} must be a whole number >= {low}, got {value!r}")
        unit, positive = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: v > 0, "> 0")
        non_negative, below_one = (lambda v: v >= 0, ">= 0"), (lambda v: 0 <= v < 1, "in [0, 1)")
        numbers = {"distillation_alpha": unit, "soft_tail_limit": unit, "ema_decay": unit,
                   "distillation_tau": positive, "drop_path": below_one, "lr": positive,
                   "clip_grad": positive, "min_lr": non_negative, "warmup_lr": non_negative,
                   "weight_decay": non_negative}
        for name, (ok, form) in numbers.items():
            value, option = values[name], "--" + name.replace("_", "-")
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if value is not None and not (finite and ok(value)):
                raise StudentError(f"{option} must be a number {form}, got {value!r}")
        if self.distillation_type not in ("none", "soft", "hard"):
            raise StudentError(f"--distillation-type must be none, soft or hard, "
                               f"got {self.distillation_type!r}")


def option_defaults() -> dict:
    """{option name: default} of TrainConfig and the student's fields: what the CLI shows."""
    return {f.name: f.default for cls in (TrainConfig, StudentConfig) for f in fields(cls)
            if f.default is not MISSING}
