"""Stage two end to end on digits: cached = online, resume, refusals, NaN stop, DDP, evaluate."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _student_helpers import (CACHE_BATCH, CACHE_TOPK, RECIPE, TEACHER_ARCH, TINY_DEIT, make_cache,  # noqa: F401
                              make_teacher_checkpoint, metric_lines, model_state, one_thread, single_thread,
                              tiny_config)   # one_thread: autouse fixture

import student.train as train_module
from cli_runner import CLI, run_cli
from data_shards import ShardSet, finish_item
from student.data import DataPlanError, replay_item, unit_items
from student.errors import StudentError
from student.evaluate import evaluate_checkpoint
from student.teachers import OnlineTeacher, ReplayMismatchError, load_online_teacher
from student.train import TrainingError, train
from teacher_cache import CacheError, TeacherCache
from teacher_cache.inspection import format_inspection, inspect_cache
from teacher_cache.targets import TeacherTargets, soft_tail_mass


@pytest.fixture(scope="module")
def setup(digits_shards, tmp_path_factory):
    """Digits shards, a random test_resnet teacher and its cache (2 seeds, top-3)."""
    root = tmp_path_factory.mktemp("student")
    with single_thread():
        teacher = make_teacher_checkpoint(root / "teacher.pt")
        cache = make_cache(digits_shards["train"], root / "cache", teacher, seeds=2)
    return {"train": digits_shards["train"], "val": digits_shards["val"], "teacher": teacher, "cache": cache,
            "root": root}


def online_options(setup) -> dict:
    return dict(teacher_online=str(setup["teacher"]), teacher_model=TEACHER_ARCH, teacher_topk=CACHE_TOPK,
                teacher_batch_size=CACHE_BATCH)


# ----------------------------------------------------------------------------- cached = online

def test_online_teacher_targets_are_the_cached_ones_bit_for_bit(setup):
    shard_set, cache = ShardSet.open(setup["train"]), TeacherCache.open(setup["cache"])
    online = OnlineTeacher(load_online_teacher(str(setup["teacher"]), 10, "cpu", TEACHER_ARCH), CACHE_TOPK,
                           batch_size=CACHE_BATCH)
    for shard, seed in [(0, 0), (5, 1)]:           # 5 is the short last shard
        items = [replay_item(shard_set, item, RECIPE)
                 for item in unit_items(shard_set.shard_counts[shard], shard, seed, CACHE_BATCH)]
        live = TeacherTargets.cat([online.item_targets(item, finish_item(item, RECIPE)) for item in items])
        stored = cache.read(shard, seed).select(torch.cat([item.positions for item in items]))
        assert torch.equal(live.topk_indices, stored.topk_indices)
        assert torch.equal(live.topk_logprobs, stored.topk_logprobs)
        assert torch.equal(live.tail_logsumexp, stored.tail_logsumexp)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cached_run_equals_online_run(setup, tmp_path, kind):
    cached = tmp_path / "cached"
    online = tmp_path / "online"
    # the cached run also replays in 2 worker processes: neither the data nor the RNG may notice.
    # The random teacher's top 3 leave most of the mass in the tail: allow it (equality is tested here).
    train(tiny_config(setup["train"], cached, cache=str(setup["cache"]), recipe=None, distillation_type=kind,
                      workers=2, max_steps_per_epoch=10, soft_tail_limit=1.0))
    train(tiny_config(setup["train"], online, distillation_type=kind, max_steps_per_epoch=10, **online_options(setup)))
    losses = metric_lines(cached, "train")
    assert len(losses) == 10 and losses[0]["loss_distill"] > 0          # 2 epochs x 10 steps, a line every 2
    assert losses == metric_lines(online, "train")          # identical floats, every logged step
    assert metric_lines(cached, "epoch") == metric_lines(online, "epoch")
    a, b = model_state(cached), model_state(online)
    assert all(torch.equal(a[k], b[k]) for k in a)            # identical weights


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_is_refused_when_the_cache_cannot_represent_tau(setup, tmp_path, tau):
    """The test cache keeps the top 3 of 10 classes of a random (flat) teacher: most of the soft
    target lies in the tail, whose per-class values are lost. Refused, naming the bound and the fixes;
    with the limit raised it trains and logs the bound."""
    cache = TeacherCache.open(setup["cache"])
    mass = float(soft_tail_mass(cache.read(0, 0), cache.num_classes, tau).mean())
    assert mass > 0.25
    with pytest.raises(StudentError, match=rf"τ={tau:g}.*{100 * mass:.1f}%.*--soft-tail-limit 0.25.*--topk"):
        train(tiny_config(setup["train"], tmp_path / "refused", cache=str(setup["cache"]), recipe=None,
                          distillation_type="soft", distillation_tau=tau))
    assert not (tmp_path / "refused" / "checkpoint.pt").exists()
    train(tiny_config(setup["train"], tmp_path / "allowed", cache=str(setup["cache"]), recipe=None, epochs=1,
                      max_steps_per_epoch=1, distillation_type="soft", distillation_tau=tau, soft_tail_limit=1.0))
    notes = [line["message"] for line in metric_lines(tmp_path / "allowed", "note")]
    assert any(f"total variation to the exact target <= {mass:.3f}" in note for note in notes)
    info = inspect_cache(setup["cache"])            # inspect-cache states the same bound per τ
    assert info["soft_target_tv_bound_by_tau"][f"{tau:g}"] > 0.25
    assert "--soft-tail-limit" in format_inspection(info)


def test_a_full_logit_cache_gives_exact_soft_targets_at_any_tau(setup, tmp_path):
    full = make_cache(setup["train"], tmp_path / "full", setup["teacher"], seeds=1, store_logits="full")
    assert sorted(TeacherCache.open(full).array_names) == ["logits", "topk_indices", "topk_logprobs"]
    note = train_module.check_soft_targets(TeacherCache.open(full), 3.0, 0.25)
    assert "<= 0.000" in note


# ----------------------------------------------------------------------------- resume

def test_resume_after_an_interrupted_epoch_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    options = dict(cache=str(setup["cache"]), recipe=None, distillation_type="hard", epochs=3, reuse_seeds=True,
                   ema_decay=0.9, student=dict(drop_path_rate=0.1), warmup_epochs=1, warmup_lr=1e-4)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(tiny_config(setup["train"], whole, **options))

    real_batches = train_module.train_batches

    def crashing_batches(shard_set, plan, *args, **kwargs):
        for step, batch in enumerate(real_batches(shard_set, plan, *args, **kwargs)):
            if plan.epoch == 1 and step == 2:
                raise KeyboardInterrupt("simulated preemption")
            yield batch

    monkeypatch.setattr(train_module, "train_batches", crashing_batches)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(setup["train"], broken, **options))
    assert torch.load(broken / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_module, "train_batches", real_batches)
    with pytest.raises(StudentError, match="--resume"):
        train(tiny_config(setup["train"], broken, **options))          # refuses to overwrite
    with pytest.raises(StudentError, match="batch_size"):
        train(tiny_config(setup["train"], broken, **{**options, "batch_size": 16}, resume=True))
    train(tiny_config(setup["train"], broken, **options, resume=True))

    assert metric_lines(broken, "epoch") == metric_lines(whole, "epoch")
    assert metric_lines(broken, "train") == metric_lines(whole, "train")
    a, b = torch.load(whole / "checkpoint.pt", weights_only=True), torch.load(broken / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert any("reuse-seeds" in line["message"] for line in metric_lines(whole, "note"))


# ----------------------------------------------------------------------------- refusals

def test_a_cache_of_other_shards_or_another_recipe_is_refused(setup, tmp_path):
    with pytest.raises(CacheError, match="shards content hash"):
        train(tiny_config(setup["val"], tmp_path / "a", cache=str(setup["cache"]), recipe=None, distillation_type="hard"))
    other = RECIPE.with_overrides(hflip=0.0).to_dict()
    with pytest.raises(CacheError, match="recipe hflip: cache 0.5, this run 0.0"):
        train(tiny_config(setup["train"], tmp_path / "b", cache=str(setup["cache"]), recipe=other, distillation_type="hard"))
    with pytest.raises(DataPlanError, match="need 3 augmentation seeds, the cache holds 2"):
        train(tiny_config(setup["train"], tmp_path / "c", cache=str(setup["cache"]), recipe=None, epochs=3,
                          distillation_type="hard"))
    with pytest.raises(StudentError, match="needs teacher targets"):
        train(tiny_config(setup["train"], tmp_path / "d", distillation_type="soft"))


def test_a_cache_whose_images_differ_from_the_replay_is_refused_before_training(setup, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    for unit_json in (cache / "units").glob("*.json"):        # pretend the teacher saw other pixels
        record = json.loads(unit_json.read_text())
        record["digests"] = {seed: {key: "f" * 32 for key in d} for seed, d in record["digests"].items()}
        unit_json.write_text(json.dumps(record))
    with pytest.raises(ReplayMismatchError, match="has digest .* the cache recorded f{32}"):
        train(tiny_config(setup["train"], tmp_path / "run", cache=str(cache), recipe=None, distillation_type="hard"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not metric_lines(tmp_path / "run", "train")                # not a single step was taken


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(setup["train"], run, warmup_epochs=1, warmup_lr=1e-4, lr=1e30, epochs=3)
    with pytest.raises(TrainingError, match=r"NaN/inf at epoch 1, step \d.*last good checkpoint .*checkpoint.pt"):
        train(cfg)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------------- fine-tuning, CLI, evaluate

def test_fine_tune_at_a_higher_resolution(setup, tmp_path):
    train(tiny_config(setup["train"], tmp_path / "base", epochs=1, max_steps_per_epoch=2))
    cfg = tiny_config(setup["train"], tmp_path / "ft", epochs=1, max_steps_per_epoch=2, student=dict(img_size=48),
                      recipe=RECIPE.with_overrides(input_size=48).to_dict(),
                      init_from=str(tmp_path / "base" / "checkpoint.pt"))
    train(cfg)
    notes = [n["message"] for n in metric_lines(tmp_path / "ft", "note")]
    assert any("pos_embed resampled from 4x4 to 6x6" in n for n in notes)
    assert model_state(tmp_path / "ft")["pos_embed"].shape == (1, 38, 48)


def test_cli_trains_a_one_head_teacher_and_evaluates_three_heads(setup, tmp_path):
    size = ["--input-size", "32", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "32",
            "--workers", "0", "--no-progress", "--warmup-epochs", "0", "--device", "cpu"]
    teacher = run_cli([CLI, "train-student", "--shards", str(setup["train"]), "--out", str(tmp_path / "t"),
                       "--model", TEACHER_ARCH, *size])
    assert teacher.returncode == 0, teacher.output
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_DEIT.items()]
    student = run_cli([CLI, "train-student", "--shards", str(setup["train"]), "--out", str(tmp_path / "s"),
                       "--teacher-online", str(tmp_path / "t" / "checkpoint.pt"), "--distillation-type",
                       "soft", "--val-shards", str(setup["val"]), *tiny, *size])
    assert student.returncode == 0, student.output
    assert "val top-1 class" in student.output

    report = run_cli([CLI, "evaluate", "--checkpoint", str(tmp_path / "s" / "checkpoint.pt"),
                      "--shards", str(setup["val"]), "--teacher", str(tmp_path / "t" / "checkpoint.pt"),
                      "--json", "--device", "cpu"])
    assert report.returncode == 0, report.output
    data = json.loads(report.stdout)
    assert set(data["heads"]) == {"class", "distillation", "fused"} and data["default_head"] == "fused"
    assert data["num_samples"] == sum(ShardSet.open(setup["val"]).shard_counts)
    assert set(data["teacher"]["agreement"]) == {"class", "distillation", "fused"}
    assert sum(v for k, v in data["teacher"]["disagreement"].items() if k != "head") == data["num_samples"]
    text = run_cli([CLI, "evaluate", "--checkpoint", str(tmp_path / "s" / "checkpoint.pt"),
                    "--shards", str(setup["val"]), "--device", "cpu"])
    assert "distillation" in text.output and "(default prediction)" in text.output

    one_head = run_cli([CLI, "evaluate", "--checkpoint", str(tmp_path / "t" / "checkpoint.pt"),
                        "--shards", str(setup["val"]), "--json", "--device", "cpu"])
    assert set(json.loads(one_head.stdout)["heads"]) == {"class"}

    bad = run_cli([CLI, "train-student", "--shards", str(setup["val"]), "--out", str(tmp_path / "x"),
                   "--cache", str(setup["cache"]), *tiny, *size])
    assert bad.returncode == 2 and "shards content hash" in bad.output and "Traceback" not in bad.output


def test_evaluate_against_the_cache(setup, tmp_path):
    train(tiny_config(setup["train"], tmp_path / "s", cache=str(setup["cache"]), recipe=None,
                      distillation_type="hard", epochs=1))
    report = evaluate_checkpoint(str(tmp_path / "s" / "checkpoint.pt"), str(setup["train"]), cache=str(setup["cache"]),
                                 aug_seed=1, device="cpu")
    agreement = report["cache_agreement"]
    assert agreement["num_samples"] == sum(ShardSet.open(setup["train"]).shard_counts)
    assert set(agreement["agreement"]) == {"class", "distillation", "fused"}
    assert all(0 <= v <= 1 for v in agreement["student_top1_in_teacher_topk"].values())


# ----------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_ddp_two_cpu_processes_take_the_same_number_of_steps(setup, tmp_path):
    run = tmp_path / "ddp"
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_DEIT.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline", "train-student", "--shards", str(setup["train"]), "--out", str(run),
           "--cache", str(setup["cache"]), "--distillation-type", "hard", "--epochs", "2", "--batch-size", "64",
           "--repeated-aug", "1",
           "--workers", "0", "--no-progress", "--warmup-epochs", "0", "--lr", "1e-3", "--device", "cpu",
           "--val-shards", str(setup["val"]), *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group, so a hang (the failure this test guards against) can be killed with its workers.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun with 2 processes did not finish in 240 s (DDP hang?)")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    epochs = metric_lines(run, "epoch")
    assert len(epochs) == 2
    for line in epochs:
        assert len(set(line["samples_per_rank"])) == 2                    # uneven: 750 vs 693 samples
        assert line["steps_per_rank"] == [min(line["samples_per_rank"]) // 64] * 2
        assert line["val"]["num_samples"] == sum(ShardSet.open(setup["val"]).shard_counts)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["rng"]["torch"].shape[0] == 2 and ckpt["data"]["world_size"] == 2

    # Resumed in one process, one epoch longer: the 2 cached seeds now need --reuse-seeds (a permission,
    # allowed to change on --resume), the cosine length changes; both are said.
    args = [CLI if a == "pipeline" else a for a in cmd[cmd.index("pipeline"):]]
    args[args.index("--epochs") + 1] = "3"
    refused = run_cli([*args, "--resume"])
    assert refused.returncode == 2 and "--reuse-seeds" in refused.output, refused.output
    resumed = run_cli([*args, "--resume", "--reuse-seeds"])
    assert resumed.returncode == 0, resumed.output
    assert "world size 2 -> 1" in resumed.output and "cosine schedule now spans 3 epochs" in resumed.output
    assert "trained 1 epoch(s) (epochs 2..2, resumed)" in resumed.output
    assert torch.load(run / "checkpoint.pt", weights_only=True)["data"]["world_size"] == 1


def test_every_train_student_option_reaches_the_config():
    """train-student builds TrainConfig.from_dict(options), which ignores unknown keys: each option the
    command does not consume itself must be a key of the config's flat form, or it would be lost."""
    from pipeline.cli import main
    consumed = {"input_size", "recipe_source", "aug_overrides", "model_kwargs", "distillation_type", "no_progress",
                "as_json"}
    options = {p.name for p in main.commands["train-student"].params} - consumed
    assert options - set(tiny_config("s", "o").to_dict()) == set()
    assert {"drop_path", "model", "resume", "teacher_channels_last"} <= options
