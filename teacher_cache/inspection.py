"""inspect_cache: what a cache holds, how big it is, and how good its teacher looks.

Teacher quality is measured without running the teacher: the cached argmax against the true
label of the sample, and (the images are mixed) against the dominant label of the mixed pair,
whose partner and λ come from the recipe's mixing rule at no image cost.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from data_shards.mixing import mix_params, mixing_partners

from .cache import TeacherCache
from .errors import CacheError
from .layout import CACHE_ENTRIES, INDEX_FILE, UNITS_DIR, Unit, array_path
from .targets import (DEFAULT_SOFT_TAIL_LIMIT, GUARD_QUANTILE, TAIL_TAUS, guard_units,
                      largest_fit_tau, tail_masses)


def disk_usage(root: Path) -> dict[str, dict[str, int]]:
    """Bytes of regular files per part of the cache: apparent size and allocated blocks."""
    parts = {}
    for part in CACHE_ENTRIES:
        path, stats = Path(root) / part, []
        walk = [(str(path.parent), [], [path.name])] if path.is_file() else os.walk(path)
        for folder, _, names in walk:
            for name in names:
                try:
                    stats.append(os.stat(os.path.join(folder, name)))
                except FileNotFoundError:
                    continue
        parts[part] = {"bytes": sum(st.st_size for st in stats),
                       "allocated_bytes": sum(st.st_blocks * 512 for st in stats), "files": len(stats)}
    return parts


def array_bytes(root: Path, names: list[str], array_dirs: list[str] = ("",)) -> dict[str, int]:
    """Bytes of each array's storage files, summed over the seed generations' folders."""
    return {name: sum(os.path.getsize(os.path.join(folder, f))
                      for array_dir in array_dirs
                      for folder, _, files in os.walk(array_path(root, name, array_dir))
                      for f in files if f != "zarr.json")
            for name in names}


STAT_NAMES = ("records", "top1", "dominant", "either", "mass", "unmixed", "unmixed_top1")


def _label_stats(cache: TeacherCache, pairs: list[tuple[int, int]], damage: dict[str, str]) -> dict:
    """top-1 against labels for the given (shard, seed) pairs, plus per-seed rows; what cannot be
    read (the index, a unit) goes into `damage` instead."""
    try:
        index = cache.read_index().sort_by([("shard", "ascending"), ("position", "ascending")])
    except CacheError as exc:
        damage[INDEX_FILE] = str(exc)
        return {}
    keys_all = index.column("key").to_pylist()
    labels_all = np.asarray(index.column("label").to_numpy(), dtype=np.int64)
    shards = np.asarray(index.column("shard").to_numpy())
    starts = np.searchsorted(shards, np.arange(cache.num_shards + 1))
    recipe = cache.recipe
    per_seed: dict[int, dict[str, float]] = {}
    for shard, seed in pairs:
        keys = keys_all[starts[shard]:starts[shard + 1]]
        labels = labels_all[starts[shard]:starts[shard + 1]]
        try:
            targets = cache.read(shard, seed)
        except CacheError as exc:
            damage.setdefault(cache.unit_for(shard, seed).name, str(exc))
            continue
        pred = targets.label.numpy()
        partner = np.asarray(mixing_partners(keys, seed, recipe), dtype=np.int64)
        lam = np.array([mix_params(keys[i], keys[p], seed, recipe).lam for i, p in enumerate(partner)])
        partner_labels = labels[partner]
        unmixed = lam == 1.0
        row = per_seed.setdefault(seed, dict.fromkeys(STAT_NAMES, 0.0))
        row["records"] += len(keys)
        row["top1"] += float((pred == labels).sum())
        row["dominant"] += float((pred == np.where(lam >= 0.5, labels, partner_labels)).sum())
        row["either"] += float(((pred == labels) | (pred == partner_labels)).sum())
        row["mass"] += float(np.exp(targets.topk_logprobs.numpy().astype(np.float64)).sum(axis=1).sum())
        row["unmixed"] += float(unmixed.sum())
        row["unmixed_top1"] += float((pred == labels)[unmixed].sum())
    return per_seed


def soft_target_bounds(cache: TeacherCache, pairs: list[tuple[int, int]], taus=TAIL_TAUS) -> dict:
    """What soft targets the cache gives: per τ, the mean tail mass (the share of the soft target
    whose per-class values are not stored; it bounds the total variation to the exact target), or
    None where the cache cannot tell. 0 = exact (full logits, or top-k covering every class)."""
    parts = [cache.read(shard, seed) for shard, seed in pairs]
    masses = {tau: tail_masses(parts, cache.num_classes, tau) for tau in taus}
    return {f"{tau:g}": None if m is None else round(float(m.numpy().mean()), 4)
            for tau, m in masses.items()}


def soft_target_fit(cache: TeacherCache, readable: set[tuple[int, int]],
                    limit: float = DEFAULT_SOFT_TAIL_LIMIT) -> dict:
    """The largest τ at which train-student's guard (its sample of units, the p99 of the tail
    mass) accepts the cache at `limit`: "any" (exact or (C-K)/C <= limit), a number, or None (not
    even τ = 0.25; or, without a tail summary, not τ = 1, the only one known)."""
    units, parts = [], []
    for unit in (u for u in guard_units(cache.num_shards, cache.num_seeds) if u in readable):
        try:
            parts.append(cache.read(*unit))
            units.append(unit)
        except CacheError:             # damage the stat-only check missed: inspect never raises
            continue
    tau = largest_fit_tau(parts, cache.num_classes, limit) if parts else None
    records = sum(cache.shard_counts[shard] for shard, _ in units)
    return {"limit": limit, "quantile": GUARD_QUANTILE, "units": len(units), "records": records,
            "largest_tau": "any" if tau == math.inf else tau,
            "tail_summary": "tail_logsumexp" in cache.array_names}


def inspect_cache(path: str | os.PathLike, max_label_records: int = 200_000) -> dict:
    """Units done / missing / damaged, records, bytes on disk and per record, teacher top-1, top-k
    mass, per seed. Damage (an unreadable unit record, a storage file missing or of another size
    than committed, a chunk that does not decode, an unreadable index) is listed under "damage",
    never raised."""
    if max_label_records < 0:
        raise CacheError(f"--max-label-records must be >= 0, got {max_label_records}")
    cache = TeacherCache.open(path)
    m, counts, units = cache.manifest, cache.shard_counts, cache.units()
    done, missing = cache.done_units(), cache.missing_units()
    damage = {}
    for unit in done:              # stat only; verify-cache also compares every file's sha256
        if problems := cache.unit_file_problems(unit, hash_files=False):
            damage[unit.name] = "; ".join(problems.values())
    records_done = sum(counts[u.shard] * len(u.seeds) for u in done)
    chosen = _label_pairs([u for u in done if u.name not in damage], counts, max_label_records)
    per_seed = _label_stats(cache, chosen, damage)
    readable = [pair for pair in chosen if cache.unit_for(*pair).name not in damage]
    locks = sorted(p.name for p in (cache.root / UNITS_DIR).glob("*.lock.*"))
    return {
        "cache": str(cache.root), "teacher": m["teacher"], "num_classes": cache.num_classes,
        "topk": cache.topk, "store_logits": m["store_logits"],
        "precision": m["precision"], "seeds": cache.num_seeds, "seeds_per_unit": cache.seeds_per_unit,
        "seed_generations": [[g.start, g.stop] for g in cache.seed_generations],
        "batch_size": m.get("batch_size"), "channels_last": m.get("channels_last"),
        "recipe_fingerprint": m["recipe_fingerprint"],
        "shards": {k: m["shards"][k] for k in ("path", "content_hash", "num_shards", "num_samples")},
        "units": {"total": len(units), "done": len(done), "missing": len(missing),
                  "missing_names": [u.name for u in missing[:20]], "locks_present": locks[:20],
                  "damaged": len([k for k in damage if k != INDEX_FILE])},
        "damage": [{"unit": where, "problem": why} for where, why in damage.items()],
        "fix": _fix_advice(cache, damage),
        "records": {"done": records_done, "total": sum(counts) * cache.num_seeds},
        **_storage(cache, records_done),
        "teacher_quality": _quality({k: sum(r[k] for r in per_seed.values()) for k in STAT_NAMES}),
        "soft_target_tv_bound_by_tau": soft_target_bounds(cache, readable[:8]),
        "soft_target_fit": soft_target_fit(cache, {(u.shard, s) for u in done
                                                   if u.name not in damage for s in u.seeds}),
        "per_seed": [_seed_row(seed, per_seed.get(seed), done, cache.num_shards)
                     for seed in range(cache.num_seeds)],
    }


def _fix_advice(cache: TeacherCache, damage: dict[str, str]) -> str | None:
    if not damage:
        return None
    if set(damage) == {INDEX_FILE}:
        return f"run {cache.compute_command()} (it rewrites the index)"
    return cache.repair_advice(damaged=True)


def _seed_row(seed: int, stats: dict | None, done: list[Unit], num_shards: int) -> dict:
    """One seed's units done (all of them, sampled or not) and, when sampled, its label statistics."""
    row = {"seed": seed, "units_done": sum(1 for u in done if seed in u.seeds),
           "units_total": num_shards, "records_checked": int(stats["records"]) if stats else 0}
    if stats:
        quality = _quality(stats)
        row |= {k: quality[k]
                for k in ("top1_vs_label", "agreement_with_dominant_label", "mean_topk_mass")}
    return row


