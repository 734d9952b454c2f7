"""verify_cache: recompute sampled cached records in the very batches that produced them, and
compare (DESIGN.md, verify-cache).

On a GPU, bf16 results depend on the batch a record sat in, so each sampled record's original
batch is rebuilt as cache-teacher built it (the same work item, the unit's batch size and
channels-last, the cache's precision): on the same machine a healthy cache reproduces exactly. A
differing argmax is a *near-tie* when the recomputation puts the two classes within
`near_tie_tolerance` nats and the stored top-1 log-prob is its class's recomputed value within the
same tolerance, else a *real mismatch* (always fails). Near-ties fail on the unit's kind of device
(`device_kind` in its record); on another kind they are expected, reported and do not fail.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from data_shards import ShardSet, WorkItem, replay_item, unit_items
from data_shards.devices import device_kind, recorded_device_kind, resolve_device, same_device_kind
from data_shards.items import digest_positions

from .build import finish_batch
from .cache import TeacherCache
from .errors import CacheError
from .layout import TAIL_LOGSUMEXP, Unit
from .manifest import with_defaults
from .targets import encode_teacher_logits
from .teacher import check_precision, load_teacher, teacher_logits

# sampled records per (shard, seed), all from one batch: one replay serves them
RECORDS_PER_PAIR = 8
# nats; about the spread of bf16 logits between GPU kernels of different shapes
NEAR_TIE_TOLERANCE = 0.05
VERDICTS = ("match", "near-tie", "mismatch")


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
    """(batch size, channels-last) the unit was computed with. Unit records always held the batch
    size; channels-last was implicit before it was recorded: on for CUDA devices."""
    record = cache.unit_record(unit)
    batch_size = int(record.get("batch_size") or with_defaults(cache.manifest)["batch_size"])
    channels_last = record.get("channels_last")
    if channels_last is None:
        channels_last = str(record.get("device", "")).startswith("cuda")
    return batch_size, bool(channels_last)


def sample_records(cache: TeacherCache, samples: int, seed: int = 0,
                   units: list[Unit] | None = None) -> list[Pick]:
    """About `samples` records over `units` (default: the done ones): random (shard, seed) pairs,
    one random batch of each, up to RECORDS_PER_PAIR random rows of that batch (small caches:
    further batches of the pairs). Empty when there is no unit."""
    done = cache.done_units() if units is None else units
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
            batch_size, channels_last = unit_batch_settings(cache, unit)   # records read once
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


def classify(stored_indices: torch.Tensor, stored_logprobs: torch.Tensor,
             recomputed_logprobs: torch.Tensor, tolerance: float) -> str:
    """'match', 'near-tie' or 'mismatch' for one record (stored top-k vs recomputed full log-probs)."""
    cached, best = int(stored_indices[0]), int(torch.argmax(recomputed_logprobs))
    if cached == best:
        return "match"
    gap = float(recomputed_logprobs[best] - recomputed_logprobs[cached])
    stored_off = abs(float(stored_logprobs[0]) - float(recomputed_logprobs[cached]))
    return "near-tie" if gap <= tolerance and stored_off <= tolerance else "mismatch"


def verify_cache(path: str | os.PathLike, shards: str | os.PathLike, samples: int = 64,
                 min_agreement: float = 1.0, max_logprob_diff: float | None = None,
                 device: str = "auto", precision: str | None = None,
                 teacher_checkpoint: str | None = None, seed: int = 0,
                 near_tie_tolerance: float = NEAR_TIE_TOLERANCE, allow_incomplete: bool = False) -> dict:
    """Check every done unit's files against its record (existence, size, sha256), list the units
    not computed yet, and recompute about `samples` sampled records of the intact units. "ok" is
    False on any damaged unit, any missing unit (unless `allow_incomplete`), any real mismatch,
    below `min_agreement` exact argmax agreement of the records recomputed on their unit's kind of
    device (near-ties count as disagreement; on another kind they are expected and only reported),
    on a digest mismatch, or when a top-k log-prob or tail log-sum-exp differs by more than
    `max_logprob_diff` (when given). Bad input (no cache, other shards, other teacher weights, a bad
    option) raises CacheError."""
    _check_verify_options(samples, min_agreement, near_tie_tolerance, max_logprob_diff, seed)
    cache = TeacherCache.open(path)
    shard_set = ShardSet.open(shards)
    cache.check_compatible(shard_set, cache.recipe)
    torch_device = resolve_device(device)
    precision = precision or cache.manifest["precision"]
    check_precision(precision, torch_device)
    done, missing = cache.done_units(), cache.missing_units()
    found = _Findings(kind=device_kind(torch_device))
    for unit in done:                      # cheap next to the teacher: every unit, every file
        _check_files(cache, unit, found)
    picks = sample_records(cache, samples, seed, [u for u in done if u.name not in found.damaged])
    model = _load_cache_teacher(cache, teacher_checkpoint, torch_device) if picks else None
    for pick in picks:
        _verify_pick(cache, shard_set, model, pick, precision, near_tie_tolerance, found, torch_device)
    tally, other = found.tally, found.other_kind
    records = sum(tally.values())
    agreement = tally["match"] / records if records else None
    same_records = records - sum(other.values())
    same_agreement = (tally["match"] - other["match"]) / same_records if same_records else None
    ok = (tally["mismatch"] == 0 and (same_agreement is None or same_agreement >= min_agreement)
          and not found.damaged and not found.bad_digests and (allow_incomplete or not missing)
          and (max_logprob_diff is None or max(found.max_lp, found.max_tail) <= max_logprob_diff))
    pairs = sorted({(p.shard, p.seed) for p in picks})
    return {"cache": str(cache.root), "records": records, "pairs": len(pairs),
            "units_total": len(done) + len(missing), "units_done": len(done),
            "units_missing": len(missing), "missing_units": [u.name for u in missing[:20]],
            "complete": not missing, "allow_incomplete": allow_incomplete,
            "damaged_units": [{"unit": name, "problem": why} for name, why in found.damaged.items()],
            "fix": cache.repair_advice(bool(found.damaged)) if missing or found.damaged else None,
            "argmax_agreement": agreement, "near_ties": tally["near-tie"],
            "mismatches": tally["mismatch"], "near_tie_tolerance": near_tie_tolerance,
            "disagreements": found.examples, "pairs_checked": [list(p) for p in pairs],
            "batch_sizes": sorted({p.batch_size for p in picks}),
            "channels_last": sorted({p.channels_last for p in picks}),
            "max_logprob_diff": found.max_lp,
            "max_logit_diff": found.max_logit if cache.has_logits else None,
            "max_tail_logsumexp_diff": found.max_tail if TAIL_LOGSUMEXP in cache.array_names else None,
            "digests_checked": found.digests_checked, "digest_mismatches": found.bad_digests,
            "files_checked": found.files_checked, "file_hash_mismatches": found.bad_files,
            "min_agreement": min_agreement, "max_logprob_diff_allowed": max_logprob_diff,
            "device": str(torch_device), "precision": precision, "device_kind": found.kind,
            "recorded_device_kinds": sorted(found.recorded_kinds),
            "same_kind_agreement": same_agreement, "other_kind_records": sum(other.values()),
            "other_kind_near_ties": other["near-tie"], "ok": ok}


def _check_verify_options(samples: int, min_agreement: float, near_tie_tolerance: float,
                          max_logprob_diff: float | None, seed: int) -> None:
    """The ranges verify-cache's options are parsed with, for callers that do not go through the CLI."""
    for valid, option, rule, value in (
            (samples >= 1, "--samples", ">= 1", samples),
            (0.0 <= min_agreement <= 1.0, "--min-agreement", "in [0, 1]", min_agreement),
            (near_tie_tolerance >= 0.0, "--near-tie-tolerance", ">= 0", near_tie_tolerance),
            (max_logprob_diff is None or max_logprob_diff >= 0.0, "--max-logprob-diff", ">= 0",
             max_logprob_diff),
            (seed >= 0, "--seed", ">= 0", seed)):
        if not valid:
            raise CacheError(f"{option} must be {rule}, got {value}")


