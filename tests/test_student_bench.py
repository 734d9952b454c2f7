"""The step benchmark runs with small models and writes its markdown row and JSON record."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
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
    results = record["results"]
    assert set(results) == {"none", "cached", "online"}
    for r in results.values():      # each figure follows from the round times it was measured from
        assert len(r["seconds_per_round"]) == 1 and r["seconds_per_round"][0] > 0
        assert r["steps"] == 2
        assert r["images_per_s"] == pytest.approx(2 * 8 / r["seconds_per_round"][0])
        assert r["ms_per_step"] == pytest.approx(1000 * r["seconds_per_round"][0] / 2)
    ips = {m: r["images_per_s"] for m, r in results.items()}
    assert record["ratios"] == pytest.approx({"cached/none": ips["cached"] / ips["none"],
                                              "online/none": ips["online"] / ips["none"],
                                              "cached/online": ips["cached"] / ips["online"]})
    assert record["student_params_m"] > 0 and record["teacher_params_m"] > 0
    rows = (tmp_path / "bench_student_step.md").read_text().splitlines()
    assert rows[0].startswith("| device") and "test_resnet" in rows[-1]
    assert f"| {ips['cached']:.1f} |" in rows[-1]
    assert f"| {record['ratios']['cached/online']:.2f}x |" in rows[-1]
    written = json.loads((tmp_path / "bench_student_step.jsonl").read_text())
    assert written == json.loads(json.dumps(record))
