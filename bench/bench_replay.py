"""Replay speed per core: this project's replay vs timm's DeiT transform (+ Mixup), same JPEGs.

    python bench/bench_replay.py --images 256 --repeats 2

Generates ImageNet-sized JPEGs (crops / rescales of scikit-learn's two sample photos, about
500x375, quality 90; in a temporary folder, nothing kept), then times on ONE core:
  * replay:  `replay_slice` (decode, crop-resize, flip, RandAugment: uint8)
             + `finish_item` (normalise, erase, mix) on the CPU, in items of --item-size; with
             DeiT's recipe (bit-exact timm maths, Pillow resize) and the fast recipe
             (resize_backend="torch", rand_augment_interpolation="bilinear", decode_draft);
  * timm:    create_transform(224, is_training=True, DeiT's args) on each decoded image,
             stacked into batches of --item-size and mixed with timm's Mixup (DeiT's args).
Both start from the encoded bytes. Reports img/s per core for both and the ratio, and the
peak memory of one replay worker's item per recipe: tracemalloc (Python + NumPy allocations; not
torch's decode / resize buffers) and the RSS high-water growth of a fresh worker process (Linux).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from data_shards import AugRecipe, finish_item, replay_slice


def imagenet_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Random crops of the sample photos, rescaled to about 500x375 (either orientation), quality 90."""
    import sklearn.datasets
    folder = Path(sklearn.datasets.__file__).parent / "images"
    photos = [Image.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % 2]
        w, h = int(rng.integers(320, photo.width + 1)), int(rng.integers(240, photo.height + 1))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        buf = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def as_samples(jpegs: list[bytes]) -> list[SimpleNamespace]:
    return [SimpleNamespace(key=f"img{i:06d}", label=i % 1000, data=d, shard=0, position=i)
            for i, d in enumerate(jpegs)]


def time_replay(samples, recipe: AugRecipe, item_size: int, finish: bool = True) -> float:
    keys = [s.key for s in samples]
    start = time.perf_counter()
    for lo in range(0, len(samples), item_size):
        item = replay_slice(samples, 0, recipe, lo, min(len(samples), lo + item_size), keys)
        if finish:
            finish_item(item, recipe)
    return len(samples) / (time.perf_counter() - start)


def _patch_timm_posterize() -> None:
    """timm's Posterize passes 0 bits at high magnitudes, which Pillow >= 12 refuses; older Pillow
    (which timm targets) returned a black image - do that, as data_shards.pixels_pil does."""
    from timm.data import auto_augment
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if name.startswith("Posterize"):
            auto_augment.NAME_TO_OP[name] = (lambda img, bits, _op=op, **kw:
                                             Image.new(img.mode, img.size) if bits <= 0 else _op(img, bits, **kw))


def time_timm(jpegs: list[bytes], batch: int) -> float:
    from timm.data import Mixup, create_transform
    _patch_timm_posterize()
    transform = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                                 re_prob=0.25, re_mode="pixel", re_count=1)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=1000)
    start = time.perf_counter()
    for lo in range(0, len(jpegs), batch):
        chunk = jpegs[lo:lo + batch]
        images = torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in chunk])
        if len(chunk) % 2 == 0:                       # timm's Mixup needs an even batch
            mixup(images, torch.arange(len(chunk)) % 1000)
    return len(jpegs) / (time.perf_counter() - start)


# Not timm's bytes: draft decoding, torch's uint8 resize, bilinear RandAugment affine ops.
FAST_RECIPE = AugRecipe(resize_backend="torch", rand_augment_interpolation="bilinear",
                        decode_draft=True)


