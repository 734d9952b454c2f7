"""Stage two commands: train-student and evaluate (thin wrappers over student.train /
student.evaluate). The options' defaults are the library's (TrainConfig's fields,
evaluate_checkpoint's arguments), looked up only when shown or parsed."""
from __future__ import annotations

import inspect
import os

import click

from .group import (COUNT, FILE, FOLDER, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT,
                    PRECISION, PROBABILITY, SEED, FiniteFloatRange, device_option, echo_json, main,
                    option, parse_key_values, read_recipe_source, recipe_options, run_or_explain)


def train_default(name: str):
    """TrainConfig's (or StudentConfig's) default of option `name`, read when shown or parsed."""
    def default():
        from student.config import option_defaults
        return option_defaults()[name]
    return default


def evaluate_default(name: str):
    """evaluate_checkpoint's default of argument `name`, read when shown or parsed."""
    def default():
        from student.evaluate import evaluate_checkpoint
        return inspect.signature(evaluate_checkpoint).parameters[name].default
    return default


@main.command("train-student")
@option("--shards", required=True, type=FOLDER, help="Training shards (make-shards).")
@option("--out", required=True, type=FOLDER,
        help="Run folder: checkpoint.pt (each epoch end) and metrics.jsonl.")
@option("--cache", type=FOLDER,
        help="Teacher cache (cache-teacher); brings the recipe, the seeds and the targets.")
@option("--teacher-online", metavar="NAME_OR_CHECKPOINT",
        help="Run this teacher live on the same replayed images instead of reading a cache.")
@option("--teacher-model", metavar="NAME",
        help="timm architecture of a --teacher-online checkpoint that does not record it.")
@option("--teacher-topk", type=COUNT, default=train_default("teacher_topk"),
        help="Online teacher: K kept, as a cache's --topk. Default: full logits for soft "
             "distillation (DeiT's), top-10 for hard; with soft, given K truncates the targets "
             "(logged, refused past --soft-tail-limit).")
@option("--teacher-full-logits", is_flag=True,
        help="Online teacher: keep full logits, as --store-logits full.")
@option("--teacher-precision", type=PRECISION, default=train_default("teacher_precision"),
        show_default=True, help="Online teacher autocast precision, as cache-teacher's "
        "--precision (fp16 on CUDA only).")
@option("--teacher-batch-size", type=COUNT, default=train_default("teacher_batch_size"),
        show_default=True, help="Online teacher batch; equal to cache-teacher's --batch-size "
        "gives bit-identical targets.")
@option("--channels-last/--no-channels-last", "teacher_channels_last",
        default=train_default("teacher_channels_last"),
        help="Online teacher in channels-last memory format, as cache-teacher's --channels-last "
             "(match the cache's setting for bit-identical targets on a GPU). [default: off, as "
             "cache-teacher]")
@recipe_options
@option("--num-seeds", type=COUNT, help="Without a cache: cycle through this many augmentation "
        "seeds S (default: a new seed group every R epochs, never repeating). Epoch e uses seeds "
        "R*g..R*g+R-1, g = (e // R) mod (S // R), R = --repeated-aug; with R = 1, seed e mod S.")
@option("--model", default=train_default("model"), show_default=True, help="Any timm model name.")
@option("--img-size", type=COUNT, help="Model input size (default: the recipe's).")
@option("--patch-size", type=COUNT, help="ViT patch size (default: the model's).")
@option("--embed-dim", type=COUNT, help="ViT width (default: the model's).")
@option("--depth", type=COUNT, help="ViT blocks (default: the model's).")
@option("--num-heads", type=COUNT, help="ViT attention heads (default: the model's).")
@option("--model-kwarg", "model_kwargs", multiple=True, metavar="KEY=VALUE",
        help="Extra timm constructor argument (JSON value), repeatable.")
@option("--drop-path", "drop_path_rate", type=FiniteFloatRange(0.0, 1.0, max_open=True),
        default=train_default("drop_path_rate"), show_default=True,
        help="Stochastic depth rate (DeiT: 0.1).")
@option("--init-from", type=FILE, help="Start from these weights (pos_embed resampled to "
        "--img-size; other-class heads left fresh).")
@option("--distillation-type", type=click.Choice(["none", "soft", "hard"]),
        help="Default: hard with --cache/--teacher-online, none without.")
@option("--distillation-alpha", type=PROBABILITY, default=train_default("distillation_alpha"),
        show_default=True, help="Weight of the distillation loss: (1-α)·base + α·distill.")
@option("--distillation-tau", type=POSITIVE_FLOAT, default=train_default("distillation_tau"),
        show_default=True, help="Soft distillation temperature τ.")
@option("--soft-tail-limit", type=PROBABILITY, default=train_default("soft_tail_limit"),
        show_default=True,
        help="Soft distillation from a top-k cache (or --teacher-topk): refuse when the 99th "
             "percentile over records (8 units sampled) of the mass at τ of the classes outside the "
             "stored top k (a bound on the soft target's total variation error) exceeds this.")
@option("--epochs", type=COUNT, default=train_default("epochs"), show_default=True,
        help="Epochs of the run (with --resume: may grow or shrink the rest of the run; the "
             "cosine schedule then spans the new count).")
@option("--batch-size", type=COUNT, default=train_default("batch_size"), show_default=True,
        help="Per process.")
