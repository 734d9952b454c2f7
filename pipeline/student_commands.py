"""Stage two commands: train-student and evaluate (thin wrappers over student.train /
student.evaluate). The options' defaults are the library's (TrainConfig's fields,
evaluate_checkpoint's arguments)."""
from __future__ import annotations

import inspect
import os

import click

from student.config import option_defaults
from student.evaluate import evaluate_checkpoint
from student.train import TrainConfig, train

from .group import echo_json, main, run_or_explain
from .options import (COUNT, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, PROBABILITY, SEED,
                      FiniteFloatRange, device_option, parse_key_values, read_recipe_source,
                      recipe_options)

TRAIN = option_defaults()
EVALUATE = {name: p.default
            for name, p in inspect.signature(evaluate_checkpoint).parameters.items()}


@main.command("train-student")
@click.option("--shards", required=True, type=click.Path(file_okay=False),
              help="Training shards (make-shards).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoint.pt (each epoch end) and metrics.jsonl.")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Teacher cache (cache-teacher); brings the recipe, the seeds and the targets.")
@click.option("--teacher-online", metavar="NAME_OR_CHECKPOINT",
              help="Run this teacher live on the same replayed images instead of reading a cache.")
@click.option("--teacher-model", metavar="NAME",
              help="timm architecture of a --teacher-online checkpoint that does not record it.")
@click.option("--teacher-topk", type=COUNT, default=TRAIN["teacher_topk"],
              help="Online teacher: K kept, as a cache's --topk. Default: full logits for soft "
                   "distillation (DeiT's), top-10 for hard; with soft, given K truncates the "
                   "targets (logged, refused past --soft-tail-limit).")
@click.option("--teacher-full-logits", is_flag=True,
              help="Online teacher: keep full logits, as --store-logits full.")
@click.option("--teacher-precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              default=TRAIN["teacher_precision"], show_default=True,
              help="Online teacher autocast precision, as cache-teacher's --precision (fp16 on "
                   "CUDA only).")
@click.option("--teacher-batch-size", type=COUNT, default=TRAIN["teacher_batch_size"],
              show_default=True,
              help="Online teacher batch; equal to cache-teacher's --batch-size gives "
                   "bit-identical targets.")
@click.option("--channels-last/--no-channels-last", "teacher_channels_last",
              default=TRAIN["teacher_channels_last"],
              help="Online teacher in channels-last memory format, as cache-teacher's "
                   "--channels-last "
                   "(match the cache's setting for bit-identical targets on a GPU). "
                   "[default: off, as cache-teacher]")
@recipe_options
@click.option("--num-seeds", type=COUNT,
              help="Without a cache: cycle through this many augmentation seeds S (default: a new "
                   "seed "
                   "group every R epochs, never repeating). Epoch e uses seeds R*g..R*g+R-1, "
                   "g = (e // R) mod (S // R), R = --repeated-aug; with R = 1, seed e mod S.")
@click.option("--model", default=TRAIN["model"], show_default=True, help="Any timm model name.")
@click.option("--img-size", type=COUNT, help="Model input size (default: the recipe's).")
@click.option("--patch-size", type=COUNT, help="ViT patch size (default: the model's).")
@click.option("--embed-dim", type=COUNT, help="ViT width (default: the model's).")
@click.option("--depth", type=COUNT, help="ViT blocks (default: the model's).")
@click.option("--num-heads", type=COUNT, help="ViT attention heads (default: the model's).")
@click.option("--model-kwarg", "model_kwargs", multiple=True, metavar="KEY=VALUE",
              help="Extra timm constructor argument (JSON value), repeatable.")
@click.option("--drop-path", "drop_path_rate", type=FiniteFloatRange(0.0, 1.0, max_open=True),
              default=TRAIN["drop_path_rate"], show_default=True,
              help="Stochastic depth rate (DeiT: 0.1).")
@click.option("--init-from", type=click.Path(dir_okay=False),
              help="Start from these weights (pos_embed resampled to --img-size; other-class heads "
                   "left "
                   "fresh).")
@click.option("--distillation-type", type=click.Choice(["none", "soft", "hard"]),
              help="Default: hard with --cache/--teacher-online, none without.")
@click.option("--distillation-alpha", type=PROBABILITY, default=TRAIN["distillation_alpha"],
              show_default=True,
              help="Weight of the distillation loss: (1-α)·base + α·distill.")
