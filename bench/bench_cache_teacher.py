"""Benchmarks 2 and 3 — stage one: cache-teacher throughput against a bare teacher forward,
cache read throughput, and bytes on disk per record.

Sections (all by default, or pick with --sections):
  throughput  cache-teacher images x seeds / s (decode + replay + teacher + commit, the real
              cache_teacher() call) against the same teacher's forward on ready tensors, in the
              same run, same batch size and precision. Goal: ratio >= 0.9. Loader workers replay
              the teacher batches as work items, so --workers all work even for --units 1.
  read        TeacherCache.read(shard, seed) records / s over the cache just written.
  storage     bytes on disk per (sample, seed) record at K=10 top-k and with full logits, on
              digits, with a small teacher trained here for a few epochs on the replayed (mixed,
              augmented) images so its outputs look like a real teacher's (a random network's
              near-uniform outputs would flatter or penalise compression arbitrarily).
  codecs      the K=10 arrays of the storage cache re-encoded with alternative codecs.

The teacher is random-initialised unless --teacher-checkpoint is given (no downloads): a
random RegNetY-16GF costs the same FLOPs as the real one.

    python bench/bench_cache_teacher.py                                   # CPU defaults (small)
    python bench/bench_cache_teacher.py --sections throughput --teacher regnety_160 --input-size 224 \\
        --device cuda --precision bf16 --channels-last --batch-size 256 --workers 8 --units 8

Writes bench/results/cache_teacher.json (merged per section) and prints markdown rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from data_shards import (AugRecipe, ShardSet, decode_image, finish_item, make_shards, mixed_targets,
                         replay_slice)
from data_shards.devices import resolve_device
from teacher_cache import CacheOptions, TeacherCache, cache_teacher, load_teacher
from teacher_cache.inspection import inspect_cache
from teacher_cache.teacher import teacher_logits

RESULTS = ROOT / "bench" / "results" / "cache_teacher.json"


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_teacher(model: torch.nn.Module, path: Path, arch: str) -> Path:
    torch.save({"model": model.state_dict(), "arch": arch}, path)
    return path


def random_teacher(arch: str, num_classes: int, path: Path) -> Path:
    import timm
    torch.manual_seed(0)
    return save_teacher(timm.create_model(arch, num_classes=num_classes), path, arch)


# ----------------------------------------------------------------------------- throughput

def bare_forward_rate(model, batch: int, input_size: int, precision: str, channels_last: bool, device,
                      seconds: float = 10.0) -> float:
    """Images / s of the teacher alone on ready tensors (already on the device)."""
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    teacher_logits(model, x, precision, channels_last)            # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3 * batch:
        teacher_logits(model, x, precision, channels_last)
        done += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def section_throughput(args, work: Path, device) -> dict:
    shards = work / "shards"
    if not shards.exists():
        make_shards("digits", shards, split="train", shard_size=args.shard_size, progress=False)
    shard_set = ShardSet.open(shards)
    ckpt = Path(args.teacher_checkpoint) if args.teacher_checkpoint else \
        random_teacher(args.teacher, shard_set.num_classes, work / "teacher.pth")
    recipe = AugRecipe(input_size=args.input_size)
    model = load_teacher(args.teacher, ckpt, num_classes=shard_set.num_classes, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rounds = []
    bare_forward_rate(model, args.batch_size, args.input_size, args.precision, args.channels_last, device, 1.0)
    for r in range(args.rounds):            # interleaved: both measured under the same conditions
        bare = bare_forward_rate(model, args.batch_size, args.input_size, args.precision, args.channels_last, device,
                                 args.bare_seconds)
        out = work / f"cache-{r}"
        shutil.rmtree(out, ignore_errors=True)
        summary = cache_teacher(CacheOptions(shards, out, teacher=args.teacher, teacher_checkpoint=ckpt, seeds=args.seeds,
                                             seeds_per_unit=args.seeds, recipe=recipe, batch_size=args.batch_size,
                                             channels_last=args.channels_last, device=str(device), precision=args.precision, workers=args.workers,
                                             max_units=args.units, progress=False, log=lambda m: None))
        rounds.append({"bare_img_per_s": bare, "cache_img_seeds_per_s": summary["records_per_s"],
                       "records": summary["records_computed"], "teacher_seconds": summary["teacher_seconds"],
                       "seconds": summary["seconds"]})
    bare = statistics.median(r["bare_img_per_s"] for r in rounds)
    cached = statistics.median(r["cache_img_seeds_per_s"] for r in rounds)
    result = {"teacher": args.teacher, "input_size": args.input_size, "batch_size": args.batch_size,
              "precision": args.precision, "channels_last": args.channels_last, "workers": args.workers,
              "seeds_per_unit": args.seeds, "units": args.units, "rounds": rounds,
              "bare_forward_img_per_s": round(bare, 2), "cache_teacher_img_seeds_per_s": round(cached, 2),
              "ratio": round(cached / bare, 3), "goal_ratio": 0.9}
    return result


# ----------------------------------------------------------------------------- read

def section_read(args, work: Path) -> dict:
    caches = sorted(work.glob("cache-*")) or sorted(work.glob("storage-*-topk"))
    if not caches:
        raise SystemExit("run the throughput or storage section first (the read section reads its cache)")
    cache = TeacherCache.open(caches[-1])
    pairs = [(u.shard, s) for u in cache.done_units() for s in u.seeds]
    records = reads = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.read_seconds:
        for shard, seed in pairs:
            records += len(cache.read(shard, seed))      # one batched read of a whole (shard, seed)
            reads += 1
    seconds = time.perf_counter() - start
    return {"cache": str(caches[-1]), "records_per_read": round(records / reads, 1),
            "read_records_per_s": round(records / seconds, 1), "reads_per_s": round(reads / seconds, 1)}


# ----------------------------------------------------------------------------- storage

def train_small_teacher(shards: Path, arch: str, input_size: int, epochs: int, path: Path,
                        on: str = "replayed") -> tuple[Path, list]:
    """A few epochs of training so the outputs look like a trained network's.

    on="replayed": soft-target training on the replayed (augmented, mixed) images, seed = epoch,
    like a teacher trained with the same recipe (unsure on the harsh 32 px digits recipe);
    on="clean": hard-label training on the evaluation transform (confident, often confidently
    wrong on the augmented images). The two bracket what a real teacher's outputs look like.
    """
    import timm
    from data_shards import eval_image
    shard_set = ShardSet.open(shards)
    recipe = AugRecipe(input_size=input_size)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=shard_set.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    clean = None
    if on == "clean":
        samples = [s for i in range(shard_set.num_shards) for s in shard_set.read_shard(i)]
        clean = (torch.stack([eval_image(decode_image(s.data), recipe) for s in samples]),
                 torch.tensor([s.label for s in samples]))
    history = []
    for epoch in range(epochs):
        model.train()
        losses = []
        batches = []
        if clean is not None:
            perm = torch.randperm(len(clean[1]))
            batches = [(clean[0][perm[i:i + 64]],
                        torch.nn.functional.one_hot(clean[1][perm[i:i + 64]], shard_set.num_classes).float())
                       for i in range(0, len(perm), 64)]
        else:
            for shard in range(shard_set.num_shards):
                samples = shard_set.read_shard(shard)
                for i in range(0, len(samples), 64):
                    item = replay_slice(samples, epoch, recipe, i, min(len(samples), i + 64))
                    y = mixed_targets(item.labels, item.partner_labels, item.lam, shard_set.num_classes,
                                      recipe.smoothing)
                    batches.append((finish_item(item, recipe), y))
        for x, y in batches:
            if len(x) < 2:                # BatchNorm needs two samples in training mode
                continue
            loss = torch.sum(-y * torch.log_softmax(model(x), 1), 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(round(statistics.mean(losses), 4))
        print(f"  teacher ({on}) epoch {epoch}: loss {history[-1]}", file=sys.stderr)
    return save_teacher(model.eval(), path, arch), history


def section_storage(args, work: Path) -> dict:
    shards = work / "storage-shards"
    if not shards.exists():
        make_shards("digits", shards, split="train", shard_size=args.storage_shard_size, progress=False)
    out = {"teacher": args.storage_teacher, "train_epochs": args.train_epochs, "seeds": args.storage_seeds,
           "shard_size": args.storage_shard_size, "input_size": 32,
           "reference_bytes_per_record": {"TinyViT K=10": 44, "TinyViT K=100": 404, "Dataset Reinforcement": "65-104"},
           "goal_bytes_per_record_k10": 32, "teachers": {}}
    for on in args.storage_teacher_training.split(","):
        ckpt = work / f"storage-teacher-{on}.pth"
        history = None
        if not ckpt.exists():
            ckpt, history = train_small_teacher(shards, args.storage_teacher, 32, args.train_epochs, ckpt, on)
        row = {"train_loss": history}
        for mode in ("topk", "full"):
            cache = work / f"storage-{on}-{mode}"
            shutil.rmtree(cache, ignore_errors=True)
            cache_teacher(CacheOptions(shards, cache, teacher=args.storage_teacher, teacher_checkpoint=ckpt,
                                       seeds=args.storage_seeds, topk=10, store_logits=mode, recipe=AugRecipe(input_size=32),
                                       batch_size=64, device="cpu", progress=False, log=lambda m: None))
            info = inspect_cache(cache)
            row[mode] = {"records": info["records"]["done"], "bytes_per_record": info["bytes_per_record"],
                         "bytes": {"arrays": info["bytes"]["arrays"], "total": info["bytes"]["total"]},
                         "teacher_quality": info["teacher_quality"]}
        out["teachers"][on] = row
    return out


def section_codecs(args, work: Path) -> dict:
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
    cache = TeacherCache.open(sorted(work.glob("storage-*-topk"))[0])
    rows = cache.rows_per_shard
    records = sum(cache.shard_counts) * cache.num_seeds
    options = {
        "blosc-zstd9-shuffle (used)": lambda ts: [BloscCodec(cname="zstd", clevel=9, shuffle="shuffle", typesize=ts)],
        "blosc-zstd5-shuffle": lambda ts: [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=ts)],
        "blosc-zstd9-bitshuffle": lambda ts: [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle", typesize=ts)],
        "blosc-zstd9-noshuffle": lambda ts: [BloscCodec(cname="zstd", clevel=9, shuffle="noshuffle", typesize=ts)],
        "zstd9": lambda ts: [ZstdCodec(level=9)],
        "zstd19": lambda ts: [ZstdCodec(level=19)],
    }
    out = {}
    for label, make in options.items():
        row = {}
        for name in ("topk_indices", "topk_logprobs"):
            data = np.asarray(zarr.open_array(str(cache.root / "arrays.zarr" / name), mode="r")[:])
            scratch = Path(tempfile.mkdtemp(dir=work))
            arr = zarr.create_array(str(scratch / "a"), shape=data.shape, chunks=(1, rows, data.shape[2]),
                                    shards=(cache.seeds_per_unit, rows, data.shape[2]), dtype=data.dtype,
                                    compressors=make(data.dtype.itemsize) + [Crc32cCodec()], fill_value=0)
            arr[:] = data
            size = sum(f.stat().st_size for f in (scratch / "a").rglob("*") if f.is_file() and f.name != "zarr.json")
            row[name] = round(size / records, 3)
            shutil.rmtree(scratch)
        row["total"] = round(sum(row.values()), 3)
        out[label] = row
    return {"records": records, "bytes_per_record": out}


# ----------------------------------------------------------------------------- main

def markdown(results: dict) -> str:
    lines = []
    if "throughput" in results:
        t = results["throughput"]
        lines += ["| teacher | input | batch | precision | workers | bare forward img/s | cache-teacher img·seeds/s | ratio (goal ≥ 0.9) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {t['teacher']} | {t['input_size']} | {t['batch_size']} | {t['precision']}"
                  f"{' + channels-last' if t['channels_last'] else ''} | {t['workers']} | {t['bare_forward_img_per_s']} | "
                  f"{t['cache_teacher_img_seeds_per_s']} | {t['ratio']} |", ""]
    if "read" in results:
        r = results["read"]
        lines += [f"cache read: {r['read_records_per_s']} records/s ({r['reads_per_s']} reads/s of "
                  f"{r['records_per_read']} records each)", ""]
    if "storage" in results:
        s = results["storage"]
        lines += ["| teacher trained on | store | records | B/record (arrays) | B/record (all files) | per array | teacher top-1 / dominant-label agreement |",
                  "|---|---|---|---|---|---|---|"]
        for on, row in s["teachers"].items():
            for mode in ("topk", "full"):
                b, q = row[mode]["bytes_per_record"], row[mode]["teacher_quality"]
                lines.append(f"| {on} | {mode} K=10 | {row[mode]['records']} | {b['arrays']:.2f} | {b['total']:.2f} | "
                             + ", ".join(f"{k} {v:.2f}" for k, v in b["per_array"].items())
                             + f" | {q['top1_vs_label']:.3f} / {q['agreement_with_dominant_label']:.3f} |")
        lines.append("")
    if "codecs" in results:
        lines += ["| codec (inner chunk, + crc32c) | topk_indices B/rec | topk_logprobs B/rec | total |", "|---|---|---|---|"]
        for label, row in results["codecs"]["bytes_per_record"].items():
            lines.append(f"| {label} | {row['topk_indices']} | {row['topk_logprobs']} | {row['total']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="throughput,read,storage,codecs")
    p.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one).")
    p.add_argument("--teacher", default="regnety_002")
    p.add_argument("--teacher-checkpoint", default=None)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--shard-size", type=int, default=16, help="Digits shard size for the throughput section.")
    p.add_argument("--seeds", type=int, default=4, help="Seeds per unit in the throughput section.")
    p.add_argument("--units", type=int, default=2, help="Units computed per throughput round.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bare-seconds", type=float, default=5.0)
    p.add_argument("--read-seconds", type=float, default=5.0)
    p.add_argument("--storage-teacher", default="test_efficientnet")
    p.add_argument("--storage-teacher-training", default="replayed,clean",
                   help="Which small teachers to train for the storage section (replayed, clean).")
    p.add_argument("--storage-seeds", type=int, default=10)
    p.add_argument("--storage-shard-size", type=int, default=250)
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()

    device = resolve_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_cache_teacher_"))
    work.mkdir(parents=True, exist_ok=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {}
    for name in sections:
        print(f"section {name} ...", file=sys.stderr)
        t0 = time.time()
        if name == "throughput":
            results[name] = section_throughput(args, work, device)
        elif name == "read":
            results[name] = section_read(args, work)
        elif name == "storage":
            results[name] = section_storage(args, work)
        elif name == "codecs":
            results[name] = section_codecs(args, work)
        else:
            raise SystemExit(f"unknown section {name!r}")
        results[name]["machine"] = machine(device if name == "throughput" else torch.device("cpu"))
        results[name]["wall_seconds"] = round(time.time() - t0, 1)
        results[name]["date"] = time.strftime("%Y-%m-%d")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {path} (work folder {work})", file=sys.stderr)


if __name__ == "__main__":
    main()
