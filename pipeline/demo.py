"""The embedded demo: the whole two-stage flow on scikit-learn's digits, CPU-sized.

    make-shards (train/val) -> train a small convnet teacher (supervised) -> cache-teacher over S
    seeds -> from that one cache, the same small DeiT three ways (none/soft/hard) -> evaluate each
    and the teacher -> results.md, results.json, accuracy.png

It only wires the library functions together; every number comes from the real commands."""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from data_shards import AugRecipe, make_shards
from data_shards.devices import device_kind, resolve_device
from student.evaluate import default_head, evaluate_checkpoint
from student.metrics import METRICS_FILE
from student.models import StudentConfig
from student.train import TrainConfig, train
from teacher_cache.build import CacheOptions, cache_teacher

# A recipe for 32x32 digits (8x8 originals, upsampled): DeiT's recipe with three changes a
# digit needs — no horizontal flip (a mirrored 2 or 7 is not a 2 or 7), milder crops (a 0.08
# crop of an 8x8 digit is one stroke), and no centre crop at evaluation (the digit fills the image).
TEACHER_RECIPE = AugRecipe(input_size=32, scale=(0.35, 1.0), hflip=0.0,
                           rand_augment="rand-m7-mstd0.5-inc1", eval_crop_pct=1.0)
# The students' (= the cache's) recipe keeps every DeiT ingredient at magnitudes scaled for 1,443
# images of 8x8 and 40 epochs (chosen by short runs, see README "demo"): RandAugment m5, crops of
# 50-100 %, erasing of at most 20 % of the image, Mixup α 0.2 / CutMix α 0.5 on 80 % of batches.
DEMO_RECIPE = AugRecipe(input_size=32, scale=(0.5, 1.0), hflip=0.0,
                        rand_augment="rand-m5-mstd0.5-inc1", eval_crop_pct=1.0, re_area=(0.02, 0.2),
                        mixup_alpha=0.2, cutmix_alpha=0.5, mix_prob=0.8)
TEACHER_MODEL = "resnet10t"
# DeiT-Tiny's width (192) and heads (3), 4 blocks, for 32x32 inputs: a 4x4 grid of 8x8 patches
# (= 2x2 original pixels). Width 192 learns per step ~2x faster than 96 here, at ~3x the cost.
STUDENT = dict(model="deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=192,
               depth=4, num_heads=3)
# DeiT's baseline: without distillation the student is the non-distilled DeiT of the same size
# (no distillation token, one head), as in the paper; soft and hard train the distilled one.
BASELINE_MODEL = "deit_tiny_patch16_224"
DISTILLATION_TYPES = ("none", "soft", "hard")


@dataclass
class DemoSettings:
    teacher_epochs: int = 12
    teacher_batch_size: int = 64
    teacher_lr: float = 1e-3
    student_epochs: int = 40        # = cached seeds: one seed per student epoch
    batch_size: int = 32            # students: twice DeiT's steps per image, for 1,443 images
    # DeiT's 5e-4 x 32/512 is too low; 1e-3 learns 2x slower, 2e-3 stalls
    lr: float = 5e-4
    warmup_epochs: int = 2
    drop_path: float = 0.05         # DeiT-Ti's 0.1, halved for a 4-block model
    student_seeds: int = 1          # train each student with seeds 0..N-1 (mean ± spread)
    shard_size: int = 256
    device: str = "auto"
    # Replay in the main process and every core to torch: on 2 quiet cores a student epoch took
    # 2.9 s against 4.5 s with 1 thread + 1 replay worker (replay is ~12 % of a student's CPU).
    workers: int = 0
    max_steps_per_epoch: int | None = None

    @classmethod
    def quick(cls) -> "DemoSettings":
        """Two short epochs per model: checks the wiring, not the accuracy."""
        return cls(teacher_epochs=2, student_epochs=2, warmup_epochs=0, max_steps_per_epoch=4)


@contextmanager
def phase(title: str, timings: dict[str, float], key: str | None = None):
    """Print the phase's title; add its wall time to timings[key] (results.json)."""
    click.secho(f"\n== {title}", bold=True, err=True)
    started = time.time()
    yield
    if key:
        timings[key] = timings.get(key, 0.0) + time.time() - started


DEMO_MARKER = ".deit-pipeline-demo"     # in --out: the folder is the demo's, a rerun may replace it


class DemoError(ValueError):
    """The demo cannot start as asked (the message names the folder and what to do)."""


