"""Bad input as a new user types it: one clean error line (exit code 2) before any work, nothing
written that blocks the corrected rerun, no user file touched. Families: recipe values of every
type, numeric ranges, files that do not match, output folders holding user data.
(Damaged caches and resume: tests/test_cli_damage_and_resume.py.)"""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from cache_fixtures import TEACHER_ARCH, file_states
from cli_runner import CLI, run_cli


def one_line_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one `Error: ` line, last (the message is whole on it),
    naming every needle; returns that line."""
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------- recipe values of every type

RECIPE_CASES = [      # --aug value, what the message must say: each field type, and each way to get it wrong
    ("scale=0.5,1", "recipe field scale expects two numbers 0 < low <= high <= 1, like [0.08, 1], got '0.5,1'"),
    ("scale=[1,0.5]", "recipe field scale expects"),
    ("scale=[0.5]", "recipe field scale expects two numbers"),
    ("ratio=[0,1]", "recipe field ratio expects"),
    ("input_size=32.5", "recipe field input_size expects a whole number >= 1"),
    ("input_size=true", "recipe field input_size expects a whole number"),
    ("hflip=yes", "recipe field hflip expects a probability in [0, 1]"),
    ("reprob=1.5", "recipe field reprob expects a probability"),
    ("smoothing=true", "recipe field smoothing expects a probability"),
    ("mixup_alpha=NaN", "recipe field mixup_alpha expects a number >= 0"),
    ("cutmix_alpha=-1", "recipe field cutmix_alpha expects a number >= 0"),
    ("mean=[0.5,0.5]", "recipe field mean expects three numbers"),
    ("std=[1,0,1]", "recipe field std expects three numbers > 0"),
    ("re_area=[0.5,0.1]", "recipe field re_area expects"),
    ("re_aspect=0", "recipe field re_aspect expects a number in (0, 1]"),
    ("eval_crop_pct=1.5", "recipe field eval_crop_pct expects"),
    ("decode_draft=2", "recipe field decode_draft expects true or false"),
    ("pairing_seeds=1.5", "recipe field pairing_seeds expects a whole number"),
    ("interpolation=nearest", "recipe field interpolation expects one of 'bicubic', 'bilinear'"),
    ("rand_augment=5", "recipe field rand_augment expects null or a timm RandAugment string"),
    ("rand_augment=rand-m9-x1", "unsupported RandAugment section 'x1'"),
    ("resize_backend=cv2", "recipe field resize_backend expects one of 'pil', 'torch'"),
    ("rand_augment_interpolation=lanczos", "recipe field rand_augment_interpolation expects null or one of"),
    ("hflp=0.5", "unknown recipe field 'hflp'"),
    ("hflip", "expected KEY=VALUE"),
]


@pytest.mark.parametrize("command", ["cache-teacher", "train-student"])
@pytest.mark.parametrize("aug, message", RECIPE_CASES, ids=[case[0] for case in RECIPE_CASES])
def test_every_recipe_field_is_checked_when_parsed(tmp_path, small_shards, command, aug, message):
    out = tmp_path / "out"
    result = run_cli([CLI, command, "--shards", small_shards, "--out", out, "--aug", aug])
    one_line_error(result, "--aug", message)
    assert not out.exists()


@pytest.mark.parametrize("source, message", [
    ("missing.json", "cannot read recipe file missing.json"),
    ("list.json", "expected a JSON object of recipe fields, got a JSON list"),
    ("broken.json", "broken.json is not a JSON object"),
    ("binary.pth", "cannot read recipe file binary.pth"),
    ('{"hflip": 2}', "recipe field hflip expects a probability in [0, 1], like 0.5, got 2"),
    ("manifest.json", "recipe field scale expects two numbers"),              # a cache manifest's recipe
])
def test_recipe_files_are_checked_when_parsed(tmp_path, small_shards, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    Path("list.json").write_text("[1, 2]")
    Path("broken.json").write_text('{"hflip": 0.5')
    torch.save({"w": torch.zeros(3)}, "binary.pth")
    Path("manifest.json").write_text(json.dumps({"format": "x", "recipe": {"scale": "0.5,1"}}))
    result = run_cli([CLI, "cache-teacher", "--shards", small_shards, "--out", "cache", "--recipe", source])
    one_line_error(result, "--recipe", message)
    assert not Path("cache").exists()


def test_recipe_fields_that_only_fail_together_are_refused_before_work(tmp_path, small_shards):
    """input_size 3000 alone is fine, and so is the default erasing area: together the largest erased
    box needs more noise than the bank holds (it used to fail mid-run, in a worker)."""
    out = tmp_path / "cache"
    result = run_cli([CLI, "cache-teacher", "--shards", small_shards, "--out", out, "--seeds", 1,
                      "--input-size", 3000])
    one_line_error(result, "input_size 3000 and re_area [0.02, 0.333333]", "erasing noise bank")
    assert not out.exists()


def test_the_issues_bad_scale_leaves_nothing_that_blocks_the_rerun(tmp_path, small_shards, teacher_checkpoint):
    """`--aug scale=0.5,1` used to write manifest.json with scale '0.5,1' and then crash; the corrected
    rerun was refused because the recipes differed."""
    out = tmp_path / "cache"
    args = [CLI, "cache-teacher", "--shards", small_shards, "--out", out, "--teacher", TEACHER_ARCH,
            "--teacher-checkpoint", teacher_checkpoint, "--input-size", 32, "--seeds", 1, "--max-units", 1,
            "--device", "cpu", "--no-progress"]
    one_line_error(run_cli([*args, "--aug", "scale=0.5,1"]), "scale")
    assert not out.exists()
    fixed = run_cli([*args, "--aug", "scale=[0.5,1]"])
    assert fixed.returncode == 0, fixed.output
    assert json.loads((out / "manifest.json").read_text())["recipe"]["scale"] == [0.5, 1.0]


# ----------------------------------------------------------------------------- numeric ranges (every command)

def base_args(command: str, small_shards, reference_cache, tmp_path) -> list:
    return {"make-shards": ["make-shards", "--source", "digits", "--out", tmp_path / "out"],
            "cache-teacher": ["cache-teacher", "--shards", small_shards, "--out", tmp_path / "out"],
            "inspect-cache": ["inspect-cache", reference_cache],
            "verify-cache": ["verify-cache", reference_cache, "--shards", small_shards],
            "train-student": ["train-student", "--shards", small_shards, "--out", tmp_path / "out"],
            "evaluate": ["evaluate", "--checkpoint", tmp_path / "out" / "checkpoint.pt", "--shards", small_shards],
            "demo": ["demo", "--out", tmp_path / "out"]}[command]


RANGE_CASES = [
    ("make-shards", "--shard-size", "0"), ("make-shards", "--val-fraction", "1"),
    ("make-shards", "--val-fraction", "-0.1"), ("make-shards", "--val-fraction", "nan"),
    ("make-shards", "--workers", "0"),
    ("cache-teacher", "--seeds", "0"), ("cache-teacher", "--seeds", "-2"), ("cache-teacher", "--topk", "0"),
    ("cache-teacher", "--seeds-per-unit", "0"), ("cache-teacher", "--batch-size", "0"),
    ("cache-teacher", "--num-jobs", "0"), ("cache-teacher", "--job-index", "-1"), ("cache-teacher", "--workers", "-1"),
    ("cache-teacher", "--max-units", "-1"), ("cache-teacher", "--lock-stale-after", "0"),
    ("cache-teacher", "--lock-stale-after", "inf"), ("cache-teacher", "--input-size", "0"),
    ("cache-teacher", "--device", "gpu"), ("cache-teacher", "--teacher-kwargs", "[1]"),
    ("cache-teacher", "--teacher-kwargs", "{bad"),
    ("inspect-cache", "--max-label-records", "-1"),
    ("verify-cache", "--samples", "0"), ("verify-cache", "--min-agreement", "1.5"),
    ("verify-cache", "--near-tie-tolerance", "-1"), ("verify-cache", "--max-logprob-diff", "-0.1"),
    ("verify-cache", "--seed", "-1"), ("verify-cache", "--device", "cuda:x"),
    ("train-student", "--num-seeds", "0"), ("train-student", "--num-seeds", "-2"),
    ("train-student", "--distillation-tau", "0"), ("train-student", "--distillation-alpha", "1.5"),
    ("train-student", "--distillation-alpha", "-0.1"), ("train-student", "--epochs", "0"),
    ("train-student", "--batch-size", "0"), ("train-student", "--lr", "0"), ("train-student", "--lr", "nan"),
    ("train-student", "--min-lr", "-1"), ("train-student", "--warmup-epochs", "-1"),
    ("train-student", "--warmup-lr", "-1"), ("train-student", "--weight-decay", "-1"),
    ("train-student", "--clip-grad", "0"), ("train-student", "--ema-decay", "1.5"),
    ("train-student", "--drop-path", "1"), ("train-student", "--repeated-aug", "0"),
    ("train-student", "--max-steps-per-epoch", "0"), ("train-student", "--workers", "-1"),
    ("train-student", "--eval-batch-size", "0"), ("train-student", "--log-interval", "0"),
    ("train-student", "--teacher-topk", "0"), ("train-student", "--teacher-batch-size", "0"),
    ("train-student", "--soft-tail-limit", "2"), ("train-student", "--img-size", "0"),
    ("train-student", "--patch-size", "0"), ("train-student", "--embed-dim", "0"), ("train-student", "--depth", "0"),
    ("train-student", "--num-heads", "0"), ("train-student", "--seed", "-1"), ("train-student", "--device", "tpu"),
    ("evaluate", "--aug-seed", "-1"), ("evaluate", "--batch-size", "0"), ("evaluate", "--device", "x"),
    ("demo", "--student-seeds", "0"), ("demo", "--workers", "-1"), ("demo", "--device", "x"),
]


@pytest.mark.parametrize("command, option, value", RANGE_CASES, ids=[" ".join(c) for c in RANGE_CASES])
def test_every_numeric_option_is_range_checked_when_parsed(tmp_path, small_shards, reference_cache,
                                                           command, option, value):
    before = file_states(reference_cache)
    result = run_cli([CLI, *base_args(command, small_shards, reference_cache, tmp_path), f"{option}={value}"])
    one_line_error(result, f"Invalid value for '{option}'")
    assert not (tmp_path / "out").exists()
    assert file_states(reference_cache) == before


def test_library_callers_get_the_same_ranges(tmp_path, small_shards, teacher_checkpoint):
    """Callers that build the options themselves (no CLI) are refused before anything is written."""
    from _student_helpers import tiny_config
    from cache_fixtures import cache_options
    from student.errors import StudentError
    from student.train import train
    from teacher_cache import CacheError, cache_teacher
    from teacher_cache.verification import verify_cache

    for bad, option in ((dict(distillation_tau=0.0), "--distillation-tau"), (dict(num_seeds=-2), "--num-seeds"),
                        (dict(lr=float("nan")), "--lr"), (dict(epochs=0), "--epochs"),
                        (dict(distillation_alpha=1.5), "--distillation-alpha")):
        with pytest.raises(StudentError, match=option):
            train(tiny_config(small_shards, tmp_path / "run", **bad))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CacheError, match="--max-units must be >= 0"):
        cache_teacher(cache_options(small_shards, tmp_path / "cache", teacher_checkpoint, max_units=-1))
    with pytest.raises(CacheError, match="--lock-stale-after must be > 0"):
        cache_teacher(cache_options(small_shards, tmp_path / "cache", teacher_checkpoint, lock_stale_after=0))
    assert not (tmp_path / "cache").exists()
    with pytest.raises(CacheError, match=r"--min-agreement must be in \[0, 1\]"):
        verify_cache(tmp_path / "cache", small_shards, min_agreement=2.0)


def test_a_refused_training_writes_nothing(tmp_path, small_shards):
    """Refused in setup (after the options parsed): no run folder, so nothing blocks the corrected rerun."""
    out = tmp_path / "run"
    result = run_cli([CLI, "train-student", "--shards", small_shards, "--out", out, "--model", "no_such_model",
                      "--teacher-online", "test_resnet", "--distillation-type", "none", "--device", "cpu"])
    one_line_error(result, "unknown timm model 'no_such_model'")
    assert not out.exists()


# ----------------------------------------------------------------------------- files that do not match

class Payload:
    """Unpickling it would run code (it would create `sentinel`)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.touch, (self.sentinel,)