@option("--lr", type=POSITIVE_FLOAT, help="Default 5e-4 x global batch / 512.")
@option("--min-lr", type=NON_NEGATIVE_FLOAT, default=train_default("min_lr"), show_default=True,
        help="Where the cosine ends.")
@option("--warmup-epochs", type=NON_NEGATIVE, default=train_default("warmup_epochs"),
        show_default=True, help="Epochs of linear warm-up from --warmup-lr.")
@option("--warmup-lr", type=NON_NEGATIVE_FLOAT, default=train_default("warmup_lr"),
        show_default=True, help="lr of the first epoch.")
@option("--weight-decay", type=NON_NEGATIVE_FLOAT, default=train_default("weight_decay"),
        show_default=True,
        help="AdamW weight decay (none on 1-D weights, pos_embed, class/dist tokens).")
@option("--opt", default=train_default("opt"), show_default=True, help="timm optimizer name.")
@option("--clip-grad", type=POSITIVE_FLOAT, help="Clip the gradient norm to this value.")
@option("--ema-decay", type=PROBABILITY, help="Keep an EMA of the weights (DeiT: 0.99996).")
@option("--amp", type=click.Choice(["auto", "none", "bf16", "fp16"]), default=train_default("amp"),
        show_default=True, help="auto: bf16 on GPU, none on CPU.")
@option("--seed", type=SEED, default=train_default("seed"), show_default=True,
        help="Initial weights, drop path and the shard order (the augmentation comes from the "
             "seeds).")
@option("--repeated-aug", type=COUNT, default=train_default("repeated_aug"), show_default=True,
        help="DeiT's repeated augmentation: an epoch is ~N samples, N/R images each under the R "
             "seeds of its seed group, copies in the same step; a cache of S seeds serves R*(S//R) "
             "epochs. 1: plain epochs.")
@option("--reuse-seeds", is_flag=True,
        help="Allow more epochs than cached seeds (seeds repeat; logged).")
@option("--max-steps-per-epoch", type=COUNT, help="Cap the steps per epoch (smoke runs).")
@option("--workers", type=NON_NEGATIVE, default=train_default("workers"), show_default=True,
        help="Replay worker processes per rank (0: in the main process).")
@option("--compile", is_flag=True, help="torch.compile the student (as timm's train.py).")
@option("--val-shards", type=FOLDER,
        help="Evaluate every epoch on these shards (accuracy per head in metrics.jsonl).")
@option("--eval-batch-size", type=COUNT, default=train_default("eval_batch_size"),
        show_default=True, help="Batch size of --val-shards.")
@option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt (fresh start if there is "
        "none yet; nothing to do if it holds --epochs epochs).")
@option("--log-interval", type=COUNT, default=train_default("log_interval"), show_default=True,
        help="Steps between metric lines.")
@device_option(default=train_default("device"))
@option("--no-progress", is_flag=True, help="No tqdm bar.")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_student_cmd(input_size, recipe_source, aug_overrides, model_kwargs, no_progress, as_json,
                      **options):
    """Train a student on the shards, distilling from a teacher cache or an online teacher.

    Epoch e uses the seed group g = e // R of --repeated-aug R: seeds R*g .. R*g+R-1, modulo the
    S // R groups of a cache of S seeds (with R = 1: seed e mod S). Works as one process or under
    torchrun (DDP: shards dealt to ranks, equal step counts on every rank).
    """
    from student.train import TrainConfig, train

    # Parsed only: the library resolves the recipe (against the cache's, when there is one).
    aug = parse_key_values(aug_overrides, "--aug")
    if input_size:
        aug["input_size"] = input_size
    recipe = read_recipe_source(recipe_source) if recipe_source else None
    cfg = TrainConfig.from_dict({**options, "aug": aug, "progress": not no_progress, "recipe": recipe,
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
@option("--checkpoint", required=True, type=FILE, help="A train-student checkpoint.")
@option("--shards", required=True, type=FOLDER, help="Shards to evaluate on.")
@option("--teacher", metavar="NAME_OR_CHECKPOINT",
        help="Also run this teacher on the same images: its accuracy and the agreement per head.")
@option("--teacher-model", metavar="NAME", help="Architecture of a --teacher checkpoint.")
@option("--cache", type=FOLDER, help="Compare with the cached teacher on the replayed images of "
        "--aug-seed (--shards = the cache's).")
@option("--aug-seed", type=NON_NEGATIVE, default=evaluate_default("aug_seed"), show_default=True,
        help="With --cache: the cached augmentation seed to compare on.")
@option("--batch-size", type=COUNT, default=evaluate_default("batch_size"), show_default=True,
        help="Evaluation batch size.")
@option("--ema", "use_ema", is_flag=True, help="Evaluate the EMA weights.")
@device_option(default=evaluate_default("device"))
@option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate_cmd(as_json, **options):
    """Top-1/top-5 of the class head, the distillation head and their late fusion (eval
    transform)."""
    from student.evaluate import evaluate_checkpoint
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
                   f"{d['student_only']}, only teacher {d['teacher_only']}, both wrong {d['both_wrong']}")
    if "cache_agreement" in report:
        c = report["cache_agreement"]
        click.echo(f"  vs cached teacher (aug seed {c['aug_seed']}, {c['num_samples']} replayed "
                   "images): agreement " + ", ".join(f"{k} {v:.4f}" for k, v in c["agreement"].items()))
