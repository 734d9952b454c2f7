"""verify_cache: recompute M random cached records through the replay path and compare.

For each sampled (shard, seed) it replays the shard with `replay_shard` (stopping as soon
as the sampled samples have appeared), checks the digests recorded in the unit JSON and
the storage files' sha256, runs the teacher on the replayed images with the cache's
precision, and compares: argmax agreement, and the largest difference between the stored
and the recomputed log-probabilities at the stored top-k classes (and logits in full mode).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np
import torch

from data_shards import ShardSet, replay_shard, tensor_digest

from .cache import TeacherCache
from .errors import CacheError
from .layout import storage_shard_path
from .teacher import check_precision, file_sha256, load_teacher, resolve_device, teacher_logits

RECORDS_PER_PAIR = 8       # sampled records per (shard, seed): replaying a shard costs, reuse it


def sample_records(cache: TeacherCache, samples: int, seed: int = 0) -> dict[tuple[int, int], list[int]]:
    """{(shard, aug seed): sorted positions}: about `samples` records over done units, spread over pairs."""
    done = cache.done_units()
    if not done:
        raise CacheError(f"teacher cache {cache.root} has no computed unit yet; {cache.fix_command()}")
    rng = np.random.default_rng(seed)
    pairs = [(u.shard, s) for u in done for s in u.seeds]
    num_pairs = min(len(pairs), max(1, math.ceil(samples / RECORDS_PER_PAIR)))
    chosen = [pairs[i] for i in rng.choice(len(pairs), num_pairs, replace=False)]
    out: dict[tuple[int, int], set] = defaultdict(set)
    for k in range(samples):
        shard, s = chosen[k % num_pairs]
        count = cache.shard_counts[shard]
        if len(out[(shard, s)]) < count:
            free = sorted(set(range(count)) - out[(shard, s)])
            out[(shard, s)].add(int(free[rng.integers(len(free))]))
    return {pair: sorted(pos) for pair, pos in sorted(out.items())}


def verify_cache(path: str | os.PathLike, shards: str | os.PathLike, samples: int = 64, min_agreement: float = 1.0,
                 max_logprob_diff: float | None = None, batch_size: int = 64, device: str = "auto",
                 precision: str | None = None, teacher_checkpoint: str | None = None, seed: int = 0) -> dict:
    """Recompute `samples` random records; the result's "ok" is False below `min_agreement`, on a digest or
    file-hash mismatch, or above `max_logprob_diff` when given."""
    if samples < 1:
        raise CacheError(f"--samples must be >= 1, got {samples}")
    cache = TeacherCache.open(path)
    shard_set = ShardSet.open(shards)
    recipe = cache.recipe
    cache.check_compatible(shard_set, recipe)
    picked = sample_records(cache, samples, seed)
    t = cache.manifest["teacher"]
    checkpoint = teacher_checkpoint or t.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CacheError(f"the cache's teacher checkpoint {checkpoint} is gone; pass --teacher-checkpoint PATH")
    torch_device = resolve_device(device)
    precision = precision or cache.manifest["precision"]
    check_precision(precision, torch_device)
    model = load_teacher(t["name"], checkpoint, num_classes=cache.num_classes, device=torch_device,
                         model_kwargs=t.get("model_kwargs"))
    if model.teacher_info["weights_sha256"] != t["weights_sha256"]:
        raise CacheError(f"teacher weights {model.teacher_info['weights_sha256'][:12]}… differ from the cache's "
                         f"{t['weights_sha256'][:12]}…; pass the checkpoint the cache was computed with")

    digest_checked = files_checked = 0
    bad_files, bad_digests = [], []
    checked_units = set()
    images, stored = [], []
    for (shard, aug_seed), positions in picked.items():
        unit = cache.unit_for(shard, aug_seed)
        if unit.name not in checked_units:
            checked_units.add(unit.name)
            for name, info in cache.unit_record(unit)["files"].items():
                files_checked += 1
                try:
                    digest = file_sha256(storage_shard_path(cache.root, name, unit))
                except FileNotFoundError:
                    digest = "missing"
                if digest != info["sha256"]:
                    bad_files.append(f"{unit.name}:{name}")
        wanted = set(positions)
        recorded = cache.unit_digests(shard, aug_seed)
        got, seen_recorded = {}, 0
        for rs in replay_shard(shard_set.read_shard(shard), aug_seed, recipe):
            if rs.key in recorded:
                seen_recorded += 1
                digest_checked += 1
                if tensor_digest(rs.image) != recorded[rs.key]:
                    bad_digests.append(f"{rs.key}@seed{aug_seed}")
            if rs.position in wanted:
                got[rs.position] = rs.image
            if len(got) == len(wanted) and seen_recorded == len(recorded):
                break                      # the rest of the shard is not needed
        targets = cache.read(shard, aug_seed)
        for pos in positions:
            images.append(got[pos])
            stored.append((targets.topk_indices[pos], targets.topk_logprobs[pos],
                           None if targets.logits is None else targets.logits[pos]))

    agree, max_lp, max_logit = 0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        logits = teacher_logits(model, torch.stack(images[start:start + batch_size]), precision,
                                channels_last=False)
        # Rounded through fp16 exactly as stored (encode_teacher_logits), so identical runs differ by 0.
        exact = torch.log_softmax(logits.float().cpu(), dim=1)
        argmax = torch.topk(exact, 1, dim=1).indices[:, 0]   # as encode_teacher_logits picks it
        logprobs = exact.half().float()
        logits = logits.float().cpu().half().float()
        for row, (idx, lp, full) in enumerate(stored[start:start + batch_size]):
            agree += int(int(argmax[row]) == int(idx[0]))
            max_lp = max(max_lp, float((logprobs[row, idx] - lp).abs().max()))
            if full is not None:
                max_logit = max(max_logit, float((logits[row] - full).abs().max()))
    n = len(images)
    agreement = agree / n
    ok = (agreement >= min_agreement and not bad_files and not bad_digests
          and (max_logprob_diff is None or max_lp <= max_logprob_diff))
    return {"cache": str(cache.root), "records": n, "pairs": len(picked), "argmax_agreement": agreement,
            "max_logprob_diff": max_lp, "max_logit_diff": max_logit if cache.has_logits else None,
            "digests_checked": digest_checked, "digest_mismatches": bad_digests,
            "files_checked": files_checked, "file_hash_mismatches": bad_files,
            "min_agreement": min_agreement, "max_logprob_diff_allowed": max_logprob_diff,
            "device": str(torch_device), "precision": precision, "ok": ok}
