"""Students from the timm registry (any `--model`; DeiT is the main case), sized for the data,
and initialised from checkpoints. Size overrides reach the constructor only when given, so
convnets work without them. A distilled DeiT has two heads (`head`: class token, `head_dist`:
distillation token); a one-head model distils through its only head (losses.py)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from teacher_cache.teacher import read_checkpoint

from .errors import CheckpointError, StudentError

SIZE_OPTIONS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")  # to timm if given


@dataclass
class StudentConfig:
    """Everything needed to rebuild a student; stored (as plain primitives) in every checkpoint."""
    model: str = "deit_small_distilled_patch16_224"
    num_classes: int = 1000
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.1
    model_kwargs: dict = field(default_factory=dict)   # any other timm constructor argument

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def timm_kwargs(self) -> dict:
        sizes = {k: getattr(self, k) for k in SIZE_OPTIONS}
        return {**{k: v for k, v in sizes.items() if v is not None}, **self.model_kwargs}

    def network(self) -> dict:
        """The network as a checkpoint records it: timm.create_model(arch, **model_kwargs) rebuilds
        it, as stage one's load_teacher reads it (drop path, a training option, is in "args")."""
        kwargs = {"num_classes": self.num_classes, **self.timm_kwargs()}
        return {"arch": self.model, "model_kwargs": kwargs}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "StudentConfig":
        """The network of a train-student checkpoint, sizes among model_kwargs (format 1 kept the
        class count under "student")."""
        kwargs = dict(ckpt["model_kwargs"])
        num_classes = kwargs.pop("num_classes", None) or ckpt["student"]["num_classes"]
        return cls(ckpt["arch"], num_classes, model_kwargs=kwargs)


def create_student(config: StudentConfig, distilled_training: bool = True) -> nn.Module:
    """timm.create_model(config.model, ...), no download. `distilled_training`: a distilled DeiT's
    training forward returns (class logits, distillation logits); without it timm averages them."""
    if not timm.is_model(config.model):
        close = timm.list_models(f"*{config.model.split('_')[0]}*")[:8]
        raise StudentError(f"unknown timm model {config.model!r}"
                           + (f"; similar: {', '.join(close)}" if close else ""))
    try:
        model = timm.create_model(config.model, pretrained=False, num_classes=config.num_classes,
                                  drop_path_rate=config.drop_path_rate, **config.timm_kwargs())
    except TypeError as exc:  # e.g. a convnet given --patch-size
        raise StudentError(f"model {config.model!r} does not accept these options "
                           f"{config.timm_kwargs()}: {exc}") from None
    if is_distilled(model):
        model.set_distilled_training(distilled_training)
    return model


def is_distilled(model: nn.Module) -> bool:
    """True for a model with a distillation token and head (DeiT distilled)."""
    model = getattr(model, "module", model)   # DDP / EMA wrappers
    return hasattr(model, "set_distilled_training") and hasattr(model, "head_dist")


def student_heads(model: nn.Module, images: torch.Tensor):
    """(class-head logits, distillation-head logits or None), in train or eval mode alike."""
    model = getattr(model, "module", model)
    if not is_distilled(model):
        return model(images), None
    tokens = model.forward_features(images)
    return model.head(model.head_drop(tokens[:, 0])), model.head_dist(model.head_drop(tokens[:, 1]))


def adapt_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Resample an absolute position embedding to the model's patch grid (timm's helper), the
    token rows (model.num_prefix_tokens) kept; -> a note per change for the log."""
    if "pos_embed" not in state or not hasattr(model, "pos_embed"):
        return []
    old, new = state["pos_embed"], model.pos_embed
    if old.shape == new.shape:
        return []
    prefix = (0 if getattr(model, "no_embed_class", False)
              else int(getattr(model, "num_prefix_tokens", 1)))
    old_grid = int(math.isqrt(old.shape[1] - prefix))
    if old_grid * old_grid != old.shape[1] - prefix:
        raise CheckpointError(f"pos_embed of shape {tuple(old.shape)} is not a square grid plus "
                              f"{prefix} token row(s)")
    new_grid = list(model.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(old, new_size=new_grid, old_size=[old_grid] * 2,
                                                num_prefix_tokens=prefix)
    return [f"pos_embed resampled from {old_grid}x{old_grid} to {new_grid[0]}x{new_grid[1]} "
            "patches"]


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load weights for fine-tuning: pos_embed resampled; heads of another class count left fresh;
    everything else must match (a missing or misshapen weight is an error naming it)."""
    state = read_checkpoint(path)[0]        # as stage one reads a teacher (ours, DeiT's, timm's)
    notes = adapt_pos_embed(state, model)
    own = model.state_dict()
    heads = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
    for name in heads:
        if name in state and name in own and state[name].shape != own[name].shape:
            notes.append(f"{name} not loaded: {tuple(state[name].shape)} in checkpoint, "
                         f"{tuple(own[name].shape)} in model (different class count; trained "
                         "from scratch)")
            del state[name]
    misshapen = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
    if misshapen:
        raise CheckpointError(f"{path} does not fit model: " + "; ".join(misshapen[:5]) +
                              " (check --model and the size options against the checkpoint's)")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in heads]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit model: missing {missing[:5]}, unexpected "
                              f"{result.unexpected_keys[:5]} (check --model against the "
                              "checkpoint's)")
    return notes
