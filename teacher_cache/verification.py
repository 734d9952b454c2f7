"""verify_cache: recompute sampled cached records in the very batches that produced them, and compare.

cache-teacher runs the teacher on consecutive slices of --batch-size replayed images of one
(shard, seed), in mixing order (build.py: one work item per batch). On a GPU, bf16 results
depend on the batch a record sat in, so recomputing records in other batches disagrees on a
healthy cache. Here each sampled record's original batch is rebuilt as cache-teacher builds it (the same work item,
replay_item + finish_item: same shard, seed, order and the unit's recorded batch size) and run
with the cache's precision and the unit's channels-last setting: on the same machine and
precision a healthy cache reproduces exactly.

Each sampled (shard, seed) also gets its recorded replay digests and its storage files' sha256
checked. A record whose recomputed argmax differs from the cached one is a *near-tie* when the
recomputation itself puts the two classes within `near_tie_tolerance` (nats) and the stored
top-1 log-prob is that class's recomputed value within the same tolerance; any other difference
is a *real mismatch* and always fails. Near-ties count against --min-agreement (exact argmax
agreement, default 1.0): they fail by default, because on the same machine a healthy cache is
bit-exact; lower --min-agreement to accept them when verifying on other hardware.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from data_shards import ShardSet, WorkItem, replay_item, unit_items
from data_shards.io import file_sha256, resolve_device
from data_shards.items import digest_positions

from .build import finish_batch
from .cache import TeacherCache
from .errors import CacheError
from .layout import TAIL_LOGSUMEXP, Unit, storage_shard_path
from .manifest import with_defaults
from .targets import encode_teacher_logits
from .teacher import check_precision, load_teacher, teacher_logits

RECORDS_PER_PAIR = 8            # sampled records per (shard, seed), all from one batch: one replay serves them
NEAR_TIE_TOLERANCE = 0.05       # nats; about the spread of bf16 logits between GPU kernels of different shapes


@dataclass
class Pick:
    """Records to recompute: rows `rows` (indices within the batch) of batch `batch` of (shard, seed)."""
    shard: int
    seed: int
    batch: int
    batch_size: int
    channels_last: bool
    rows: list[int]


def unit_batch_settings(cache: TeacherCache, unit: Unit) -> tuple[int, bool]:
    """(batch size, channels-last) the unit was computed with. Unit records always held the batch size;
    channels-last was implicit before it was recorded: on for CUDA devices."""
    record = cache.unit_record(unit)
    batch_size = int(record.get("batch_size") or with_defaults(cache.manifest)["batch_size"])
    channels_last = record.get("channels_last")
    if channels_last is None:
        channels_last = str(record.get("device", "")).startswith("cuda")
    return batch_size, bool(channels_last)


def sample_records(cache: TeacherCache, samples: int, seed: int = 0) -> list[Pick]:
    """About `samples` records over done units: random (shard, seed) pairs, one random batch of each,
    up to RECORDS_PER_PAIR random rows of that batch (small caches: further batches of the pairs)."""
    done = cache.done_units()
    if not done:
        raise CacheError(f"teacher cache {cache.root} has no computed unit yet; {cache.fix_command()}")
    rng = np.random.default_rng(seed)
    pairs = [(u, s) for u in done for s in u.seeds]
    used: dict[int, set[int]] = {}
    picks, remaining = [], samples
    while remaining > 0:
        before = remaining
        for i in rng.permutation(len(pairs)):
            if remaining <= 0:
                break
            unit, aug_seed = pairs[i]
            batch_size, channels_last = unit_batch_settings(cache, unit)      # unit records are read once
            count = cache.shard_counts[unit.shard]
            free = sorted(set(range(math.ceil(count / batch_size))) - used.setdefault(int(i), set()))
            if not free:
                continue
            batch = int(free[rng.integers(len(free))])
            used[int(i)].add(batch)
            size = min(batch_size, count - batch * batch_size)
            take = min(RECORDS_PER_PAIR, size, remaining)
            rows = sorted(int(r) for r in rng.choice(size, take, replace=False))
            picks.append(Pick(unit.shard, aug_seed, batch, batch_size, channels_last, rows))
            remaining -= take
        if remaining == before:
            break                          # every batch of every pair is used: the cache is small
    return sorted(picks, key=lambda p: (p.shard, p.seed, p.batch))


def classify(stored_indices: torch.Tensor, stored_logprobs: torch.Tensor, recomputed_logprobs: torch.Tensor,
             tolerance: float) -> str:
    """'match', 'near-tie' or 'mismatch' for one record (stored top-k vs recomputed full log-probs)."""
    cached, best = int(stored_indices[0]), int(torch.argmax(recomputed_logprobs))
    if cached == best:
        return "match"
    gap = float(recomputed_logprobs[best] - recomputed_logprobs[cached])
    stored_off = abs(float(stored_logprobs[0]) - float(recomputed_logprobs[cached]))
    return "near-tie" if gap <= tolerance and stored_off <= tolerance else "mismatch"


def verify_cache(path: str | os.PathLike, shards: str | os.PathLike, samples: int = 64, min_agreement: float = 1.0,
                 max_logprob_diff: float | None = None, device: str = "auto", precision: str | None = None,
                 teacher_checkpoint: str | None = None, seed: int = 0,
                 near_tie_tolerance: float = NEAR_TIE_TOLERANCE) -> dict:
    """Recompute about `samples` sampled records; "ok" is False on any real mismatch, below `min_agreement`
    exact argmax agreement (near-ties count as disagreement), on a digest or file-hash mismatch, or when a
    top-k log-prob or tail log-sum-exp differs by more than `max_logprob_diff` (when given)."""
    if samples < 1:
        raise CacheError(f"--samples must be >= 1, got {samples}")
    cache = TeacherCache.open(path)
    shard_set = ShardSet.open(shards)
    cache.check_compatible(shard_set, cache.recipe)
    picks = sample_records(cache, samples, seed)
    torch_device = resolve_device(device)
    precision = precision or cache.manifest["precision"]
    check_precision(precision, torch_device)
    model = _load_cache_teacher(cache, teacher_checkpoint, torch_device)
    found = _Findings()
    for pick in picks:
        _verify_pick(cache, shard_set, model, pick, precision, near_tie_tolerance, found)
    tally = found.tally
    agreement = tally["match"] / sum(tally.values())
    ok = (tally["mismatch"] == 0 and agreement >= min_agreement and not found.bad_files and not found.bad_digests
          and (max_logprob_diff is None or max(found.max_lp, found.max_tail) <= max_logprob_diff))
    return {"cache": str(cache.root), "records": sum(tally.values()), "pairs": len(picks),
            "argmax_agreement": agreement, "near_ties": tally["near-tie"], "mismatches": tally["mismatch"],
            "near_tie_tolerance": near_tie_tolerance, "disagreements": found.examples,
            "pairs_checked": [[p.shard, p.seed] for p in picks], "batch_sizes": sorted({p.batch_size for p in picks}),
            "channels_last": sorted({p.channels_last for p in picks}),
            "max_logprob_diff": found.max_lp, "max_logit_diff": found.max_logit if cache.has_logits else None,
            "max_tail_logsumexp_diff": found.max_tail if TAIL_LOGSUMEXP in cache.array_names else None,
            "digests_checked": found.digests_checked, "digest_mismatches": found.bad_digests,
            "files_checked": found.files_checked, "file_hash_mismatches": found.bad_files,
            "min_agreement": min_agreement, "max_logprob_diff_allowed": max_logprob_diff,
            "device": str(torch_device), "precision": precision, "ok": ok}


@dataclass
class _Findings:
    """What the recomputation found so far, over every pick."""
    tally: dict[str, int] = field(default_factory=lambda: {"match": 0, "near-tie": 0, "mismatch": 0})
    examples: list[dict] = field(default_factory=list)       # the first 20 disagreements
    checked_units: set[str] = field(default_factory=set)
    checked_pairs: set[tuple[int, int]] = field(default_factory=set)   # (shard, seed): digests seen
    files_checked: int = 0
    bad_files: list[str] = field(default_factory=list)
    digests_checked: int = 0
    bad_digests: list[str] = field(default_factory=list)
    max_lp: float = 0.0
    max_logit: float = 0.0
    max_tail: float = 0.0            # the soft targets' tail summary (top-k mode with K < C)


def _verify_pick(cache: TeacherCache, shard_set: ShardSet, model: torch.nn.Module, pick: Pick, precision: str,
                 tolerance: float, found: _Findings) -> None:
    """Rebuild and rerun the pick's batch; check its unit's files (once), its seed's replay digests
    and its records against the cache."""
    unit = cache.unit_for(pick.shard, pick.seed)
    if unit.name not in found.checked_units:
        found.checked_units.add(unit.name)
        _check_files(cache, unit, found)
    item, images, digests = _original_batch(shard_set, unit, pick, cache.recipe)
    if (pick.shard, pick.seed) not in found.checked_pairs:
        found.checked_pairs.add((pick.shard, pick.seed))
        replayed = _replayed_digests(shard_set, pick, cache.recipe, item, digests)
        _check_digests(cache.unit_digests(pick.shard, pick.seed), replayed, pick.seed, found)
    model.to(memory_format=torch.channels_last if pick.channels_last else torch.contiguous_format)
    logits = teacher_logits(model, images, precision, channels_last=pick.channels_last)
    recomputed = encode_teacher_logits(logits, cache.topk, cache.has_logits).to("cpu")
    full_logprobs = torch.log_softmax(logits, dim=1).cpu()
    stored = cache.read(pick.shard, pick.seed)
    for row in pick.rows:
        pos = int(item.positions[row])
        idx, lp = stored.topk_indices[pos], stored.topk_logprobs[pos]
        verdict = classify(idx, lp, full_logprobs[row], tolerance)
        found.tally[verdict] += 1
        if verdict != "match" and len(found.examples) < 20:
            found.examples.append({"kind": verdict, "shard": pick.shard, "seed": pick.seed, "position": pos,
                                   "batch": pick.batch, "cached_argmax": int(idx[0]),
                                   "recomputed_argmax": int(recomputed.topk_indices[row, 0]),
                                   "recomputed_gap": float(full_logprobs[row].max() - full_logprobs[row, int(idx[0])])})
        found.max_lp = max(found.max_lp, float((full_logprobs[row, idx].half().float() - lp).abs().max()))
        if stored.tail_logsumexp is not None:
            found.max_tail = max(found.max_tail, float((recomputed.tail_logsumexp[row]
                                                        - stored.tail_logsumexp[pos]).abs().max()))
        if stored.logits is not None:
            found.max_logit = max(found.max_logit, float((recomputed.logits[row] - stored.logits[pos]).abs().max()))


def _load_cache_teacher(cache: TeacherCache, teacher_checkpoint, device: torch.device) -> torch.nn.Module:
    t = cache.manifest["teacher"]
    checkpoint = teacher_checkpoint or t.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CacheError(f"the cache's teacher checkpoint {checkpoint} is gone; pass --teacher-checkpoint PATH")
    model = load_teacher(t["name"], checkpoint, num_classes=cache.num_classes, device=device,
                         model_kwargs=t.get("model_kwargs"))
    if model.teacher_info["weights_sha256"] != t["weights_sha256"]:
        raise CacheError(f"teacher weights {model.teacher_info['weights_sha256'][:12]}… differ from the cache's "
                         f"{t['weights_sha256'][:12]}…; pass the checkpoint the cache was computed with")
    return model


def _check_files(cache: TeacherCache, unit: Unit, found: _Findings) -> None:
    """sha256 of the unit's storage files against its record."""
    for name, info in cache.unit_record(unit)["files"].items():
        found.files_checked += 1
        try:
            digest = file_sha256(storage_shard_path(cache.root, name, unit))
        except FileNotFoundError:
            digest = "missing"
        if digest != info["sha256"]:
            found.bad_files.append(f"{unit.name}:{name}")