@dataclass
class _Findings:
    """What the recomputation found so far, over every pick."""
    kind: str                                                 # device_kind of the recomputation
    tally: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    other_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    recorded_kinds: set[str] = field(default_factory=set)     # the sampled units' device kinds
    examples: list[dict] = field(default_factory=list)        # the first 20 disagreements
    damaged: dict[str, str] = field(default_factory=dict)     # unit name -> what is wrong
    checked_pairs: set[tuple[int, int]] = field(default_factory=set)   # (shard, seed): digests seen
    files_checked: int = 0
    bad_files: list[str] = field(default_factory=list)
    digests_checked: int = 0
    bad_digests: list[str] = field(default_factory=list)
    max_lp: float = 0.0
    max_logit: float = 0.0
    max_tail: float = 0.0            # the soft targets' tail summary (top-k mode with K < C)


def _verify_pick(cache: TeacherCache, shard_set: ShardSet, model: torch.nn.Module, pick: Pick,
                 precision: str, tolerance: float, found: _Findings, device: torch.device) -> None:
    """Rebuild and rerun the pick's batch; check its seed's replay digests and its records against
    the cache (a unit that cannot be read is recorded as damaged)."""
    unit = cache.unit_for(pick.shard, pick.seed)
    try:
        stored = cache.read(pick.shard, pick.seed)
        recorded = cache.unit_digests(pick.shard, pick.seed)
    except CacheError as exc:              # intact files that still do not decode: damage, reported
        found.damaged.setdefault(unit.name, str(exc))
        return
    recorded_kind = recorded_device_kind(cache.unit_record(unit))
    found.recorded_kinds.add(recorded_kind)
    same_kind = same_device_kind(recorded_kind, found.kind)
    item, images, digests = _original_batch(shard_set, unit, pick, cache.recipe, device)
    if (pick.shard, pick.seed) not in found.checked_pairs:    # once per pair, however many batches
        found.checked_pairs.add((pick.shard, pick.seed))
        replayed = _replayed_digests(shard_set, pick, cache.recipe, item, digests, device)
        _check_digests(recorded, replayed, pick.seed, found)
    model.to(memory_format=torch.channels_last if pick.channels_last else torch.contiguous_format)
    logits = teacher_logits(model, images, precision, channels_last=pick.channels_last)
    recomputed = encode_teacher_logits(logits, cache.topk, cache.has_logits).to("cpu")
    full_logprobs = torch.log_softmax(logits, dim=1).cpu()
    for row in pick.rows:
        pos = int(item.positions[row])
        idx, lp = stored.topk_indices[pos], stored.topk_logprobs[pos]
        verdict = classify(idx, lp, full_logprobs[row], tolerance)
        found.tally[verdict] += 1
        if not same_kind:
            found.other_kind[verdict] += 1
        if verdict != "match" and len(found.examples) < 20:
            cached = int(idx[0])
            found.examples.append({"kind": verdict, "shard": pick.shard, "seed": pick.seed,
                                   "position": pos, "batch": pick.batch, "cached_argmax": cached,
                                   "recomputed_argmax": int(recomputed.topk_indices[row, 0]),
                                   "recomputed_gap":
                                       float(full_logprobs[row].max() - full_logprobs[row, cached])})
        found.max_lp = max(found.max_lp,
                           float((full_logprobs[row, idx].half().float() - lp).abs().max()))
        if stored.tail_logsumexp is not None:
            found.max_tail = max(found.max_tail, float((recomputed.tail_logsumexp[row]
                                                        - stored.tail_logsumexp[pos]).abs().max()))
        if stored.logits is not None:
            found.max_logit = max(found.max_logit,
                                  float((recomputed.logits[row] - stored.logits[pos]).abs().max()))


