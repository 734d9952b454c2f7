"""The device check of issues 17 and 18: one command, at most ~6 minutes on one H200 with 16 cores.

On the device machine, from a copy of the tree (run from its root; the dependencies that machine
lacks travel as wheels in bench/wheels, see bench/README.md, "The device check"):

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
        --target /tmp/deps bench/wheels/*.whl \\
        || for w in bench/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/deps; done; \\
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/deps python3 bench/gpu_check.py --out $OUT 2>&1 \\
        | tee $OUT/gpu_check.log

(the device tool: carry ["bench/wheels"], timeout_s 480; the one line is in bench/README.md).

    python bench/gpu_check.py --smoke --out DIR       # the same steps at toy sizes on the CPU

Makes ImageNet-sized JPEGs (bench_replay.imagenet_like_jpegs, 4,096 in 1,000 classes), shards
them, then runs these steps, each guarded (a failing step is recorded with its error, the rest
still run), printing its planned and actual seconds:
  finishing     issue 17: the same replay items finished on the CPU and on the device, bit for
                bit (gpu_cache_verify.finish_equality), DeiT's and the fast recipe;
  stage_one     cache-teacher img·seeds/s against the bare teacher forward, in both memory
                formats, channels-last then contiguous, in this run (gpu_cache_verify.build_cache);
  verify_device verify-cache of the GPU-built (channels-last) cache on the device;
  verify_cpu    the same cache verified on the CPU (near-ties expected, digests must match);
  loader        the loader alone, no model: replay items and finished batches of one epoch
                (bench_end_to_end.loader_alone), DeiT's and the fast recipe;
  e2e_deit      train-student end to end against the pure step: none / cached / online, DeiT's
                recipe (bench_end_to_end, bench_student_step);
  e2e_fast      cached with the fast recipe (torch resize, bilinear RandAugment);
  e2e_compile   cached with --compile (the pure step is never compiled).
Writes --out/gpu_check-<machine>-<date>.json and .md (gpu_check-smoke-... with --smoke),
rewritten after every step, so a run stopped early keeps what it measured. Exit status 1 when a
correctness check (finishing, verify_device, verify_cpu) fails or could not run.

--smoke: 48 JPEGs, 12 classes, 64 px, DeiT-Ti depth 1 / test_resnet, one epoch, the compile run
with TORCH_COMPILE_DISABLE=1. 3 min 32 s wall (1 min 42 s CPU time) on 2 cores shared with
other jobs (load 7.8-8.6), from a copy of the tree with zarr and its dependencies importable
only from the wheels' folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import torchvision

import bench_end_to_end as e2e
import gpu_cache_verify as gcv
from bench_replay import FAST_RECIPE, imagenet_like_jpegs
from data_shards import AugRecipe, make_shards

RESULTS = Path(__file__).resolve().parent / "results"
FAST_AUG = ["resize_backend=torch", "rand_augment_interpolation=bilinear"]    # = FAST_RECIPE
GPU_SIZES = dict(images=4096, classes=1000, shard_size=512,
                 student="deit_small_distilled_patch16_224", student_kwargs=[],
                 teacher="regnety_160", input_size=224, batch_size=128, teacher_batch_size=256,
                 precision="bf16", workers=max(1, (os.cpu_count() or 2) - 2),
                 epochs=2, repeated_aug=3, log_interval=4, steps=20, rounds=2, warmup=5,
                 stage_one_seeds=2, bare_seconds=5.0, finish_items=12, verify_samples=64,
                 cpu_samples=8)
SMOKE_SIZES = dict(images=48, classes=12, shard_size=16, student="deit_tiny_distilled_patch16_224",
                   student_kwargs=["depth=1"], teacher="test_resnet", input_size=64, batch_size=8,
                   teacher_batch_size=8, precision="fp32", workers=1, epochs=1, repeated_aug=3,
                   log_interval=2, steps=2, rounds=1, warmup=1, stage_one_seeds=1,
                   bare_seconds=0.5, finish_items=2, verify_samples=8, cpu_samples=8)
# Planned seconds per step on one H200 with 16 cores, from the runs of 2026-11-30
# (/work/shared/measurements/h200-2026-11-30): e2e 97 s for data + cache + 3 runs, 54 s for
# data + cache + 1 run; cache-teacher 1,600-1,900 img·seeds/s; the loader 3,700 img/s.
PLAN_S = dict(data=20, finishing=5, stage_one=40, verify_device=20, verify_cpu=35, loader=20,
              e2e_deit=95, e2e_fast=35, e2e_compile=60)
CHECKS = {"finishing_equal": "finishing", "verify_device_ok": "verify_device",
          "verify_cpu_ok": "verify_cpu"}     # verdict: the step that gives it


def machine(device: torch.device) -> dict:
    info = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "platform": platform.platform(), "device": str(device)}
    info["name"] = f"{(info['gpu'] or 'cpu').replace(' ', '-')}-{info['cpu_count']}cpu"
    return info


# ----------------------------------------------------------------------------- data

def _jpeg_chunk(task: tuple[int, int]) -> list[bytes]:
    count, seed = task
    return imagenet_like_jpegs(count, seed=seed)


def make_data(work: Path, s: SimpleNamespace, processes: int) -> Path:
    """ImageNet-sized JPEGs in class folders (chunks of 64 made in parallel), sharded."""
    chunks = [(min(64, s.images - lo), lo // 64) for lo in range(0, s.images, 64)]
    with multiprocessing.get_context("fork").Pool(max(1, processes)) as pool:    # PIL only: no CUDA
        jpegs = [j for chunk in pool.map(_jpeg_chunk, chunks) for j in chunk]
    for i, data in enumerate(jpegs):
        target = work / "jpegs" / f"class{i % s.classes:04d}" / f"img{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    make_shards(str(work / "jpegs"), work / "shards", shard_size=s.shard_size, val_fraction=0.0,
                progress=False)
    return work / "shards"


# ----------------------------------------------------------------------------- steps

def step_finishing(ctx) -> dict:
    out = {name: gcv.finish_equality(ctx.shards, recipe, ctx.device, ctx.s.finish_items)
           for name, recipe in gcv.recipes(ctx.s.input_size).items()}
    out["equal"] = all(f["differing_items"] == 0 for f in out.values())
    return out


def step_stage_one(ctx) -> dict:
    """cache-teacher vs the bare forward, channels-last then contiguous (caches kept for verify)."""
    out = {}
    for name, channels_last in (("channels_last", True), ("contiguous", False)):
        args = SimpleNamespace(teacher=ctx.s.teacher, classes=ctx.s.classes,
                               input_size=ctx.s.input_size, batch_size=ctx.s.teacher_batch_size,
                               precision=ctx.s.precision,
                               channels_last=channels_last, bare_seconds=ctx.s.bare_seconds,
                               seeds=ctx.s.stage_one_seeds, workers=ctx.s.workers)
        work = ctx.work / f"stage_one-{name}"
        work.mkdir(exist_ok=True)
        out[name] = gcv.build_cache(work, ctx.shards, args, ctx.device)
        print(f"  {name}: bare forward {out[name]['bare_forward_img_per_s']:.0f} img/s, "
              f"cache-teacher {out[name]['cache_img_seeds_per_s']} img·seeds/s, "
              f"ratio {out[name]['ratio']}", flush=True)
    return out


def _stage_one_cache(ctx) -> Path:
    stage_one = ctx.results.get("stage_one", {}).get("result") or {}
    for name in ("channels_last", "contiguous"):
        if name in stage_one:
            return Path(stage_one[name]["cache"])
    raise RuntimeError("no stage-one cache to verify (the stage_one step failed)")


def step_verify_device(ctx) -> dict:
    v = gcv.verify_on(_stage_one_cache(ctx), ctx.shards, ctx.device, ctx.s.verify_samples)
    print("  " + gcv.verify_line(v), flush=True)
    return v


def step_verify_cpu(ctx) -> dict:
    v = gcv.verify_on(_stage_one_cache(ctx), ctx.shards, torch.device("cpu"), ctx.s.cpu_samples)
    print("  " + gcv.verify_line(v), flush=True)
    return v


def step_loader(ctx) -> dict:
    out = {}
    deit = AugRecipe(input_size=ctx.s.input_size)
    fast = dataclasses.replace(FAST_RECIPE, input_size=ctx.s.input_size)
    for name, recipe in (("deit", deit), ("fast", fast)):
        out[name] = r = e2e.loader_alone(ctx.shards, recipe, ctx.s.batch_size, ctx.s.workers,
                                         ctx.device, ctx.s.repeated_aug)
        print(f"  {name}: " + ", ".join(f"{kind} {r[kind]['img_s']:.0f} img/s (steady "
                                        f"{r[kind]['steady_img_s'] or float('nan'):.0f})"
                                        for kind in ("items", "batches")), flush=True)
    return out


def e2e_args(ctx, *extra: str) -> argparse.Namespace:
    s = ctx.s
    argv = ["--images", s.images, "--classes", s.classes, "--shard-size", s.shard_size,
            "--student", s.student, *[f"--student-kwarg={kv}" for kv in s.student_kwargs],
            "--teacher", s.teacher, "--img-size", s.input_size, "--batch-size", s.batch_size,
            "--teacher-batch-size", s.teacher_batch_size, "--precision", s.precision,
            "--workers", s.workers, "--epochs", s.epochs, "--repeated-aug", s.repeated_aug,
            "--log-interval", s.log_interval,
            "--steps", s.steps, "--rounds", s.rounds, "--warmup", s.warmup, *extra]
    return e2e.parse_args([str(a) for a in argv])


def _cache(ctx, recipe: str) -> Path:
    """The e2e cache of `recipe` (deit / fast), built once through the CLI."""
    if recipe not in ctx.caches:
        args = e2e_args(ctx, *[f"--aug={kv}" for kv in (FAST_AUG if recipe == "fast" else [])])
        try:
            ctx.caches[recipe] = e2e.build_cache(args, ctx.shards, ctx.teacher_ckpt,
                                                 ctx.work / f"cache-{recipe}")
        except Exception as exc:        # tried once: a later step says why instead of retrying
            ctx.caches[recipe] = RuntimeError(f"the {recipe} cache could not be built: {exc}")
    if isinstance(ctx.caches[recipe], Exception):
        raise ctx.caches[recipe]
    return ctx.caches[recipe]


def _pure(ctx, modes: list[str]) -> dict:
    """Pure-step img/s per mode, measured once (the same models whatever the recipe)."""
    missing = [m for m in modes if m not in ctx.pure]
    if missing:
        step = e2e.pure_step(e2e_args(ctx), missing, ctx.work / "pure_step")
        ctx.pure.update({m: step["results"][m]["images_per_s"] for m in missing})
    return ctx.pure


def _e2e_rows(ctx, variant: str, modes: list[str], *extra: str) -> list[dict]:
    args, rows = e2e_args(ctx, *extra), []
    recipe = "fast" if "resize_backend=torch" in " ".join(extra) else "deit"
    runs = {}
    for mode in modes:
        cache = _cache(ctx, recipe) if mode == "cached" else None
        run = ctx.work / f"run-{variant}-{mode}"
        runs[mode] = e2e.train_run(args, mode, ctx.shards, run, cache, ctx.teacher_ckpt)
    pure = _pure(ctx, modes)
    for mode in modes:
        rows.append({"variant": variant, **e2e.table_row(mode, runs[mode], pure[mode])})
        r = rows[-1]
        print(f"  {variant} {mode}: {r['end_to_end_img_s']:.0f} / {r['steady_img_s']:.0f} img/s "
              f"against {r['pure_step_img_s']:.0f}, ratio {r['ratio']:.2f} / {r['steady_ratio']:.2f}",
              flush=True)
    return rows


STEPS = {
    "finishing": step_finishing,
    "stage_one": step_stage_one,
    "verify_device": step_verify_device,
    "verify_cpu": step_verify_cpu,
    "loader": step_loader,
    "e2e_deit": lambda ctx: _e2e_rows(ctx, "deit", ["none", "cached", "online"]),
    "e2e_fast": lambda ctx: _e2e_rows(ctx, "fast", ["cached"], *[f"--aug={kv}" for kv in FAST_AUG]),
    "e2e_compile": lambda ctx: _compiled(ctx),
}


def _compiled(ctx) -> list[dict]:
    """cached with --compile. In --smoke, TORCH_COMPILE_DISABLE=1: the flag's path runs
    (torch.compile wraps the model) but nothing is compiled (inductor on 2 CPU cores would take
    minutes)."""
    if not ctx.smoke:
        return _e2e_rows(ctx, "compile", ["cached"], "--compile")
    os.environ["TORCH_COMPILE_DISABLE"] = "1"          # read by train-student's subprocess
    try:
        return _e2e_rows(ctx, "compile", ["cached"], "--compile")
    finally:
        del os.environ["TORCH_COMPILE_DISABLE"]


# ----------------------------------------------------------------------------- the run

def run_step(ctx, name: str, fn) -> None:
    """Run one step, guarded: its result or its error, and its seconds against the plan."""
    k, n = list(ctx.plan).index(name) + 1, len(ctx.plan)
    so_far = time.perf_counter() - ctx.t0
    print(f"[{k}/{n}] {name} (planned {ctx.plan[name]} s; {so_far:.0f} s so far)", flush=True)
    start = time.perf_counter()
    record = {"planned_s": ctx.plan[name], "ok": True, "result": None, "error": None}
    try:
        record["result"] = fn(ctx)
    except Exception as exc:            # a failing step is recorded; the others still run
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
        print(f"  FAILED: {record['error']}", flush=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    ctx.results[name] = record
    print(f"  {name}: {'ok' if record['ok'] else 'error'} in {record['seconds']} s", flush=True)


def checks(results: dict) -> dict:
    """The correctness verdicts (None: the step did not run to its end)."""
    def ok(name, test):
        r = results.get(name)
        return None if r is None or not r["ok"] else bool(test(r["result"]))
    return {"finishing_equal": ok("finishing", lambda r: r["equal"]),
            "verify_device_ok": ok("verify_device", lambda r: r["ok"]),
            "verify_cpu_ok": ok("verify_cpu", lambda r: r["ok"])}


def write(ctx, paths: tuple[Path, Path]) -> dict:
    verdicts = checks(ctx.results)
    report = {"machine": ctx.machine, "smoke": ctx.smoke, "sizes": vars(ctx.s), "plan_s": ctx.plan,
              "planned_total_s": sum(ctx.plan.values()), "steps": ctx.results, "checks": verdicts,
              "passed": all(verdicts[v] is True for v, step in CHECKS.items() if step in ctx.plan),
              "seconds": round(time.perf_counter() - ctx.t0, 1)}
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    m, steps = r["machine"], r["steps"]
    lines = [f"# Device check, {m['name']}{' (smoke: toy sizes)' if r['smoke'] else ''}", "",
             f"{m['gpu'] or 'no GPU'}, {m['cpu_count']} CPUs; Python {m['python']}, "
             f"torch {m['torch']}, torchvision {m['torchvision']}, timm {m['timm']}; "
             f"{r['seconds']} s in all "
             f"(planned {r['planned_total_s']} s{' on one H200' if r['smoke'] else ''}). Checks: " +
             ", ".join(f"{k} {v}" for k, v in r["checks"].items()), "",
             "| step | ok | seconds (planned) | error |", "|---|---|---|---|"]
    lines += [f"| {n} | {s['ok']} | {s['seconds']} ({s['planned_s']}) | {s['error'] or ''} |"
              for n, s in steps.items()]
    rows = [row for n in ("e2e_deit", "e2e_fast", "e2e_compile")
            if steps.get(n, {}).get("ok") for row in steps[n]["result"]]
    if rows:
        lines += ["", "| variant | mode | train-student img/s (epoch / steady) | pure step img/s "
                  "| ratio (epoch / steady) | data-wait share |", "|---|---|---|---|---|---|"]
        lines += [f"| {w['variant']} | {w['mode']} | {w['end_to_end_img_s']:,.0f} "
                  f"/ {w['steady_img_s']:,.0f} | {w['pure_step_img_s']:,.0f} | {w['ratio']:.2f} "
                  f"/ {w['steady_ratio']:.2f} "
                  f"| {w['data_wait_share']:.2f} |" for w in rows]
    if steps.get("loader", {}).get("ok"):
        lines += ["", "| loader alone | items img/s (steady) | finished batches img/s (steady) |",
                  "|---|---|---|"]
        fmt = lambda x: "-" if x is None else f"{x:,.0f}"   # noqa: E731
        lines += [f"| {n} | {fmt(v['items']['img_s'])} ({fmt(v['items']['steady_img_s'])}) "
                  f"| {fmt(v['batches']['img_s'])} ({fmt(v['batches']['steady_img_s'])}) |"
                  for n, v in steps["loader"]["result"].items()]
    if steps.get("stage_one", {}).get("ok"):
        lines += ["", "| stage one | bare forward img/s | cache-teacher img·seeds/s | ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {v['bare_forward_img_per_s']:,.0f} | {v['cache_img_seeds_per_s']} "
                  f"| {v['ratio']} |" for n, v in steps["stage_one"]["result"].items()]
    for n in ("verify_device", "verify_cpu"):
        if steps.get(n, {}).get("ok"):
            lines += ["", f"{n}: " + gcv.verify_line(steps[n]["result"])]
    if steps.get("finishing", {}).get("ok"):
        f = steps["finishing"]["result"]
        lines += ["", "finishing, items differing CPU vs device: " + ", ".join(
            f"{k} {v['differing_items']}/{v['items']} (max {v['max_abs_diff']:.3g})"
            for k, v in f.items() if k != "equal")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="Toy sizes on the CPU.")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="Folder of the .json and .md [bench/results].")
    p.add_argument("--work", type=Path, default=None, help="Keep the data here [a temporary one].")
    p.add_argument("--steps", default=",".join(STEPS), help="A subset of the steps, comma-separated.")
    p.add_argument("--workers", type=int, default=None, help="Loader workers [cores - 2; smoke: 1].")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = dict(SMOKE_SIZES if args.smoke else GPU_SIZES)
    if args.workers:
        sizes["workers"] = args.workers
    names = [n for n in args.steps.split(",") if n]
    if not set(names) <= set(STEPS):
        raise SystemExit(f"--steps: unknown {sorted(set(names) - set(STEPS))}; "
                         f"known: {', '.join(STEPS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = SimpleNamespace(s=SimpleNamespace(**sizes), device=device, work=work, smoke=args.smoke,
                          machine=machine(device), t0=time.perf_counter(), results={}, caches={},
                          pure={}, plan={n: PLAN_S[n] for n in ["data", *names]})
    kind = "gpu_check-smoke" if args.smoke else "gpu_check"
    stem = f"{kind}-{ctx.machine['name']}-{time.strftime('%Y-%m-%d')}"
    args.out.mkdir(parents=True, exist_ok=True)
    paths = (args.out / f"{stem}.json", args.out / f"{stem}.md")
    plan = ", ".join(f"{n} {s}" for n, s in ctx.plan.items())
    print(f"device check on {ctx.machine['name']} ({device}), torch {torch.__version__}, work {work}; "
          f"plan (s, {'toy sizes: not the GPU plan' if args.smoke else 'one H200'}): {plan}; "
          f"total {sum(ctx.plan.values())}", flush=True)
    if device.type != "cuda":
        print("no CUDA device in this run: the device steps run on the CPU and compare the CPU "
              "with itself", flush=True)

    def data(c):
        c.shards = make_data(work, c.s, c.s.workers + 1)
        c.teacher_ckpt = e2e.save_random_teacher(e2e_args(c), work / "teacher.pt")
        return {"shards": str(c.shards), "images": c.s.images}

    run_step(ctx, "data", data)
    write(ctx, paths)
    for name in names:
        if ctx.results["data"]["ok"]:
            run_step(ctx, name, STEPS[name])
        else:
            ctx.results[name] = {"planned_s": ctx.plan[name], "ok": False, "result": None,
                                 "error": "not run: the data step failed", "seconds": 0.0}
        write(ctx, paths)
    report = write(ctx, paths)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}; {'PASSED' if report['passed'] else 'FAILED'} "
          f"in {report['seconds']} s", flush=True)
    return report


if __name__ == "__main__":
    if not main()["passed"]:
        raise SystemExit(1)