def _check_digests(recorded: dict[str, str], replayed: dict[str, str], seed: int,
                   found: _Findings) -> None:
    """The (shard, seed)'s recorded digests against the replay's, at the digest positions: a
    differing digest, a recorded key not at a digest position here, or one not recorded fails."""
    keys = sorted(set(recorded) | set(replayed))
    found.digests_checked += len(keys)
    found.bad_digests += [f"{key}@seed{seed}" for key in keys
                          if recorded.get(key) != replayed.get(key)]


def _original_batch(shard_set: ShardSet, unit: Unit, pick: Pick, recipe):
    """The images of batch `pick.batch` exactly as cache-teacher built them (the same work item,
    replayed and finished the same way), and the digests of its samples at digest positions."""
    count = shard_set.shard_counts[unit.shard]
    works = unit_items(count, unit.shard, pick.seed, pick.batch_size)
    if pick.batch >= len(works):
        raise CacheError(f"shard {pick.shard} replays fewer than {pick.batch + 1} batches of {pick.batch_size}: "
                         "the shards changed since the cache was computed")
    keys_cache: dict[int, list[str]] = {}
    item = replay_item(shard_set, works[pick.batch], recipe, keys_cache)
    images, digests = finish_batch(item, recipe, "cpu", count)
    return item, images, digests


def _replayed_digests(shard_set: ShardSet, pick: Pick, recipe, item,
                      digests: dict[str, str]) -> dict[str, str]:
    """Digests of every digest position of (shard, seed): `digests` (those in the pick's batch
    `item`), plus 1-sample slices replayed for the others (any cut of a unit gives the same
    finished images)."""
    count, keys_cache, digests = shard_set.shard_counts[pick.shard], {}, dict(digests)
    for k in digest_positions(count, recipe.pairing_seeds):
        if not item.start <= k < item.stop:
            work = WorkItem(pick.shard, pick.seed, k, k + 1)
            one = replay_item(shard_set, work, recipe, keys_cache)
            digests.update(finish_batch(one, recipe, "cpu", count)[1])
    return digests
