"""Batched device geometry ops (data_shards/device_geometry.py): img/s and launches per batch.

    python bench/bench_device_geometry.py --batch 128 --repeats 3     # CPU (+ CUDA if present)
    python bench/bench_device_geometry.py --devices cuda --batch 128 --repeats 5

Generates --batch ImageNet-sized JPEGs (crops / rescales of scikit-learn's two sample photos,
about 500x375, quality 90: bench_replay.imagenet_like_jpegs), then times on each device, for the
whole batch: decode (decode_jpeg list; nvJPEG on CUDA), resized_crop to 224 (RandomResizedCrop
boxes, bicubic), hflip, and each of RandAugment's five affine ops on the 224x224 batch (bicubic,
magnitudes drawn as the CPU recipe draws rand-m9-mstd0.5). On the CPU the Pillow / timm
per-image calls that give the same bytes are timed too. "launches": CUDA kernels per batch
(torch.profiler) on CUDA; on the CPU the aten ops that would be kernels (views, allocations
and other metadata-only ops left out), run with the GPU's gather chunk size: the count a GPU
would launch, not a CPU cost (the CPU times use the CPU's smaller chunks).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timm.data.auto_augment import NAME_TO_OP

from bench_replay import imagenet_like_jpegs
from data_shards import AugRecipe, decode_image, device_resample
from data_shards.parameters import SIGNED_LEVEL, rand_augment_hparams, resized_crop_params
from data_shards.device_geometry import (GEOMETRY_OPS, decode_images, hflip,
                                         resized_crop)

SIZE = 224
# Ops that only describe or allocate tensors: no kernel on a GPU.
_METADATA_OPS = {"view", "unfold", "as_strided", "permute", "transpose", "select", "slice",
                 "expand", "unsqueeze", "reshape", "empty", "empty_strided", "empty_like",
                 "lift_fresh", "alias", "detach", "t", "_reshape_alias", "resolve_conj",
                 "resolve_neg", "split", "chunk", "squeeze", "narrow", "contiguous", "to",
                 "_to_copy", "numpy_T", "result_type", "unbind"}


def crop_boxes(images: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor([resized_crop_params(rng, img.shape[1], img.shape[2], (0.08, 1.0), (3 / 4, 4 / 3))
                         for img in images])


def op_args(name: str, count: int, seed: int = 0) -> torch.Tensor:
    """Arguments as parameters.rand_augment_ops draws them: magnitude N(9, 0.5) in [0, 10], random
    sign, timm's level maths."""
    rng = np.random.default_rng(seed)
    hparams = rand_augment_hparams(AugRecipe())
    magnitudes = np.clip(9 + 0.5 * rng.standard_normal(count), 0, 10)
    signs = np.where(rng.random(count) > 0.5, -1.0, 1.0)
    args = [[s * SIGNED_LEVEL[name](m / 10, hparams)] for m, s in zip(magnitudes, signs)]
    return torch.tensor(args, dtype=torch.float64)


def timed(fn, device: str, repeats: int) -> float:
    """Best wall time of `repeats` calls (after one warm-up), synchronised on CUDA."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def launches(fn, device: str) -> int:
    """Kernels per call; on the CPU counted with the GPU's chunk size (fewer, larger chunks)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    cpu_budget = device_resample.MAX_GATHER_ELEMENTS
    device_resample.MAX_GATHER_ELEMENTS = device_resample.MAX_GATHER_ELEMENTS_CUDA
    try:
        with profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        device_resample.MAX_GATHER_ELEMENTS = cpu_budget
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    def kernel(e) -> bool:
        return e.name.startswith("aten::") and e.name.split("::")[1] not in _METADATA_OPS

    def outermost(e) -> bool:      # not run inside another op that is counted
        parent = e.cpu_parent
        while parent is not None:
            if kernel(parent):
                return False
            parent = parent.cpu_parent
        return True
    return sum(1 for e in events if kernel(e) and outermost(e))


def pillow_rows(jpegs: list[bytes], boxes: torch.Tensor, crops: torch.Tensor, fill,
                repeats: int) -> dict:
    """The Pillow / timm per-image calls that give the same bytes, on this CPU."""
    images = [decode_image(d) for d in jpegs]
    rows = {"decode": timed(lambda: [decode_image(d) for d in jpegs], "cpu", repeats)}

    def crop_resize():
        for img, (top, left, h, w) in zip(images, boxes.tolist()):
            img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    rows["resized_crop"] = timed(crop_resize, "cpu", repeats)
    pil_crops = [Image.fromarray(c.permute(1, 2, 0).numpy()) for c in crops]
    for name in GEOMETRY_OPS:
        args = op_args(name, len(crops))[:, 0].tolist()
        op = NAME_TO_OP[name]
        rows[name] = timed(lambda: [op(img, a, fillcolor=fill, resample=Image.Resampling.BICUBIC)
                                    for img, a in zip(pil_crops, args)], "cpu", repeats)
    return rows


def bench_device(jpegs: list[bytes], device: str, repeats: int, fill) -> dict:
    n = len(jpegs)
    images, fallbacks = decode_images(jpegs, device)
    boxes = crop_boxes(images)
    crops = resized_crop(images, boxes, SIZE, "bicubic")
    flags = torch.arange(n, device=device) % 2 == 0
    work = {"decode": lambda: decode_images(jpegs, device),
            "resized_crop": lambda: resized_crop(images, boxes, SIZE, "bicubic"),
            "hflip": lambda: hflip(crops, flags)}
    for name, op in GEOMETRY_OPS.items():
        args = op_args(name, n).to(device)
        work[name] = lambda op=op, args=args: op(crops, args, fill, "bicubic")
    rows = {}
    for name, fn in work.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn, device, repeats)
        rows[name] = {"img_per_s": round(n / seconds, 1), "ms_per_batch": round(seconds * 1e3, 2),
                      "launches": launches(fn, device)}
        if device == "cuda":
            rows[name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"rows": rows, "pillow_fallbacks": fallbacks, "crops": crops.cpu(), "boxes": boxes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="Best of this many timed calls.")
    p.add_argument("--devices", default="cpu,cuda",
                   help="Comma-separated; cuda is skipped when absent.")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    p.add_argument("--no-pillow", action="store_true",
                   help="Skip the per-image Pillow reference on the CPU.")
    p.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    jpegs = imagenet_like_jpegs(args.batch)
    fill = rand_augment_hparams(AugRecipe())["img_mean"]
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    result = {"batch": args.batch, "image_size": "500x375 / 375x500 JPEG q90",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "devices": {}}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    for device in devices:
        out = bench_device(jpegs, device, args.repeats, fill)
        result["devices"][device] = {k: out[k] for k in ("rows", "pillow_fallbacks")}
        print(f"\n{device}: batch of {args.batch}, {torch.get_num_threads()} CPU threads")
        print(f"{'op':16s} {'img/s':>9s} {'ms/batch':>9s} {'launches':>9s}")
        for name, row in out["rows"].items():
            print(f"{name:16s} {row['img_per_s']:9.1f} {row['ms_per_batch']:9.2f} "
                  f"{row['launches']:9d}")
        if device == "cpu" and not args.no_pillow:
            pillow = pillow_rows(jpegs, out["boxes"], out["crops"], fill, args.repeats)
            result["pillow_cpu_img_per_s"] = {k: round(args.batch / v, 1)
                                              for k, v in pillow.items()}
            print("Pillow / timm per image on this CPU (same bytes):")
            for name, seconds in pillow.items():
                print(f"{name:16s} {args.batch / seconds:9.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
