"""DeiT's distillation loss (facebookresearch/deit losses.py), fed by cached teacher targets.

    base    = soft-target CE(class-head logits, mixed smoothed true labels)
    hard    = CE(dist-head logits, teacher argmax)                       (teacher label not smoothed)
    soft    = KL(log_softmax(dist/τ) ‖ teacher log-probs at τ, sum) · τ² / dist.numel()   (as DeiT)
    total   = (1-α)·base + α·distill          ("none": total = base)

The teacher distribution at τ comes from what the cache stores (teacher_cache/targets.py):
  - full logits z:  p_τ = softmax(z / τ)  (exact);
  - top-k log-probs l_i (i in top k) and the tail summary L_τ = log Σ_{j in tail} exp(l_j / τ),
    stored at τ ∈ {1, 2, 3, 4}, linear in 1/τ for other τ (teacher_cache.targets.tail_logsumexp_at):
    p_τ ∝ exp(l_i / τ) on the top k and exp(L_τ) / (C - K) on each tail class (the tail's shape is lost);
  - top-k only (caches made before the tail summary): the remaining mass 1 - Σ exp(l_i) spread
    evenly over the tail at τ = 1, then tempered; wrong at τ > 1 (bench/bench_soft_targets.py).
Either way the rebuilt p_τ differs from the exact one only inside the tail when the tail mass is
right, so total variation <= the tail's mass at τ (teacher_cache.targets.soft_tail_mass).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from teacher_cache.targets import TeacherTargets, tail_logsumexp_at

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
    log_w = topk.new_zeros(n, num_classes)
    if k < num_classes:
        log_w[:] = tail_log_weight(teacher, num_classes, tau)[:, None]
    log_w.scatter_(1, teacher.topk_indices, topk / tau)
    return F.log_softmax(log_w, dim=1)   # also renormalises the fp16-rounded values


def tail_log_weight(teacher: TeacherTargets, num_classes: int, tau: float) -> torch.Tensor:
    """(N,) unnormalised log-weight of each tail class at τ (see the module docstring)."""
    n_tail = num_classes - teacher.topk_logprobs.shape[1]
    if teacher.tail_logsumexp is None:      # legacy: even spread at τ = 1, then tempered
        rest_mass = (1.0 - teacher.topk_logprobs.float().exp().sum(dim=1)).clamp_min(1e-12)  # fp16 can overshoot 1
        return (rest_mass / n_tail).log() / tau
    return tail_logsumexp_at(teacher, num_classes, tau) - math.log(n_tail)


class DistillationLoss(nn.Module):
    def __init__(self, distillation_type: str = "none", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise StudentError(f"distillation type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise StudentError(f"need 0 <= alpha <= 1 and tau > 0, got alpha={alpha}, tau={tau}")
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau
        self.base_criterion = SoftTargetCrossEntropy()      # as DeiT's main.py with Mixup

    def forward(self, outputs, targets: torch.Tensor, teacher: TeacherTargets | None = None) -> LossParts:
        """outputs: logits, or (class logits, dist logits) of a distilled model in training mode.
        targets: (N, C) mixed smoothed true-label targets. teacher: stored targets (not for "none")."""
        cls_logits, dist_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base = self.base_criterion(cls_logits.float(), targets)
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
