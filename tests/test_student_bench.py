"""The step benchmark runs with small models and writes its markdown row and JSON record."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from _student_helpers import single_thread


def test_bench_student_step_smoke(tmp_path):
    path = Path(__file__).parent.parent / "bench" / "bench_student_step.py"
    spec = importlib.util.spec_from_file_location("bench_student_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with single_thread():
        record = bench.main(["--student", "deit_tiny_distilled_patch16_224", "--teacher", "test_resnet",
                             "--img-size", "32", "--student-kwarg", "patch_size=8", "--student-kwarg", "embed_dim=48",
                             "--student-kwarg", "depth=2", "--student-kwarg", "num_heads=3", "--num-classes", "10",
                             "--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "1",
                             "--device", "cpu", "--out", str(tmp_path)])
    assert set(record["results"]) == {"none", "cached", "online"}
    assert set(record["ratios"]) == {"cached/none", "online/none", "cached/online"}
    rows = (tmp_path / "bench_student_step.md").read_text().splitlines()
    assert rows[0].startswith("| device") and "test_resnet" in rows[-1]
    assert json.loads((tmp_path / "bench_student_step.jsonl").read_text())["img_size"] == 32
