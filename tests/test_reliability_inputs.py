"""Bad arguments fail clearly before any work starts; nothing unsafe is ever loaded."""
from __future__ import annotations

import ast
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from cli_runner import CLI, run_cli
from data_shards import ShardSet, ShardsError

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    """A bad command line: it must end with a message, never a traceback."""
    result = run_cli([CLI, *args])
    assert "Traceback" not in result.stderr, f"traceback instead of a message:\n{result.output}"
    return result


def cache_teacher_args(shards, out, checkpoint, *extra):
    return ("cache-teacher", "--shards", str(shards), "--out", str(out), "--teacher", "test_efficientnet",
            "--teacher-checkpoint", str(checkpoint), "--input-size", "32", "--device", "cpu", "--no-progress", *extra)


@pytest.mark.parametrize("extra, needle", [
    (("--seeds", "2", "--topk", "11"), "--topk 11"),
    (("--seeds", "0"), "seeds"),
])
def test_cache_teacher_bad_numbers(tmp_path, small_shards, teacher_checkpoint, extra, needle):
    out = tmp_path / "cache"
    result = invoke(*cache_teacher_args(small_shards, out, teacher_checkpoint, *extra))
    assert result.returncode == 2 and needle in result.output.lower(), result.output
    assert not (out / "units").exists() or not any((out / "units").iterdir())  # no work started


def test_missing_checkpoint_and_unknown_model(tmp_path, small_shards, teacher_checkpoint):
    """Bad input exits 2 (README), naming the file or model; nothing is written."""
    result = invoke(*cache_teacher_args(small_shards, tmp_path / "c1", tmp_path / "nope.pth", "--seeds", "2"))
    assert result.returncode == 2 and "nope.pth" in result.output, result.output
    result = invoke("cache-teacher", "--shards", str(small_shards), "--out", str(tmp_path / "c2"),
                    "--teacher", "no_such_model_xyz", "--seeds", "2", "--device", "cpu")
    assert result.returncode == 2 and "no_such_model_xyz" in result.output, result.output
    result = invoke("train-student", "--shards", str(small_shards), "--out", str(tmp_path / "run"),
                    "--model", "no_such_model_xyz", "--distillation-type", "none", "--epochs", "1")
    assert result.returncode == 2 and "no_such_model_xyz" in result.output, result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    result = invoke("evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--shards", str(small_shards))
    assert result.returncode == 2 and "missing.pt" in result.output, result.output
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_more_epochs_than_seeds_refused_unless_reuse(tmp_path, reference_cache, small_shards):
    args = ["train-student", "--shards", str(small_shards), "--cache", str(reference_cache), "--out",
            str(tmp_path / "run"), "--model", "deit_tiny_distilled_patch16_224", "--patch-size", "8", "--embed-dim",
            "48", "--depth", "2", "--num-heads", "3", "--batch-size", "32", "--warmup-epochs", "0", "--workers", "0",
            "--no-progress", "--device", "cpu", "--max-steps-per-epoch", "1"]
    result = invoke(*args, "--epochs", "4")
    assert result.returncode == 2 and "--reuse-seeds" in result.output, result.output
    budget = "4 epoch(s) at --repeated-aug 3 need 6 augmentation seeds, the cache holds 3"
    assert budget in result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    result = invoke(*args, "--epochs", "4", "--reuse-seeds")
    assert result.returncode == 0, result.output
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in metrics]
    notes = [n["message"] for n in lines if n.get("event") == "note"]
    assert f"{budget} (it serves 3 epoch(s)); --reuse-seeds: records repeat every 3 epoch(s)" \
        in notes
    # epoch 3 cycles back to the first seed group
    assert [n["aug_seeds"] for n in lines if n.get("event") == "epoch"] == [[0, 1, 2]] * 4


# ----------------------------------------------------------------------------- security

def test_cache_holds_no_pickle(reference_cache):
    """Every file of a cache is JSON, Parquet or a zarr chunk; none starts with a pickle opcode."""
    for path in Path(reference_cache).rglob("*"):
        if not path.is_file():
            continue
        head = path.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"pickle? {path}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".parquet":
            assert path.read_bytes()[:4] == b"PAR1"


UNPICKLING_LOADS = {"torch.load", "torch.serialization.load"}


