"""Loading a teacher and running it on replayed images (shared by the cache and the online teacher).

`load_teacher` builds a timm model by name and either takes timm's pretrained weights (needs
internet or a filled Hugging Face cache) or loads a local checkpoint: DeiT's format (a dict whose
"model" key holds the state dict), timm's ("state_dict"), a plain state dict, or a .safetensors
file. Files are read with `torch.load(weights_only=True)` or safetensors: never unpickled.
`teacher_forward` turns a batch of replayed images into `TeacherTargets`, for both stages.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import timm
import torch
from timm.models import clean_state_dict

from data_shards.devices import autocast
from data_shards.files import load_weights_only
from data_shards.hashing import file_sha256

from .errors import CacheError
from .targets import TeacherTargets, encode_teacher_logits

DEFAULT_TEACHER = "regnety_160.deit_in1k"     # RegNetY-16GF, DeiT's teacher
PRECISIONS = ("fp32", "bf16", "fp16")
# Keys under which common training scripts keep the weights, tried in this order.
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")
# Keys that may name the architecture inside a checkpoint (timm train.py writes "arch").
_ARCH_KEYS = ("arch", "model_name", "architecture")


class TeacherError(CacheError):
    """The teacher cannot be built or loaded as asked."""


def weights_sha256(model: torch.nn.Module) -> str:
    """Digest of every parameter and buffer (name, dtype, shape, bytes): the teacher's identity,
    whatever file format or download path the weights came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    """A checkpoint file -> (state dict, architecture name if recorded, timm kwargs if recorded).
    The architecture may be recorded under "arch" / "model_name" (top-level key, or safetensors
    metadata); constructor arguments under a top-level "model_kwargs" dict (safetensors: a JSON
    string), e.g. {"img_size": 32} for a DeiT trained on small images."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = load_weights_only(path, TeacherError, "save the weights as a state dict of tensors "
                               "(or {'model': state_dict}) or as .safetensors")
    if not isinstance(obj, dict):
        raise TeacherError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    arch = next((obj[k] for k in _ARCH_KEYS if isinstance(obj.get(k), str)), None)
    kwargs = obj.get("model_kwargs") if isinstance(obj.get("model_kwargs"), dict) else {}
    obj = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), dict)), obj)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TeacherError(f"checkpoint {path} has no tensors (top-level keys: "
                           f"{', '.join(sorted(map(str, obj))[:8])}); expected a state dict or "
                           "a dict with a 'model' state dict (DeiT's format)")
    return clean_state_dict(tensors), arch, dict(kwargs)    # DDP's, torch.compile's prefixes dropped


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise TeacherError(f"cannot read safetensors checkpoint {path}: {exc}") from None
    try:
        kwargs = json.loads(metadata.get("model_kwargs") or "{}")
    except ValueError:
        raise TeacherError(f"{path}: metadata model_kwargs is not JSON: "
                           f"{metadata['model_kwargs']!r}") from None
    arch = next((metadata[k] for k in _ARCH_KEYS if metadata.get(k)), None)
    return clean_state_dict(state), arch, kwargs


def load_teacher(name: str | None, checkpoint: str | os.PathLike | None = None,
                 num_classes: int | None = None, device: str | torch.device = "cpu",
                 model_kwargs: dict | None = None,
                 options: tuple[str, str] = ("--teacher", "--teacher-checkpoint")) -> torch.nn.Module:
    """A timm teacher in eval mode with grads off, on `device`, carrying `teacher_info` (name,
    checkpoint, checkpoint_sha256, weights_sha256, ...). name: timm model name (a pretrained tag
    like ".deit_in1k" is allowed); None means the name recorded in the checkpoint, or
    DEFAULT_TEACHER when there is no checkpoint (then timm's pretrained weights are used).
    num_classes: the head size (the shards' class count); a checkpoint must match it. options: the
    command's options for the name and the checkpoint, named in messages."""
    state, arch, checkpoint_sha, recorded_kwargs = None, None, None, {}
    if checkpoint is not None:
        state, arch, recorded_kwargs = read_checkpoint(checkpoint)
        checkpoint_sha = file_sha256(checkpoint)
    name = name or arch or (DEFAULT_TEACHER if checkpoint is None else None)
    if name is None:
        raise TeacherError(f"checkpoint {checkpoint} does not record its architecture; "
                           f"pass the timm model name with {options[0]} NAME")
    kwargs = {**recorded_kwargs, **(model_kwargs or {})}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        model = timm.create_model(name, pretrained=checkpoint is None, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise TeacherError(f"unknown teacher {name!r}: {exc} (see timm.list_models())") from None
        raise
    except (OSError, ValueError) as exc:  # no network / no weights for this tag
        raise TeacherError(f"cannot get pretrained weights for teacher {name!r}: {exc}; "
                           f"pass local weights with {options[1]} PATH") from None
    if state is not None:
        _load_state(model, state, checkpoint, name)
    model.eval().requires_grad_(False).to(device)
    model.teacher_info = {"name": name,
                          "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
                          "checkpoint_sha256": checkpoint_sha, "weights_sha256": weights_sha256(model),
                          "pretrained": checkpoint is None, "num_classes": num_classes,
                          "model_kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"}}
    return model


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint, name: str) -> None:
    expected = model.state_dict()
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    parts = [f"{what} {len(keys)} key(s) e.g. {', '.join(keys[:3])}"
             for what, keys in (("missing", sorted(set(expected) - set(state))),
                                ("unexpected", sorted(set(state) - set(expected)))) if keys]
    parts += ["shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} vs model "
                                            f"{tuple(expected[k].shape)}" for k in wrong_shape[:3])
              ] if wrong_shape else []
    if parts:
        raise TeacherError(f"checkpoint {checkpoint} does not fit timm model {name!r} "
                           f"(num_classes={getattr(model, 'num_classes', '?')}): {'; '.join(parts)}. "
                           "Check --teacher and that the checkpoint was trained on these classes")
    model.load_state_dict(state, strict=True)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise TeacherError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise TeacherError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on the CPU")


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32",
                   channels_last: bool = False) -> torch.Tensor:
    """Raw teacher logits (N, C) as fp32, for a batch of replayed images (N, 3, H, W)."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    check_precision(precision, device)
    with autocast(device, precision):       # fp32: none; bf16 on CUDA or CPU; fp16 on CUDA only
        logits = model(images)
    if not torch.isfinite(logits).all():
        raise TeacherError("the teacher produced NaN/inf logits; check the checkpoint or use "
                           "--precision fp32")
    return logits.float()


def teacher_forward(model: torch.nn.Module, images: torch.Tensor, topk: int, store_full: bool = False,
                    precision: str = "fp32", channels_last: bool = False) -> TeacherTargets:
    """Replayed images -> TeacherTargets on the CPU; channels_last: feed NHWC (for a model converted
    with `model.to(memory_format=torch.channels_last)`)."""
    logits = teacher_logits(model, images, precision, channels_last)
    return encode_teacher_logits(logits, topk, store_full).to("cpu")
