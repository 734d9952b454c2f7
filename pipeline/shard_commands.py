"""Stage zero command: make-shards (a thin wrapper over data_shards.make_shards)."""
from __future__ import annotations

import click

from .group import COUNT, FILE, FOLDER, FiniteFloatRange, echo_json, main, option, run_or_explain


@main.command("make-shards")
@option("--source", required=True, help="ImageFolder root (one sub-folder per class), the word "
        "'digits', or existing WebDataset tars: a folder of *.tar, one .tar, or a brace pattern "
        "like 'train-{000000..001281}.tar' (indexed in place).")
@option("--out", required=True, type=FOLDER, help="Output folder for this split's shards.")
@option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
        help="Which split this output folder holds (with --val-fraction: which part of SOURCE).")
@option("--shard-size", type=COUNT,
        help="Samples per shard (default 1000). Not for WebDataset tars: each tar is one shard.")
@option("--val-fraction", type=FiniteFloatRange(0.0, 1.0, max_open=True),
        help="Carve a deterministic val split (by key hash) out of SOURCE. Default: 0.2 for "
             "digits, 0 (whole folder) otherwise.")
@option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@option("--allow-empty-classes", is_flag=True,
        help="Keep class folders with no usable image (index kept, no samples).")
@option("--workers", type=COUNT, help="Processes that read and decode-validate images (default: "
        "all cores). Output is the same for any value.")
@option("--classes", "classes_file", type=FILE,
        help="WebDataset tars only: class names, one per line (line i = class index i); it must "
             "name every class index the tars use. Default: the indices.")
@option("--no-progress", is_flag=True, help="No progress bar.")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON (skipped files too).")
def make_shards_cmd(out, no_progress, as_json, **options):
    """Write SOURCE as WebDataset shards + Parquet manifest + metadata.json."""
    from data_shards import make_shards
    meta = run_or_explain(make_shards, out=out, progress=not no_progress, **options)
    if as_json:
        echo_json({"out": str(out), "num_samples": meta["num_samples"],
                   "num_classes": meta["num_classes"], "num_shards": len(meta["shards"]),
                   "content_hash": meta["content_hash"],
                   "external_shards": bool(meta.get("external_shards")), "skipped": meta["skipped"]})
        return
    verb = "indexed in place" if meta.get("external_shards") else "wrote"
    click.echo(f"{verb} {meta['num_samples']} images of {meta['num_classes']} classes in "
               f"{len(meta['shards'])} shard(s) to {out} (content hash "
               f"{meta['content_hash'][:12]}); skipped {len(meta['skipped'])}"
               + (" (listed above)" if meta["skipped"] else ""))
