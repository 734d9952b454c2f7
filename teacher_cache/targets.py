"""What the teacher contributes per (sample, aug seed), exactly as stored in the cache.

`encode_teacher_logits` is the one place where teacher logits become targets: stage one stores
its output, and stage two's online teacher passes its live logits through it too, so a cached run
and an online run see identical numbers. Top-k mode also stores the tail's log-sum-exp at
τ = 1, 2, 3, 4 (TAIL_TAUS), from which stage two rebuilds the tail's mass at any τ (DESIGN.md;
chosen by bench/bench_soft_targets.py); only the tail's shape is lost (`soft_tail_mass`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

# The temperatures at which the tail's log-sum-exp is stored (stage two interpolates in 1/τ).
TAIL_TAUS = (1.0, 2.0, 3.0, 4.0)


@dataclass
class TeacherTargets:
    topk_indices: torch.Tensor               # (N, K) int64, descending by teacher score
    topk_logprobs: torch.Tensor              # (N, K) float32 (values representable in fp16)
    logits: torch.Tensor | None = None       # (N, C) float32 (fp16 values), full mode only
    tail_logsumexp: torch.Tensor | None = None   # (N, len(TAIL_TAUS)) (fp16 values), top-k, K < C

    @property
    def label(self) -> torch.Tensor:
        """The teacher's hard label (argmax of its fp32 logits)."""
        return self.topk_indices[:, 0]

    def __len__(self) -> int:
        return self.topk_indices.shape[0]

    def _map(self, fn) -> "TeacherTargets":
        return TeacherTargets(**{f.name: None if getattr(self, f.name) is None
                                 else fn(getattr(self, f.name)) for f in fields(self)})

    def select(self, index) -> "TeacherTargets":
        return self._map(lambda t: t[index])

    def to(self, device) -> "TeacherTargets":
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        return TeacherTargets(**{f.name: None if getattr(parts[0], f.name) is None
                                 else torch.cat([getattr(p, f.name) for p in parts])
                                 for f in fields(parts[0])})


def tail_logsumexp(logprobs: torch.Tensor, topk_indices: torch.Tensor,
                   taus=TAIL_TAUS) -> torch.Tensor:
    """(N, len(taus)): log Σ_{j outside the top k} exp(log p_j / τ) for each τ."""
    tail = logprobs.scatter(1, topk_indices, float("-inf"))
    return torch.stack([torch.logsumexp(tail / tau, dim=1) for tau in taus], dim=1)


def tail_logsumexp_at(targets: TeacherTargets, num_classes: int, tau: float) -> torch.Tensor:
    """(N,) L(β) = log Σ_tail exp(β · log p_j) at β = 1/τ: stored at β = 1/τ for τ in TAIL_TAUS, and
    L(0) = log(C - K); linear in β in between (L is convex in β, so the interpolated tail mass is
    never too small; for τ < 1 the last segment is extended and may be)."""
    k = targets.topk_indices.shape[1]
    points = [(0.0, torch.full((len(targets),), math.log(num_classes - k)))]
    points += sorted((1.0 / t, v) for t, v in zip(TAIL_TAUS, targets.tail_logsumexp.float().unbind(1)))
    beta = 1.0 / tau
    i = next((i for i in range(len(points) - 1) if beta <= points[i + 1][0]), len(points) - 2)
    (b0, l0), (b1, l1) = points[i], points[i + 1]
    return l0 + (l1 - l0) * (beta - b0) / (b1 - b0)


def soft_tail_mass(targets: TeacherTargets, num_classes: int, tau: float) -> torch.Tensor | None:
    """(N,) mass of the tail (the classes whose individual values are not stored) in the soft target
    at τ, or None when the cache cannot tell (no tail summary and τ != 1). A rebuilt soft target
    with the right tail mass differs from the exact one only inside the tail, so this bounds their
    total variation; 0 with full logits or K = C."""
    k = targets.topk_indices.shape[1]
    if targets.logits is not None or k >= num_classes:
        return torch.zeros(len(targets))
    top = targets.topk_logprobs.float()
    if targets.tail_logsumexp is None:
        return (1.0 - top.exp().sum(dim=1)).clamp(0.0, 1.0) if tau == 1.0 else None
    log_tail = tail_logsumexp_at(targets, num_classes, tau)
    return (log_tail - torch.logaddexp(log_tail, torch.logsumexp(top / tau, dim=1))).exp()


