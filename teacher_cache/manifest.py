"""The cache's manifest.json: what was computed, from what, and how it is laid out.

Written once, by whichever job gets there first: each job writes its candidate aside and hard-links
it to manifest.json (locks.create_exclusive: exactly one job wins); every other job checks the
winner's against its own settings. The fields that decide the numbers (IDENTITY_FIELDS) must match
for any job to add to the cache; the rest is description. The seed count is not one of them:
a larger --seeds grows the cache (store.grow_cache), a smaller one is refused. Manifests written before
growth, batch size and channels-last were recorded read as MANIFEST_DEFAULTS (with_defaults).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

import numcodecs
import pyarrow
import zarr

from data_shards.files import write_text_atomic
from data_shards.recipe import (LATER_FIELD_DEFAULTS, REPLAY_ALGORITHM_CHANGES, REPLAY_ALGORITHM_VERSION,
                                RESIZE_KERNEL_KEY, AugRecipe, fingerprint_of, pixel_library_versions)

from .errors import CacheError
from .layout import MANIFEST_FILE, SeedGeneration, all_units
from .locks import create_exclusive

FORMAT = "deit-pipeline teacher cache"
FORMAT_VERSION = 1

# (dotted path in the manifest, what to call it in messages)
IDENTITY_FIELDS = (
    ("format_version", "cache format version"), ("shards.content_hash", "shards content hash"),
    ("shards.num_shards", "number of shards"), ("shards.rows_per_shard", "shard size"),
    ("num_classes", "class count"), ("recipe_fingerprint", "augmentation recipe fingerprint"),
    ("teacher.name", "teacher"),
    ("teacher.weights_sha256", "teacher weights (sha256 of the state dict)"),
    ("teacher.model_kwargs", "teacher constructor arguments"), ("precision", "teacher precision"),
    ("seeds_per_unit", "seeds per unit"),
    ("batch_size", "--batch-size (batch composition changes GPU results)"),
    ("channels_last", "--channels-last"), ("topk", "top-k K"), ("store_logits", "--store-logits"))

# Older manifests lack these; they were computed with cache-teacher's documented default batch
# size (64). channels_last was then implicit (on for CUDA): unit records name the device.
MANIFEST_DEFAULTS = {"batch_size": 64, "channels_last": False}


def with_defaults(manifest: dict) -> dict:
    """The manifest with the fields older versions did not write filled in."""
    filled = {**MANIFEST_DEFAULTS, **manifest}
    filled.setdefault("seed_generations", [[0, manifest.get("seeds")]])
    return filled


def seed_generations(manifest: dict) -> list[SeedGeneration]:
    """The cache's seed generations in seed order (one per run that added seeds)."""
    return [SeedGeneration(int(a), int(b)) for a, b in with_defaults(manifest)["seed_generations"]]


def library_versions(recipe: AugRecipe | None = None) -> dict[str, str]:
    return {**pixel_library_versions(recipe), "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "pyarrow": pyarrow.__version__,
            "python": platform.python_version()}


