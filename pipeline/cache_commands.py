"""Stage one commands: cache-teacher, inspect-cache, verify-cache (thin wrappers over teacher_cache)."""
from __future__ import annotations

import sys

import click

from .group import (COUNT, FILE, FOLDER, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT,
                    PRECISION, PROBABILITY, SEED, device_form, device_option, echo_json,
                    json_object_option, library_value, main, option, recipe_from_options,
                    recipe_options, run_or_explain)


@main.command("cache-teacher")
@option("--shards", required=True, type=FOLDER, help="Shard folder (from make-shards).")
@option("--out", required=True, type=FOLDER, help="Cache folder (created, or resumed).")
@option("--teacher", help="timm model name. Default: regnety_160.deit_in1k (timm pretrained), or "
        "the architecture recorded in --teacher-checkpoint, or the existing cache's teacher.")
@option("--teacher-checkpoint", type=FILE, help="Local weights: DeiT dict {'model': state_dict}, "
        "plain state dict, or .safetensors (loaded with weights_only=True).")
@option("--teacher-kwargs", callback=json_object_option,
        help='timm constructor arguments of the teacher as JSON, e.g. \'{"img_size": 32}\'.')
@option("--seeds", type=COUNT,
        help="Number of augmentation seeds S (0..S-1). Required for a new cache; larger than an "
             "existing cache's count, it grows the cache (a cache never shrinks).")
@option("--topk", type=COUNT,
        help="K top classes stored per record (at most the class count). [default: 10]")
@option("--store-logits", type=click.Choice(["topk", "full"]),
        help="Also store the full fp16 logits with 'full'. [default: topk]")
@option("--seeds-per-unit", type=COUNT,
        help="Seeds per work unit (locked and committed together). [default: min(S, 10)]")
@recipe_options
@option("--batch-size", type=COUNT,
        help="Teacher batch size; recorded (GPU results depend on batch composition; verify-cache "
             "replays these batches). [default: 64, or the existing cache's]")
@option("--channels-last/--no-channels-last", default=None, help="Feed the teacher NHWC tensors "
        "(recorded; verify-cache uses it). Slower for RegNetY-16GF bf16 on an H200 (3,554 "
        "against 4,352 img/s). [default: off, or the existing cache's]")
@device_option()
@option("--precision", type=PRECISION,
        help="Teacher autocast precision (fp16 on CUDA only). [default: fp32]")
@option("--num-jobs", type=COUNT, help="Total jobs N (default: SLURM array / torchrun / 1).")
@option("--job-index", type=NON_NEGATIVE, help="This job's index I in 0..N-1.")
@option("--workers", type=NON_NEGATIVE, default=0, show_default=True,
        help="Processes that replay teacher batches (uint8 work items; 0: in the main process).")
@option("--max-units", type=NON_NEGATIVE, help="Stop after computing this many units "
        "(time-limited jobs; 0 only creates or grows the cache).")
@option("--lock-stale-after", type=POSITIVE_FLOAT, show_default=True,
        default=library_value("teacher_cache.locks", "DEFAULT_STALE_AFTER"),
        help="Seconds without heartbeat after which another job's unit lock counts as abandoned.")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@option("--no-progress", is_flag=True, help="No progress bar.")
def cache_teacher_cmd(input_size, recipe_source, aug_overrides, teacher_kwargs, as_json,
                      no_progress, **options):
    """Run the teacher on every (sample, augmentation seed) and store its top-k in a Zarr cache.

    Resumable: rerunning skips finished units. Jobs split the units round-robin; several
    jobs (different --job-index, a SLURM array, or torchrun ranks) can fill one cache at once.
    """
    from teacher_cache import CacheOptions, cache_teacher

    # Unset recipe options mean: the existing cache's recipe (or DeiT's for a new cache).
    opts = CacheOptions(**options, recipe=recipe_from_options(input_size, recipe_source,
                                                              aug_overrides),
                        progress=not no_progress, teacher_kwargs=teacher_kwargs,
                        log=(lambda msg: click.echo(msg, err=True)) if as_json else click.echo)
    summary = run_or_explain(cache_teacher, opts)
    if as_json:
        echo_json(summary)