# The soft-target guard (train-student, inspect-cache): the 99th percentile over records of the
# tail mass at τ, on at most GUARD_UNITS (shard, seed) units spread over shards and seeds. A
# per-record statistic: a mean lets a minority of flat records (the ones soft targets are for)
# pass with most of their target unstored.
GUARD_QUANTILE = 0.99
DEFAULT_SOFT_TAIL_LIMIT = 0.25    # train-student's --soft-tail-limit; inspect-cache reports the fit
GUARD_UNITS = 8


def guard_units(num_shards: int, num_seeds: int,
                max_units: int = GUARD_UNITS) -> list[tuple[int, int]]:
    """Up to `max_units` distinct (shard, seed) pairs, deterministic, spread over both: seeds
    evenly over 0..num_seeds-1, shards evenly (or in turn, when there are fewer than the pairs)."""
    n = min(max_units, num_shards * num_seeds)
    return [(i * num_shards // n if num_shards >= n else i % num_shards, i * num_seeds // n)
            for i in range(n)]


def tail_masses(parts: list[TeacherTargets], num_classes: int, tau: float) -> torch.Tensor | None:
    """soft_tail_mass at τ of every record of `parts`, concatenated (None: cannot tell)."""
    masses = [soft_tail_mass(t, num_classes, tau) for t in parts]
    return None if not masses or any(m is None for m in masses) else torch.cat(masses)


def tail_mass_quantile(parts: list[TeacherTargets], num_classes: int, tau: float,
                       q: float = GUARD_QUANTILE) -> float | None:
    """The q-quantile over every record of `parts` of soft_tail_mass at τ (None: cannot tell)."""
    masses = tail_masses(parts, num_classes, tau)
    return None if masses is None else float(masses.double().quantile(q))


def largest_fit_tau(parts: list[TeacherTargets], num_classes: int, limit: float,
                    lowest: float = 0.25, highest: float = 1000.0) -> float | None:
    """The largest τ (floored to 0.01) whose tail_mass_quantile is <= limit: math.inf when any τ is
    (exact targets, or (C-K)/C <= limit, the tail's share as τ -> ∞), None when not even `lowest`
    is. A record's tail mass grows with τ (the tail's log-probs are below the top k's, and the
    stored summary keeps that), so the quantile does too: bisection in log τ. Without a tail
    summary only τ = 1 is known: 1.0 or None."""
    fits = lambda tau: (m := tail_mass_quantile(parts, num_classes, tau)) is not None and m <= limit  # noqa: E731
    k = parts[0].topk_indices.shape[1] if parts else num_classes
    if not parts or parts[0].logits is not None or (num_classes - k) / num_classes <= limit:
        return math.inf
    if any(t.tail_logsumexp is None for t in parts):
        return 1.0 if fits(1.0) else None
    if not fits(lowest):
        return None
    if fits(highest):
        return highest
    lo, hi = math.log(lowest), math.log(highest)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(math.exp(mid)) else (lo, mid)
    return max(lowest, math.floor(math.exp(lo) * 100) / 100)


def encode_teacher_logits(logits: torch.Tensor, topk: int,
                          store_full: bool = False) -> TeacherTargets:
    """fp32 teacher logits (N, C) -> top-k indices + fp16-rounded top-k log-probs, and either
    the full fp16 logits or (when K < C) the fp16 tail summary `tail_logsumexp`."""
    logits = logits.detach().float()
    if not 1 <= topk <= logits.shape[1]:
        raise ValueError(f"top-k K={topk} must be between 1 and the number of classes {logits.shape[1]}")
    logprobs = torch.log_softmax(logits, dim=1)
    values, indices = torch.topk(logprobs, topk, dim=1, largest=True, sorted=True)
    full = logits.half().float() if store_full else None
    has_tail = not store_full and topk < logits.shape[1]
    tail = tail_logsumexp(logprobs, indices).half().float() if has_tail else None
    return TeacherTargets(indices.long(), values.half().float(), full, tail)