def _label_pairs(done: list[Unit], counts: list[int], max_records: int) -> list[tuple[int, int]]:
    """A deterministic spread of done (shard, seed) pairs holding up to about `max_records` records."""
    pairs = sorted({(u.shard, s) for u in done for s in u.seeds}, key=lambda p: (p[1], p[0]))
    np.random.default_rng(0).shuffle(pairs)
    ahead = np.cumsum([0] + [counts[shard] for shard, _ in pairs])     # records before each pair
    return [pair for pair, records in zip(pairs, ahead) if records < max_records]


def _storage(cache: TeacherCache, records_done: int) -> dict:
    """Bytes on disk per part and per array, and per computed record."""
    usage = disk_usage(cache.root)
    arrays = array_bytes(cache.root, cache.array_names, [g.dir for g in cache.seed_generations])
    total, in_arrays = sum(part["bytes"] for part in usage.values()), sum(arrays.values())
    return {"bytes": {"total": total, "arrays": in_arrays, "per_array": arrays, "parts": usage},
            "bytes_per_record": {"arrays": _ratio(in_arrays, records_done),
                                 "total": _ratio(total, records_done),
                                 "per_array": {k: _ratio(v, records_done) for k, v in arrays.items()}}}


def _quality(tot: dict[str, float]) -> dict:
    n = tot["records"]
    return {"records_checked": int(n), "top1_vs_label": _ratio(tot["top1"], n),
            "unmixed_records": int(tot["unmixed"]),
            "top1_vs_label_unmixed": _ratio(tot["unmixed_top1"], tot["unmixed"]),
            "agreement_with_dominant_label": _ratio(tot["dominant"], n),
            "argmax_is_either_label": _ratio(tot["either"], n), "mean_topk_mass": _ratio(tot["mass"], n)}


