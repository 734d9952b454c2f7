"""Stage one on a GPU, end to end, as one prepared run (issue 9, part 4): cache-teacher then verify-cache.

Makes --images ImageNet-sized JPEGs (smooth random pictures, 500x375) in --classes class folders,
shards them, builds a cache with a random-initialised teacher (same FLOPs as the real one; no
download) in bf16 with channels-last, then runs verify-cache on it: a healthy cache must pass at
100 %, near-ties and real mismatches reported apart. Reports cache-teacher img·seeds/s against
a bare teacher forward (same batch size, precision, memory format) measured in the same run.

    python bench/gpu_cache_verify.py                           # GPU defaults: 4,096 JPEGs, RegNetY-16GF
    python bench/gpu_cache_verify.py --device cpu --images 48 --classes 12 --teacher test_efficientnet \\
        --input-size 64 --batch-size 8 --workers 1 --seeds 1 --samples 16 --bare-seconds 1   # smoke test

Writes bench/results/gpu_cache_verify.json and prints a markdown row.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_cache_teacher import ROOT, bare_forward_rate, machine, random_teacher  # noqa: E402  (sets sys.path)
from data_shards import AugRecipe, make_shards  # noqa: E402
from data_shards.io import resolve_device  # noqa: E402
from teacher_cache import CacheOptions, cache_teacher, load_teacher  # noqa: E402
from teacher_cache.verification import verify_cache  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu_cache_verify.json"


def write_jpegs(folder: Path, images: int, classes: int, seed: int = 0) -> None:
    """ImageNet-sized JPEGs: low-frequency random colour fields upsampled to 500x375 (compress like photos)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        target = folder / f"c{i % classes:04d}" / f"img{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target, quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--teacher", default="regnety_160")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--bare-seconds", type=float, default=10.0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_cache_verify_"))
    device = resolve_device(args.device)
    t0 = time.time()
    write_jpegs(work / "jpegs", args.images, args.classes)
    make_shards(str(work / "jpegs"), work / "shards", shard_size=args.shard_size, val_fraction=0.0, progress=False)
    print(f"data: {args.images} JPEGs -> shards in {time.time() - t0:.0f}s", flush=True)

    ckpt = random_teacher(args.teacher, args.classes, work / "teacher.pth")
    model = load_teacher(args.teacher, ckpt, num_classes=args.classes, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bare = bare_forward_rate(model, args.batch_size, args.input_size, args.precision, args.channels_last, device,
                             args.bare_seconds)
    del model
    print(f"bare forward: {bare:.0f} img/s", flush=True)

    summary = cache_teacher(CacheOptions(work / "shards", work / "cache", teacher_checkpoint=ckpt, seeds=args.seeds,
                                         recipe=AugRecipe(input_size=args.input_size), batch_size=args.batch_size,
                                         channels_last=args.channels_last, device=str(device), precision=args.precision,
                                         workers=args.workers, progress=False))
    report = verify_cache(work / "cache", work / "shards", samples=args.samples, device=str(device))
    result = {"machine": machine(device), "images": args.images, "classes": args.classes, "teacher": args.teacher,
              "input_size": args.input_size, "seeds": args.seeds, "batch_size": args.batch_size,
              "precision": args.precision, "channels_last": args.channels_last, "workers": args.workers,
              "bare_forward_img_per_s": round(bare, 1), "cache_img_seeds_per_s": summary["records_per_s"],
              "ratio": round(summary["records_per_s"] / bare, 3) if summary["records_per_s"] else None,
              "verify": {k: report[k] for k in ("ok", "records", "pairs", "argmax_agreement", "near_ties",
                                                "mismatches", "max_logprob_diff", "digests_checked",
                                                "digest_mismatches", "files_checked", "file_hash_mismatches",
                                                "batch_sizes", "channels_last")}}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    v = result["verify"]
    print("| device | teacher | batch | precision | bare img/s | cache-teacher img·seeds/s | ratio | verify |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {result['machine'].get('gpu', device)} | {args.teacher} | {args.batch_size} | {args.precision}"
          f"{' + channels-last' if args.channels_last else ''} | {bare:.0f} | {summary['records_per_s']} | "
          f"{result['ratio']} | {'OK' if v['ok'] else 'FAILED'} {100 * v['argmax_agreement']:.2f}% of {v['records']}, "
          f"{v['near_ties']} near-ties, {v['mismatches']} real mismatches, max log-prob diff {v['max_logprob_diff']:.3g} |")
    if not v["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
