"""train-student end to end (real shards, real cache) vs the pure training step of the same model.

    python bench/bench_end_to_end.py                           # GPU node: DeiT-S / RegNetY-16GF, 4,096 JPEGs, bf16
    python bench/bench_end_to_end.py --images 96 --classes 10 --student deit_tiny_distilled_patch16_224 \
        --student-kwarg depth=2 --teacher resnet18 --batch-size 16 --workers 2 --epochs 2 \
        --steps 3 --rounds 1 --warmup 1                         # CPU smoke run (tiny sizes)

One command: generates ImageNet-sized JPEGs (bench_replay.imagenet_like_jpegs: crops of
scikit-learn's sample photos, ~500x375, q90) into an ImageFolder in --work (a temporary
folder by default), runs make-shards, writes a randomly initialised teacher checkpoint (no
download), runs cache-teacher, then train-student for none / cached / online. The rate of
each is its last epoch's samples_per_s from metrics.jsonl (the first epoch pays start-up and
compilation; the steady rate leaves out its first log window), next to the pure-step rate of the same models from bench_student_step (tensors
already on the device). Also reports the share of the epoch spent waiting for data and the
peak GPU memory. --compile and --channels-last are passed through to train-student.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_student_step
import timm
import torch
from bench_replay import imagenet_like_jpegs

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, env=env)


def make_data(work: Path, images: int, classes: int, shard_size: int) -> Path:
    folder = work / "jpegs"
    for i, data in enumerate(imagenet_like_jpegs(images)):
        label = folder / f"class{i % classes:04d}"
        label.mkdir(parents=True, exist_ok=True)
        (label / f"img{i:06d}.jpg").write_bytes(data)
    cli("make-shards", "--source", str(folder), "--out", str(work / "shards"), "--shard-size", str(shard_size))
    return work / "shards"


def last_epoch(run: Path) -> dict:
    """The last epoch's record, plus `steady_samples_per_s`: its log windows after the first one.

    An epoch's first window pays the loader's start (workers forked, first items replayed); on a
    short benchmark epoch that start is a large share, on an ImageNet epoch (thousands of steps) it
    is not, so both rates are reported."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in lines if r.get("event") == "epoch"][-1]
    windows = [r for r in lines if r.get("event") == "train" and r["epoch"] == epoch["epoch"]]
    steps = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + windows, windows)]
    if len(windows) > 1:     # rate over the steps of windows 2.. (B cancels: seconds = steps * B / rate)
        epoch["steady_samples_per_s"] = sum(steps[1:]) / sum(n / w["samples_per_s"] for n, w in zip(steps[1:], windows[1:]))
    return epoch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--student", default="deit_small_distilled_patch16_224")
    p.add_argument("--student-kwarg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--teacher", default="regnety_160")
    p.add_argument("--img-size", type=int, default=224,
                   help="input size of the recipe, the student and the pure step (small: smoke runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-batch-size", type=int, default=256)
    p.add_argument("--precision", default=None, help="Teacher precision (default bf16 on GPU, fp32 on CPU).")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeated-aug", type=int, default=3, help="train-student --repeated-aug (DeiT's 3)")
    p.add_argument("--modes", default="none,cached,online")
    p.add_argument("--aug", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for cache-teacher and train-student, e.g. the fast recipe: "
                        "--aug resize_backend=torch --aug rand_augment_interpolation=bilinear")
    p.add_argument("--compile", action="store_true", help="train-student --compile")
    p.add_argument("--channels-last", action="store_true", help="online teacher and cache-teacher channels-last")
    p.add_argument("--steps", type=int, default=20, help="bench_student_step: timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=4, help="train-student steps per log window (steady rate)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--work", type=Path, default=None, help="Keep the data here (default: a temporary folder).")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.img_size != 224:        # the recipe's and the student's input size (AugRecipe's default: 224)
        args.aug = [f"input_size={args.img_size}", *args.aug]
        args.student_kwarg = [f"img_size={args.img_size}", *args.student_kwarg]
    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    # seeds for the epochs at R repeats: each epoch takes R seeds of one group (student/samplers.py)
    args.seeds = (args.repeated_aug * -(-args.epochs // args.repeated_aug) if args.repeated_aug > 1
                  else args.epochs)
    return args


def save_random_teacher(args, path: Path) -> Path:
    torch.save({"model": timm.create_model(args.teacher, num_classes=args.classes).state_dict()}, path)
    return path


def build_cache(args, shards: Path, teacher_ckpt: Path, out: Path) -> Path:
    """cache-teacher (the CLI) with the seeds the epochs need, in the recipe of args.aug."""
    cli("cache-teacher", "--shards", str(shards), "--out", str(out), "--teacher", args.teacher,
        "--teacher-checkpoint", str(teacher_ckpt), "--seeds", str(args.seeds), "--topk", "10",
        "--batch-size", str(args.teacher_batch_size), "--precision", args.precision,
        "--workers", str(args.workers), "--no-progress", *[f"--aug={kv}" for kv in args.aug],
        *(["--channels-last"] if args.channels_last else []))
    return out


def train_run(args, mode: str, shards: Path, run: Path, cache: Path | None = None,
              teacher_ckpt: Path | None = None) -> dict:
    """One train-student run of `mode` (none / cached / online) into `run`: its last epoch's record."""
    aug_opts = [f"--aug={kv}" for kv in args.aug]
    base = ["train-student", "--shards", str(shards), "--model", args.student,
            *[f"--model-kwarg={kv}" for kv in args.student_kwarg],
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--warmup-epochs", "0", "--repeated-aug", str(args.repeated_aug), "--no-progress",
            "--log-interval", str(args.log_interval), *(["--compile"] if args.compile else [])]
    per_mode = {
        "none": lambda: ["--distillation-type", "none", "--num-seeds", str(args.seeds), *aug_opts],
        "cached": lambda: ["--cache", str(cache), "--distillation-type", "hard"],
        "online": lambda: ["--teacher-online", str(teacher_ckpt), "--teacher-model", args.teacher,
                           "--teacher-batch-size", str(args.teacher_batch_size),
                           "--teacher-precision", args.precision, "--distillation-type", "hard",
                           "--num-seeds", str(args.seeds),
                           "--channels-last" if args.channels_last else "--no-channels-last", *aug_opts],
    }
    cli(*base, "--out", str(run), *per_mode[mode]())
    return last_epoch(run)


def pure_step(args, modes: list[str], out: Path) -> dict:
    """bench_student_step of the same models (tensors already on the device), never compiled."""
    return bench_student_step.main([
        "--student", args.student, *[f"--student-kwarg={kv}" for kv in args.student_kwarg],
        "--teacher", args.teacher, "--img-size", str(args.img_size), "--num-classes", str(args.classes),
        "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
        "--modes", ",".join(modes), "--out", str(out)])


def table_row(mode: str, e2e: dict, pure: float) -> dict:
    """One mode's end-to-end rates (epoch, steady) against its pure step rate."""
    steady = e2e.get("steady_samples_per_s", e2e["samples_per_s"])
    wait = e2e.get("data_wait_s", 0.0) / max(e2e["epoch_time_s"], 1e-9)
    peak = e2e.get("peak_gpu_memory_bytes")
    return {"mode": mode, "end_to_end_img_s": e2e["samples_per_s"], "steady_img_s": steady,
            "pure_step_img_s": pure, "ratio": e2e["samples_per_s"] / pure, "steady_ratio": steady / pure,
            "data_wait_share": wait, "peak_gpu_gib": None if peak is None else peak / 2**30}


def loader_alone(shards: Path, recipe, batch_size: int, workers: int, device, repeated_aug: int = 3,
                 epoch: int = 0) -> dict:
    """The loader without a model, one epoch of train-student's plan: the replay workers' items alone
    ("items", pinned on a GPU) and the finished batches on `device` ("batches": `train_batches`,
    as the training loop gets them). img/s over the epoch, and steady: after the first 2 x workers
    items / first 3 batches (the loader's start: workers forked, first items replayed)."""
    from data_shards import ShardSet
    from student.data import iter_items, train_batches
    from student.samplers import plan_epoch
    device = torch.device(device)
    shard_set = ShardSet.open(shards)
    plan = plan_epoch(shard_set.shard_counts, epoch, batch_size, 0, 1, 0, repeated_aug, repeated_aug=repeated_aug)
    cuda = device.type == "cuda"
    out = {}
    for kind in ("items", "batches"):
        start, count, skip, t_steady = time.perf_counter(), 0, 0, None
        if kind == "items":
            stream = (len(item) for item in iter_items(shard_set, plan.items, recipe, workers, pin_memory=cuda))
            warm = 2 * workers
        else:
            stream = (b.images.shape[0] for b in train_batches(shard_set, plan, recipe, batch_size, None,
                                                               workers, cuda, device))
            warm = 3
        for k, n in enumerate(stream):
            if k == warm:
                if cuda:
                    torch.cuda.synchronize(device)
                t_steady, skip = time.perf_counter(), count
            count += n
        if cuda:
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        out[kind] = {"images": count, "seconds": end - start, "img_s": count / (end - start),
                     "steady_img_s": (count - skip) / (end - t_steady) if t_steady else None}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        shards = make_data(work, args.images, args.classes, args.shard_size)
        teacher_ckpt = save_random_teacher(args, work / "teacher.pt")
        cache = build_cache(args, shards, teacher_ckpt, work / "cache") if "cached" in modes else None
        end_to_end = {mode: train_run(args, mode, shards, work / f"run-{mode}", cache, teacher_ckpt)
                      for mode in modes}
        data_seconds = time.perf_counter() - started

    step = pure_step(args, modes, Path(tempfile.gettempdir()) / "bench_end_to_end_step")
    rows = []
    print("\n| mode | train-student img/s (epoch / steady) | pure step img/s | end-to-end / step (epoch / steady) "
          "| data wait share | peak GPU GiB |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        row = table_row(mode, end_to_end[mode], step["results"][mode]["images_per_s"])
        rows.append(row)
        peak = row["peak_gpu_gib"]
        print(f"| {mode} | {row['end_to_end_img_s']:.1f} / {row['steady_img_s']:.1f} | {row['pure_step_img_s']:.1f} "
              f"| {row['ratio']:.2f} / {row['steady_ratio']:.2f} | {row['data_wait_share']:.2f} "
              f"| {'-' if peak is None else format(peak, '.1f')} |")
    result = {"device": step["device"], "args": vars(args) | {"work": str(args.work), "json": str(args.json)},
              "rows": rows, "seconds_for_data_and_runs": data_seconds}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