def show_report(report: dict, as_json: bool, format_text, ok: bool) -> None:
    """inspect-cache's and verify-cache's output: JSON or text; exit code 1 unless `ok`."""
    if as_json:
        echo_json(report)
    else:
        click.echo(format_text(report))
    if not ok:
        sys.exit(1)


@main.command("inspect-cache")
@click.argument("cache", type=FOLDER)
@option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@option("--max-label-records", type=NON_NEGATIVE, default=200_000, show_default=True,
        help="Records read to measure teacher top-1 and top-k mass.")
def inspect_cache_cmd(cache, as_json, max_label_records):
    """Units done / missing / damaged, records, bytes on disk and per record, teacher top-1,
    per-seed summary.

    Exit code 0; 1 when part of the cache is damaged (listed with what to do; the other figures
    leave it out); 2 when CACHE is not a teacher cache. """
    from teacher_cache.inspection import format_inspection, inspect_cache
    info = run_or_explain(inspect_cache, cache, max_label_records=max_label_records)
    show_report(info, as_json, format_inspection, ok=not info["damage"])


@main.command("verify-cache")
@click.argument("cache", type=FOLDER)
@option("--shards", required=True, type=FOLDER,
        help="The shard folder the cache was computed from.")
@option("--samples", type=COUNT, default=64, show_default=True, help="Random (key, seed) records "
        "to recompute with the teacher (every unit's files are checked anyway).")
@option("--min-agreement", type=PROBABILITY, default=1.0, show_default=True,
        help="Fail below this exact argmax agreement of the records recomputed on cache-teacher's "
             "kind of device (near-ties count as disagreement; 1.0 is expected there at the same "
             "precision; on another kind near-ties are only reported). A real mismatch fails at "
             "any value.")
@option("--near-tie-tolerance", type=NON_NEGATIVE_FLOAT, show_default=True,
        default=library_value("teacher_cache.verification", "NEAR_TIE_TOLERANCE"),
        help="A disagreement is a near-tie when the recomputed log-probs of the two classes, and "
             "the stored and recomputed top-1 log-prob, are within this many nats.")
@option("--max-logprob-diff", type=NON_NEGATIVE_FLOAT,
        help="Also fail above this top-k log-prob (or tail log-sum-exp) difference, in nats.")
@option("--teacher-checkpoint", type=FILE,
        help="Where the cache's teacher checkpoint is now, if it moved (its weights must match).")
@device_option(help=lambda: f"Where the teacher is rerun: {device_form()}. On the cache's own "
               "device type and precision a healthy cache reproduces exactly.")
@option("--precision", type=PRECISION, help="Default: the cache's precision.")
@option("--seed", type=SEED, default=0, show_default=True, help="Which random records.")
@option("--allow-incomplete", is_flag=True, help="Pass a cache that is still being computed: its "
        "missing units are listed, not a failure.")
@option("--json", "as_json", is_flag=True,
        help="Print the report as JSON (exit codes as without it).")
def verify_cache_cmd(cache, shards, as_json, **options):
    """Check every computed unit's files against its record, list the units not computed yet, and
    recompute random cached records in the batches that produced them (the unit's recorded batch
    size, order and channels-last).

    Exit code 0 when all is well; 1 on damage (a unit's file missing or changed, a replayed image or
    a record that differs) or missing units (unless --allow-incomplete); 2 on bad input (not a
    cache, other shards, other teacher weights, a bad option). """
    from teacher_cache.verification import format_verification, verify_cache
    report = run_or_explain(verify_cache, cache, shards, **options)
    show_report(report, as_json, format_verification, ok=report["ok"])
