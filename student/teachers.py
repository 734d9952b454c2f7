"""Where the teacher targets of a replayed unit come from: the cache, or the teacher run live.

Both return `TeacherTargets` for every sample of the unit, in the unit's (mixing) order, and
both go through `teacher_cache.targets.encode_teacher_logits` (via stage one's
`teacher_forward`), so a cached run and an online run see the same numbers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data_shards import tensor_digest
from teacher_cache.errors import CacheError
from teacher_cache.targets import TeacherTargets
from teacher_cache.teacher import load_teacher, teacher_forward

from .checkpoint import CHECKPOINT_FORMAT
from .data import ReplayedUnit
from .models import StudentConfig


class ReplayMismatchError(CacheError):
    """A replayed image differs from the one the teacher saw when the cache was computed."""


class CachedTeacher:
    """One batched `cache.read(shard, seed)` per unit; recorded image digests checked on the way."""

    def __init__(self, cache):
        self.cache = cache
        self.units_read = 0
        self.digests_checked = 0

    def unit_targets(self, unit: ReplayedUnit) -> TeacherTargets:
        self.check_digests(unit)
        targets = self.cache.read(unit.shard, unit.aug_seed)      # position order, one read
        self.units_read += 1
        return targets.select(unit.positions)

    def check_digests(self, unit: ReplayedUnit) -> None:
        """Compare the replayed images of the samples whose digest stage one recorded."""
        recorded = self.cache.unit_digests(unit.shard, unit.aug_seed)
        index = {key: i for i, key in enumerate(unit.keys)}
        for key, digest in recorded.items():
            if key not in index:
                raise ReplayMismatchError(
                    f"cache {self.cache.root}: sample {key!r} recorded for shard {unit.shard} seed {unit.aug_seed} "
                    "is not in that shard here; the cache was computed from other shards - recompute it "
                    "or pass the shards it was made from")
            found = tensor_digest(unit.images[index[key]])
            if found != digest:
                raise ReplayMismatchError(
                    f"replayed image of {key!r} (shard {unit.shard}, aug seed {unit.aug_seed}) has digest {found}, "
                    f"the cache recorded {digest}: this machine's augmentation differs from the one the teacher saw "
                    "(library versions? see the cache manifest's library_versions); training would use "
                    "targets of other images - recompute the cache here or train where it was computed")
            self.digests_checked += 1


class OnlineTeacher:
    """The teacher run live on the unit's replayed images, batched exactly as cache-teacher does.

    Why per unit and not per training batch: a convnet's fp32 output for one image changes in
    the last bits with the batch it is computed in (other GEMM/conv blocking), and a flipped
    low bit can change a rounded top-k value or even the argmax. Stage one runs each
    (shard, seed) in mixing order in consecutive batches of its --batch-size; doing the same
    here (same batch size, same precision) gives bit-identical targets.
    """

    def __init__(self, model, topk: int, store_full: bool = False, precision: str = "fp32", batch_size: int = 64):
        self.model, self.topk, self.store_full = model, topk, store_full
        self.precision, self.batch_size = precision, batch_size
        self.channels_last = next(model.parameters()).device.type == "cuda"   # as stage one on GPUs
        if self.channels_last:
            self.model = model.to(memory_format=torch.channels_last)

    def unit_targets(self, unit: ReplayedUnit) -> TeacherTargets:
        parts = [teacher_forward(self.model, unit.images[i:i + self.batch_size], self.topk, self.store_full,
                                 self.precision, self.channels_last)
                 for i in range(0, len(unit.keys), self.batch_size)]
        return TeacherTargets.cat(parts)


def load_online_teacher(spec: str, num_classes: int, device, teacher_model: str | None = None):
    """NAME_OR_CHECKPOINT -> teacher in eval mode (stage one's load_teacher).

    A train-student checkpoint (e.g. a teacher trained with --distillation-type none) brings its
    own architecture and size options; other checkpoints name it inside or need `teacher_model`.
    """
    path = Path(spec)
    if not path.is_file():
        return load_teacher(spec, None, num_classes=num_classes, device=device)
    try:
        peek = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:       # load_teacher explains unreadable files
        peek = None
    if isinstance(peek, dict) and peek.get("format") == CHECKPOINT_FORMAT:
        config = StudentConfig.from_dict(peek["student"])
        return load_teacher(teacher_model or config.model, path, num_classes=num_classes, device=device,
                            model_kwargs=config.timm_kwargs())
    return load_teacher(teacher_model, path, num_classes=num_classes, device=device)
