"""Where the teacher targets of a work item come from: the cache, or the teacher run live.

Both return `TeacherTargets` for every sample of the item, in the item's (mixing) order, and
both go through `teacher_cache.targets.encode_teacher_logits` (via stage one's
`teacher_forward`), so a cached run and an online run see the same numbers.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from data_shards import ReplayItem, tensor_digest
from data_shards.items import digest_positions
from teacher_cache.targets import TeacherTargets
from teacher_cache.teacher import TeacherError, load_teacher, teacher_forward

from .errors import ReplayMismatchError


class CachedTeacher:
    """One batched `cache.read(shard, seed)` per unit, kept in a small LRU; items select their rows.

    Every item is checked at the digest positions it holds (data_shards.items.digest_positions)
    before its targets are returned; why that covers every unit a run reads, in every epoch:
    DESIGN.md, "Replay digests". `take_coverage`: units read and checked since the last call."""
    UNITS_KEPT = 4

    def __init__(self, cache, device: torch.device | str = "cpu"):
        self.cache, self.device = cache, torch.device(device)
        self._units: OrderedDict[tuple[int, int], TeacherTargets] = OrderedDict()
        self._parts = cache.recipe.pairing_seeds
        self._positions: dict[int, list[int]] = {}
        self.unit_reads = 0                # batched reads (LRU misses)
        self.digests_checked = 0
        self.units_seen: set[tuple[int, int]] = set()
        self.units_checked: set[tuple[int, int]] = set()

    def item_targets(self, item: ReplayItem, images: torch.Tensor) -> TeacherTargets:
        self.check_digests(item, images)
        unit = (item.shard, item.aug_seed)
        if unit not in self._units:
            # position order, one read; moved to the device once per unit, not per step
            self._units[unit] = _to_device(self.cache.read(item.shard, item.aug_seed), self.device)
            self.unit_reads += 1
            while len(self._units) > self.UNITS_KEPT:
                self._units.popitem(last=False)
        self._units.move_to_end(unit)
        return self._units[unit].select(item.positions.to(self.device, non_blocking=True))

    def take_coverage(self) -> tuple[set[tuple[int, int]], set[tuple[int, int]], int]:
        """(units read, units whose digests were compared, digests compared) since the last call."""
        coverage = self.units_seen, self.units_checked, self.digests_checked
        self.units_seen, self.units_checked, self.digests_checked = set(), set(), 0
        return coverage

    def check_digests(self, item: ReplayItem, images: torch.Tensor) -> None:
        """Compare the finished images of the item's samples at digest positions with the recorded
        digests; a sample there whose key the cache did not record means other shards or recipe."""
        unit = (item.shard, item.aug_seed)
        self.units_seen.add(unit)
        if item.shard not in self._positions:
            count = self.cache.shard_counts[item.shard]
            self._positions[item.shard] = digest_positions(count, self._parts)
        recorded = None
        for k in self._positions[item.shard]:
            if not item.start <= k < item.stop:
                continue
            recorded = self.cache.unit_digests(*unit) if recorded is None else recorded
            key = item.keys[k - item.start]
            if key not in recorded:
                raise ReplayMismatchError(
                    f"cache {self.cache.root}: mixing-order position {k} of shard {item.shard} "
                    f"seed {item.aug_seed} holds {key!r} here, whose digest the cache did not "
                    f"record (it recorded {', '.join(map(repr, recorded))}); the cache was "
                    "computed from other shards, another recipe or an older version - recompute "
                    "it or pass the shards it was made from")
            found = tensor_digest(images[k - item.start])
            if found != recorded[key]:
                raise ReplayMismatchError(
                    f"replayed image of {key!r} (shard {item.shard}, aug seed {item.aug_seed}) has "
                    f"digest {found}, the cache recorded {recorded[key]}: this machine's "
                    "augmentation differs from the one the teacher saw (library versions? see the "
                    "cache manifest's library_versions); training would use targets of other "
                    "images - recompute the cache here or train where it was computed")
            self.digests_checked += 1
            self.units_checked.add(unit)


def _to_device(targets: TeacherTargets, device: torch.device) -> TeacherTargets:
    if device.type != "cuda":
        return targets.to(device)
    return targets._map(lambda t: t.pin_memory().to(device, non_blocking=True))


class OnlineTeacher:
    """The teacher run live on an item's finished images, batched exactly as cache-teacher does:
    a convnet's output for an image changes in the last bits with its batch, so the plan cuts
    online-teacher items at stage one's batch boundaries (plan_epoch(teacher_batch_size=...)) and
    the targets are bit-identical given the same precision and memory format."""

    def __init__(self, model, topk: int, store_full: bool = False, precision: str = "fp32",
                 batch_size: int = 64, channels_last: bool | None = None):
        self.model, self.topk, self.store_full = model, topk, store_full
        self.precision, self.batch_size = precision, batch_size
        self.channels_last = bool(channels_last)      # default (None) off: cache-teacher's default
        if self.channels_last:
            self.model = model.to(memory_format=torch.channels_last)

    def item_targets(self, item: ReplayItem, images: torch.Tensor) -> TeacherTargets:
        if len(item) > self.batch_size:
            raise ValueError(f"an online-teacher item holds {len(item)} samples, more than the "
                             f"teacher batch {self.batch_size}; plan the epoch with "
                             f"teacher_batch_size={self.batch_size}")
        targets = teacher_forward(self.model, images, self.topk, self.store_full, self.precision,
                                  self.channels_last)
        return targets.to(images.device)    # stage one's encoder returns them on the CPU


def load_online_teacher(spec: str, num_classes: int, device, teacher_model: str | None = None,
                        option: str = "--teacher-online"):
    """NAME_OR_CHECKPOINT -> teacher in eval mode (stage one's load_teacher, which reads a
    train-student checkpoint's arch and model_kwargs; other checkpoints name their architecture
    or need `teacher_model`). `option`: the command's option for `spec`, named in messages."""
    options = ("--teacher-model", option)
    if Path(spec).is_file():
        return load_teacher(teacher_model, spec, num_classes=num_classes, device=device,
                            options=options)
    if Path(spec).suffix in (".pt", ".pth", ".safetensors", ".bin") or Path(spec).exists():
        raise TeacherError(f"{option} {spec} is not a checkpoint file (not found, or a folder)")
    return load_teacher(spec, None, num_classes=num_classes, device=device, options=options)
