"""load_teacher: local checkpoint formats, pretrained path, clear errors; teacher_forward precision."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cache_fixtures import TEACHER_ARCH, make_teacher
from data_shards.devices import DeviceError, resolve_device
from teacher_cache import TeacherError, load_teacher, teacher_forward, weights_sha256
from teacher_cache.targets import encode_teacher_logits


@pytest.fixture(scope="module")
def model():
    return make_teacher(seed=3)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(6, 3, 32, 32)


def _expected(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("fmt", ["deit_dict", "timm_state_dict_key", "plain", "ddp_prefix", "safetensors"])
def test_local_checkpoint_formats_load_the_same_weights(tmp_path, model, images, fmt):
    state = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "teacher.pth"
        obj = {"deit_dict": {"model": state, "epoch": 299},
               "timm_state_dict_key": {"state_dict": state, "arch": TEACHER_ARCH},
               "plain": state,
               "ddp_prefix": {f"module.{k}": v for k, v in state.items()}}[fmt]
        torch.save(obj, path)
    loaded = load_teacher(TEACHER_ARCH, path, num_classes=10)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    info = loaded.teacher_info
    assert info["weights_sha256"] == weights_sha256(model)
    assert len(info["checkpoint_sha256"]) == 64 and info["pretrained"] is False
    torch.testing.assert_close(_expected(loaded, images), _expected(model, images), rtol=0, atol=0)


def test_architecture_recorded_in_the_checkpoint_is_used(tmp_path, model):
    with_arch = tmp_path / "with_arch.pth"
    torch.save({"model": model.state_dict(), "arch": TEACHER_ARCH}, with_arch)
    assert load_teacher(None, with_arch, num_classes=10).teacher_info["name"] == TEACHER_ARCH
    st = tmp_path / "with_arch.safetensors"
    save_file(model.state_dict(), str(st), metadata={"arch": TEACHER_ARCH})
    assert load_teacher(None, st, num_classes=10).teacher_info["name"] == TEACHER_ARCH
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    with pytest.raises(TeacherError, match="does not record its architecture.*--teacher NAME"):
        load_teacher(None, plain, num_classes=10)


def test_pickled_objects_are_refused(tmp_path, model):
    path = tmp_path / "whole_model.pth"
    torch.save(model, path)                     # a pickled nn.Module, not a state dict
    with pytest.raises(TeacherError, match="weights_only=True"):
        load_teacher(TEACHER_ARCH, path, num_classes=10)


def test_bad_checkpoints_and_names_are_explained(tmp_path, model):
    path = tmp_path / "teacher.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(TeacherError, match=r"does not fit.*shape mismatch .*\(10, .*vs model \(7,"):
        load_teacher(TEACHER_ARCH, path, num_classes=7)
    with pytest.raises(TeacherError, match="missing .* key"):
        load_teacher("test_resnet", path, num_classes=10)
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(TEACHER_ARCH, tmp_path / "nope.pth", num_classes=10)
    with pytest.raises(TeacherError, match="unknown teacher 'no_such_net'"):
        load_teacher("no_such_net", path, num_classes=10)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(TeacherError, match=r"cannot read .*junk.pth as weights: it is a text file; expected"):
        load_teacher(TEACHER_ARCH, junk, num_classes=10)


def test_without_checkpoint_timm_pretrained_weights_are_requested(monkeypatch):
    """No network here: check the call, which on a connected machine downloads the weights."""
    import timm
    calls = []
    stand_in = make_teacher()

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return stand_in

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    teacher = load_teacher(None, None, num_classes=10)
    assert calls == [("regnety_160.deit_in1k", True, {"num_classes": 10})]
    assert teacher.teacher_info["pretrained"] is True and teacher.teacher_info["checkpoint_sha256"] is None


def test_offline_advice_names_the_commands_own_option(monkeypatch):
    """Without network, each command says how to pass local weights with an option it has (evaluate and
    train-student have no --teacher-checkpoint)."""
    import timm

    from student.teachers import load_online_teacher

    def offline(name, pretrained=False, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TeacherError, match="pass local weights with --teacher-checkpoint PATH"):
        load_teacher("resnet10t.a1_in1k", None, num_classes=10)
    with pytest.raises(TeacherError, match="pass local weights with --teacher PATH"):
        load_online_teacher("resnet10t.a1_in1k", 10, "cpu", option="--teacher")              # evaluate
    with pytest.raises(TeacherError, match="pass local weights with --teacher-online PATH"):
        load_online_teacher("resnet10t.a1_in1k", 10, "cpu")                                 # train-student


def test_teacher_forward_encodes_and_handles_precision(model, images):
    got = teacher_forward(model, images, topk=4, store_full=True, precision="fp32")
    want = encode_teacher_logits(_expected(model, images), 4, True)
    assert torch.equal(got.topk_indices, want.topk_indices) and torch.equal(got.logits, want.logits)
    bf16 = teacher_forward(model, images, topk=4, precision="bf16")      # CPU autocast
    assert bf16.topk_logprobs.dtype == torch.float32
    assert (bf16.topk_logprobs - want.topk_logprobs).abs().max() < 0.5
    with pytest.raises(TeacherError, match="fp16 autocast needs a CUDA device"):
        teacher_forward(model, images, topk=4, precision="fp16")
    with pytest.raises(TeacherError, match="precision must be one of"):
        teacher_forward(model, images, topk=4, precision="int8")


def test_device_resolution_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
