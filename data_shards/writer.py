"""make-shards: turn a source into a shard set (format: shards.py) in flat memory. The order is
fixed from the keys alone (sha256(key) for a folder or digits, so every shard mixes classes:
Mixup partners are drawn within a shard; WebDataset tars are indexed in place), then the bytes
stream through a bounded pool of read + decode-validation workers into the tars in that order
(the same bytes for any worker count), and the manifest goes to Parquet in batches."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter, deque
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .faults import crash_point
from .files import out_folder, temp_path
from .hashing import text_sha256
from .shards import (FORMAT_VERSION, MANIFEST_FILE, MANIFEST_SCHEMA, METADATA_FILE, SHARD_PATTERN,
                     SampleTarWriter, hash_manifest_rows)
from .sources import (Candidate, Skipped, SourceError, TarIndexer, check_candidates,
                      expand_tar_source, is_tar_source, list_source, read_classes_file)

DEFAULT_SHARD_SIZE = 1000
MANIFEST_BATCH_ROWS = 8192  # rows held (as Python objects, ~300 B each) before a Parquet row group is written


class ManifestBuilder:
    """Manifest rows in write order: flushed to Parquet in batches and hashed as they come."""

    def __init__(self, path: Path):
        self._writer = pq.ParquetWriter(path, MANIFEST_SCHEMA, compression="zstd")
        self._rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
        self._hash, self.label_counts, self.shard_counts = hashlib.sha256(), Counter(), []

    def add(self, key: str, label: int, shard: int, position: int, nbytes: int, ext: str,
            sha256: str, offset: int) -> None:
        row = (key, label, shard, position, nbytes, sys.intern(ext), sha256)
        hash_manifest_rows(self._hash, [row])
        for name, value in zip(MANIFEST_SCHEMA.names, row + (offset,)):
            self._rows[name].append(value)
        self.label_counts[label] += 1
        if shard == len(self.shard_counts):
            self.shard_counts.append(0)
        self.shard_counts[shard] += 1
        if len(self._rows["key"]) >= MANIFEST_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows["key"]:
            self._writer.write_batch(pa.record_batch(self._rows, schema=MANIFEST_SCHEMA))
            self._rows = {name: [] for name in MANIFEST_SCHEMA.names}

    def close(self) -> str:
        """Write what is left; return the content hash (hash_manifest_rows, in write order)."""
        self._flush()
        self._writer.close()
        return self._hash.hexdigest()


def make_shards(source: str, out: str | os.PathLike, split: str = "train", shard_size: int | None = None,
                val_fraction: float | None = None, overwrite: bool = False,
                allow_empty_classes: bool = False, progress: bool = True, workers: int | None = None,
                classes_file: str | os.PathLike | None = None) -> dict:
    """Write `source` (ImageFolder path, "digits", or WebDataset tars: a folder of *.tar, one .tar
    or a brace pattern like `train-{000000..001281}.tar`) as a shard set in `out`; returns its
    metadata. Built aside and renamed into place: a failure never leaves a half-written set."""
    if val_fraction is None:
        val_fraction = 0.2 if source == "digits" else 0.0
    workers = default_workers() if workers is None else workers
    out = _checked_options(split, shard_size, val_fraction, workers, out, overwrite)
    tars = _source_tars(source, out, shard_size, classes_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        skipped: list[Skipped] = []
        manifest = ManifestBuilder(tmp / MANIFEST_FILE)
        if tars is None:
            classes, candidates = list_source(source, split, val_fraction)
            if not candidates:
                raise SourceError(f"source {source} has no image files for split {split!r}")
            shard_size = shard_size or DEFAULT_SHARD_SIZE
            _write_sorted(candidates, tmp, shard_size, workers, manifest, skipped, progress)
            extra = {"source": source if source == "digits" else str(Path(source).resolve())}
        else:
            classes = read_classes_file(classes_file) if classes_file is not None else None
            indexer = TarIndexer(tars, classes, split, val_fraction, skipped)
            _index_in_place(indexer, workers, manifest, skipped, progress)
            shard_size = max(manifest.shard_counts, default=0)
            classes = classes or [str(i) for i in range(max(manifest.label_counts, default=-1) + 1)]
            extra = {"source": source, "external_shards": True, "shard_names": indexer.shard_names}
        metadata = _finish(tmp, manifest, manifest.close(), classes, skipped, source, split, val_fraction,
                           shard_size, allow_empty_classes, extra)
        crash_point("make-shards-built")     # the new set whole aside, the old one in place
        _move_into_place(tmp, out)
        return metadata
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_options(split: str, shard_size: int | None, val_fraction: float, workers: int,
                     out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse bad options (naming them); returns `out` as a Path."""
    if split not in ("train", "val"):
        raise SourceError(f"--split must be 'train' or 'val', got {split!r}")
    if shard_size is not None and shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise SourceError(f"--workers must be >= 1, got {workers}")
    out = out_folder(out, "output", SourceError)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SourceError(f"output folder {out} is not empty; pass --overwrite to replace it")
    return out


def _source_tars(source: str, out: Path, shard_size: int | None, classes_file) -> list[Path] | None:
    """The WebDataset tars `source` names, checked against the options; None for an ImageFolder or digits."""
    tars = expand_tar_source(source) if is_tar_source(source) else None
    if tars is None and classes_file is not None:
        raise SourceError("--classes applies to WebDataset tars only (an ImageFolder's classes are its folders)")
    if tars is not None and shard_size is not None:
        raise SourceError("--shard-size does not apply to WebDataset tars: each tar is one shard")
    if tars is not None and any(out.resolve() in t.parents for t in tars):
        raise SourceError(f"output folder {out} holds the source tars; choose another --out")
    return tars


