"""Stage one on a GPU, end to end, as one prepared run (issues 9 and 17): finishing equality,
cache-teacher, verify-cache on the GPU and on the CPU.

Makes --images ImageNet-sized JPEGs (smooth random pictures, 500x375) in --classes class folders,
shards them, then
  1. finishes the same replay items (DeiT's recipe and the fast one) on the CPU and on the GPU:
     how many items differ, max abs diff (must be 0 of N: finishing is exact on every device);
  2. builds a cache with a random-initialised teacher (same FLOPs as the real one; no download) in
     bf16 with channels-last, and reports cache-teacher img·seeds/s against a bare teacher forward
     (same batch size, precision, memory format) measured in the same run: the stage-one ratio;
  3. runs verify-cache on that cache on the GPU (same kind of device: must pass at 100 %) and on
     the CPU (another kind: digests must match, near-ties are expected and reported, real
     mismatches fail).

    python bench/gpu_cache_verify.py            # GPU defaults: 4,096 JPEGs, RegNetY-16GF, bf16
    python bench/gpu_cache_verify.py --samples 128 --cpu-samples 16 --cpu-precision fp32  # < 10 min
    python bench/gpu_cache_verify.py --smoke    # the same steps at toy sizes on the CPU (< 1 min)

With --smoke (or --device cpu) every "GPU" step runs on the CPU, so step 1 and the GPU verify
compare the CPU with itself; the output says so. The CPU verify-cache recomputes whole batches
of the cache's batch size (256) in its precision (bf16; --cpu-precision fp32 if the host's
CPU lacks fast bf16), hence few samples. Writes --results (default
bench/results/gpu_cache_verify.json; with --smoke, WORKDIR/gpu_cache_verify.json) and prints a
markdown row. Exit status 1 when finishing differs or either verify-cache fails.
Steps are functions (make_data, finish_equality, build_cache, verify_on) for other scripts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_cache_teacher import ROOT, bare_forward_rate, machine, random_teacher
from data_shards import AugRecipe, ShardSet, finish_item, make_shards, replay_slice
from data_shards.devices import device_kind, resolve_device
from teacher_cache import CacheOptions, cache_teacher, load_teacher
from teacher_cache.verification import verify_cache

RESULTS = ROOT / "bench" / "results" / "gpu_cache_verify.json"
GPU_SIZES = dict(images=4096, classes=1000, shard_size=256, teacher="regnety_160", input_size=224,
                 seeds=2, batch_size=256, precision="bf16", workers=14, device="cuda", samples=256,
                 cpu_samples=32, bare_seconds=10.0, items=12)
SMOKE_SIZES = dict(images=36, classes=12, shard_size=16, teacher="test_efficientnet", input_size=32,
                   seeds=1, batch_size=8, precision="fp32", workers=1, device="cpu", samples=16,
                   cpu_samples=8, bare_seconds=1.0, items=4)
VERIFY_KEYS = ("ok", "records", "pairs", "argmax_agreement", "near_ties", "mismatches",
               "max_logprob_diff", "digests_checked", "digest_mismatches", "files_checked",
               "file_hash_mismatches", "batch_sizes", "channels_last", "device", "precision",
               "device_kind", "recorded_device_kinds", "same_kind_agreement", "other_kind_records",
               "other_kind_near_ties")


def write_jpegs(folder: Path, images: int, classes: int, seed: int = 0) -> None:
    """ImageNet-sized JPEGs: low-frequency random colour fields upsampled to 500x375 (compress like photos)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        target = folder / f"c{i % classes:04d}" / f"img{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target, quality=90)


def make_data(work: Path, images: int, classes: int, shard_size: int) -> Path:
    """JPEGs in class folders under work/jpegs, sharded into work/shards (returned)."""
    write_jpegs(work / "jpegs", images, classes)
    make_shards(str(work / "jpegs"), work / "shards", shard_size=shard_size, val_fraction=0.0,
                progress=False)
    return work / "shards"


def recipes(input_size: int) -> dict[str, AugRecipe]:
    """DeiT's recipe and the fast one (torch resize, bilinear RandAugment); erasing at p 0.5."""
    deit = AugRecipe(input_size=input_size, reprob=0.5)
    fast = dataclasses.replace(deit, resize_backend="torch", rand_augment_interpolation="bilinear")
    return {"deit": deit, "fast": fast}


def finish_equality(shards: Path, recipe: AugRecipe, device: torch.device, items: int = 12,
                    item_size: int = 16) -> dict:
    """The same replay items (shard 0, seed k, consecutive slices) finished on the CPU and on
    `device`: how many items differ in any bit, and the largest absolute difference."""
    samples = ShardSet.open(shards).read_shard(0)
    differing, max_diff = 0, 0.0
    for k in range(items):
        start = (k * item_size) % max(1, len(samples) - item_size)
        item = replay_slice(samples, k, recipe, start, min(len(samples), start + item_size))
        cpu, other = finish_item(item, recipe, "cpu"), finish_item(item, recipe, device).cpu()
        same = torch.equal(cpu.view(torch.int32), other.view(torch.int32))     # bits, -0.0 too
        differing += not same
        max_diff = max(max_diff, float((cpu - other).abs().max()))
    return {"items": items, "item_size": item_size, "differing_items": differing,
            "max_abs_diff": max_diff, "devices": ["cpu", str(device)]}


