"""`deit-pipeline demo`: the embedded two-stage demo on digits (a thin wrapper over pipeline.demo)."""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import click

from .group import (COUNT, FOLDER, NON_NEGATIVE, UserError, device_option, main, option,
                    run_or_explain)


@main.command("demo")
@option("--out", default="demo_out", show_default=True, type=FOLDER,
        help="Folder for shards, checkpoints, the cache and the results. A folder the demo made "
             "before is replaced; any other non-empty folder is refused unless --overwrite.")
@option("--overwrite", is_flag=True,
        help="Replace --out even when the demo did not make it (deletes its files).")
@device_option(help="auto (GPU when there is one), cpu, cuda or cuda:N.")
@option("--quick", is_flag=True, help="Two epochs per model: checks the wiring in about a minute.")
@option("--student-seeds", type=COUNT, default=1, show_default=True, help="Train each student "
        "with seeds 0..N-1 from the same cache; results give mean ± spread.")
@option("--workers", type=NON_NEGATIVE, default=0, show_default=True,
        help="Replay worker processes; the other cores go to torch. 0 is fastest on quiet cores; 1 "
             "degrades more gracefully when other jobs share a small machine.")
@option("--json", "as_json", is_flag=True, help="Print results.json instead of the results table.")
def demo_cmd(out, quick, overwrite, as_json, **options):
    """Whole two-stage flow on scikit-learn's digits: shards, teacher, cache, 3 students, results."""
    from .demo import DemoError, DemoSettings, prepare_out, run_demo

    settings = dataclasses.replace(DemoSettings.quick() if quick else DemoSettings(), **options)
    try:
        prepare_out(out, overwrite)      # refuses a folder of the user's files; marks it the demo's
    except DemoError as exc:
        raise UserError(str(exc)) from None
    command = shlex.join(["deit-pipeline", *sys.argv[1:]])      # as typed (the script's name aside)
    run_or_explain(run_demo, out, settings, echo=lambda text: click.echo(text, err=as_json),
                   command=command)
    if as_json:
        click.echo((Path(out) / "results.json").read_text(), nl=False)
