"""Stage two commands: train-student and evaluate (thin wrappers over student.train / student.evaluate)."""
from __future__ import annotations

import dataclasses
import os

import click

from student.evaluate import evaluate_checkpoint
from student.train import TrainConfig, train
from teacher_cache.cache import TeacherCache

from .cli import echo_json, main, run_or_explain
from .options import parse_key_values, recipe_from_options, recipe_given, recipe_options


@main.command("train-student")
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Training shards (make-shards).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoint.pt (each epoch end) and metrics.jsonl.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Teacher cache (cache-teacher); brings the recipe, the seeds and the targets.")
@click.option("--teacher-online", metavar="NAME_OR_CHECKPOINT", default=None,
              help="Run this teacher live on the same replayed images instead of reading a cache.")
@click.option("--teacher-model", metavar="NAME", default=None,
              help="timm architecture of a --teacher-online checkpoint that does not record it.")
@click.option("--teacher-topk", type=int, default=10, show_default=True, help="Online teacher: K kept, as a cache's --topk.")
@click.option("--teacher-full-logits", is_flag=True, help="Online teacher: keep full logits, as --store-logits full.")
@click.option("--teacher-precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--teacher-batch-size", type=int, default=64, show_default=True,
              help="Online teacher batch; equal to cache-teacher's --batch-size gives bit-identical targets.")
@click.option("--channels-last/--no-channels-last", "teacher_channels_last", default=None,
              help="Online teacher in channels-last memory format (default: on CUDA, as cache-teacher).")
@recipe_options
@click.option("--num-seeds", type=int, default=None,
              help="Without a cache: cycle through this many augmentation seeds (epoch e uses e mod S).")
@click.option("--model", default="deit_small_distilled_patch16_224", show_default=True, help="Any timm model name.")
@click.option("--img-size", type=int, default=None, help="Model input size (default: the recipe's).")
@click.option("--patch-size", type=int, default=None)
@click.option("--embed-dim", type=int, default=None)
@click.option("--depth", type=int, default=None)
@click.option("--num-heads", type=int, default=None)
@click.option("--model-kwarg", "model_kwargs", multiple=True, metavar="KEY=VALUE",
              help="Extra timm constructor argument (JSON value), repeatable.")
@click.option("--drop-path", type=float, default=0.1, show_default=True)
@click.option("--init-from", type=click.Path(dir_okay=False), default=None,
              help="Start from these weights (pos_embed resampled to --img-size; other-class heads left fresh).")
@click.option("--distillation-type", type=click.Choice(["none", "soft", "hard"]), default=None,
              help="Default: hard with --cache/--teacher-online, none without.")
@click.option("--distillation-alpha", type=float, default=0.5, show_default=True)
@click.option("--distillation-tau", type=float, default=1.0, show_default=True)
@click.option("--soft-tail-limit", type=float, default=0.25, show_default=True,
              help="Soft distillation from a top-k cache: refuse when the mean mass at τ of the classes outside "
                   "the stored top k (a bound on the soft target's total variation error) exceeds this.")
