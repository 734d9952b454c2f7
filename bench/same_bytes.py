"""Fingerprint of what the library writes, to show a refactor changes no byte (issue 12).

    PYTHONPATH=TREE python bench/same_bytes.py OUT_DIR > fingerprint.json

Builds digits shards, a small teacher cache (3 seeds, then grown to 5), and a two-epoch tiny
student distilled from it, then prints the sha256 of every file (the manifest's volatile
fields dropped: times, hosts, job logs) and of every checkpoint tensor. Run it with two code
trees and diff the outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import timm
import torch

VOLATILE = {"created", "updated", "jobs", "host", "hostname", "pid", "time", "started", "finished", "elapsed_s",
            "timestamp", "duration_s", "log", "history", "versions", "seconds", "worker_pids"}
SKIP_FILES = {"metrics.jsonl", "train.log", "config.json"}   # timings / absolute paths


def scrub(obj):
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(OUT)):
        return "<out>" + obj[len(str(OUT)):]
    return obj


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(folder) / name
            rel = str(path.relative_to(OUT))
            if name in SKIP_FILES or name.endswith(".pt"):
                continue
            if name.endswith(".json"):
                data = json.dumps(scrub(json.loads(path.read_text())), sort_keys=True).encode()
            else:
                data = path.read_bytes()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def tensor_digests(path: Path) -> dict[str, str]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for part in ("model", "ema", "optimizer"):
        flat = state.get(part)
        if part == "optimizer" and flat is not None:
            flat = {f"{k}.{n}": t for k, s in flat["state"].items() for n, t in s.items()}
        for name, t in sorted((flat or {}).items()):
            if isinstance(t, torch.Tensor):
                t = t.detach().contiguous()
                out[f"{part}.{name}"] = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


if __name__ == "__main__":
    OUT = Path(sys.argv[1]).resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    from data_shards import AugRecipe, make_shards
    from teacher_cache import CacheOptions, cache_teacher
    from student.train import TrainConfig, train
    recipe = AugRecipe(input_size=32)
    make_shards("digits", OUT / "val", split="val", shard_size=40, progress=False)
    torch.manual_seed(0)
    teacher = OUT / "teacher.pth"
    torch.save({"model": timm.create_model("test_resnet", num_classes=10).state_dict()}, teacher)
    kw = dict(teacher="test_resnet", teacher_checkpoint=teacher, seeds_per_unit=2, topk=3, recipe=recipe,
              batch_size=32, device="cpu", progress=False, log=lambda m: None)
    cache_teacher(CacheOptions(OUT / "val", OUT / "cache", seeds=3, **kw))
    cache_teacher(CacheOptions(OUT / "val", OUT / "cache", seeds=5, **kw))
    # from_dict (a checkpoint's flat "args"): the same call builds it whether or not TrainConfig nests a StudentConfig
    cfg = TrainConfig.from_dict(dict(
        shards=str(OUT / "val"), out=str(OUT / "run"), cache=str(OUT / "cache"),
        model="deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
        recipe=recipe.to_dict(), epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0, workers=0, progress=False,
        log_interval=2, max_steps_per_epoch=4, distillation_type="hard", device="cpu"))
    train(cfg)
    print(json.dumps({"files": tree_digests(OUT), "checkpoint": tensor_digests(OUT / "run" / "checkpoint.pt")},
                     indent=1, sort_keys=True))