def prepare_out(out: str | Path, overwrite: bool = False) -> Path:
    """An empty `out` marked as the demo's. An existing folder is replaced only when the demo made
    it (its marker file) or `overwrite` is given; someone else's files are refused untouched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DemoError(f"demo --out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not ((out / DEMO_MARKER).is_file() or overwrite):
            names = sorted(p.name for p in out.iterdir())
            raise DemoError(f"demo --out {out} holds files the demo did not write "
                            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); choose "
                            "another --out, or pass --overwrite to delete the folder and "
                            "everything in it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `deit-pipeline demo`: a rerun into this folder "
                                   "replaces it\n")
    return out


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), overwrite: bool = False,
             echo=click.echo, command: str | None = None) -> dict:
    """The whole demo into `out` (see prepare_out); `echo` shows the results table. `command`: the
    command line as run, for results.md (default: this Python call)."""
    out = prepare_out(out, overwrite)
    if settings.device in ("auto", "cpu") and not torch.cuda.is_available():
        # One core per replay worker, the rest for torch: oversubscribed OpenMP threads spin against
        # the workers (and against other jobs: with 2 threads and another job on one of 2 cores a
        # teacher step took 1.7 s instead of 0.2 s; --workers 1 keeps torch on one core then).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - settings.workers))
    run = {"command": command or f"python: pipeline.demo.run_demo({str(out)!r}, {settings})",
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "machine": machine_info(settings.device)}         # after the thread count is set
    timings: dict[str, float] = {}
    started = time.time()
    shards = {split: out / "shards" / split for split in ("train", "val")}
    with phase("1/6 make-shards: scikit-learn digits -> WebDataset shards (train / val)", timings,
               "make_shards"):
        for split, folder in shards.items():
            make_shards("digits", folder, split=split, shard_size=settings.shard_size, overwrite=True)
    common = dict(shards=str(shards["train"]), val_shards=str(shards["val"]),
                  device=settings.device, workers=settings.workers, repeated_aug=1,
                  log_interval=10**9, max_steps_per_epoch=settings.max_steps_per_epoch)
    teacher_ckpt, cache_dir, cache_summary = teacher_and_cache(out, shards, settings, common, timings)
    runs = train_students(out, cache_dir, settings, common, timings)
    with phase("5/6 evaluate the students (class, distillation, fused heads) and the teacher",
               timings, "evaluate"):
        all_reports = {key: evaluate_checkpoint(str(d / "checkpoint.pt"), str(shards["val"]),
                                                teacher=str(teacher_ckpt), device=settings.device)
                       for key, d in runs.items()}
        teacher_report = evaluate_checkpoint(str(teacher_ckpt), str(shards["val"]),
                                             device=settings.device)
    with phase("6/6 results: results.md, results.json, accuracy.png", timings):
        curves = {kind: val_curve(runs[kind, 0] / METRICS_FILE) for kind in DISTILLATION_TYPES}
        curves["teacher"] = val_curve(teacher_ckpt.parent / METRICS_FILE)
        results = {
            "run": run, "settings": settings.__dict__, "recipe": DEMO_RECIPE.to_dict(),
            "teacher_recipe": TEACHER_RECIPE.to_dict(), "teacher_model": TEACHER_MODEL,
            "student": STUDENT, "baseline_model": BASELINE_MODEL, "teacher": teacher_report,
            "students": {kind: all_reports[kind, 0] for kind in DISTILLATION_TYPES},
            "over_seeds": over_seeds(all_reports), "val_curves": curves, "cache": cache_summary,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "total_s": round(time.time() - started, 1)}
        write_results(out, results, curves, echo)
    return results


def teacher_and_cache(out: Path, shards: dict[str, Path], settings: DemoSettings, common: dict,
                      timings: dict):
    """Phases 2-3: the supervised teacher, then its cache over one seed per student epoch."""
    teacher_dir, cache_dir = out / "teacher", out / "teacher_cache"
    teacher_ckpt = teacher_dir / "checkpoint.pt"
    with phase(f"2/6 train the teacher ({TEACHER_MODEL}, supervised, {settings.teacher_epochs} "
               "epochs)", timings, "train_teacher"):
        train(TrainConfig(out=str(teacher_dir), distillation_type="none",
                          student=StudentConfig(TEACHER_MODEL, drop_path_rate=0.0),
                          recipe=TEACHER_RECIPE.to_dict(), epochs=settings.teacher_epochs,
                          batch_size=settings.teacher_batch_size, lr=settings.teacher_lr,
                          warmup_epochs=2, **common))
    with phase(f"3/6 cache-teacher: {settings.student_epochs} augmentation seeds x every training "
               "image", timings, "cache_teacher"):
        cache_summary = cache_teacher(CacheOptions(
            shards["train"], cache_dir, teacher_checkpoint=str(teacher_ckpt),
            seeds=settings.student_epochs, topk=10, recipe=DEMO_RECIPE,
            batch_size=settings.teacher_batch_size, device=settings.device,
            workers=settings.workers, log=lambda message: click.echo(message, err=True)))
    return teacher_ckpt, cache_dir, cache_summary


def train_students(out: Path, cache_dir: Path, settings: DemoSettings, common: dict,
                   timings: dict) -> dict:
    """Phase 4: the same student with none / soft / hard distillation per seed -> {(kind, seed):
    run folder}."""
    runs = {}
    for seed in range(settings.student_seeds):
        for i, kind in enumerate(DISTILLATION_TYPES):
            runs[kind, seed] = out / (f"student_{kind}" if seed == 0 else f"student_{kind}_seed{seed}")
            student = {**STUDENT, "model": BASELINE_MODEL} if kind == "none" else STUDENT
            with phase(f"4/6 student {i + 1}/3 (seed {seed}): {student['model']} (32x32, patch 8), "
                       f"distillation {kind}, from the cache", timings, f"train_student_{kind}"):
                train(TrainConfig(out=str(runs[kind, seed]), cache=str(cache_dir),
                                  distillation_type=kind, seed=seed, epochs=settings.student_epochs,
                                  batch_size=settings.batch_size, lr=settings.lr,
                                  warmup_epochs=settings.warmup_epochs,
                                  student=StudentConfig(**student, drop_path_rate=settings.drop_path),
                                  **common))
    return runs


def write_results(out: Path, results: dict, curves: dict[str, list[dict]], echo=click.echo) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = results_table(results)
    (out / "results.md").write_text(table)
    plot_curves(curves, out / "accuracy.png")
    echo(table)
    echo(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy.png'} "
         f"in {results['total_s']:.0f}s")


def over_seeds(reports: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Fused top-1 (default head) of each student kind over its seeds: values, mean, spread
    (max - min)."""
    out = {}
    for kind in DISTILLATION_TYPES:
        values = [r["heads"][r["default_head"]]["top1"] for (k, _), r in sorted(reports.items())
                  if k == kind]
        out[kind] = {"top1": values, "mean": sum(values) / len(values),
                     "spread": max(values) - min(values)}
    return out