@click.option("--distillation-tau", type=POSITIVE_FLOAT, default=TRAIN["distillation_tau"],
              show_default=True, help="Soft distillation temperature τ.")
@click.option("--soft-tail-limit", type=PROBABILITY, default=TRAIN["soft_tail_limit"],
              show_default=True,
              help="Soft distillation from a top-k cache (or --teacher-topk): refuse when the "
                   "99th percentile over records (8 units sampled) of the mass at τ of the "
                   "classes outside the stored top k (a bound on the soft target's total variation "
                   "error) exceeds this.")
@click.option("--epochs", type=COUNT, default=TRAIN["epochs"], show_default=True,
              help="Epochs of the run (with --resume: may grow or shrink the rest of the run; the "
                   "cosine "
                   "schedule then spans the new count).")
@click.option("--batch-size", type=COUNT, default=TRAIN["batch_size"], show_default=True,
              help="Per process.")
@click.option("--lr", type=POSITIVE_FLOAT, help="Default 5e-4 x global batch / 512.")
@click.option("--min-lr", type=NON_NEGATIVE_FLOAT, default=TRAIN["min_lr"], show_default=True,
              help="Where the cosine ends.")
@click.option("--warmup-epochs", type=NON_NEGATIVE, default=TRAIN["warmup_epochs"],
              show_default=True,
              help="Epochs of linear warm-up from --warmup-lr.")
@click.option("--warmup-lr", type=NON_NEGATIVE_FLOAT, default=TRAIN["warmup_lr"], show_default=True,
              help="lr of the first epoch.")
@click.option("--weight-decay", type=NON_NEGATIVE_FLOAT, default=TRAIN["weight_decay"],
              show_default=True,
              help="AdamW weight decay (none on 1-D weights, pos_embed, class/dist tokens).")
@click.option("--opt", default=TRAIN["opt"], show_default=True, help="timm optimizer name.")
@click.option("--clip-grad", type=POSITIVE_FLOAT, help="Clip the gradient norm to this value.")
@click.option("--ema-decay", type=PROBABILITY, help="Keep an EMA of the weights (DeiT: 0.99996).")
@click.option("--amp", type=click.Choice(["auto", "none", "bf16", "fp16"]), default=TRAIN["amp"],
              show_default=True, help="auto: bf16 on GPU, none on CPU.")
@click.option("--seed", type=SEED, default=TRAIN["seed"], show_default=True,
              help="Initial weights, drop path and the shard order (the augmentation comes from "
                   "the seeds).")
@click.option("--repeated-aug", type=COUNT, default=TRAIN["repeated_aug"], show_default=True,
              help="DeiT's repeated augmentation: an epoch is ~N samples, N/R images each under "
                   "the R seeds "
                   "of its seed group, copies in the same step; a cache of S seeds serves R*(S//R) "
                   "epochs. "
                   "1: plain epochs.")
@click.option("--reuse-seeds", is_flag=True,
              help="Allow more epochs than cached seeds (seeds repeat; logged).")