def build_manifest(opts, shard_set, teacher_info: dict, arrays: dict) -> dict:
    """A new cache's manifest; `opts`: resolved CacheOptions (build.resolve_settings)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "created_by": {"host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv},
        "teacher": {k: teacher_info.get(k) for k in ("name", "checkpoint", "checkpoint_sha256",
                                                     "weights_sha256", "pretrained", "model_kwargs")},
        "num_classes": shard_set.num_classes, "classes": shard_set.metadata.get("classes"),
        "topk": opts.topk, "store_logits": opts.store_logits, "precision": opts.precision,
        "seeds": opts.seeds, "seeds_per_unit": opts.seeds_per_unit,
        "seed_generations": [[0, opts.seeds]],    # grow_cache appends [S1, S2] (arrays.zarr/seeds-…)
        "batch_size": opts.batch_size,            # verify-cache recomputes records in these batches
        "channels_last": opts.channels_last,
        "recipe": opts.recipe.to_dict(), "recipe_fingerprint": opts.recipe.fingerprint(),
        "replay_algorithm": REPLAY_ALGORITHM_VERSION,     # description: the fingerprint covers it
        "shards": {"path": str(Path(shard_set.root).resolve()), "content_hash": shard_set.content_hash,
                   "num_shards": shard_set.num_shards, "shard_counts": shard_set.shard_counts,
                   "rows_per_shard": shard_set.rows_per_shard,
                   "num_samples": sum(shard_set.shard_counts), "split": shard_set.metadata.get("split")},
        "arrays": arrays,
        "units": {"count": len(all_units(shard_set.num_shards, opts.seeds, opts.seeds_per_unit)),
                  "dir": "units", "status": "a unit is done when units/<unit>.json exists; see "
                                            "`deit-pipeline inspect-cache`"},
        "library_versions": library_versions(opts.recipe),
    }


def _get(manifest: dict, dotted: str):
    value = manifest
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def recipe_differences(existing: dict, wanted: dict) -> list[str]:
    """Which recipe fields or pixel libraries explain a fingerprint difference."""
    out = []
    # A recipe dict leaves out later fields at their default (to_dict): compare with them filled in.
    old_recipe = {**LATER_FIELD_DEFAULTS, **(existing.get("recipe") or {})}
    new_recipe = {**LATER_FIELD_DEFAULTS, **(wanted.get("recipe") or {})}
    for key in sorted(set(old_recipe) | set(new_recipe)):
        if old_recipe.get(key) != new_recipe.get(key):
            out.append(f"  recipe {key}: cache {old_recipe.get(key)!r}, this run {new_recipe.get(key)!r}")
    old_lib, new_lib = existing.get("library_versions") or {}, wanted.get("library_versions") or {}
    for key in sorted(set(pixel_library_versions()) | {RESIZE_KERNEL_KEY}):
        if old_lib.get(key) != new_lib.get(key):
            out.append(f"  library {key}: cache {old_lib.get(key)}, this run {new_lib.get(key)} "
                       "(the augmented pixels may differ)")
    return out


def replay_algorithm(manifest: dict) -> int | None:
    """The replay algorithm the cache's images were made with: recorded since algorithm 3; before,
    the version under which the manifest's recipe and pixel libraries give its fingerprint (None:
    none does, e.g. an edited manifest)."""
    if manifest.get("replay_algorithm") is not None:
        return int(manifest["replay_algorithm"])
    pixel_keys = set(pixel_library_versions()) | {RESIZE_KERNEL_KEY}
    libraries = {k: v for k, v in (manifest.get("library_versions") or {}).items() if k in pixel_keys}
    recipe, fingerprint = manifest.get("recipe") or {}, manifest.get("recipe_fingerprint")
    for algorithm in range(REPLAY_ALGORITHM_VERSION, 0, -1):
        if fingerprint_of(recipe, libraries, algorithm) == fingerprint:
            return algorithm
    return None


def other_algorithm_message(root: Path, manifest: dict) -> str | None:
    """Why a cache of another replay algorithm cannot be used, and the command that rebuilds it;
    None when the cache's algorithm is this version's (or unknown)."""
    version = replay_algorithm(manifest)
    if version is None or version == REPLAY_ALGORITHM_VERSION:
        return None
    if version > REPLAY_ALGORITHM_VERSION:
        return (f"teacher cache {root} was made with replay algorithm {version}, newer than this "
                f"version's {REPLAY_ALGORITHM_VERSION}: use a newer deit-pipeline")
    changes = "; ".join(f"{v}: {REPLAY_ALGORITHM_CHANGES[v]}"
                        for v in range(version + 1, REPLAY_ALGORITHM_VERSION + 1)
                        if v in REPLAY_ALGORITHM_CHANGES)
    return (f"teacher cache {root} was made with replay algorithm {version}, this version replays "
            f"algorithm {REPLAY_ALGORITHM_VERSION} ({changes}): its recorded images do not apply. "
            f"Rebuild it (in a new folder) with: {rebuild_command(root, manifest)}")


def rebuild_command(root: Path, manifest: dict) -> str:
    """The cache-teacher command line computing the cache of `manifest` anew, into ROOT-replayN."""
    m, teacher = with_defaults(manifest), manifest["teacher"]
    out = Path(root).with_name(f"{Path(root).name}-replay{REPLAY_ALGORITHM_VERSION}")
    args = ["deit-pipeline", "cache-teacher", "--shards", str(m["shards"]["path"]), "--out", str(out)]
    for option, key in (("--teacher", "name"), ("--teacher-checkpoint", "checkpoint")):
        if teacher.get(key):
            args += [option, teacher[key]]
    if teacher.get("model_kwargs"):
        args += ["--teacher-kwargs", json.dumps(teacher["model_kwargs"], sort_keys=True)]
    args += ["--seeds", str(m["seeds"]), "--seeds-per-unit", str(m["seeds_per_unit"]),
             "--topk", str(m["topk"]), "--store-logits", m["store_logits"],
             "--precision", m["precision"], "--batch-size", str(m["batch_size"]),
             "--channels-last" if m["channels_last"] else "--no-channels-last"]
    default = {**LATER_FIELD_DEFAULTS, **AugRecipe().to_dict()}   # the recipe: fields off default
    recipe = {k: v for k, v in (m.get("recipe") or {}).items() if default.get(k) != v}
    if recipe:
        args += ["--recipe", json.dumps(recipe, sort_keys=True)]
    return shlex.join(args)


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return repr(value)


def read_manifest(root: str | os.PathLike, retries: int = 20) -> dict:
    path = Path(root) / MANIFEST_FILE
    for attempt in range(retries):
        try:
            manifest = json.loads(path.read_text())
            break
        except FileNotFoundError:
            raise CacheError(f"{path} not found: {root} is not a teacher cache "
                             "(create one with `deit-pipeline cache-teacher`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # Only the fallback writer (no hard links) can expose a half-written file: wait.
            if attempt + 1 == retries:
                raise CacheError(f"{path} is not valid JSON ({exc}); the cache is damaged - "
                                 "recreate it in a new folder") from None
            time.sleep(0.1)
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a teacher-cache manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {manifest.get('format_version')} is not "
                         f"{FORMAT_VERSION}; recreate the cache with this version of deit-pipeline")
    return manifest


def write_json_atomic(path: Path, obj: dict) -> None:
    """Readers see the old file or the whole new one."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", crash="json-written")


