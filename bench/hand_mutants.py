"""Hand mutation testing: does removing one guarantee make a test fail?

Each mutant is one text replacement in a scratch copy of the repository (never in the working
tree); the tests that should notice run against the copy (PYTHONPATH = the copy). Prints
`caught` with the failing tests, or `SURVIVED`. A mutant whose text is no longer in its file
(the code moved on) is reported as `stale`, one that does not run as `broken`: rewrite those.

    python bench/hand_mutants.py                                   # all (~20 min, 2 cores)
    python bench/hand_mutants.py issue-1-verify-ignores-digests   # one
    python bench/hand_mutants.py --list

The six `issue-*` mutants are those of issue 23 (each survived the suite before it); the others
are the practice round on the modules that carry guarantees (bench/README.md, "Hand mutants").
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPLAY = ["tests/test_replay_fast.py", "tests/test_replay.py"]
BUILD = ["tests/test_cache_build.py"]
VERIFY = ["tests/test_cache_verify.py", "tests/test_cache_cli.py", "-k", "verify"]
JOBS = ["tests/test_cache_jobs.py", "tests/test_cache_build.py"]
DATA = ["tests/test_student_data.py", "tests/test_student_schedule.py"]
SHARDS = ["tests/test_make_shards.py", "tests/test_make_shards_wds.py"]

# name: (file, text, replacement, pytest arguments)
MUTANTS = {
    "issue-1-verify-ignores-digests": (
        "teacher_cache/verification.py",
        'found.bad_digests += [f"{key}@seed{seed}" for key in keys\n',
        'found.bad_digests += [] and [0 for key in keys\n',
        ["tests/test_cache_cli.py", "-k", "digests_were_edited"]),
    "issue-2-hash-ignores-bytes": (
        "data_shards/writer.py", "hash_manifest_rows(self._hash, [row])",
        "hash_manifest_rows(self._hash, [row[:4]])",
        ["tests/test_make_shards.py", "-k", "covers_the_pixels"]),
    "issue-3-evaluate-counts-zero": (
        "student/evaluate.py",
        "_count_agreement(agree, logits, t.label)\n"
        "        for name, out in logits.items():\n"
        "            in_topk[name] += int((out.argmax(dim=1).view(-1, 1) == t.topk_indices).any(dim=1).sum())",
        "_count_agreement(agree, {name: 0 * out for name, out in logits.items()}, -1)\n"
        "        for name, out in logits.items():\n"
        "            in_topk[name] += 0",
        ["tests/test_student_train.py", "-k", "evaluate_against_the_cache"]),
    "issue-4-overwrite-deletes-first": (
        "data_shards/writer.py",
        "    tars = _source_tars(source, out, shard_size, classes_file)\n",
        "    tars = _source_tars(source, out, shard_size, classes_file)\n"
        "    if overwrite and out.exists():\n        shutil.rmtree(out)\n",
        ["tests/test_make_shards.py", "-k", "overwrite"]),
    "issue-5-first-difference-only": (
        "teacher_cache/manifest.py",
        "    if diffs:                     # one line (the CLI's errors are one line each)\n",
        "    diffs = diffs[:1]\n    if diffs:\n",
        ["tests/test_cache_cli.py", "-k", "settings"]),
    "issue-5-no-early-refusal": (
        "teacher_cache/build.py",
        "        refuse_differences(root, existing, s.manifest(shard_set, known))\n",
        "        pass\n", ["tests/test_cache_cli.py", "-k", "settings"]),
    "issue-6-serialization-load-unsafe": (
        "data_shards/files.py", 'return torch.load(path, map_location="cpu", weights_only=True)',
        'return torch.serialization.load(path, map_location="cpu", weights_only=False)',
        ["tests/test_reliability_inputs.py", "-k", "weights_only"]),
    # data_shards: replay, parts and digest positions, shards hash
    "replay-one-order-per-seed": (
        "data_shards/mixing.py", "group = int(aug_seed) // recipe.pairing_seeds",
        "group = int(aug_seed)", REPLAY + DATA),
    "replay-mix-with-itself": (
        "data_shards/items.py", "partners = augmented[offset:offset + m]",
        "partners = augmented[:m]", REPLAY),
    "replay-no-cutmix-paste": (
        "data_shards/finishing.py", "        if yh > yl and xh > xl:", "        if False:", REPLAY),
    "replay-wrong-last-partner": (
        "data_shards/items.py", "for k in range(stop, stop + offset)]",
        "for k in range(stop + 1, stop + offset + 1)]", REPLAY),
    "replay-one-partner-per-group": (
        "data_shards/mixing.py",
        "return 1 + (int(aug_seed) % recipe.pairing_seeds) % max(1, n - 1)", "return 1", REPLAY),
    "replay-digest-ignores-shape": (
        "data_shards/finishing.py", 'f"{tuple(t.shape)}|{t.dtype}|"', 'f"|"', REPLAY + BUILD),
    "parts-one-short": (
        "data_shards/items.py", "return part * n // parts, (part + 1) * n // parts",
        "return part * n // parts, max(part * n // parts, (part + 1) * n // parts - 1)", DATA),
    "digests-part-start-only": (
        "data_shards/items.py", "positions += range(start, min(stop, start + parts))",
        "positions += range(start, min(stop, start + 1))", DATA + BUILD),
    "shards-no-sha-check": (
        "data_shards/shards.py",
        "if len(data) != nbytes or hashlib.sha256(data).hexdigest() != rows[\"sha256\"][position]:",
        "if len(data) != nbytes:", SHARDS),
    "shards-hash-ignores-labels": (
        "data_shards/writer.py", "hash_manifest_rows(self._hash, [row])",
        "hash_manifest_rows(self._hash, [row[:1] + row[2:]])", SHARDS),
    # teacher_cache: build, verification, store
    "build-digest-of-wrong-image": (
        "teacher_cache/build.py", "tensor_digest(images[k - item.start])",
        "tensor_digest(images[0])", BUILD),
    "build-seed-index-global": (
        "teacher_cache/build.py", "s = item.aug_seed - self.unit.seed_start",
        "s = item.aug_seed % len(self.unit.seeds)", BUILD + ["tests/test_cache_growth.py"]),
    "build-index-never-rewritten": (
        "teacher_cache/build.py", "            pass                                    # damaged",
        "            return  #", BUILD),
    "verify-no-slice-replay": (
        "teacher_cache/verification.py", "        if not item.start <= k < item.stop:\n",
        "        if False:\n", VERIFY),
    "verify-near-tie-or": (
        "teacher_cache/verification.py",
        'return "near-tie" if gap <= tolerance and stored_off <= tolerance',
        'return "near-tie" if gap <= tolerance or stored_off <= tolerance', VERIFY),
    "verify-files-not-compared": (
        "teacher_cache/cache.py",
        '            elif hash_files and file_sha256(path) != info.get("sha256"):',
        "            elif False:", VERIFY),
    "verify-max-logprob-diff-ignored": (
        "teacher_cache/verification.py",
        "and (max_logprob_diff is None or max(found.max_lp, found.max_tail) <= max_logprob_diff))",
        ")", VERIFY),
    "verify-digests-rechecked-per-pick": (
        "teacher_cache/verification.py",
        "    if (pick.shard, pick.seed) not in found.checked_pairs:", "    if True:", VERIFY),
    "store-clean-live-scratch": (
        "teacher_cache/store.py",
        "        if not owner_gone(path, stale_after):\n            continue\n", "", JOBS),
    "store-unlink-live-locks": (
        "teacher_cache/store.py", 'n.split(".lock.")[0] in done',
        'n.split(".lock.")[0] not in done', JOBS),
    # student: data plan, cached teacher, digest coverage
    "data-steps-from-richest-rank": (
        "student/samplers.py", "steps = min(samples) // batch_size",
        "steps = max(samples) // batch_size", DATA),
    "data-same-deal-every-epoch": (
        "student/samplers.py", 'plan_rng("shard-order", seed, epoch)', 'plan_rng("shard-order", seed)',
        DATA),
    "teacher-digest-not-compared": (
        "student/teachers.py", "            if found != recorded[key]:", "            if False:",
        DATA),
    "teacher-no-position-guard": (
        "student/teachers.py", "            if key not in recorded:\n",
        "            if key not in recorded:\n                continue\n", DATA),
    "teacher-rows-not-selected": (
        "student/teachers.py",
        "return self._units[unit].select(item.positions.to(self.device, non_blocking=True))",
        "return self._units[unit].select(torch.arange(len(item)).to(self.device))", DATA),
    "teacher-coverage-never-reset": (
        "student/teachers.py",
        "        coverage = self.units_seen, self.units_checked, self.digests_checked\n"
        "        self.units_seen, self.units_checked, self.digests_checked = set(), set(), 0\n",
        "        coverage = self.units_seen, self.units_checked, self.digests_checked\n",
        ["tests/test_student_train.py", "-k", "repeated_aug_checks"]),
    "train-coverage-per-rank": (
        "student/metrics.py", '"units_checked": int((read & checked_any).sum())}',
        '"units_checked": int((read & checked_any).sum())\n'
        '            - int(D.all_reduce_sum(torch.tensor([float(len(seen - checked))]), ctx))}',
        ["tests/test_student_train.py", "-m", "slow", "-k", "killed_in_epoch_1"]),
}


def run_mutant(name: str, scratch: Path) -> str:
    rel, text, replacement, tests = MUTANTS[name]
    tree = scratch / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    ignored = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".venv")
    shutil.copytree(REPO, tree, ignore=ignored)
    path = tree / rel
    source = path.read_text()
    if source.count(text) != 1:
        return f"{name}: stale (its text is not once in {rel})"
    path.write_text(source.replace(text, replacement))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                          *tests], cwd=tree, env=env, capture_output=True, text=True)
    failed = [line[len("FAILED "):].split(" - ")[0] for line in run.stdout.splitlines()
              if line.startswith("FAILED")]
    summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    if failed:
        return f"{name}: caught by {', '.join(failed)}"
    if run.returncode != 0:                          # import error, nothing collected, ...
        return f"{name}: broken (the mutant does not run: {summary}), rewrite it"
    return f"{name}: SURVIVED ({summary})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(MUTANTS))
        return
    unknown = set(args.names) - set(MUTANTS)
    if unknown:
        p.error(f"unknown mutant(s): {', '.join(sorted(unknown))} (--list names them)")
    with tempfile.TemporaryDirectory(prefix="hand-mutants-") as scratch:
        for name in args.names or MUTANTS:
            print(run_mutant(name, Path(scratch)), flush=True)


if __name__ == "__main__":
    main()
