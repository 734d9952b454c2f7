"""Benchmark 5 — make-shards on ImageNet-sized JPEGs: img/s and peak memory at three data-set sizes,
to show throughput per core and memory flat in the data-set size.

It generates `--unique` distinct ~500x375 JPEGs (crops / resizes of scikit-learn's two sample
photos, varied offsets, sizes, orientation and quality 70-95), then builds one ImageFolder per
size (`--classes` class folders) from hard links to them, so 20k images cost the disk of 1k; `--source-kind tars` writes them as
WebDataset tars of 1,000 samples instead and measures indexing them in place.
Each size runs make-shards in a fresh process; peak RSS is that process's high-water mark
(`ru_maxrss`), reported with the part that is imports (measured just before make_shards) so
that the growth with the data set is visible. Nothing generated is kept unless `--keep`.

    python bench/bench_make_shards.py [--sizes 1000,5000,20000] [--workers N] [--workdir /tmp/bench_make_shards]
    python bench/bench_make_shards.py --source-kind tars --out bench/results/make_shards_tars.json

Writes bench/results/make_shards.json and prints a markdown table. Files are read from the
page cache after the first size (the same hard-linked files), so this measures decode-validation
and writing, not a cold disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from data_shards import make_shards
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
shard_size = 1000 if sys.argv[4] == "folder" else None  # WebDataset tars: each tar is a shard
meta = make_shards(sys.argv[1], sys.argv[2], shard_size=shard_size, workers=int(sys.argv[3]), progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "num_samples": meta["num_samples"], "skipped": len(meta["skipped"]),
                  "rss_imports_kb": rss_imports, "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rss_worker_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_pool(folder: Path, unique: int, seed: int = 0) -> list[Path]:
    """`unique` distinct ImageNet-sized JPEGs cut from the two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640x427 each
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(unique):
        photo = photos[i % 2]
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 428))
        x, y = int(rng.integers(0, 641 - w)), int(rng.integers(0, 428 - h))
        size = (500, 375) if rng.random() < 0.8 else (375, 500)  # some portrait images, as in ImageNet
        img = photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"pool_{i:06d}.jpg"
        img.save(path, format="JPEG", quality=int(rng.integers(70, 96)))
        paths.append(path)
    return paths


def make_image_folder(folder: Path, pool: list[Path], n: int, classes: int) -> int:
    """An ImageFolder of n hard links to the pool; returns its bytes."""
    total = 0
    for c in range(classes):
        (folder / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for j in range(n):
        src = pool[j % len(pool)]
        os.link(src, folder / f"n{j % classes:08d}" / f"n{j % classes:08d}_{j}.JPEG")
        total += src.stat().st_size
    return total


def make_tars(folder: Path, pool: list[Path], n: int, classes: int) -> int:
    """n samples of the pool as WebDataset tars of 1,000 (jpg + cls), shuffled classes; returns image bytes."""
    import webdataset as wds

    folder.mkdir(parents=True)
    total = 0
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for j in range(n):
            data = pool[j % len(pool)].read_bytes()
            sink.write({"__key__": f"n{j % classes:08d}_{j}", "jpg": data, "cls": str(j % classes).encode()})
            total += len(data)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--unique", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--workdir", default="/tmp/bench_make_shards")
    ap.add_argument("--source-kind", choices=["folder", "tars"], default="folder",
                    help="an ImageFolder tree (written into new shards) or WebDataset tars (indexed in place)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "make_shards.json"))
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    pool = make_pool(work / "pool", args.unique)
    print(f"generated {len(pool)} JPEGs in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        src, out = work / f"src_{n}", work / f"out_{n}"
        build = make_image_folder if args.source_kind == "folder" else make_tars
        nbytes = build(src, pool, n, args.classes)
        run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(args.workers), args.source_kind],
                             capture_output=True, text=True, env=env)
        if run.returncode != 0:
            sys.exit(run.stderr)
        r = json.loads(run.stdout)
        row = {"source": args.source_kind, "images": n, "data_mb": round(nbytes / 1e6, 1), "workers": args.workers,
               "seconds": round(r["seconds"], 2), "img_per_s": round(n / r["seconds"], 1),
               "img_per_s_per_worker": round(n / r["seconds"] / args.workers, 1),
               "rss_imports_mb": round(r["rss_imports_kb"] / 1024), "rss_peak_mb": round(r["rss_peak_kb"] / 1024),
               "rss_growth_mb": round((r["rss_peak_kb"] - r["rss_imports_kb"]) / 1024),
               "rss_worker_peak_mb": round(r["rss_worker_peak_kb"] / 1024), "skipped": r["skipped"]}
        assert r["num_samples"] == n, r
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(src)
            shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(work)

    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "args": vars(args), "rows": rows,
              "rss_growth_first_to_last_mb": rows[-1]["rss_peak_mb"] - rows[0]["rss_peak_mb"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| images | data MB | workers | s | img/s | img/s per worker | peak RSS MB (imports) | growth MB | largest worker RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['data_mb']} | {r['workers']} | {r['seconds']} | {r['img_per_s']} | "
              f"{r['img_per_s_per_worker']} | {r['rss_peak_mb']} ({r['rss_imports_mb']}) | {r['rss_growth_mb']} | "
              f"{r['rss_worker_peak_mb']} |")
    print(f"peak RSS {rows[0]['images']:,} -> {rows[-1]['images']:,} images: "
          f"{result['rss_growth_first_to_last_mb']:+d} MB")


if __name__ == "__main__":
    main()
