"""Epoch boundaries: one loader per epoch (before) vs the run's ItemStream, whose workers live
across epochs (train-student now), on a CPU analog of a GPU training loop (issue 18).

    python bench/bench_epoch_boundary.py [--images 384] [--workers 1] [--epochs 4] \
        [--step-ms 40] [--pause-s 1.0] [--json FILE]

For each batch the main thread sleeps --step-ms (a device step that holds no GIL and launches
nothing); between epochs it sleeps --pause-s (evaluation and checkpoint). ImageNet-sized JPEGs
(bench_replay.imagenet_like_jpegs), DeiT's recipe at 224 px, --repeated-aug 3 plans. Reports per
epoch the wait for its first batch and its wall time, for both loaders, and checks that both
give the same bytes (sha256 of every batch's images).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from functools import partial
from pathlib import Path

from bench_end_to_end import make_data

from data_shards import AugRecipe, ShardSet
from student.data import ItemStream, train_batches
from student.samplers import plan_epoch


def run_epochs(shard_set, plan_for, epochs: int, batch_size: int, workers: int, step_s: float,
               pause_s: float, persistent: bool) -> tuple[list[dict], str]:
    recipe, digest, rows = AugRecipe(), hashlib.sha256(), []
    stream = ItemStream(shard_set, recipe, plan_for, range(epochs), batch_size, workers) if persistent else None
    for epoch in range(epochs):
        plan = stream.plan(epoch) if persistent else plan_for(epoch)
        items = stream.epoch_items(epoch) if persistent else None
        start, first = time.perf_counter(), None
        for batch in train_batches(shard_set, plan, recipe, batch_size, workers=workers, items=items):
            first = first if first is not None else time.perf_counter() - start
            digest.update(batch.images.numpy().tobytes())
            time.sleep(step_s)
        rows.append({"epoch": epoch, "steps": plan.steps, "first_batch_wait_s": first,
                     "epoch_s": time.perf_counter() - start})
        time.sleep(pause_s)
    if stream is not None:
        stream.close()
    return rows, digest.hexdigest()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--step-ms", type=float, default=40.0)
    p.add_argument("--pause-s", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        shard_set = ShardSet.open(make_data(Path(work), args.images, 10, 128))
        plan_for = partial(plan_epoch, shard_set.shard_counts, batch_size=args.batch_size, rank=0,
                           world_size=1, seed=0, num_seeds=None, repeated_aug=3)
        out = {"args": {k: str(v) for k, v in vars(args).items()}}
        for name, persistent in (("one loader per epoch", False), ("ItemStream", True)):
            rows, digest = run_epochs(shard_set, plan_for, args.epochs, args.batch_size, args.workers,
                                      args.step_ms / 1e3, args.pause_s, persistent)
            out[name] = {"epochs": rows, "sha256": digest}
    assert out["ItemStream"]["sha256"] == out["one loader per epoch"]["sha256"], "streams differ"
    print("| loader | epoch | steps | first batch wait s | epoch s |\n|---|---|---|---|---|")
    for name in ("one loader per epoch", "ItemStream"):
        for r in out[name]["epochs"]:
            print(f"| {name} | {r['epoch']} | {r['steps']} | {r['first_batch_wait_s']:.3f} | {r['epoch_s']:.2f} |")
    print("same bytes:", out["ItemStream"]["sha256"][:16])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
