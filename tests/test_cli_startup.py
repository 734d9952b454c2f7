"""Issue 18: `deit-pipeline --help` and argument errors start without the library (torch, timm,
zarr, ...): checked by the modules a fresh process has loaded, not by timing. A command body, a
given --aug/--recipe/--device value, or a default that lives in the library imports it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "torchvision", "zarr", "webdataset", "pyarrow", "data_shards",
         "teacher_cache", "student")
RUN = """
import json, sys
import click
from pipeline.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
    message = None
except click.ClickException as exc:
    message = exc.format_message()
print(json.dumps({"loaded": sorted(m for m in %r if m in sys.modules), "error": message}))
""" % (HEAVY,)


def start(*args: str) -> dict:
    """Run the command line in a fresh interpreter; what it loaded and its error message."""
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [[], ["make-shards"], ["inspect-cache"], ["demo"]])
def test_help_imports_no_torch(args):
    assert start(*args, "--help") == {"loaded": [], "error": None}


@pytest.mark.parametrize("args, message", [
    (["train-student"], "Missing option '--shards'"),
    (["cache-teacher", "--shards", "s"], "Missing option '--out'"),
    (["verify-cache"], "Missing argument 'CACHE'"),
    (["evaluate", "--checkpoint", "c"], "Missing option '--shards'"),
    (["make-shards", "--out", "o"], "Missing option '--source'"),
    (["train-student", "--shards", "s", "--out", "o", "--amp", "fp8"], "'fp8' is not one of"),
    (["cache-teacher", "--shards", "s", "--out", "o", "--precision", "fp64"], "'fp64' is not one of"),
    (["demo", "--workers", "-1"], "-1 is not in the range x>=0"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_argument_errors_import_no_torch(args, message):
    result = start(*args)
    assert result["loaded"] == [] and message in result["error"], result