def replay_peak_bytes(samples, recipe: AugRecipe, item_size: int) -> tuple[int, int]:
    keys = [s.key for s in samples]
    tracemalloc.start()
    item = replay_slice(samples, 0, recipe, 0, item_size, keys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, item.nbytes()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_growth_child(samples, recipe: AugRecipe, item_size: int, conn) -> None:
    torch.set_num_threads(1)
    keys = [s.key for s in samples]
    replay_slice(samples, 0, recipe, 0, 2, keys)                   # warm: imports, allocator arenas
    Path("/proc/self/clear_refs").write_text("5")                  # reset the RSS high-water mark (Linux)
    before = _status_kib("VmRSS")
    replay_slice(samples, 0, recipe, 0, item_size, keys)
    conn.send((_status_kib("VmHWM") - before) * 1024)


def replay_rss_growth(samples, recipe: AugRecipe, item_size: int) -> int:
    """Peak RSS growth (bytes) of a fresh worker process, warmed up on two images, replaying one
    item: every allocator (torch's decode / resize buffers too), the returned item included."""
    ctx = multiprocessing.get_context("spawn")      # fresh heap: no memory freed by earlier items to reuse
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_rss_growth_child, args=(samples[:item_size], recipe, item_size, child))
    proc.start()
    growth = parent.recv()
    proc.join()
    return growth


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--item-size", type=int, default=64, help="Replay item / timm batch size.")
    p.add_argument("--repeats", type=int, default=2, help="Alternating rounds; the best of each is reported.")
    p.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = p.parse_args(argv)
    if args.images < args.item_size:
        p.error(f"--images {args.images} must be at least --item-size {args.item_size} (one work item)")
    torch.set_num_threads(1)
    jpegs = imagenet_like_jpegs(args.images)
    samples = as_samples(jpegs)
    variants = {  # name: (recipe, finish on this CPU too)
        "replay worker (uint8 item)": (AugRecipe(), False),     # what a loader worker does; finish is on the GPU
        "replay worker, fast recipe": (FAST_RECIPE, False),
        "replay + CPU finish": (AugRecipe(), True),             # everything on one core (CPU training)
        "replay + CPU finish, fast recipe": (FAST_RECIPE, True),
        "replay + CPU finish, DeiT's + draft": (AugRecipe(decode_draft=True), True),
    }
    best: dict[str, float] = {}
    for recipe in (AugRecipe(), FAST_RECIPE):
        time_replay(samples[:8], recipe, 8)                     # warm caches and imports
    for _ in range(args.repeats):
        for name, (recipe, finish) in variants.items():
            best[name] = max(best.get(name, 0.0), time_replay(samples, recipe, args.item_size, finish))
        best["timm DeiT transform + Mixup"] = max(best.get("timm DeiT transform + Mixup", 0.0),
                                                 time_timm(jpegs, args.item_size))
    memory = {}
    for label, recipe in (("deit", AugRecipe()), ("fast", FAST_RECIPE)):
        peak, item_bytes = replay_peak_bytes(samples, recipe, args.item_size)
        memory[label] = {"traced_peak_bytes": peak, "rss_growth_bytes": replay_rss_growth(samples, recipe, args.item_size)}
    timm_rate = best["timm DeiT transform + Mixup"]
    result = {"images": args.images, "image_size": "500x375 / 375x500 JPEG q90", "threads": 1,
              "fast_recipe": {"resize_backend": "torch", "rand_augment_interpolation": "bilinear",
                              "decode_draft": True},
              "img_per_s_per_core": {k: round(v, 1) for k, v in best.items()},
              "ratio_to_timm": {k: round(v / timm_rate, 2) for k, v in best.items()},
              "replay_worker_item_memory": memory, "replay_item_bytes": item_bytes}
    for name, rate in best.items():
        print(f"{name:34s} {rate:7.1f} img/s per core   x{rate / timm_rate:.2f} of timm")
    for label, m in memory.items():
        print(f"one replay item of {args.item_size} ({label} recipe): {item_bytes / 2**20:.1f} MiB returned (uint8), "
              f"peak {m['traced_peak_bytes'] / 2**20:.1f} MiB traced, RSS high-water +{m['rss_growth_bytes'] / 2**20:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
