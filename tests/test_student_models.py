"""Students from the timm registry, init-from with pos-embed resampling, checkpoint files."""
from __future__ import annotations

import pytest
from pathlib import Path

import torch
from _student_helpers import TINY_DEIT, one_thread  # noqa: F401 (autouse)

from student.checkpoint import load_checkpoint, save_checkpoint
from student.errors import CheckpointError, StudentError
from student.models import StudentConfig, create_student, init_from_checkpoint, is_distilled, student_heads


def tiny(**changes) -> StudentConfig:
    return StudentConfig(**{**TINY_DEIT, "num_classes": 10, **changes})


def test_size_overrides_and_two_heads():
    model = create_student(tiny())
    assert is_distilled(model) and model.embed_dim == 48 and len(model.blocks) == 2
    assert model.pos_embed.shape == (1, 16 + 2, 48)      # 4x4 patches + class + distillation tokens
    x = torch.randn(3, 3, 32, 32)
    model.train()
    cls, dist = model(x)                                 # distilled training: two outputs
    assert cls.shape == dist.shape == (3, 10)
    model.eval()
    c, d = student_heads(model, x)
    assert torch.allclose((c + d) / 2, model(x), atol=1e-6)   # late fusion = timm's eval output


def test_one_head_model_and_unknown_model():
    model = create_student(StudentConfig(model="test_resnet", num_classes=10, drop_path_rate=0.0))
    assert not is_distilled(model)
    logits, none = student_heads(model.eval(), torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and none is None
    with pytest.raises(StudentError, match="unknown timm model"):
        create_student(StudentConfig(model="deit_enormous_patch3"))


def test_init_from_resamples_position_embeddings(tmp_path):
    small = create_student(tiny())
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    large = create_student(tiny(img_size=48))             # 6x6 patches
    notes = init_from_checkpoint(large, tmp_path / "small.pt")
    assert any("4x4 to 6x6" in n for n in notes)
    assert large.pos_embed.shape == (1, 36 + 2, 48)
    assert torch.equal(large.pos_embed[:, :2], small.pos_embed[:, :2])      # token rows kept as they are
    assert torch.equal(large.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    large(torch.randn(1, 3, 48, 48))


def test_init_from_new_class_count_leaves_heads_fresh_and_refuses_other_shapes(tmp_path):
    torch.save(create_student(tiny(num_classes=5)).state_dict(), tmp_path / "five.pt")
    model = create_student(tiny())
    notes = init_from_checkpoint(model, tmp_path / "five.pt")
    assert any(n.startswith("head.weight not loaded") for n in notes)
    torch.save(create_student(tiny(embed_dim=24)).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError, match="does not fit model"):
        init_from_checkpoint(create_student(tiny()), tmp_path / "narrow.pt")


def test_checkpoint_is_atomic_plain_and_weights_only(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "args": {"lr": 1e-3, "recipe": None, "sizes": [1, 2]}})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]     # no temporary left behind
    state = torch.load(path, weights_only=True)
    assert state["args"]["sizes"] == [1, 2] and load_checkpoint(path)["model"]["w"].sum() == 2
    with pytest.raises(TypeError, match=r"checkpoint\['args'\]\['when'\] is a object"):
        save_checkpoint(path, {"args": {"when": object()}})
    assert load_checkpoint(path)["args"]["lr"] == 1e-3                       # the old one survived
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(StudentError, match="not a train-student checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_student_checkpoint_loads_as_a_teacher_with_its_sizes(tmp_path, digits_shards):
    """A model trained by train-student (e.g. the demo's teacher) is a valid cache-teacher teacher."""
    from _student_helpers import tiny_config
    from student.train import train
    from teacher_cache import load_teacher

    train(tiny_config(digits_shards["val"], tmp_path / "run", epochs=1, max_steps_per_epoch=1))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    teacher = load_teacher(None, tmp_path / "run" / "checkpoint.pt", num_classes=10)
    assert teacher.teacher_info["model_kwargs"]["img_size"] == 32
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, state[name]), name
