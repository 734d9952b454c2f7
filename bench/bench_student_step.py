"""Training-step throughput of a student: no teacher vs cached hard targets vs an online teacher.

    python bench/bench_student_step.py                      # DeiT-S student, RegNetY-16GF teacher, 224, batch 64
    python bench/bench_student_step.py --student deit_tiny_distilled_patch16_224 --teacher test_resnet \
        --img-size 32 --student-kwarg patch_size=8 --student-kwarg embed_dim=48 --student-kwarg depth=2 \
        --student-kwarg num_heads=3 --num-classes 10 --batch-size 32 --steps 5      # smoke run on a CPU

A step is what train-student does per batch: forward (AMP on GPU), DeiT's loss, backward,
AdamW step. Modes:
  none     base loss only (supervised; the floor)
  cached   hard distillation from stored targets (what a cache read gives: top-k indices and
           log-probs; as train-student, moved to the device once per unit, rows selected per step)
  online   hard distillation with the teacher run on every batch (eval, no grad), as DeiT does
The images are fixed random tensors already on the device: replaying the augmentation costs
the same in every mode, so it is left out. Weights are random (no download): speed only.
Prints a markdown table row and writes it (appended) and a JSON record to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2

from data_shards.devices import autocast, resolve_device
from student.losses import DistillationLoss
from student.models import StudentConfig, create_student
from teacher_cache.targets import encode_teacher_logits

MODES = ("none", "cached", "online")
RATIOS = (("cached", "none"), ("online", "none"), ("cached", "online"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(mode: str, args, device, amp, student, teacher, images, targets, cached):
    """One training step of `mode` (its own optimizer state), as a closure."""
    optimizer = create_optimizer_v2(student, opt="adamw", lr=5e-4, weight_decay=0.05)
    criterion = DistillationLoss("none" if mode == "none" else "hard", alpha=0.5, tau=1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    rows = torch.arange(len(images), device=device).flip(0)

    def step():
        if mode == "online":
            with torch.no_grad(), autocast(device, amp):
                teacher_targets = encode_teacher_logits(teacher(images).float(), args.topk)
        elif mode == "cached":
            # as train-student: a unit's targets are moved to the device once per unit (pinned, async),
            # each step selects its rows there - no pageable host-to-device copy (a host sync) per step
            teacher_targets = cached.select(rows)
        else:
            teacher_targets = None
        with autocast(device, amp):
            outputs = student(images)
        loss = criterion(outputs, targets, teacher_targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.total).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.total

    return step


def time_steps(step, steps: int, device) -> tuple[float, float | None]:
    """Seconds for `steps` steps, and the peak GPU memory (GiB) while they ran."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss in the benchmark")
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_modes(modes, args, device, amp, student, teacher, images, targets, cached) -> dict:
    """Warm every mode up, then time them round-robin (--rounds times) and keep the median:
    the order of the modes and slow drifts of the machine do not favour one of them."""
    student.train()
    steps = {m: make_step(m, args, device, amp, student, teacher if m == "online" else None, images,
                          targets, cached) for m in modes}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {m: [] for m in modes}
    memory = {}
    for _ in range(args.rounds):
        for m in modes:
            seconds, memory[m] = time_steps(steps[m], args.steps, device)
            times[m].append(seconds)
    out = {}
    for m in modes:
        median = statistics.median(times[m])
        out[m] = {"mode": m, "steps": args.steps, "rounds": args.rounds, "seconds_per_round": times[m],
                  "ms_per_step": 1000 * median / args.steps, "images_per_s": args.steps * args.batch_size / median,
                  "peak_memory_gib": memory[m]}
    return out


def key_value(item: str) -> tuple[str, object]:
    """KEY=VALUE, the value JSON or a bare string (as the CLI's options read them)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="deit_small_distilled_patch16_224")
    p.add_argument("--student-kwarg", action="append", default=[], type=key_value, metavar="KEY=VALUE")
    p.add_argument("--teacher", default="regnety_160")
    p.add_argument("--teacher-kwarg", action="append", default=[], type=key_value, metavar="KEY=VALUE")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="Per GPU, DeiT's 64.")
    p.add_argument("--topk", type=int, default=10, help="K of the cached targets.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps per round.")
    p.add_argument("--warmup", type=int, default=5, help="Untimed steps per mode first.")
    p.add_argument("--rounds", type=int, default=3, help="Timed blocks per mode, interleaved; the median counts.")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto", help="auto: bf16 on GPU.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="Folder for the .md row and .json.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        p.error(f"--modes must be a subset of {','.join(MODES)}")

    student_kwargs = {"img_size": args.img_size, **dict(args.student_kwarg)}
    config = StudentConfig(args.student, args.num_classes, drop_path_rate=0.1, model_kwargs=student_kwargs)
    student = create_student(config, distilled_training=True).to(device)
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.num_classes,
                                **dict(args.teacher_kwarg)).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    targets = torch.nn.functional.one_hot(labels, args.num_classes).float() * 0.9 + 0.1 / args.num_classes
    with torch.no_grad():
        cached = encode_teacher_logits(teacher(images).float(), args.topk)       # stays on the device

    results = run_modes(modes, args, device, amp, student, teacher, images, targets, cached)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    record = {"device": device_name, "student": args.student, "student_kwargs": student_kwargs,
              "teacher": args.teacher, "img_size": args.img_size, "batch_size": args.batch_size, "amp": amp,
              "num_classes": args.num_classes, "topk": args.topk, "results": results,
              "command": " ".join(sys.argv),
              "student_params_m": sum(p.numel() for p in student.parameters()) / 1e6,
              "teacher_params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ips = {m: r["images_per_s"] for m, r in results.items()}
    record["ratios"] = ratios = {f"{a}/{b}": ips[a] / ips[b] for a, b in RATIOS if a in ips and b in ips}

    header = ("| device | student | teacher | img | batch | amp | none img/s | cached-hard img/s | online img/s "
              "| cached/none | online/none | cached/online |")
    cell = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"   # noqa: E731
    row = (f"| {device_name} | {args.student} | {args.teacher} | {args.img_size} | {args.batch_size} | {amp} "
           f"| {cell(ips, 'none', '.1f')} | {cell(ips, 'cached', '.1f')} | {cell(ips, 'online', '.1f')} "
           f"| {cell(ratios, 'cached/none', '.3f')} | {cell(ratios, 'online/none', '.3f')} "
           f"| {cell(ratios, 'cached/online', '.2f')}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "bench_student_step.md"
    if not md.exists():
        md.write_text(header + "\n|" + "---|" * 12 + "\n")
    with open(md, "a") as f:
        f.write(row + "\n")
    with open(out / "bench_student_step.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    print(header)
    print(row)
    return record


if __name__ == "__main__":
    main()