def build_cache(work: Path, shards: Path, args, device: torch.device) -> dict:
    """A random-initialised teacher's cache at work/cache, and the stage-one ratio (cache-teacher
    img·seeds/s over a bare teacher forward in the same run)."""
    ckpt = random_teacher(args.teacher, args.classes, work / "teacher.pth")
    model = load_teacher(args.teacher, ckpt, num_classes=args.classes, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bare = bare_forward_rate(model, args.batch_size, args.input_size, args.precision,
                             args.channels_last, device, args.bare_seconds)
    del model
    summary = cache_teacher(CacheOptions(
        shards, work / "cache", teacher_checkpoint=ckpt, seeds=args.seeds,
        recipe=AugRecipe(input_size=args.input_size), batch_size=args.batch_size,
        channels_last=args.channels_last, device=str(device), precision=args.precision,
        workers=args.workers, progress=False))
    rate = summary["records_per_s"]
    return {"cache": str(work / "cache"), "bare_forward_img_per_s": round(bare, 1),
            "cache_img_seeds_per_s": rate, "ratio": round(rate / bare, 3) if rate else None}


def verify_on(cache: Path, shards: Path, device: torch.device, samples: int,
              precision: str | None = None) -> dict:
    """verify-cache of `cache` recomputed on `device` (default: the cache's precision): the main
    fields of its report."""
    report = verify_cache(cache, shards, samples=samples, device=str(device), precision=precision)
    return {k: report[k] for k in VERIFY_KEYS}


def verify_line(v: dict) -> str:
    digests_ok = v["digests_checked"] - len(v["digest_mismatches"])
    files_ok = v["files_checked"] - len(v["file_hash_mismatches"])
    line = (f"verify-cache on {v['device']} ({v['device_kind']}, {v['precision']}): "
            f"{'OK' if v['ok'] else 'FAILED'}, {100 * v['argmax_agreement']:.2f}% argmax agreement "
            f"of {v['records']}, {v['near_ties']} near-ties, {v['mismatches']} real mismatches, "
            f"max log-prob diff {v['max_logprob_diff']:.3g}, digests {digests_ok}/"
            f"{v['digests_checked']}, files {files_ok}/{v['files_checked']}")
    if v["other_kind_records"]:
        line += (f"; {v['other_kind_records']} records on another kind than cache-teacher's "
                 f"({', '.join(v['recorded_device_kinds'])}): near-ties expected, not failing")
    return line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="Toy sizes on the CPU (under a minute).")
    for name, value in GPU_SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                       help=f"[default: {value}; --smoke: {SMOKE_SIZES[name]}]")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--cpu-precision", default=None, choices=["fp32", "bf16"],
                   help="Precision of the CPU verify-cache [default: the cache's].")
    p.add_argument("--workdir", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    for name, value in (SMOKE_SIZES if args.smoke else GPU_SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_cache_verify_"))
    device = resolve_device(args.device)
    if device.type != "cuda":
        print(f"no CUDA device in this run ({device}): the GPU steps run on the CPU and compare "
              "the CPU with itself", flush=True)
    t0 = time.time()
    shards = make_data(work, args.images, args.classes, args.shard_size)
    print(f"data: {args.images} JPEGs -> shards in {time.time() - t0:.0f}s", flush=True)
    finishing = {}
    for name, recipe in recipes(args.input_size).items():
        finishing[name] = f = finish_equality(shards, recipe, device, args.items)
        print(f"finishing {name}: items differing cpu vs {device}: "
              f"{f['differing_items']}/{f['items']}, max abs diff {f['max_abs_diff']:.6g}",
              flush=True)
    stage_one = build_cache(work, shards, args, device)
    print(f"stage one: bare forward {stage_one['bare_forward_img_per_s']:.0f} img/s, "
          f"cache-teacher {stage_one['cache_img_seeds_per_s']} img·seeds/s, "
          f"ratio {stage_one['ratio']}", flush=True)
    verify = {}
    cpu = torch.device("cpu")
    for name, where, samples, precision in (("device", device, args.samples, None),
                                            ("cpu", cpu, args.cpu_samples, args.cpu_precision)):
        verify[name] = v = verify_on(work / "cache", shards, where, samples, precision)
        print(verify_line(v), flush=True)
    settings = ("images", "classes", "teacher", "input_size", "seeds", "batch_size", "precision",
                "channels_last", "workers")
    result = {"machine": {**machine(device), "device_kind": device_kind(device)},
              "smoke": args.smoke, **{k: getattr(args, k) for k in settings},
              "finishing": finishing, **stage_one, "verify": verify}
    results = Path(args.results or (work / "gpu_cache_verify.json" if args.smoke else RESULTS))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")
    print_row(result, device)
    return result


def print_row(result: dict, device: torch.device) -> None:
    r, gpu, cpu = result, result["verify"]["device"], result["verify"]["cpu"]
    finishing = ", ".join(f"{k} {f['differing_items']}/{f['items']}"
                          for k, f in r["finishing"].items())
    print("| device | teacher | batch | precision | bare img/s | cache-teacher img·seeds/s "
          "| ratio | finishing differs (cpu vs device) | verify on device | verify on cpu |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['machine'].get('gpu', device)} | {r['teacher']} | {r['batch_size']} | "
          f"{r['precision']}{' + channels-last' if r['channels_last'] else ''} | "
          f"{r['bare_forward_img_per_s']:.0f} | {r['cache_img_seeds_per_s']} | {r['ratio']} | "
          f"{finishing} | {'OK' if gpu['ok'] else 'FAILED'} {100 * gpu['argmax_agreement']:.2f}% "
          f"of {gpu['records']} | {'OK' if cpu['ok'] else 'FAILED'} "
          f"{100 * cpu['argmax_agreement']:.2f}% of {cpu['records']}, "
          f"{cpu['other_kind_near_ties']} near-ties expected |")


def passed(result: dict) -> bool:
    return (all(f["differing_items"] == 0 for f in result["finishing"].values())
            and all(v["ok"] for v in result["verify"].values()))


if __name__ == "__main__":
    if not passed(main()):
        raise SystemExit(1)