def _load_cache_teacher(cache: TeacherCache, teacher_checkpoint,
                        device: torch.device) -> torch.nn.Module:
    t = cache.manifest["teacher"]
    checkpoint = teacher_checkpoint or t.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CacheError(f"the cache's teacher checkpoint {checkpoint} is gone; pass "
                         f"--teacher-checkpoint PATH")
    model = load_teacher(t["name"], checkpoint, num_classes=cache.num_classes, device=device,
                         model_kwargs=t.get("model_kwargs"))
    if model.teacher_info["weights_sha256"] != t["weights_sha256"]:
        raise CacheError(f"teacher weights {model.teacher_info['weights_sha256'][:12]}… differ "
                         f"from the cache's {t['weights_sha256'][:12]}…; pass the checkpoint the "
                         f"cache was computed with")
    return model


def _check_files(cache: TeacherCache, unit: Unit, found: _Findings) -> None:
    """The unit's storage files against its record (existence, size, sha256)."""
    problems = cache.unit_file_problems(unit, hash_files=True)
    found.files_checked += len(cache.array_names)
    found.bad_files += [f"{unit.name}:{name}" for name in problems if name != "record"]
    if problems:
        found.damaged[unit.name] = "; ".join(problems.values())


def _check_digests(recorded: dict[str, str], replayed: dict[str, str], seed: int,
                   found: _Findings) -> None:
    """The (shard, seed)'s recorded digests against the replay's, at the digest positions: a
    differing digest, a recorded key not at a digest position here, or one not recorded fails."""
    keys = sorted(set(recorded) | set(replayed))
    found.digests_checked += len(keys)
    found.bad_digests += [f"{key}@seed{seed}" for key in keys
                          if recorded.get(key) != replayed.get(key)]


