"""Stage one commands: cache-teacher, inspect-cache, verify-cache (thin wrappers over teacher_cache)."""
from __future__ import annotations

import sys

import click

from teacher_cache import CacheOptions, cache_teacher
from teacher_cache.inspection import format_inspection, inspect_cache
from teacher_cache.locks import DEFAULT_STALE_AFTER
from teacher_cache.verification import NEAR_TIE_TOLERANCE, format_verification, verify_cache

from .group import echo_json, main, run_or_explain
from .options import (COUNT, DEVICE_FORM, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT,
                      PROBABILITY, SEED,
                      device_option, json_object_option, recipe_from_options, recipe_given,
                      recipe_options)


@main.command("cache-teacher")
@click.option("--shards", required=True, type=click.Path(file_okay=False),
              help="Shard folder (from make-shards).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Cache folder (created, or resumed).")
@click.option("--teacher", default=None,
              help="timm model name. Default: regnety_160.deit_in1k (timm pretrained), or the "
                   "architecture recorded in --teacher-checkpoint, or the existing cache's teacher.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Local weights: DeiT dict {'model': state_dict}, plain state dict, or "
                   ".safetensors (loaded with weights_only=True).")
@click.option("--teacher-kwargs", default=None, callback=json_object_option,
              help='timm constructor arguments of the teacher as JSON, e.g. \'{"img_size": 32}\'.')
@click.option("--seeds", type=COUNT, default=None,
              help="Number of augmentation seeds S (0..S-1). Required for a new cache; larger than "
                   "an existing cache's count, it grows the cache (a cache never shrinks).")
@click.option("--topk", type=COUNT, default=None,
              help="K top classes stored per record (at most the class count). [default: 10]")
@click.option("--store-logits", type=click.Choice(["topk", "full"]), default=None,
              help="Also store the full fp16 logits with 'full'. [default: topk]")
@click.option("--seeds-per-unit", type=COUNT, default=None,
              help="Seeds per work unit (locked and committed together). [default: min(S, 10)]")
@recipe_options
@click.option("--batch-size", type=COUNT, default=None,
              help="Teacher batch size; recorded (GPU results depend on batch composition; "
                   "verify-cache replays these batches). [default: 64, or the existing cache's]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Feed the teacher NHWC tensors (recorded; verify-cache uses it). Slower for "
                   "RegNetY-16GF bf16 on an H200 (3,554 against 4,352 img/s). [default: off, or "
                   "the existing cache's]")
@device_option()
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher autocast precision (fp16 on CUDA only). [default: fp32]")
@click.option("--num-jobs", type=COUNT, default=None,
              help="Total jobs N (default: SLURM array / torchrun / 1).")
@click.option("--job-index", type=NON_NEGATIVE, default=None, help="This job's index I in 0..N-1.")
@click.option("--workers", type=NON_NEGATIVE, default=0, show_default=True,
              help="Processes that replay teacher batches (uint8 work items; 0: in the main "
                   "process).")
@click.option("--max-units", type=NON_NEGATIVE, default=None,
              help="Stop after computing this many units (time-limited jobs; 0 only creates or "
                   "grows the cache).")
@click.option("--lock-stale-after", type=POSITIVE_FLOAT, default=DEFAULT_STALE_AFTER,
              show_default=True,
              help="Seconds without heartbeat after which another job's unit lock counts as "
                   "abandoned.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_teacher_cmd(input_size, recipe_source, aug_overrides, teacher_kwargs, as_json,
                      no_progress, **options):
    """Run the teacher on every (sample, augmentation seed) and store its top-k in a Zarr cache.

    Resumable: rerunning skips finished units. Jobs split the units round-robin; several
    jobs (different --job-index, a SLURM array, or torchrun ranks) can fill one cache at once.
    """
    # Unset recipe options mean: the existing cache's recipe (or DeiT's for a new cache).
    recipe = (recipe_from_options(input_size, recipe_source, aug_overrides)
              if recipe_given(input_size, recipe_source, aug_overrides) else None)
    opts = CacheOptions(**options, recipe=recipe, progress=not no_progress,
                        teacher_kwargs=teacher_kwargs,
                        log=(lambda msg: click.echo(msg, err=True)) if as_json else click.echo)
    summary = run_or_explain(cache_teacher, opts)
    if as_json:
        echo_json(summary)


@main.command("inspect-cache")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--max-label-records", type=NON_NEGATIVE, default=200_000, show_default=True,
              help="Records read to measure teacher top-1 and top-k mass.")
def inspect_cache_cmd(cache, as_json, max_label_records):
    """Units done / missing / damaged, records, bytes on disk and per record, teacher top-1,
    per-seed summary.

    Exit code 0; 1 when part of the cache is damaged (listed with what to do; the other figures
    leave it out); 2 when CACHE is not a teacher cache. """
    info = run_or_explain(inspect_cache, cache, max_label_records=max_label_records)
    if as_json:
        echo_json(info)
    else:
        click.echo(format_inspection(info))
    if info["damage"]:
        sys.exit(1)


@main.command("verify-cache")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--shards", required=True, type=click.Path(file_okay=False),
              help="The shard folder the cache was computed from.")
@click.option("--samples", type=COUNT, default=64, show_default=True,
              help="Random (key, seed) records to recompute with the teacher (every unit's files "
                   "are checked anyway).")
@click.option("--min-agreement", type=PROBABILITY, default=1.0, show_default=True,
              help="Fail below this exact argmax agreement of the records recomputed on "
                   "cache-teacher's kind of device (near-ties count as disagreement; 1.0 is "
                   "expected there at the same precision; on another kind near-ties are only "
                   "reported). A real mismatch fails at any value.")
@click.option("--near-tie-tolerance", type=NON_NEGATIVE_FLOAT, default=NEAR_TIE_TOLERANCE,
              show_default=True,
              help="A disagreement is a near-tie when the recomputed log-probs of the two classes, "
                   "and the stored and recomputed top-1 log-prob, are within this many nats.")
@click.option("--max-logprob-diff", type=NON_NEGATIVE_FLOAT, default=None,
              help="Also fail above this top-k log-prob (or tail log-sum-exp) difference, in nats.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Where the cache's teacher checkpoint is now, if it moved (its weights must "
                   "match).")
@device_option(help=f"Where the teacher is rerun: {DEVICE_FORM}. On the cache's own device type "
                    f"and precision a "
                        "healthy cache reproduces exactly.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Default: the cache's precision.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Which random records.")
@click.option("--allow-incomplete", is_flag=True,
              help="Pass a cache that is still being computed: its missing units are listed, not a "
                   "failure.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (exit codes as without it).")
def verify_cache_cmd(cache, shards, as_json, **options):
    """Check every computed unit's files against its record, list the units not computed yet, and
    recompute random cached records in the batches that produced them (the unit's recorded batch
    size, order and channels-last).

    Exit code 0 when all is well; 1 on damage (a unit's file missing or changed, a replayed image or
    a record that differs) or missing units (unless --allow-incomplete); 2 on bad input (not a
    cache, other shards, other teacher weights, a bad option). """
    report = run_or_explain(verify_cache, cache, shards, **options)
    if as_json:
        echo_json(report)
    else:
        click.echo(format_verification(report))
    if not report["ok"]:
        sys.exit(1)

