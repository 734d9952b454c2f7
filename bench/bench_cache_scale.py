"""Benchmark 4 — scale: cache write / read records/s from 0.25 M to 2 M records, and the peak
memory of a stage-two reader, to show cost grows linearly and memory stays flat.

The records are written through the real commit path (teacher_cache.store.commit_unit, one
atomic storage shard per unit) and read through the real reader (TeacherCache.read, one
batched read per shard x seed). Teacher outputs are synthetic logits passed through
encode_teacher_logits: running a teacher over 2 M augmented images would take an hour on
2 cores and would measure the teacher, not the cache (benchmark 2 measures that).

    python bench/bench_cache_scale.py [--sizes 175,350,700,1400] [--workdir /tmp/bench_scale]

Writes bench/results/cache_scale.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from data_shards import AugRecipe, ShardSet, make_shards
from teacher_cache.build import CacheOptions, resolve_settings, write_index
from teacher_cache.layout import TOPK_INDICES, TOPK_LOGPROBS, all_units, array_specs, index_dtype
from teacher_cache.manifest import build_manifest, create_or_match_manifest
from teacher_cache.store import commit_unit, ensure_arrays
from teacher_cache.targets import encode_teacher_logits

SEEDS_PER_UNIT = 10
TOPK = 10


def synthetic_unit(shard_set: ShardSet, shard: int, seeds: range, rng: np.random.Generator) -> dict:
    """Teacher-like logits (a confident class plus noise) -> the unit's stored buffers."""
    rows, count = shard_set.rows_per_shard, shard_set.shard_counts[shard]
    idx = np.zeros((len(seeds), rows, TOPK), dtype=index_dtype(shard_set.num_classes))
    logp = np.full((len(seeds), rows, TOPK), np.nan, dtype=np.float16)
    for i, _ in enumerate(seeds):
        logits = torch.from_numpy(rng.normal(0, 2, (count, shard_set.num_classes)).astype(np.float32))
        logits[torch.arange(count), torch.from_numpy(rng.integers(0, shard_set.num_classes, count))] += 6
        t = encode_teacher_logits(logits, TOPK)
        idx[i, :count] = t.topk_indices.numpy()
        logp[i, :count] = t.topk_logprobs.numpy()
    return {TOPK_INDICES: idx, TOPK_LOGPROBS: logp}


def write_cache(shards: Path, out: Path, num_seeds: int) -> dict:
    shard_set = ShardSet.open(shards)
    specs = array_specs(num_seeds, shard_set.num_shards, shard_set.rows_per_shard, shard_set.num_classes, TOPK,
                        SEEDS_PER_UNIT, store_full=False)
    units = all_units(shard_set.num_shards, num_seeds, SEEDS_PER_UNIT)
    opts = CacheOptions(shards, out, seeds=num_seeds, topk=TOPK, seeds_per_unit=SEEDS_PER_UNIT,
                        recipe=AugRecipe(input_size=32), teacher="synthetic")
    opts = resolve_settings(shard_set, None, opts)
    manifest = build_manifest(opts, shard_set, {"name": "synthetic", "checkpoint_sha256": None}, specs)
    create_or_match_manifest(out, manifest)
    write_index(out, shard_set)
    ensure_arrays(out, specs)
    rng = np.random.default_rng(0)
    generate_s = commit_s = 0.0
    for unit in units:
        t0 = time.perf_counter()
        buffers = synthetic_unit(shard_set, unit.shard, unit.seeds, rng)
        t1 = time.perf_counter()
        commit_unit(out, unit, shard_set.rows_per_shard, buffers,
                    {"unit": unit.name, "status": "done", "digests": {}})
        commit_s += time.perf_counter() - t1
        generate_s += t1 - t0
    records = sum(shard_set.shard_counts) * num_seeds
    disk = sum(p.stat().st_size for p in (out / "arrays.zarr").rglob("*") if p.is_file())
    return {"records": records, "units": len(units), "commit_s": commit_s, "write_records_per_s": records / commit_s,
            "array_bytes": disk, "bytes_per_record": disk / records}


READER = """
import json, resource, sys, time
from teacher_cache.cache import TeacherCache
cache = TeacherCache.open(sys.argv[1])
start = time.perf_counter()
records = 0
checksum = 0
for seed in range(cache.num_seeds):            # the order stage two reads: every shard of an epoch's seed
    for shard in range(cache.num_shards):
        t = cache.read(shard, seed)
        records += len(t)
        checksum += int(t.label.sum())
seconds = time.perf_counter() - start
print(json.dumps({"read_s": seconds, "read_records": records, "read_records_per_s": records / seconds,
                  "reader_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "checksum": checksum}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="175,350,700,1400", help="seed counts (x 1443 digits = records)")
    parser.add_argument("--workdir", default="/tmp/bench_cache_scale")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache_scale.json"))
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards = work / "shards"
    make_shards("digits", shards, split="train", shard_size=256, progress=False)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cache_dir = work / f"cache_{size}"
        row = {"seeds": size, **write_cache(shards, cache_dir, size)}
        run = subprocess.run([sys.executable, "-c", READER, str(cache_dir)], capture_output=True,
                             text=True, check=True)
        row.update(json.loads(run.stdout))
        assert row["read_records"] == row["records"]
        rows.append(row)
        print(f"{row['records']:>9,} records: write {row['write_records_per_s']:,.0f}/s, read "
              f"{row['read_records_per_s']:,.0f}/s, {row['bytes_per_record']:.1f} B/record, "
              f"reader peak RSS {row['reader_peak_rss_mb']:.0f} MB", flush=True)
        shutil.rmtree(cache_dir)
    base = rows[0]
    for row in rows:   # linear cost: time per record stays constant as the cache grows
        row["commit_s_per_record_vs_smallest"] = (row["commit_s"] / row["records"]) / (base["commit_s"] / base["records"])
        row["read_s_per_record_vs_smallest"] = (row["read_s"] / row["records"]) / (base["read_s"] / base["records"])
    result = {"benchmark": "cache_scale", "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, CPU", "python": platform.python_version(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| records | write rec/s | read rec/s | B/record | write s/rec (vs smallest) | read s/rec (vs smallest) | reader peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['records']:,} | {r['write_records_per_s']:,.0f} | {r['read_records_per_s']:,.0f} | "
              f"{r['bytes_per_record']:.1f} | {r['commit_s_per_record_vs_smallest']:.2f} | "
              f"{r['read_s_per_record_vs_smallest']:.2f} | {r['reader_peak_rss_mb']:.0f} MB |")
    print(f"\nwrote {args.out}; peak RSS of this (writer) process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