def _torch_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it is in torch, from the module's imports (`import torch as T`,
    `from torch.serialization import load as read`, ...)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":   # `import torch.serialization` binds torch
                    names[alias.asname or "torch"] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """`torch.serialization.load` for an expression naming it through any import alias."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    return None


def unsafe_loads(source: str) -> list[int]:
    """Lines that call torch's unpickling load without the literal `weights_only=True`, or pass it
    on (`f = torch.load`, `partial(torch.load, ...)`): only a direct literal call can be checked."""
    tree = ast.parse(source)
    names, safe = _torch_names(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func, names) in UNPICKLING_LOADS:
            keywords = {k.arg: k.value for k in node.keywords}
            flag = keywords.get("weights_only")
            if isinstance(flag, ast.Constant) and flag.value is True and None not in keywords:
                safe.add(id(node.func))
    return sorted({node.lineno for node in ast.walk(tree)
                   if isinstance(node, (ast.Name, ast.Attribute))
                   and _dotted(node, names) in UNPICKLING_LOADS and id(node) not in safe})


def test_the_load_scan_sees_every_spelling():
    bad = ["import torch\ntorch.load(p)", "import torch\ntorch.load(p, weights_only=False)",
           "import torch\ntorch.serialization.load(p, weights_only=False)",
           "import torch as T\nT.load(p, weights_only=flag)", "from torch import load\nload(p)",
           "from torch.serialization import load as read\nread(p, weights_only=False)",
           "import torch.serialization\ntorch.serialization.load(p)",
           "import torch\nf = torch.load",
           "import torch, functools\nfunctools.partial(torch.load, weights_only=True)",
           "import torch\ntorch.load(p, weights_only=True, **extra)"]
    assert [bool(unsafe_loads(src)) for src in bad] == [True] * len(bad)
    good = ["import torch\ntorch.load(p, weights_only=True)", "import json\njson.load(f)",
            "from torch.serialization import load\nload(p, map_location='cpu', weights_only=True)"]
    assert [unsafe_loads(src) for src in good] == [[]] * len(good)


def test_every_torch_load_is_weights_only():
    """No torch.load / torch.serialization.load in the package without weights_only=True (pickle
    would run code), however it is imported; the behavioural tests below check today's readers."""
    packages = ("data_shards", "teacher_cache", "student", "pipeline", "bench")
    offenders = [f"{path.relative_to(REPO)}:{line}" for package in packages
                 for path in (REPO / package).rglob("*.py")
                 for line in unsafe_loads(path.read_text())]
    assert offenders == []


class Payload:
    """What a malicious pickle carries: unpickling it runs code (here: it creates `sentinel`)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.touch, (self.sentinel,)


def _load_student_teacher(path):
    from student.teachers import load_online_teacher
    return load_online_teacher(str(path), num_classes=10, device="cpu", teacher_model="test_efficientnet")


@pytest.mark.parametrize("reader", ["cache-teacher", "init-from", "resume", "teacher-online"])
def test_pickled_checkpoint_is_refused_without_running_it(tmp_path, small_shards, reader):
    """Every checkpoint reader refuses a file whose unpickling would run code, and never runs it."""
    from student.checkpoint import load_checkpoint
    from student.models import init_from_checkpoint
    sentinel = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(sentinel)}, evil)
    if reader == "cache-teacher":
        result = invoke("cache-teacher", "--shards", str(small_shards), "--out", str(tmp_path / "c"),
                        "--teacher", "test_efficientnet", "--teacher-checkpoint", str(evil), "--seeds", "1",
                        "--device", "cpu")
        assert result.returncode != 0 and "evil.pth" in result.output
    else:
        load = {"init-from": lambda path: init_from_checkpoint(torch.nn.Linear(1, 1), path),
                "resume": load_checkpoint, "teacher-online": _load_student_teacher}
        with pytest.raises(Exception, match="evil.pth"):
            load[reader](evil)
    assert not sentinel.exists(), "the pickled payload was executed"


def test_shard_member_names_are_never_paths(tmp_path, small_shards):
    """A shard whose members try to escape (../, absolute) is read as data, never written anywhere."""
    shard_set = ShardSet.open(small_shards)
    bad_root = tmp_path / "bad"
    import shutil

    shutil.copytree(small_shards, bad_root)
    shard_path = bad_root / shard_set.metadata["shards"][0]["name"]
    samples = shard_set.read_shard(0)
    with tarfile.open(shard_path, "w") as tar:
        for i, s in enumerate(samples):
            name = f"../../escape_{i}" if i == 0 else s.key
            for suffix, data in (("png", s.data), ("cls", str(s.label).encode())):
                info = tarfile.TarInfo(f"{name}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    before = set(tmp_path.parent.rglob("escape_*"))
    with pytest.raises(ShardsError, match="escape_0"):  # read as a key string, checked against the manifest
        ShardSet.open(bad_root).read_shard(0)
    assert set(tmp_path.parent.rglob("escape_*")) == before
