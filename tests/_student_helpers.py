"""Helpers shared by the stage-two tests: a tiny DeiT, a tiny random teacher, a small cache."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import timm
import torch

from data_shards import AugRecipe

RECIPE = AugRecipe(input_size=32)
TINY_DEIT = {"model": "deit_tiny_distilled_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 48,
             "depth": 2, "num_heads": 3}
TEACHER_ARCH = "test_resnet"       # a small timm convnet (batch norm, convs: batch-size-sensitive in the last bits)
CACHE_TOPK = 3
CACHE_BATCH = 32                   # cache-teacher --batch-size, matched by the online teacher


def tiny_config(shards, out, student: dict | None = None, **overrides):
    """A tiny DeiT's TrainConfig; `student` overrides StudentConfig fields (img_size, drop_path_rate, ...)."""
    from student.models import StudentConfig
    from student.train import TrainConfig
    options = dict(shards=str(shards), out=str(out), student=StudentConfig(**{**TINY_DEIT, **(student or {})}),
                   recipe=RECIPE.to_dict(), epochs=2,
                   batch_size=32, lr=1e-3, warmup_epochs=0, workers=0, progress=False, log_interval=2,
                   max_steps_per_epoch=4, distillation_type="none", device="cpu",
                   repeated_aug=1)      # plain epochs; repeated augmentation: test_student_schedule.py
    options.update(overrides)
    return TrainConfig(**options)


def make_teacher_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random-init weights are a fine teacher for equivalence tests (no download)."""
    torch.manual_seed(seed)
    model = timm.create_model(TEACHER_ARCH, num_classes=10)
    torch.save({"model": model.state_dict()}, path)
    return path


def make_cache(shards, out: Path, teacher_checkpoint: Path, seeds: int = 2, store_logits: str = "topk") -> Path:
    from teacher_cache import CacheOptions, cache_teacher
    cache_teacher(CacheOptions(shards, out, teacher=TEACHER_ARCH, teacher_checkpoint=teacher_checkpoint, seeds=seeds,
                               topk=CACHE_TOPK, store_logits=store_logits, recipe=RECIPE, batch_size=CACHE_BATCH,
                               device="cpu", progress=False, log=lambda message: None))
    return out


TIMING_FIELDS = ("samples_per_s", "epoch_time_s", "data_wait_s", "compute_s")


def metric_lines(run: Path, event: str) -> list[dict]:
    """Lines of one event from RUN/metrics.jsonl, without the timing fields."""
    out = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == event:
            out.append({k: v for k, v in record.items() if k not in TIMING_FIELDS})
    return out


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run) / "checkpoint.pt", weights_only=True)["model"]


@contextlib.contextmanager
def single_thread():
    """torch on one thread: exact, and much faster on small shared CPUs than two contending threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test of a module that imports this fixture runs on one thread."""
    with single_thread():
        yield
