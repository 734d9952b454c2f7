"""`deit-pipeline demo`: the embedded two-stage demo on digits (a thin wrapper over pipeline.demo)."""
from __future__ import annotations

import dataclasses

import click

from .cli import main, run_or_explain


@main.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for shards, checkpoints, the cache and the results (replaced if it exists).")
@click.option("--device", default="auto", show_default=True, help="auto (GPU when there is one), cpu or cuda.")
@click.option("--quick", is_flag=True, help="Two epochs per model: checks the wiring in about a minute.")
@click.option("--student-seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each student with seeds 0..N-1 from the same cache; results give mean ± spread.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Replay worker processes; the other cores go to torch. 0 is fastest on quiet cores; "
                   "1 degrades more gracefully when other jobs share a small machine.")
def demo_cmd(out, quick, **options):
    """Whole two-stage flow on scikit-learn's digits: shards, teacher, cache, 3 students, results."""
    from .demo import DemoSettings, run_demo

    run_or_explain(run_demo, out, dataclasses.replace(DemoSettings.quick() if quick else DemoSettings(), **options))
