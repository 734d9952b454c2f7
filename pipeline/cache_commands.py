"""Stage one commands: cache-teacher, inspect-cache, verify-cache (thin wrappers over teacher_cache)."""
from __future__ import annotations

import json
import sys

import click

from teacher_cache import CacheError, CacheOptions, cache_teacher
from teacher_cache.inspection import format_inspection, inspect_cache
from teacher_cache.locks import DEFAULT_STALE_AFTER
from teacher_cache.verification import NEAR_TIE_TOLERANCE, verify_cache

from .cli import echo_json, main, run_or_explain
from .options import recipe_from_options, recipe_given, recipe_options


def parse_json_option(name: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CacheError(f"{name} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise CacheError(f"{name} must be a JSON object, got {text!r}")
    return value


@main.command("cache-teacher")
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shard folder (from make-shards).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder (created, or resumed).")
@click.option("--teacher", default=None,
              help="timm model name. Default: regnety_160.deit_in1k (timm pretrained), or the architecture "
                   "recorded in --teacher-checkpoint, or the existing cache's teacher.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Local weights: DeiT dict {'model': state_dict}, plain state dict, or .safetensors "
                   "(loaded with weights_only=True).")
@click.option("--teacher-kwargs", default=None,
              help='timm constructor arguments of the teacher as JSON, e.g. \'{"img_size": 32}\'.')
@click.option("--seeds", type=int, default=None,
              help="Number of augmentation seeds S (0..S-1). Required for a new cache; larger than an existing "
                   "cache's count, it grows the cache (a cache never shrinks).")
@click.option("--topk", type=int, default=None, help="K top classes stored per record. [default: 10]")
@click.option("--store-logits", type=click.Choice(["topk", "full"]), default=None,
              help="Also store the full fp16 logits with 'full'. [default: topk]")
@click.option("--seeds-per-unit", type=int, default=None,
              help="Seeds per work unit (locked and committed together). [default: min(S, 10)]")
@recipe_options
@click.option("--batch-size", type=int, default=None,
              help="Teacher batch size; recorded (GPU results depend on batch composition; verify-cache "
                   "replays these batches). [default: 64, or the existing cache's]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Feed the teacher NHWC tensors (recorded; verify-cache uses it). Slower for RegNetY-16GF "
                   "bf16 on an H200 (3,554 against 4,352 img/s). [default: off, or the existing cache's]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher autocast precision (fp16 on CUDA only). [default: fp32]")
@click.option("--num-jobs", type=int, default=None, help="Total jobs N (default: SLURM array / torchrun / 1).")
@click.option("--job-index", type=int, default=None, help="This job's index I in 0..N-1.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Processes that replay teacher batches (uint8 work items; 0: in the main process).")
@click.option("--max-units", type=int, default=None, help="Stop after computing this many units (time-limited jobs).")
@click.option("--lock-stale-after", type=float, default=DEFAULT_STALE_AFTER, show_default=True,
              help="Seconds without heartbeat after which another job's unit lock counts as abandoned.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_teacher_cmd(input_size, recipe_source, aug_overrides, teacher_kwargs, as_json, no_progress, **options):
    """Run the teacher on every (sample, augmentation seed) and store its top-k in a Zarr cache.

    Resumable: rerunning skips finished units. Jobs split the units round-robin; several
    jobs (different --job-index, a SLURM array, or torchrun ranks) can fill one cache at once.
    """
    # Unset recipe options mean: the existing cache's recipe (or DeiT's for a new cache).
    recipe = (recipe_from_options(input_size, recipe_source, aug_overrides)
              if recipe_given(input_size, recipe_source, aug_overrides) else None)
    opts = CacheOptions(**options, recipe=recipe, progress=not no_progress,
                        teacher_kwargs=run_or_explain(parse_json_option, "--teacher-kwargs", teacher_kwargs),
                        log=(lambda msg: click.echo(msg, err=True)) if as_json else click.echo)
    summary = run_or_explain(cache_teacher, opts)
    if as_json:
        echo_json(summary)


@main.command("inspect-cache")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--max-label-records", type=int, default=200_000, show_default=True,
              help="Records read to measure teacher top-1 and top-k mass.")
def inspect_cache_cmd(cache, as_json, max_label_records):
    """Units done / missing, records, bytes on disk and per record, teacher top-1, per-seed summary."""
    info = run_or_explain(inspect_cache, cache, max_label_records=max_label_records)
    if as_json:
        echo_json(info)
    else:
        click.echo(format_inspection(info))


@main.command("verify-cache")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="The shard folder the cache was computed from.")
@click.option("--samples", type=int, default=64, show_default=True, help="Random (key, seed) records to recompute.")
@click.option("--min-agreement", type=float, default=1.0, show_default=True,
              help="Fail below this exact argmax agreement of the records recomputed on "
                   "cache-teacher's kind of device (near-ties count as disagreement; 1.0 is "
                   "expected there at the same precision; on another kind near-ties are only "
                   "reported). A real mismatch fails at any value.")
@click.option("--near-tie-tolerance", type=float, default=NEAR_TIE_TOLERANCE, show_default=True,
              help="A disagreement is a near-tie when the recomputed log-probs of the two classes, and the stored "
                   "and recomputed top-1 log-prob, are within this many nats.")
@click.option("--max-logprob-diff", type=float, default=None,
              help="Also fail above this top-k log-prob (or tail log-sum-exp) difference, in nats.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Where the cache's teacher checkpoint is now, if it moved (its weights must match).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Default: the cache's precision.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which random records.")
@click.option("--json", "as_json", is_flag=True)
def verify_cache_cmd(cache, shards, as_json, **options):
    """Recompute random cached records in the batches that produced them (the unit's recorded batch size,
    order and channels-last); exit 1 if they disagree."""
    report = run_or_explain(verify_cache, cache, shards, **options)
    min_agreement = options["min_agreement"]
    if as_json:
        echo_json(report)
    else:
        click.echo(f"verify-cache {report['cache']}: {report['records']} records over {report['pairs']} "
                   f"(shard, seed) pairs on {report['device']} ({report['precision']}), recomputed in their "
                   f"original batches (batch size {'/'.join(map(str, report['batch_sizes']))}, channels-last "
                   f"{'/'.join(map(str, report['channels_last']))})")
        click.echo(f"  argmax agreement {100 * report['argmax_agreement']:.2f}% (min {100 * min_agreement:.2f}%), "
                   f"max top-k log-prob diff {report['max_logprob_diff']:.4g}"
                   + (f", max logit diff {report['max_logit_diff']:.4g}" if report["max_logit_diff"] is not None else "")
                   + (f", max tail log-sum-exp diff {report['max_tail_logsumexp_diff']:.4g}"
                      if report["max_tail_logsumexp_diff"] is not None else ""))
        click.echo(f"  replay digests {report['digests_checked'] - len(report['digest_mismatches'])}/"
                   f"{report['digests_checked']} match; storage files {report['files_checked'] - len(report['file_hash_mismatches'])}"
                   f"/{report['files_checked']} match their sha256")
        click.echo(f"  real mismatches {report['mismatches']} (always fail), near-ties {report['near_ties']} "
                   f"(within {report['near_tie_tolerance']:g} nats; count as disagreement)")
        if report["other_kind_records"]:
            recorded = " / ".join(report["recorded_device_kinds"])
            click.echo(f"  {report['other_kind_records']} of {report['records']} records "
                       f"recomputed on {report['device_kind']}, not on cache-teacher's {recorded}: "
                       f"their {report['other_kind_near_ties']} near-ties are expected and do not "
                       "fail; the verdict rests on digests, file hashes and real mismatches (min "
                       "agreement: same-kind records)")
        for item in report["disagreements"][:5]:
            click.echo(f"  {item['kind']}: shard {item['shard']} seed {item['seed']} position {item['position']}: "
                       f"cached class {item['cached_argmax']}, recomputed {item['recomputed_argmax']} "
                       f"(recomputed gap {item['recomputed_gap']:.4g} nats)")
        for item in report["digest_mismatches"][:5]:
            click.echo(f"  replayed image differs from the cached one: {item}")
        for item in report["file_hash_mismatches"][:5]:
            click.echo(f"  storage file changed since commit: {item}")
        click.echo("  OK" if report["ok"] else "  FAILED")
    if not report["ok"]:
        sys.exit(1)
