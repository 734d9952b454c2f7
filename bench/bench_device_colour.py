"""Batched colour ops (data_shards/device_colour.py) vs timm's Pillow ops per image: img/s, kernels.

    python bench/bench_device_colour.py                      # CPU (1 thread), and CUDA when present
    python bench/bench_device_colour.py --threads 2 --batch-size 128 --size 224 --repeats 5

For each of the ten colour ops: a batch of --batch-size images of --size x --size (crops of
scikit-learn's two sample photos resized, as the recipe's crop-resize gives), arguments drawn as
augment.py draws them for rand-m9-mstd0.5-inc1. Times, side by side in one run:
  * pillow: timm's op on each PIL image in a loop (what a CPU worker does; one thread);
  * cpu:    the batched op on the CPU tensor (--threads torch threads);
  * cuda:   the batched op on the GPU (when present), synchronised, best of --repeats.
Reports img/s (best of --repeats) and the number of kernels one call runs: CUDA kernels counted
by torch.profiler on a GPU; on the CPU, the aten ops that run a kernel (profiler events without
aten children, views and allocations left out; one whole-batch call, without the CPU
chunking), a proxy for launches; on a GPU also whether its bytes equal the CPU's. Writes
bench/results/device_colour.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from data_shards import device_colour
from data_shards.device_colour import COLOUR_OPS

FILL = (124, 116, 104)
FACTOR_OPS = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"}


def photo_batch(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    import sklearn.datasets
    folder = Path(sklearn.datasets.__file__).parent / "images"
    photos = [Image.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % 2]
        w, h = int(rng.integers(160, photo.width + 1)), int(rng.integers(160, photo.height + 1))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        out.append(photo.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BICUBIC))
    return out


def draw_args(name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, k) arguments as augment.py's _rand_augment gives them (magnitude 9, std 0.5)."""
    m = np.clip(9 + 0.5 * rng.standard_normal(count), 0, 10)
    sign = np.where(rng.random(count) > 0.5, -1.0, 1.0)
    if name == "PosterizeIncreasing":
        return (4 - (m / 10 * 4).astype(int))[:, None].astype(np.float64)
    if name == "SolarizeIncreasing":
        return (256 - np.minimum(256, (m / 10 * 256).astype(int)))[:, None].astype(np.float64)
    if name == "SolarizeAdd":
        return np.minimum(128, (m / 10 * 110).astype(int))[:, None].astype(np.float64)
    if name in FACTOR_OPS:
        return np.maximum(0.1, 1.0 + sign * (m / 10) * 0.9)[:, None]
    return np.zeros((count, 0))


def best_rate(fn, count: int, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return count / best


def pillow_rate(name: str, images: list[Image.Image], args: np.ndarray, repeats: int) -> float:
    from timm.data.auto_augment import NAME_TO_OP
    op = NAME_TO_OP[name]

    def run():
        for image, row in zip(images, args):
            if name.startswith("Posterize") and row[0] <= 0:
                Image.new(image.mode, image.size)
            else:
                values = (float(v) if name in FACTOR_OPS else int(v) for v in row)
                op(image, *values, fillcolor=FILL)
    return best_rate(run, len(images), repeats)


# aten ops that run no compute kernel (allocation, views, dispatch wrappers around copy_).
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided",
             "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view",
             "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
             "aten::permute", "aten::alias", "aten::lift_fresh", "aten::detach", "aten::resize_",
             "aten::to", "aten::_to_copy", "aten::contiguous", "aten::result_type"}


def kernel_count(fn, device: str) -> int:
    """CUDA kernels of one call; on the CPU, the innermost aten ops that compute (no chunking)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with mock.patch.object(device_colour, "CPU_CHUNK_VALUES", 1 << 62), \
            profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def computes(event) -> bool:
        return event.name.startswith("aten::") and event.name not in NO_KERNEL

    def has_compute(event) -> bool:
        return computes(event) or any(has_compute(c) for c in event.cpu_children)
    return sum(1 for e in events if computes(e) and not any(has_compute(c) for c in e.cpu_children))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", default=",".join(COLOUR_OPS))
    parser.add_argument("--no-pillow", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "device_colour.json"))
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    load_at_start = os.getloadavg()[0]     # timings on a shared machine: how busy it was
    images = photo_batch(opts.batch_size, opts.size)
    arrays = np.stack([np.asarray(im) for im in images])
    batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rng = np.random.default_rng(0)
    rows = []
    header = [f"{d} img/s | {d} kernels" for d in devices] + ["cuda = cpu"] * ("cuda" in devices)
    print("| op | pillow img/s | " + " | ".join(header) + " |")
    print("|---|---|" + "---|---|" * len(devices) + "---|" * ("cuda" in devices))
    for name in opts.ops.split(","):
        args = draw_args(name, opts.batch_size, rng)
        pillow = None if opts.no_pillow else pillow_rate(name, images, args, opts.repeats)
        row = {"op": name, "pillow": pillow}
        for device in devices:
            on_device, device_args = batch.to(device), torch.from_numpy(args).to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

            def call():
                return COLOUR_OPS[name](on_device, device_args, FILL, "bicubic")
            row[device] = best_rate(call, opts.batch_size, opts.repeats, sync)
            row[f"{device}_kernels"] = kernel_count(call, device)
            if device == "cuda":
                on_cpu = COLOUR_OPS[name](batch, torch.from_numpy(args))
                row["cuda_equals_cpu"] = torch.equal(call().cpu(), on_cpu)
        rows.append(row)
        pillow = "-" if row["pillow"] is None else f"{row['pillow']:,.0f}"
        cells = [f"{row[d]:,.0f} | {row[d + '_kernels']}" for d in devices]
        cells += [str(row["cuda_equals_cpu"])] if "cuda" in devices else []
        print(f"| {name} | {pillow} | " + " | ".join(cells) + " |", flush=True)
    setup = {"batch_size": opts.batch_size, "size": opts.size, "threads": opts.threads,
             "repeats": opts.repeats, "torch": torch.__version__, "cpu_count": os.cpu_count(),
             "load_average_1min_at_start": load_at_start,
             "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
