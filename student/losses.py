"""DeiT's distillation loss (facebookresearch/deit losses.py), fed by cached teacher targets.

    base    = soft-target CE(class-head logits, mixed smoothed true labels)
    hard    = CE(dist-head logits, teacher argmax)                       (teacher label not smoothed)
    soft    = KL(log_softmax(dist/τ) ‖ teacher log-probs at τ, sum) · τ² / dist.numel()   (as DeiT)
    total   = (1-α)·base + α·distill          ("none": total = base)

The teacher distribution comes from what the cache stores: full logits when present,
otherwise the top-k log-probs with the remaining mass 1 - Σ exp(top-k) spread evenly over
the other C-K classes; temperature is then applied to that rebuilt distribution.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from teacher_cache.targets import TeacherTargets

from .errors import StudentError

DISTILLATION_TYPES = ("none", "soft", "hard")


class LossParts(NamedTuple):
    total: torch.Tensor
    base: torch.Tensor
    distill: torch.Tensor     # zero for "none"


def teacher_log_probs(teacher: TeacherTargets, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """(N, C) teacher log-probabilities at temperature τ, rebuilt from the stored targets."""
    if teacher.logits is not None:
        return F.log_softmax(teacher.logits.float() / tau, dim=1)
    topk = teacher.topk_logprobs.float()
    n, k = topk.shape
    if k < num_classes:
        rest_mass = (1.0 - topk.exp().sum(dim=1, keepdim=True)).clamp_min(1e-12)  # fp16 rounding can overshoot 1
        log_p = (rest_mass / (num_classes - k)).log().expand(n, num_classes).clone()
    else:
        log_p = topk.new_zeros(n, num_classes)
    log_p.scatter_(1, teacher.topk_indices, topk)
    return F.log_softmax(log_p / tau, dim=1)   # also renormalises the fp16-rounded values


class DistillationLoss(nn.Module):
    def __init__(self, distillation_type: str = "none", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise StudentError(f"distillation type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise StudentError(f"need 0 <= alpha <= 1 and tau > 0, got alpha={alpha}, tau={tau}")
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, outputs, targets: torch.Tensor, teacher: TeacherTargets | None = None) -> LossParts:
        """outputs: logits, or (class logits, dist logits) of a distilled model in training mode.
        targets: (N, C) mixed smoothed true-label targets. teacher: stored targets (not for "none")."""
        cls_logits, dist_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base = torch.sum(-targets * F.log_softmax(cls_logits.float(), dim=-1), dim=-1).mean()
        if self.distillation_type == "none":
            return LossParts(base, base, torch.zeros_like(base))
        if teacher is None:
            raise StudentError(f"distillation type {self.distillation_type!r} needs teacher targets")
        dist_logits = dist_logits.float()
        if self.distillation_type == "hard":
            distill = F.cross_entropy(dist_logits, teacher.label)
        else:
            teacher_logp = teacher_log_probs(teacher, dist_logits.shape[1], self.tau)
            distill = F.kl_div(F.log_softmax(dist_logits / self.tau, dim=1), teacher_logp,
                               reduction="sum", log_target=True) * (self.tau * self.tau) / dist_logits.numel()
        total = (1 - self.alpha) * base + self.alpha * distill
        return LossParts(total, base, distill)
