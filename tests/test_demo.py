"""The README's main job: `deit-pipeline demo` end to end (quick settings)."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from click.testing import CliRunner

from pipeline.cli import main


@pytest.mark.slow
def test_quick_demo_writes_results(tmp_path):
    out, threads = tmp_path / "demo", torch.get_num_threads()
    try:     # --workers 1: the demo gives torch the other cores, and says so in results.md
        result = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--device", "cpu",
                                           "--student-seeds", "2", "--workers", "1"])
        ran_with = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)     # the demo set this process's thread count
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert ran_with == max(1, (os.cpu_count() or 1) - 1)
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {"none", "soft", "hard"}
    for kind, report in results["students"].items():
        # none: DeiT's baseline, the non-distilled DeiT of the same size (class head only)
        assert set(report["heads"]) == ({"class"} if kind == "none" else {"class", "distillation", "fused"})
        checkpoint = torch.load(out / f"student_{kind}" / "checkpoint.pt", weights_only=True)
        assert checkpoint["arch"] == ("deit_tiny_patch16_224" if kind == "none" else "deit_tiny_distilled_patch16_224")
        assert report["num_samples"] == results["teacher"]["num_samples"] > 300
        n, teacher = report["num_samples"], report["teacher"]
        split = teacher["disagreement"]              # of the default head: who is right where
        assert split["both_correct"] + split["student_only"] + split["teacher_only"] + split["both_wrong"] == n
        assert round(teacher["top1"] * n) == split["both_correct"] + split["teacher_only"]
        # both right -> they agree; one alone right -> they differ; both wrong -> either
        agree = round(teacher["agreement"][report["default_head"]] * n)
        assert split["both_correct"] <= agree <= split["both_correct"] + split["both_wrong"]
    train_samples = json.loads((out / "shards" / "train" / "metadata.json").read_text())["num_samples"]
    assert results["cache"]["records_computed"] == 2 * train_samples  # 2 seeds x every training image
    assert all(len(curve) == 2 for curve in results["val_curves"].values())
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| student | hard |" in table and table in result.output
    for kind, seeds in results["over_seeds"].items():           # seed 0 is the table's run; seed 1 its own
        report = results["students"][kind]
        assert seeds["top1"][0] == report["heads"][report["default_head"]]["top1"]
        assert len(seeds["top1"]) == 2 and seeds["spread"] == max(seeds["top1"]) - min(seeds["top1"])
        assert (out / f"student_{kind}_seed1" / "checkpoint.pt").is_file()
    assert "top-1 over 2 student seeds (0, 1), mean ± spread" in table
    assert "| student | none | " in table and " | - | - | " in table.split("| student | none | ")[1].splitlines()[0]
    # the artefact says how it was made: command, machine, date, wall time, before the tables
    run = results["run"]
    assert table.index(run["command"]) < table.index(run["machine"]["cpu"]) < table.index("| student | top-1 mean")
    assert run["machine"]["torch_threads"] == ran_with and f"({ran_with} torch threads)" in table
    assert f"{os.cpu_count()} cores" in table and f"torch {torch.__version__}, timm {timm.__version__}" in table
    assert run["started"][:10] in table and f"wall time {results['total_s']:.0f} s" in table