@click.option("--epochs", type=int, default=300, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=None, help="Default 5e-4 x global batch / 512.")
@click.option("--min-lr", type=float, default=1e-5, show_default=True)
@click.option("--warmup-epochs", type=int, default=5, show_default=True)
@click.option("--warmup-lr", type=float, default=1e-6, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--opt", default="adamw", show_default=True, help="timm optimizer name.")
@click.option("--clip-grad", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--ema-decay", type=float, default=None, help="Keep an EMA of the weights (DeiT: 0.99996).")
@click.option("--amp", type=click.Choice(["auto", "none", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on GPU, none on CPU.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeated-aug", type=int, default=3, show_default=True,
              help="DeiT's repeated augmentation: an epoch is ~N samples, N/R images each under the R seeds of "
                   "its seed group, copies in the same step; a cache of S seeds serves R*(S//R) epochs. 1: plain epochs.")
@click.option("--reuse-seeds", is_flag=True, help="Allow more epochs than cached seeds (seeds repeat; logged).")
@click.option("--max-steps-per-epoch", type=int, default=None, help="Cap the steps per epoch (smoke runs).")
@click.option("--workers", type=int, default=2, show_default=True, help="Replay worker processes per rank.")
@click.option("--compile", "compile", is_flag=True, help="torch.compile the student (as timm's train.py).")
@click.option("--val-shards", type=click.Path(file_okay=False), default=None,
              help="Evaluate every epoch on these shards (accuracy per head in metrics.jsonl).")
@click.option("--eval-batch-size", type=int, default=128, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt (fresh start if there is none yet).")
@click.option("--log-interval", type=int, default=20, show_default=True, help="Steps between metric lines.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="No tqdm bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_student_cmd(input_size, recipe_source, aug_overrides, model_kwargs, distillation_type, no_progress, as_json,
                      **options):
    """Train a student on the shards, distilling from a teacher cache or an online teacher.

    Epoch e uses augmentation seed e mod S (S = the cache's seeds). Works as one process or
    under torchrun (DDP: shards dealt to ranks, equal step counts on every rank).
    """
    recipe = None
    if recipe_given(input_size, recipe_source, aug_overrides):
        parsed = recipe_from_options(input_size or options["img_size"], recipe_source, aug_overrides)
        if options["cache"] and not recipe_source:
            # With a cache, --input-size / --aug change the cache's recipe (and are then refused by
            # the compatibility check, naming the field): the other fields stay the cache's.
            given = {item.partition("=")[0] for item in aug_overrides} | ({"input_size"} if input_size else set())
            base = run_or_explain(TeacherCache.open, options["cache"]).recipe
            parsed = dataclasses.replace(base, **{k: getattr(parsed, k) for k in given})
        recipe = parsed.to_dict()
    if distillation_type is None:
        distillation_type = "hard" if (options["cache"] or options["teacher_online"]) else "none"
    # the options are TrainConfig's flat (checkpoint "args") form, the student's under their CLI names
    cfg = TrainConfig.from_dict({**options, "recipe": recipe, "distillation_type": distillation_type,
                                 "model_kwargs": parse_key_values(model_kwargs, "--model-kwarg"),
                                 "progress": not no_progress})
    summary = run_or_explain(train, cfg)
    if int(os.environ.get("RANK", 0)) != 0:        # torchrun: rank 0 reports
        return
    if as_json:
        echo_json(summary)
    else:
        m = summary["metrics"]
        val = m.get("val", {})
        heads = ", ".join(f"{h} {v['top1']:.4f}" for h, v in val.items() if isinstance(v, dict))
        click.echo(f"trained {summary['epochs']} epoch(s), {summary['global_step']} steps on {summary['world_size']} "
                   f"process(es); last loss {m.get('loss', float('nan')):.4f}"
                   + (f"; val top-1 {heads}" if heads else "") + f"; checkpoint {summary['checkpoint']}")


@main.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="A train-student checkpoint.")
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shards to evaluate on.")
@click.option("--teacher", metavar="NAME_OR_CHECKPOINT", default=None,
              help="Also run this teacher on the same images: its accuracy and the agreement per head.")
@click.option("--teacher-model", metavar="NAME", default=None, help="Architecture of a --teacher checkpoint.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Compare with the cached teacher on the replayed images of --aug-seed (--shards = the cache's).")
@click.option("--aug-seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--ema", "use_ema", is_flag=True, help="Evaluate the EMA weights.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate_cmd(as_json, **options):
    """Top-1/top-5 of the class head, the distillation head and their late fusion (eval transform)."""
    report = run_or_explain(evaluate_checkpoint, **options)
    if as_json:
        echo_json(report)
        return
    click.echo(f"{report['checkpoint']} (epoch {report['epoch']}, {report['weights']} weights) on {report['shards']}: "
               f"{report['num_samples']} images, eval transform")
    for name, h in report["heads"].items():
        mark = "  (default prediction)" if name == report["default_head"] else ""
        click.echo(f"  {name:<13} top-1 {h['top1']:.4f}  top-5 {h['top5']:.4f}{mark}")
    if "teacher" in report:
        t = report["teacher"]
        click.echo(f"  teacher {t['name']:<5} top-1 {t['top1']:.4f}  top-5 {t['top5']:.4f}")
        click.echo("  agreement with the teacher: " + ", ".join(f"{k} {v:.4f}" for k, v in t["agreement"].items()))
        d = t["disagreement"]
        click.echo(f"  {d['head']} head vs teacher: both right {d['both_correct']}, only student {d['student_only']}, "
                   f"only teacher {d['teacher_only']}, both wrong {d['both_wrong']}")
    if "cache_agreement" in report:
        c = report["cache_agreement"]
        click.echo(f"  vs cached teacher (aug seed {c['aug_seed']}, {c['num_samples']} replayed images): agreement "
                   + ", ".join(f"{k} {v:.4f}" for k, v in c["agreement"].items()))