def create_or_match_manifest(root: Path, wanted: dict) -> tuple[dict, bool]:
    """Install `wanted` as root/manifest.json unless one exists; return (manifest in force,
    created). Raises CacheError naming every identity field that differs from an existing one."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_FILE
    if not path.exists() and create_exclusive(path, json.dumps(wanted, indent=1, sort_keys=True) + "\n"):
        return wanted, True                # exactly one job wins; the others check theirs below
    existing = read_manifest(root)
    refuse_differences(root, existing, wanted)
    return existing, False


def refuse_differences(root: Path, existing: dict, wanted: dict) -> None:
    """CacheError naming every identity field in which `wanted` differs from the cache's manifest
    (only the replay algorithm and the rebuild command when that differs: nothing else can help)."""
    if existing.get("recipe_fingerprint") != wanted.get("recipe_fingerprint"):
        message = other_algorithm_message(root, existing)
        if message is not None:
            raise CacheError(message)
    diffs = []
    existing, wanted = with_defaults(existing), with_defaults(wanted)
    for path, label in IDENTITY_FIELDS:
        old, new = _get(existing, path), _get(wanted, path)
        if old != new:
            diffs.append(f"{label}: cache has {_short(old)}, this run has {_short(new)}")
            if path == "recipe_fingerprint":
                diffs.extend(recipe_differences(existing, wanted))
    if diffs:                     # one line (the CLI's errors are one line each)
        raise CacheError(f"{root} already holds a cache computed differently: "
                         + "; ".join(d.strip() for d in diffs) + ". Use another --out folder, or "
                         f"rerun with the cache's settings (`deit-pipeline inspect-cache {root}` "
                         "shows them)")
