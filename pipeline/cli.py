"""The `deit-pipeline` command line: thin click wrappers over the library functions.

Each stage registers its commands from its own module (imported at the bottom), so
this file only holds the group and the shared error handling.
"""
from __future__ import annotations

import json

import click

from data_shards import SourceError, make_shards
from data_shards.devices import DeviceError
from data_shards.shards import ShardsError
from student.errors import StudentError
from teacher_cache.errors import CacheError

from .options import COUNT, FiniteFloatRange


class UserError(click.ClickException):
    """A problem with the user's input: printed as one clear line, exit code 2."""
    exit_code = 2


# Errors raised by the library for bad input; the CLI shows their message without a traceback.
USER_ERRORS = (SourceError, ShardsError, DeviceError, FileNotFoundError, CacheError, StudentError)


def run_or_explain(fn, *args, **kwargs):
    """Call a library function; turn known input errors into a clean CLI error."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as exc:
        raise UserError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deit-pipeline", message="deit-pipeline %(version)s")
def main():
    """Distil DeiT students from a teacher whose predictions are cached once and replayed."""


@main.command("make-shards")
@click.option("--source", required=True,
              help="ImageFolder root (one sub-folder per class), the word 'digits', or existing WebDataset tars: "
                   "a folder of *.tar, one .tar, or a brace pattern like 'train-{000000..001281}.tar' (indexed in place).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for this split's shards.")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="Which split this output folder holds (with --val-fraction: which part of SOURCE).")
@click.option("--shard-size", type=COUNT, default=None,
              help="Samples per shard (default 1000). Not for WebDataset tars: each tar is one shard.")
@click.option("--val-fraction", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=None,
              help="Carve a deterministic val split (by key hash) out of SOURCE. Default: 0.2 for digits, 0 (whole folder) otherwise.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--allow-empty-classes", is_flag=True, help="Keep class folders with no usable image (index kept, no samples).")
@click.option("--workers", type=COUNT, default=None,
              help="Processes that read and decode-validate images (default: all cores). Output is the same for any value.")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None,
              help="WebDataset tars only: class names, one per line (line i = class index i); it must name every "
                   "class index the tars use. Default: the indices.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (skipped files too).")
def make_shards_cmd(out, no_progress, as_json, **options):
    """Write SOURCE as WebDataset shards + Parquet manifest + metadata.json."""
    meta = run_or_explain(make_shards, out=out, progress=not no_progress, **options)
    if as_json:
        echo_json({"out": str(out), "num_samples": meta["num_samples"], "num_classes": meta["num_classes"],
                   "num_shards": len(meta["shards"]), "content_hash": meta["content_hash"],
                   "external_shards": bool(meta.get("external_shards")), "skipped": meta["skipped"]})
        return
    verb = "indexed in place" if meta.get("external_shards") else "wrote"
    click.echo(f"{verb} {meta['num_samples']} images of {meta['num_classes']} classes in {len(meta['shards'])} "
               f"shard(s) to {out} (content hash {meta['content_hash'][:12]}); skipped {len(meta['skipped'])}"
               + (" (listed above)" if meta["skipped"] else ""))


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


# Stage commands register themselves on `main`.
from . import cache_commands, student_commands, demo_commands  # noqa: E402,F401
