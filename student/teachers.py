"""Where a run's teacher targets come from (a cache, a teacher run online, or none) and what that
source decides before any work: the recipe (a cache's, the user's fields refused where they
differ), the seeds, and the guards on soft targets and on the seed schedule. Both sources return
`TeacherTargets` for a work item's samples in its (mixing) order, encoded by stage one's
`teacher_forward`, so a cached run and an online run see the same numbers."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_shards import AugRecipe, ReplayItem, ShardSet, finish_item, tensor_digest
from data_shards.items import digest_positions, unit_items
from teacher_cache.cache import TeacherCache
from teacher_cache.targets import GUARD_QUANTILE, TeacherTargets, guard_units, tail_mass_quantile
from teacher_cache.teacher import TeacherError, load_teacher, teacher_forward

from .config import DEFAULT_TEACHER_TOPK, TrainConfig
from .data import iter_items
from .errors import ReplayMismatchError, StudentError
from .samplers import check_seed_budget, epochs_supported

if TYPE_CHECKING:
    from .metrics import Logger


class CachedTeacher:
    """One batched `cache.read(shard, seed)` per unit, kept in a small LRU; items select their rows.

    Every item is checked at the digest positions it holds (data_shards.items.digest_positions)
    before its targets are returned; why that covers every unit a run reads, in every epoch:
    DESIGN.md, "Replay digests". `take_coverage`: units read and checked since the last call."""
    UNITS_KEPT = 4

    def __init__(self, cache, device: torch.device | str = "cpu"):
        self.cache, self.device = cache, torch.device(device)
        self._units: OrderedDict[tuple[int, int], TeacherTargets] = OrderedDict()
        self._positions: dict[int, list[int]] = {}
        self.unit_reads = 0                # batched reads (LRU misses)
        self.units_seen, self.units_checked, self.digests_checked = set(), set(), 0

    def item_targets(self, item: ReplayItem, images: torch.Tensor) -> TeacherTargets:
        self.check_digests(item, images)
        unit = (item.shard, item.aug_seed)
        if unit not in self._units:
            # position order, one read; moved to the device once per unit, not per step (pinned)
            cuda = self.device.type == "cuda"
            self._units[unit] = self.cache.read(item.shard, item.aug_seed)._map(
                lambda t: (t.pin_memory() if cuda else t).to(self.device, non_blocking=cuda))
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
            self._positions[item.shard] = digest_positions(count, self.cache.recipe.pairing_seeds)
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


class OnlineTeacher:
    """The teacher run live on an item's finished images, batched exactly as cache-teacher does:
    a convnet's output for an image changes in the last bits with its batch, so the plan cuts
    online-teacher items at stage one's batch boundaries (plan_epoch(teacher_batch_size=...)) and
    the targets are bit-identical given the same precision and memory format."""

    def __init__(self, model, topk: int, store_full: bool = False, precision: str = "fp32",
                 batch_size: int = 64, channels_last: bool | None = None):
        self.topk, self.store_full, self.precision = topk, store_full, precision
        self.batch_size = batch_size
        self.channels_last = bool(channels_last)      # default (None) off: cache-teacher's default
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

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


def resolve_recipe(cache: TeacherCache | None, recipe: dict | None, aug: dict,
                   img_size: int | None = None) -> AugRecipe:
    """The run's recipe: `recipe`'s fields (missing ones DeiT's), else the cache's, else DeiT's;
    then the fields set one by one (`aug`: --aug, --input-size). A recipe not taken from the
    cache follows --img-size where --input-size is not given. The cache's check_compatible then
    refuses any field that differs from the cache's, naming it."""
    if recipe is None and cache is not None:
        fields = {**cache.recipe.to_dict(), **aug}
    else:
        fields = {**(recipe or {}), **({"input_size": img_size} if img_size else {}), **aug}
    try:
        return AugRecipe.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise StudentError(f"recipe (--recipe/--aug/--input-size): {exc}") from None


def resolve_teacher(cfg: TrainConfig, shard_set: ShardSet, device: torch.device, log: Logger):
    """-> (recipe, teacher source or None, number of seeds or None)."""
    wants_teacher = cfg.distillation_type != "none"
    if cfg.cache and cfg.teacher_online:
        raise StudentError("give either --cache or --teacher-online, not both")
    if wants_teacher and not (cfg.cache or cfg.teacher_online):
        raise StudentError(f"--distillation-type {cfg.distillation_type} needs teacher targets: "
                           "pass --cache CACHE (from cache-teacher) or --teacher-online "
                           "NAME_OR_CHECKPOINT; or use --distillation-type none")
    if cfg.cache:
        return _cached_teacher(cfg, shard_set, device, log)
    recipe = resolve_recipe(None, cfg.recipe, cfg.aug, cfg.student.img_size)
    if not wants_teacher:
        if cfg.teacher_online:
            log.note("--distillation-type none: --teacher-online is not used")
        return recipe, None, cfg.num_seeds
    teacher = load_online_teacher(cfg.teacher_online, shard_set.num_classes, device,
                                  cfg.teacher_model)
    info = teacher.teacher_info
    # Soft targets from a live teacher cost no storage: full logits (DeiT's), unless truncation is
    # asked for (--teacher-topk without --teacher-full-logits), which is then guarded as a cache.
    truncated = (cfg.distillation_type == "soft" and cfg.teacher_topk is not None
                 and not cfg.teacher_full_logits)
    full = cfg.teacher_full_logits or (cfg.distillation_type == "soft" and not truncated)
    topk = cfg.teacher_topk or min(DEFAULT_TEACHER_TOPK, shard_set.num_classes)
    log.note(f"online teacher {info['name']} (weights sha256 {info['weights_sha256'][:12]}), "
             f"top-{topk}{' + full logits' if full else ''}, {cfg.teacher_precision}")
    online = OnlineTeacher(teacher, topk, full, cfg.teacher_precision, cfg.teacher_batch_size,
                           cfg.teacher_channels_last)
    if truncated:
        log.note(check_online_soft_targets(online, cfg, shard_set, recipe, device))
    return recipe, online, cfg.num_seeds


def _cached_teacher(cfg: TrainConfig, shard_set: ShardSet, device: torch.device, log: Logger):
    cache = TeacherCache.open(cfg.cache)
    recipe = resolve_recipe(cache, cfg.recipe, cfg.aug, cfg.student.img_size)
    cache.check_compatible(shard_set, recipe)
    if cfg.num_seeds is not None and cfg.num_seeds != cache.num_seeds:
        raise StudentError(f"--num-seeds {cfg.num_seeds} differs from the cache's "
                           f"{cache.num_seeds} seeds; drop --num-seeds (a cache decides it)")
    if cfg.distillation_type == "none":
        log.note("--distillation-type none: the cache only decides the recipe and seeds; its "
                 "targets are unused")
        return recipe, None, cache.num_seeds
    if cfg.distillation_type == "soft":
        log.note(check_soft_targets(cache, cfg.distillation_tau, cfg.soft_tail_limit))
    return recipe, CachedTeacher(cache, device=device), cache.num_seeds


SOFT_FIX = ("use a lower --distillation-tau, or pass --soft-tail-limit 1 to train anyway (a "
            "bound on the total variation, not a measured error)")


def check_soft_targets(cache: TeacherCache, tau: float, limit: float) -> str:
    """Refuse soft distillation when the cache cannot represent τ: soft_guard on the records of up
    to 8 (shard, seed) units spread over the cache (targets.guard_units); -> the note to log.
    Default limit 0.25: in bench/bench_soft_targets.py, bounds up to ~0.2 kept the soft loss's
    gradient cosine to the exact one >= 0.97 (mean, trained-like student); ~0.35-0.6: 0.93-0.26."""
    units = guard_units(cache.num_shards, cache.num_seeds)
    where = f"{cache.root} (top-{cache.topk} of {cache.num_classes} classes)"
    fix = f"re-cache with a larger --topk or --store-logits full, {SOFT_FIX}"
    return soft_guard([cache.read(*unit) for unit in units], cache.num_classes, tau, limit, where,
                      _units_text(units), fix)


def check_online_soft_targets(online: OnlineTeacher, cfg: TrainConfig, shard_set: ShardSet,
                              recipe: AugRecipe, device: torch.device) -> str:
    """soft_guard for an online teacher asked to truncate: its targets on the first teacher batch
    of each of up to 8 (shard, seed) units spread over the shards and the run's seeds."""
    seeds = cfg.num_seeds or cfg.repeated_aug * -(-cfg.epochs // cfg.repeated_aug)
    units = guard_units(shard_set.num_shards, seeds)
    counts = shard_set.shard_counts
    firsts = [item for shard, seed in units
              for item in unit_items(counts[shard], shard, seed, online.batch_size)[:1]]
    parts = [online.item_targets(item, finish_item(item, recipe, device)).to("cpu")
             for item in iter_items(shard_set, firsts, recipe)]
    where = (f"the online teacher's top-{online.topk} of {shard_set.num_classes} classes "
             "(--teacher-topk)")
    return soft_guard(parts, shard_set.num_classes, cfg.distillation_tau, cfg.soft_tail_limit,
                      where, "the first teacher batch of " + _units_text(units),
                      f"drop --teacher-topk (full logits), raise it, {SOFT_FIX}")


def soft_guard(parts: list[TeacherTargets], num_classes: int, tau: float, limit: float,
               where: str, sample: str, fix: str) -> str:
    """The one guard on truncated soft targets: refuse when the 99th percentile over records of
    the tail mass at τ (a bound on each rebuilt target's total variation to the exact one,
    targets.soft_tail_mass) exceeds `limit`; else -> the note to log."""
    p99 = tail_mass_quantile(parts, num_classes, tau)
    records = sum(len(t) for t in parts)
    stat = f"p{100 * GUARD_QUANTILE:g} over {records} records of {sample}"
    if p99 is None:
        raise StudentError(f"soft distillation at τ={tau:g}: {where} has no tail summary (made "
                           "before it existed), so the soft target's tail mass at τ != 1 is "
                           f"unknown; {fix}")
    if p99 > limit:
        raise StudentError(f"soft distillation at τ={tau:g}: in {where}, {p99:.1%} of the soft "
                           f"target's mass ({stat}) lies in classes whose values are not stored, "
                           f"above --soft-tail-limit {limit:g}; such rebuilt targets may differ "
                           f"from the exact ones by up to that much in total variation; {fix}")
    return (f"soft targets at τ={tau:g} from {where}: total variation to the exact target <= "
            f"{p99:.3f} (tail mass, {stat})")


def _units_text(units: list[tuple[int, int]]) -> str:
    shards, seeds = (",".join(map(str, sorted(set(ids)))) for ids in zip(*units))
    return f"{len(units)} (shard, seed) units: shards {shards}, seeds {seeds}"


def check_seed_schedule(cfg: TrainConfig, recipe: AugRecipe, num_seeds: int | None,
                        log: Logger) -> None:
    """Refuse a --repeated-aug the recipe's pairing or the seeds cannot serve; note the budget."""
    r, cached = cfg.repeated_aug, bool(cfg.cache)
    if r > 1 and r != recipe.pairing_seeds:
        raise StudentError(f"--repeated-aug {r} needs a recipe whose pairing_seeds is {r} (this "
                           f"one shares a mixing order between {recipe.pairing_seeds} seeds, so an "
                           "image's copies could not share a step); use --repeated-aug 1 or that "
                           "many pairing seeds in the recipe")
    if not num_seeds:
        return                         # no cache, no --num-seeds: a new seed group every R epochs
    if num_seeds < r:
        raise StudentError(f"--repeated-aug {r} needs at least {r} seeds (one group), "
                           f"{'the cache' if cached else '--num-seeds'} has {num_seeds}; "
                           + ("grow the cache (cache-teacher --seeds N)" if cached
                              else "raise --num-seeds")
                           + " or use --repeated-aug 1")
    held = f"a cache of {num_seeds} seeds" if cached else f"--num-seeds {num_seeds}"
    log.note(f"{held} serves {epochs_supported(num_seeds, r)} epochs at --repeated-aug {r} before "
             f"a {'record' if cached else '(image, seed) pair'} is used twice")
    if note := check_seed_budget(cfg.epochs, num_seeds, r, cfg.reuse_seeds, cached=cached):
        log.note(note)