def val_curve(metrics_path: Path) -> list[dict]:
    """Validation top-1 per epoch (default head) from a run's metrics.jsonl."""
    curve = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "epoch" and "val" in record:
            val = record["val"]
            curve.append({"epoch": record["epoch"] + 1, "top1": val[default_head(val)]["top1"],
                          **{f"{h}_top1": v["top1"] for h, v in val.items()
                             if isinstance(v, dict)}})
    return curve


def machine_info(device: str) -> dict:
    """What results.md names the run's machine by: CPU model and cores, versions, the device."""
    import timm
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": device_kind(resolve_device(device))}


def results_table(results: dict) -> str:
    t_top1 = results["teacher"]["heads"]["class"]["top1"]
    run, machine = results["run"], results["run"]["machine"]
    lines = [
        "# deit-pipeline demo: digits, 32x32", "", f"    {run['command']}", "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores ({machine['torch_threads']} torch "
        f"threads), device {machine['device']}; torch {machine['torch']}, timm {machine['timm']}, "
        f"python {machine['python']}. Started {run['started']}, wall time "
        f"{results['total_s']:.0f} s ({results['total_s'] / 60:.1f} min).", "",
        f"Teacher `{results['teacher_model']}` (supervised, "
        f"{results['settings']['teacher_epochs']} epochs); students resized to 32x32 / patch 8 / "
        f"dim {results['student']['embed_dim']} / depth {results['student']['depth']}: "
        f"`{results['student']['model']}` for soft and hard, `{results['baseline_model']}` for none "
        f"(DeiT's baseline: no distillation token, class head only, its default prediction); "
        f"{results['settings']['student_epochs']} epochs, one cached seed per epoch. Validation: "
        f"{results['teacher']['num_samples']} held-out digits, evaluation transform.", ""]
    seeds = results["over_seeds"]
    n = len(seeds["none"]["top1"])
    lines += [f"Default prediction (fused heads; class head for none), top-1 over {n} student "
              f"seed{'s' if n > 1 else ''} ({', '.join(map(str, range(n)))}), mean ± spread "
              "(max - min):", "",
              "| student | top-1 mean | ± spread | per seed |", "|---|---|---|---|"]
    lines += [f"| {kind} | {100 * s['mean']:.2f}% | {100 * s['spread']:.2f} | "
              + ", ".join(f"{100 * v:.2f}%" for v in s["top1"]) + " |" for kind, s in seeds.items()]
    lines += ["", "Seed 0 per head:", "",
              "| model | distillation | class head top-1 | dist head top-1 | fused top-1 | agreement "
              "with teacher |", "|---|---|---|---|---|---|",
              f"| teacher {results['teacher_model']} | - | {t_top1:.2%} | - | - | - |"]
    for kind, report in results["students"].items():
        # distilled DeiTs have three heads; the baseline (none) only the class head: "-" for others
        cells = [report["heads"].get(head, {}).get("top1")
                 for head in ("class", "distillation", "fused")]
        cells.append(report["teacher"]["agreement"][report["default_head"]])
        lines.append(f"| student | {kind} | "
                     + " | ".join("-" if c is None else f"{c:.2%}" for c in cells) + " |")
    cache = results["cache"]
    lines += ["", f"Cache: {cache.get('records_computed')} records (images x seeds) computed at "
              f"{cache.get('records_per_s')} records/s. Wall time per step (s): "
              + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items())
              + f"; total {results['total_s']} s.", ""]
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for kind in DISTILLATION_TYPES:
        ax.plot([p["epoch"] for p in curves[kind]], [100 * p["top1"] for p in curves[kind]],
                marker="o", ms=3, label=f"student, {kind} distillation")
    ax.axhline(100 * curves["teacher"][-1]["top1"], color="black", ls="--", lw=1,
               label="teacher (final)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)",
           title="digits 32x32: DeiT student from one teacher cache")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