def _write_sorted(candidates: list[Candidate], folder: Path, shard_size: int, workers: int,
                  manifest: ManifestBuilder, skipped: list[Skipped], progress: bool) -> None:
    """Order by sha256(key), then validate in parallel and write the usable images in that order."""
    candidates = sorted(candidates, key=lambda c: text_sha256(c.key))   # hex order = digest order
    for a, b in zip(candidates, candidates[1:]):
        if a.key == b.key:
            raise SourceError(f"duplicate key {a.key!r} (from {a.origin} and {b.origin})")
    checked = ordered_chunk_map(check_candidates, candidates, workers)
    writer, i = None, 0
    try:
        for cand, res in tqdm(checked, total=len(candidates), desc="make-shards", unit="img",
                              disable=not progress):
            if res.error is not None:
                skipped.append(Skipped(cand.origin, res.error))
                continue
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = SampleTarWriter(folder / (SHARD_PATTERN % (i // shard_size)))
            offsets = writer.write(cand.key, {res.ext: res.data, "cls": str(cand.label).encode("ascii")})
            manifest.add(cand.key, cand.label, i // shard_size, i % shard_size, res.nbytes, res.ext,
                         res.sha256, offsets[res.ext])
            i += 1
    finally:
        checked.close()  # stops the worker pool if we leave early
        if writer is not None:
            writer.close()


def _index_in_place(indexer: "TarIndexer", workers: int, manifest: ManifestBuilder,
                    skipped: list[Skipped], progress: bool) -> None:
    """Validate the tars' images in parallel (bytes stay in the tars) and record where they are."""
    checked = ordered_chunk_map(partial(check_candidates, keep_data=False), indexer.candidates(),
                                workers)
    first_label: list[int] = []  # per shard; -1 once a second class is seen
    try:
        for cand, res in tqdm(checked, desc="make-shards: indexing", unit="img", disable=not progress):
            if res.error is not None:
                skipped.append(Skipped(cand.origin, res.error))
                continue
            shard, position = indexer.place(cand)
            _, offset, _, member_ext = cand.ref  # the manifest describes the member as named in its tar
            manifest.add(cand.key, cand.label, shard, position, res.nbytes, member_ext, res.sha256, offset)
            if position == 0:
                first_label.append(cand.label)
            elif first_label[shard] != cand.label:
                first_label[shard] = -1
    finally:
        checked.close()
    skipped.extend(indexer.unused_tars())
    single = sum(1 for label, count in zip(first_label, manifest.shard_counts) if label >= 0 and count > 1)
    if single:
        print(f"make-shards: warning: {single} of {len(first_label)} tars hold a single class. Mixup/CutMix "
              "partners are drawn within a shard (= a tar here), so the tars should have been written from a "
              "shuffled list of samples; rewrite them shuffled, or make shards from the image folder instead.",
              file=sys.stderr)


def _finish(tmp: Path, manifest: ManifestBuilder, content_hash: str, classes: list[str],
            skipped: list[Skipped], source: str, split: str, val_fraction: float, shard_size: int,
            allow_empty_classes: bool, extra: dict) -> dict:
    """Report skips, refuse empty results and classes, write metadata.json; return it."""
    skipped.sort(key=lambda s: s.origin)
    for s in skipped:
        print(f"make-shards: skipped {s.origin}: {s.reason}", file=sys.stderr)
    if sum(manifest.shard_counts) == 0:
        raise SourceError(f"source {source} has no usable images for split {split!r} "
                          f"({len(skipped)} files skipped)")
    counts = [manifest.label_counts.get(i, 0) for i in range(len(classes))]
    empty = [classes[i] for i, c in enumerate(counts) if c == 0]
    if empty and not allow_empty_classes:
        raise SourceError(f"class(es) with no usable image in split {split!r}: {', '.join(empty[:20])}"
                          f"{' ...' if len(empty) > 20 else ''}; add images, remove the class folder(s), "
                          "or pass --allow-empty-classes to keep their class index without samples")
    names = extra.pop("shard_names", None) or [SHARD_PATTERN % i for i in range(len(manifest.shard_counts))]
    metadata = {"format_version": FORMAT_VERSION, "source": extra.pop("source"), **extra, "split": split,
                "val_fraction": val_fraction, "classes": classes, "num_classes": len(classes),
                "num_samples": sum(manifest.shard_counts), "counts_per_class": counts, "shard_size": shard_size,
                "shards": [{"name": n, "count": c} for n, c in zip(names, manifest.shard_counts)],
                "content_hash": content_hash, "skipped": [{"path": s.origin, "reason": s.reason} for s in skipped]}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = temp_path(out)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def ordered_chunk_map(fn: Callable[[list], list], items: Iterable, workers: int, chunk: int = 16,
                      window_per_worker: int = 4) -> Iterator[tuple]:
    """Yield (item, result) in the order of `items` (lazy or not); fn maps a list of item.ref to a
    list of results. At most `workers * window_per_worker` chunks are in flight, so memory is
    bounded (Pool.imap queues every result not yet taken). workers <= 1 runs in this process."""
    items = iter(items)
    chunks = iter(lambda: list(islice(items, chunk)), [])
    if workers <= 1:
        for c in chunks:
            yield from zip(c, fn([x.ref for x in c]))
        return
    # fork: workers only read files and decode with PIL; no start-up imports, shared pages.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers) as pool:
        def submit(c: list) -> tuple:
            return c, pool.apply_async(fn, ([x.ref for x in c],))

        pending = deque(submit(c) for c in islice(chunks, workers * window_per_worker))
        while pending:
            c, result = pending.popleft()
            results = result.get()
            for nxt in islice(chunks, 1):
                pending.append(submit(nxt))
            yield from zip(c, results)
