"""Stage two: train DeiT students from the replayed shards and the teacher cache (or an online teacher).

Public API:
    student.train.train(TrainConfig(...))        the training loop (one process or torchrun/DDP)
    evaluate_checkpoint(checkpoint, shards, ...) top-1/top-5 per head (+ teacher agreement)
    DistillationLoss(type, alpha, tau)           DeiT's loss, teacher targets from the cache encoding
    StudentConfig, create_student(...)           timm students with size overrides
    init_from_checkpoint(model, path)            fine-tuning start, position embeddings resampled
    save_checkpoint / load_checkpoint            atomic, weights_only-loadable checkpoint files
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import StudentError
from .evaluate import evaluate_checkpoint
from .losses import DistillationLoss
from .models import StudentConfig, create_student, init_from_checkpoint
from .train import TrainConfig   # (not `train`: the name would hide the module student.train)

__all__ = ["DistillationLoss", "StudentConfig", "StudentError", "TrainConfig", "create_student",
           "evaluate_checkpoint", "init_from_checkpoint", "load_checkpoint", "save_checkpoint"]