@click.option("--max-steps-per-epoch", type=COUNT, help="Cap the steps per epoch (smoke runs).")
@click.option("--workers", type=NON_NEGATIVE, default=TRAIN["workers"], show_default=True,
              help="Replay worker processes per rank (0: in the main process).")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the student (as timm's train.py).")
@click.option("--val-shards", type=click.Path(file_okay=False),
              help="Evaluate every epoch on these shards (accuracy per head in metrics.jsonl).")
@click.option("--eval-batch-size", type=COUNT, default=TRAIN["eval_batch_size"], show_default=True,
              help="Batch size of --val-shards.")
@click.option("--resume", is_flag=True,
              help="Continue from OUT/checkpoint.pt (fresh start if there is none yet; nothing to "
                   "do if it "
                   "holds --epochs epochs).")
@click.option("--log-interval", type=COUNT, default=TRAIN["log_interval"], show_default=True,
              help="Steps between metric lines.")
@device_option(default=TRAIN["device"])
@click.option("--no-progress", is_flag=True, help="No tqdm bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_student_cmd(input_size, recipe_source, aug_overrides, model_kwargs, no_progress, as_json,
                      **options):
    """Train a student on the shards, distilling from a teacher cache or an online teacher.

    Epoch e uses the seed group g = e // R of --repeated-aug R: seeds R*g .. R*g+R-1, modulo the
    S // R groups of a cache of S seeds (with R = 1: seed e mod S). Works as one process or under
    torchrun (DDP: shards dealt to ranks, equal step counts on every rank).
    """
    # Parsed only: the library resolves the recipe (against the cache's, when there is one).
    aug = parse_key_values(aug_overrides, "--aug")
    if input_size:
        aug["input_size"] = input_size
    recipe = read_recipe_source(recipe_source) if recipe_source else None
    cfg = TrainConfig.from_dict({**options, "aug": aug, "progress": not no_progress,
                                 "recipe": recipe,
                                 "model_kwargs": parse_key_values(model_kwargs, "--model-kwarg")})
    summary = run_or_explain(train, cfg)
    if int(os.environ.get("RANK", 0)) != 0:        # torchrun: rank 0 reports
        return
    if as_json:
        echo_json(summary)
    elif summary["nothing_to_do"]:
        click.echo(f"nothing to do: {summary['checkpoint']} already holds {summary['first_epoch']} "
                   f"epoch(s) of --epochs {summary['epochs']}")
    else:
        m, first = summary["metrics"], summary["first_epoch"]
        val = m.get("val", {})
        heads = ", ".join(f"{h} {v['top1']:.4f}" for h, v in val.items() if isinstance(v, dict))
        click.echo(f"trained {summary['epochs_trained']} epoch(s)"
                   + (f" (epochs {first}..{summary['epochs'] - 1}, resumed)" if first else "")
                   + f", {summary['global_step']} steps in all on {summary['world_size']} "
                   f"process(es); last loss {m.get('loss', float('nan')):.4f}"
                   + (f"; val top-1 {heads}" if heads else "")
                   + f"; checkpoint {summary['checkpoint']}")


@main.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A train-student checkpoint.")
@click.option("--shards", required=True, type=click.Path(file_okay=False),
              help="Shards to evaluate on.")
@click.option("--teacher", metavar="NAME_OR_CHECKPOINT",
              help="Also run this teacher on the same images: its accuracy and the agreement per "
                   "head.")
@click.option("--teacher-model", metavar="NAME", help="Architecture of a --teacher checkpoint.")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Compare with the cached teacher on the replayed images of --aug-seed "
                   "(--shards = the cache's).")
@click.option("--aug-seed", type=NON_NEGATIVE, default=EVALUATE["aug_seed"], show_default=True,
              help="With --cache: the cached augmentation seed to compare on.")
@click.option("--batch-size", type=COUNT, default=EVALUATE["batch_size"], show_default=True,
              help="Evaluation batch size.")
@click.option("--ema", "use_ema", is_flag=True, help="Evaluate the EMA weights.")
@device_option(default=EVALUATE["device"])
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate_cmd(as_json, **options):
    """Top-1/top-5 of the class head, the distillation head and their late fusion (eval
    transform)."""
    report = run_or_explain(evaluate_checkpoint, **options)
    if as_json:
        echo_json(report)
        return
    click.echo(f"{report['checkpoint']} (epoch {report['epoch']}, {report['weights']} weights) on "
               f"{report['shards']}: {report['num_samples']} images, eval transform")
    for name, h in report["heads"].items():
        mark = "  (default prediction)" if name == report["default_head"] else ""
        click.echo(f"  {name:<13} top-1 {h['top1']:.4f}  top-5 {h['top5']:.4f}{mark}")
    if "teacher" in report:
        t = report["teacher"]
        click.echo(f"  teacher {t['name']:<5} top-1 {t['top1']:.4f}  top-5 {t['top5']:.4f}")
        click.echo("  agreement with the teacher: "
                   + ", ".join(f"{k} {v:.4f}" for k, v in t["agreement"].items()))
        d = t["disagreement"]
        click.echo(f"  {d['head']} head vs teacher: both right {d['both_correct']}, only student "
                   f"{d['student_only']}, only teacher {d['teacher_only']}, "
                   f"both wrong {d['both_wrong']}")
    if "cache_agreement" in report:
        c = report["cache_agreement"]
        click.echo(f"  vs cached teacher (aug seed {c['aug_seed']}, {c['num_samples']} replayed "
                   "images): agreement "
                   + ", ".join(f"{k} {v:.4f}" for k, v in c["agreement"].items()))
