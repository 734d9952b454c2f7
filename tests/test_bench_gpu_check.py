"""bench/gpu_check.py --smoke: every step of the device check runs at toy sizes on the CPU, so a
GPU run cannot fail on a typo, and its JSON holds every step with plausible figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("data", "finishing", "stage_one", "verify_device", "verify_cpu", "loader", "e2e_deit",
         "e2e_fast", "e2e_compile")


@pytest.mark.slow
def test_the_device_check_runs_every_step_at_toy_sizes_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke",
                          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    [report_path] = (tmp_path / "out").glob("gpu_check-smoke-cpu-*cpu-*.json")
    report = json.loads(report_path.read_text())
    assert report["smoke"] and report["passed"] and report["machine"]["gpu"] is None
    assert {"torch", "torchvision", "timm", "cpu_count"} <= set(report["machine"])
    assert list(report["steps"]) == list(STEPS)
    failed = {n: s["error"] for n, s in report["steps"].items() if not s["ok"]}
    assert not failed
    steps = {n: s["result"] for n, s in report["steps"].items()}
    assert report["checks"] == {"finishing_equal": True, "verify_device_ok": True, "verify_cpu_ok": True}
    for recipe in ("deit", "fast"):
        assert steps["finishing"][recipe]["differing_items"] == 0
        for kind in ("items", "batches"):
            assert steps["loader"][recipe][kind]["img_s"] > 0
            assert steps["loader"][recipe][kind]["images"] > 0
    for fmt in ("channels_last", "contiguous"):
        stage_one = steps["stage_one"][fmt]
        assert stage_one["bare_forward_img_per_s"] > 0 and stage_one["cache_img_seeds_per_s"] > 0
    for where in ("verify_device", "verify_cpu"):
        assert steps[where]["digests_checked"] > 0 and steps[where]["digest_mismatches"] == []
    rows = [(r["variant"], r["mode"]) for n in ("e2e_deit", "e2e_fast", "e2e_compile") for r in steps[n]]
    assert rows == [("deit", "none"), ("deit", "cached"), ("deit", "online"), ("fast", "cached"),
                    ("compile", "cached")]
    for n in ("e2e_deit", "e2e_fast", "e2e_compile"):
        for r in steps[n]:
            assert r["end_to_end_img_s"] > 0 and r["steady_img_s"] > 0 and r["pure_step_img_s"] > 0
            assert 0 <= r["data_wait_share"] <= 1
    table = report_path.with_suffix(".md").read_text()
    assert "| e2e_compile | True |" in table and "| compile | cached |" in table