def _ratio(a, b):
    return None if not b else round(a / b, 6)


def format_inspection(info: dict) -> str:
    """The human-readable report of inspect_cache's dict."""
    t, u, r, b = info["teacher"], info["units"], info["records"], info["bytes"]
    q, bpr = info["teacher_quality"], info["bytes_per_record"]
    lines = [
        f"cache {info['cache']}",
        f"  teacher      {t['name']}  weights {str(t.get('weights_sha256'))[:12]}…"
        + (f"  checkpoint {t['checkpoint']}" if t.get("checkpoint") else "  (timm pretrained)"),
        f"  classes {info['num_classes']}  top-k {info['topk']}  store {info['store_logits']}  "
        f"precision {info['precision']}  seeds {info['seeds']} ({info['seeds_per_unit']} per unit)"
        + (f", grown: seed ranges {', '.join(f'{a}..{b - 1}' for a, b in info['seed_generations'])}"
           if len(info["seed_generations"]) > 1 else "")
        + f"  batch size {_fmt_opt(info['batch_size'])}  channels-last {_fmt_opt(info['channels_last'])}",
        f"  shards       {info['shards']['path']}  ({info['shards']['num_shards']} shards, "
        f"{info['shards']['num_samples']} samples, hash {info['shards']['content_hash'][:12]}…)",
        f"  units        {u['done']}/{u['total']} done, {u['missing']} missing"
        + (f", {u['damaged']} DAMAGED (listed below)" if u["damaged"] else "")
        + (f" (e.g. {', '.join(u['missing_names'][:3])})" if u["missing"] else ""),
        f"  records      {r['done']}/{r['total']} (sample x seed)",
        f"  disk         {b['total']:,} B total, arrays {b['arrays']:,} B  ->  "
        f"{_fmt(bpr['arrays'])} B/record (arrays), {_fmt(bpr['total'])} B/record (everything)",
        "               " + ", ".join(f"{k} {_fmt(v)} B/rec" for k, v in bpr["per_array"].items()),
        f"  teacher      top-1 vs label {_pct(q['top1_vs_label'])}, agreement with dominant mixed "
        f"label {_pct(q['agreement_with_dominant_label'])}, argmax is either label "
        f"{_pct(q['argmax_is_either_label'])}"
        + (f", unmixed top-1 {_pct(q['top1_vs_label_unmixed'])} on {q['unmixed_records']}"
           if q["unmixed_records"] else "")
        + f"; mean top-{info['topk']} mass {_fmt(q['mean_topk_mass'])} ({q['records_checked']} records "
          "checked)",
        "  soft targets " + _soft_line(info),
        "  per seed     seed  units  top-1   dominant  top-k mass",
    ]
    for row in info["per_seed"]:
        lines.append(f"               {row['seed']:>4}  {row['units_done']:>2}/{row['units_total']:<3} "
                     f"{_pct(row.get('top1_vs_label')):>7}  "
                     f"{_pct(row.get('agreement_with_dominant_label')):>7}  "
                     f"{_fmt(row.get('mean_topk_mass')):>6}")
    if u["locks_present"]:
        lines.append(f"  locks        {len(u['locks_present'])} lock file(s) present (running or "
                     "crashed jobs): " + ", ".join(u["locks_present"][:3]))
    if info["damage"]:
        lines.append(f"  DAMAGE       {len(info['damage'])} part(s) of the cache are damaged "
                     "(figures above leave them out):")
        lines += [f"               {d['unit']}: {d['problem']}" for d in info["damage"][:20]]
        lines.append(f"  fix          {info['fix']}")
    return "\n".join(lines)


def _fmt_opt(x) -> str:
    return "not recorded" if x is None else str(x)


def _soft_line(info: dict) -> str:
    if info["store_logits"] == "full" or info["topk"] >= info["num_classes"]:
        return "exact at any τ (full logits or top-k covers every class)"
    bounds, fit = info["soft_target_tv_bound_by_tau"], info["soft_target_fit"]
    return ("total variation to the exact target <= mean tail mass: "
            + ", ".join(f"τ={tau} {'unknown (no tail summary)' if v is None else _fmt(v)}"
                        for tau, v in bounds.items())
            + f"\n               fit for soft distillation up to τ = {_fit_tau(fit)} at "
            f"--soft-tail-limit {fit['limit']:g} (train-student's guard: p99 of the tail mass "
            f"over {fit['records']} records of {fit['units']} units)")


def _fit_tau(fit: dict) -> str:
    tau = fit["largest_tau"]
    if not fit["units"]:
        return "unknown (no readable unit among those the guard samples)"
    if tau == "any":
        return "any"
    if tau is None:
        return "none (not even τ = 0.25)" if fit["tail_summary"] else "none (τ = 1 not fit)"
    return f"{tau:g}" + ("" if fit["tail_summary"] else " only (no tail summary)")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