@pytest.mark.parametrize("kind, says", [
    ("manifest", "it is a JSON file"),
    ("index", "it is a Parquet file"),
    ("pickle", "pickled objects besides tensors and plain values"),
    ("text", "it is a text file"),
    ("empty", "it is an empty file"),
    ("teacher", "is not a train-student checkpoint (no format field"),
])
def test_evaluate_says_what_a_wrong_checkpoint_is_and_never_suggests_unpickling(tmp_path, small_shards,
                                                                                reference_cache, teacher_checkpoint,
                                                                                kind, says):
    sentinel = tmp_path / "code-ran"
    path = {"manifest": reference_cache / "manifest.json", "index": reference_cache / "index.parquet",
            "pickle": tmp_path / "evil.pt", "text": tmp_path / "notes.txt", "empty": tmp_path / "empty.pt",
            "teacher": teacher_checkpoint}[kind]
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(sentinel)}, tmp_path / "evil.pt")
    (tmp_path / "notes.txt").write_text("a plain note\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    result = run_cli([CLI, "evaluate", "--checkpoint", path, "--shards", small_shards, "--device", "cpu"])
    line = one_line_error(result, str(path), says)
    assert "weights_only=False" not in line and "Re-running" not in line and "trusted source" not in line
    assert not sentinel.exists()


def test_checkpoint_readers_name_their_own_options(tmp_path, small_shards, reference_cache, teacher_checkpoint):
    """Each command's advice names options it has (evaluate and train-student have no --teacher-checkpoint)."""
    online = run_cli([CLI, "train-student", "--shards", small_shards, "--out", tmp_path / "run",
                      "--teacher-online", teacher_checkpoint, "--device", "cpu", "--epochs", 1])
    one_line_error(online, "does not record its architecture", "--teacher-model NAME")
    missing = run_cli([CLI, "train-student", "--shards", small_shards, "--out", tmp_path / "run",
                       "--teacher-online", tmp_path / "run1" / "checkpoint.pt", "--device", "cpu"])
    one_line_error(missing, "--teacher-online", "is not a checkpoint file")
    assert not (tmp_path / "run").exists()
    init = run_cli([CLI, "train-student", "--shards", small_shards, "--out", tmp_path / "run", "--distillation-type",
                    "none", "--init-from", reference_cache / "manifest.json", "--device", "cpu", "--epochs", 1])
    one_line_error(init, "manifest.json", "it is a JSON file")
    teacher = run_cli([CLI, "cache-teacher", "--shards", small_shards, "--out", tmp_path / "cache", "--seeds", 1,
                       "--teacher", TEACHER_ARCH, "--teacher-checkpoint", reference_cache / "index.parquet",
                       "--device", "cpu"])
    one_line_error(teacher, "index.parquet", "it is a Parquet file")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def digit_tar(path: Path, labels: list[int]) -> Path:
    """A WebDataset tar of digit PNGs with these class indices."""
    from sklearn.datasets import load_digits
    from PIL import Image
    import numpy as np

    digits = load_digits()
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            index = next(j for j, t in enumerate(digits.target) if t == label and j >= 10 * i)
            buf = io.BytesIO()
            Image.fromarray(np.round(digits.images[index] * 255 / 16).astype(np.uint8), "L").save(buf, "PNG")
            for suffix, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_classes_file_that_misses_a_label_is_refused(tmp_path):
    """It used to skip every sample of the classes the file missed and exit 0 (half the data gone)."""
    tar = digit_tar(tmp_path / "train-000000.tar", [0, 1, 2, 3, 0, 1, 2, 3])
    classes = tmp_path / "classes.txt"
    classes.write_text("zero\none\n")
    out = tmp_path / "index"
    args = [CLI, "make-shards", "--source", tar, "--out", out, "--classes", classes, "--no-progress"]
    one_line_error(run_cli(args), "class index 2 is outside the --classes file's 2 classes", "s002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt", "train-000000.tar"]
    classes.write_text("zero\none\ntwo\nthree\n")
    fixed = run_cli([*args, "--json"])
    assert fixed.returncode == 0, fixed.output
    summary = json.loads(fixed.stdout)
    assert summary["num_samples"] == 8 and summary["num_classes"] == 4 and summary["skipped"] == []
    # A failure partway (the index is being written aside) over an existing output leaves it untouched.
    before = file_states(out)
    classes.write_text("zero\none\n")
    one_line_error(run_cli([*args, "--overwrite"]), "outside the --classes file's 2 classes")
    assert file_states(out) == before and [p.name for p in tmp_path.glob(".index@*")] == []


def test_make_shards_metadata_is_the_same_bytes_for_any_worker_count(photo_folder, tmp_path):
    """A skip reason used to hold a memory address (<_io.BytesIO object at 0x...>): --workers 1 and 2
    wrote different metadata.json."""
    (photo_folder / "flower" / "notes.jpg").write_text("this is not an image\n")
    (photo_folder / "china" / "cut.jpg").write_bytes((photo_folder / "china" / "china.jpg").read_bytes()[:5000])
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = run_cli([CLI, "make-shards", "--source", photo_folder, "--out", out, "--workers", workers,
                          "--no-progress", "--json"])
        assert result.returncode == 0, result.output
        assert "make-shards:" in result.stderr and "%|" not in result.stderr         # listed, no progress bar
        runs[workers] = (json.loads(result.stdout), (out / "metadata.json").read_bytes())
    assert runs[1][1] == runs[2][1]
    reasons = {Path(s["path"]).name: s["reason"] for s in runs[1][0]["skipped"]}
    assert set(reasons) == {"notes.jpg", "cut.jpg"} and not any("0x" in r for r in reasons.values())
    assert "no image format" in reasons["notes.jpg"]


# ----------------------------------------------------------------------------- output folders holding user data

def user_folder(path: Path) -> dict:
    (path / "thesis").mkdir(parents=True)
    (path / "thesis" / "chapter1.tex").write_text("my work\n")
    (path / "notes.txt").write_text("do not delete\n")
    return file_states(path)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    before = user_folder(out)
    one_line_error(run_cli([CLI, "demo", "--out", out, "--quick", "--device", "cpu"]),
                   f"demo --out {out} holds files the demo did not write", "--overwrite")
    assert file_states(out) == before
    (tmp_path / "a_file").write_text("x")
    one_line_error(run_cli([CLI, "demo", "--out", tmp_path / "a_file"]), "--out", "is a file")
    assert (tmp_path / "a_file").read_text() == "x"


def test_demo_replaces_only_its_own_folder_or_with_overwrite(tmp_path):
    from pipeline.demo import DEMO_MARKER, DemoError, prepare_out

    own = prepare_out(tmp_path / "demo")                    # new: created and marked
    (own / "results.md").write_text("last run")
    prepare_out(own)                                        # a rerun into the demo's own folder
    assert sorted(p.name for p in own.iterdir()) == [DEMO_MARKER]
    (tmp_path / "empty").mkdir()
    assert (prepare_out(tmp_path / "empty") / DEMO_MARKER).is_file()
    mine = tmp_path / "mine"
    before = user_folder(mine)
    with pytest.raises(DemoError, match="did not write"):
        prepare_out(mine)
    assert file_states(mine) == before
    prepare_out(mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == [DEMO_MARKER]


def test_cache_teacher_refuses_a_folder_of_other_files(tmp_path, small_shards, teacher_checkpoint):
    out = tmp_path / "mine"
    before = user_folder(out)
    result = run_cli([CLI, "cache-teacher", "--shards", small_shards, "--out", out, "--seeds", 1,
                      "--teacher", TEACHER_ARCH, "--teacher-checkpoint", teacher_checkpoint, "--device", "cpu"])
    one_line_error(result, f"--out {out} holds no teacher cache", "notes.txt")
    assert file_states(out) == before


def test_make_shards_and_train_student_leave_user_files_alone(tmp_path, small_shards):
    out = tmp_path / "mine"
    before = user_folder(out)
    one_line_error(run_cli([CLI, "make-shards", "--source", "digits", "--out", out, "--no-progress"]),
                   "is not empty", "--overwrite")
    assert file_states(out) == before
    (tmp_path / "a_file").write_text("x")
    one_line_error(run_cli([CLI, "train-student", "--shards", small_shards, "--out", tmp_path / "a_file",
                            "--distillation-type", "none", "--device", "cpu"]), "--out", "is a file")
    assert (tmp_path / "a_file").read_text() == "x"


# ----------------------------------------------------------------------------- help and version are true

def test_version_and_every_option_has_help():
    from importlib.metadata import version

    from pipeline.cli import main
    result = run_cli([CLI, "--version"])
    assert result.returncode == 0 and result.stdout.strip() == f"deit-pipeline {version('deit-pipeline')}"
    silent = [f"{name} {param.opts[0]}" for name, command in main.commands.items() for param in command.params
              if param.param_type_name == "option" and not param.help]
    assert silent == []


def test_readme_synopses_list_every_option():
    """Each command's README section names each of its options (the synopsis or the text under it)."""
    from pipeline.cli import main
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sections = [s for s in re.split(r"\n(?=##+ )", readme) if s.startswith("### ")]
    missing = []
    for name, command in main.commands.items():
        section = next(s for s in sections if name in s.splitlines()[0])
        for param in command.params:
            if param.param_type_name == "option" and param.opts[0] not in section:
                missing.append(f"{name} {param.opts[0]}")
    assert missing == []


def test_every_guarantee_names_tests_that_exist():
    """The README's guarantees table: each line names its tests (file::name), and they exist."""
    tests = Path(__file__).resolve().parent
    table = (tests.parent / "README.md").read_text().split("## What survives what (guarantees)", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| event")]
    assert len(rows) >= 20
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.rstrip(" |").rsplit(" | ", 1)[-1])
        assert refs, row
        for file, name in refs:
            assert f"def {name}(" in (tests / file).read_text(), f"{file}::{name}"