def _original_batch(shard_set: ShardSet, unit: Unit, pick: Pick, recipe, device: torch.device):
    """The images of batch `pick.batch` exactly as cache-teacher built them (the same work item,
    replayed and finished the same way, on `device`: finishing gives the same bits on any device),
    and the digests of its samples at digest positions."""
    count = shard_set.shard_counts[unit.shard]
    works = unit_items(count, unit.shard, pick.seed, pick.batch_size)
    if pick.batch >= len(works):
        raise CacheError(f"shard {pick.shard} replays fewer than {pick.batch + 1} batches of "
                         f"{pick.batch_size}: the shards changed since the cache was computed")
    item = replay_item(shard_set, works[pick.batch], recipe, {})
    images, digests = finish_batch(item, recipe, device, count)
    return item, images, digests


def _replayed_digests(shard_set: ShardSet, pick: Pick, recipe, item, digests: dict[str, str],
                      device: torch.device) -> dict[str, str]:
    """Digests of every digest position of (shard, seed): `digests` (those in the pick's batch
    `item`), plus 1-sample slices replayed for the others (any cut of a unit gives the same
    finished images)."""
    count, keys_cache, digests = shard_set.shard_counts[pick.shard], {}, dict(digests)
    for k in digest_positions(count, recipe.pairing_seeds):
        if not item.start <= k < item.stop:
            one = replay_item(shard_set, WorkItem(pick.shard, pick.seed, k, k + 1), recipe, keys_cache)
            digests.update(finish_batch(one, recipe, device, count)[1])
    return digests


def format_verification(report: dict) -> str:
    """verify-cache's text report."""
    r = report
    allowed = " (allowed: --allow-incomplete)" if r["units_missing"] and r["allow_incomplete"] else ""
    lines = [f"verify-cache {r['cache']}: units {r['units_done']}/{r['units_total']} computed, "
             f"{r['units_missing']} missing{allowed}",
             f"  storage files {r['files_checked'] - len(r['file_hash_mismatches'])}/"
             f"{r['files_checked']} present and matching their sha256 (every computed unit)"]
    lines += [f"  missing unit (not computed yet): {name}" for name in r["missing_units"][:5]]
    lines += [f"  DAMAGED unit {d['unit']}: {d['problem']}" for d in r["damaged_units"][:10]]
    if r["records"]:
        lines += _recomputation_lines(r)
    else:
        lines.append("  no record recomputed (no intact computed unit)")
    if r["fix"]:
        lines.append(f"  fix: {r['fix']}")
    lines.append("  OK" if r["ok"] else "  FAILED")
    return "\n".join(lines)


def _recomputation_lines(r: dict) -> list[str]:
    diffs = f"max top-k log-prob diff {r['max_logprob_diff']:.4g}"
    if r["max_logit_diff"] is not None:
        diffs += f", max logit diff {r['max_logit_diff']:.4g}"
    if r["max_tail_logsumexp_diff"] is not None:
        diffs += f", max tail log-sum-exp diff {r['max_tail_logsumexp_diff']:.4g}"
    lines = [f"  recomputed {r['records']} records of {r['pairs']} (shard, seed) pairs on "
             f"{r['device']} ({r['precision']}) in their original batches (batch size "
             f"{'/'.join(map(str, r['batch_sizes']))}, channels-last "
             f"{'/'.join(map(str, r['channels_last']))})",
             f"  argmax agreement {100 * r['argmax_agreement']:.2f}% (min "
             f"{100 * r['min_agreement']:.2f}%), " + diffs,
             f"  replay digests {r['digests_checked'] - len(r['digest_mismatches'])}/"
             f"{r['digests_checked']} match",
             f"  real mismatches {r['mismatches']} (always fail), near-ties {r['near_ties']} "
             f"(within {r['near_tie_tolerance']:g} nats; count as disagreement)"]
    for item in r["disagreements"][:5]:
        lines.append(f"  {item['kind']}: shard {item['shard']} seed {item['seed']} position "
                     f"{item['position']}: cached class {item['cached_argmax']}, recomputed "
                     f"{item['recomputed_argmax']} (recomputed gap {item['recomputed_gap']:.4g} nats)")
    lines += [f"  replayed image differs from the cached one: {item}"
              for item in r["digest_mismatches"][:5]]
    if r["other_kind_records"]:
        lines.append(f"  {r['other_kind_records']} of {r['records']} records recomputed on "
                     f"{r['device_kind']}, not on cache-teacher's "
                     f"{' / '.join(r['recorded_device_kinds'])}: their {r['other_kind_near_ties']} "
                     f"near-ties are expected and do not fail; the verdict rests on "
                     "digests, file hashes and real mismatches (min agreement: same-kind records)")
    return lines
