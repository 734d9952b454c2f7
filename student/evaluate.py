"""Top-1 / top-5 of the class head, the distillation head and their late fusion (the default
prediction: the two heads' mean logits, as timm / DeiT at inference), eval transform; with
--teacher, the teacher on the same images (accuracy, agreement, who is right where they differ);
with --cache, the student on one seed's replayed training images vs the cached teacher argmax
(how closely it mimics the teacher where it was taught)."""
from __future__ import annotations

from collections import Counter

import torch
from timm.models import clean_state_dict
from timm.utils import accuracy

from data_shards import AugRecipe, ShardSet, finish_item
from data_shards.devices import autocast, resolve_device
from data_shards.items import unit_items

from .checkpoint import load_checkpoint
from .data import eval_batches, iter_items
from .errors import StudentError
from .models import StudentConfig, create_student, is_distilled, student_heads
from .teachers import CachedTeacher, load_online_teacher

SPLIT = ("both_correct", "student_only", "teacher_only", "both_wrong")   # student / teacher right


def head_logits(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits per head: class, distillation, fused; a one-head model has only 'class'."""
    cls_logits, dist_logits = student_heads(model, images)
    if dist_logits is None:
        return {"class": cls_logits.float()}
    return {"class": cls_logits.float(), "distillation": dist_logits.float(),
            "fused": ((cls_logits + dist_logits) / 2).float()}


def _hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits), float64 on the logits' device (no host sync): timm's accuracy is a
    percentage of the batch; rounded back, it is exact."""
    return (torch.stack(accuracy(logits, labels, topk=(1, 5))).double() * len(labels) / 100).round()


@torch.no_grad()
def evaluate_heads(model, shard_set: ShardSet, recipe: AugRecipe, batch_size: int,
                   device: torch.device, shards: list[int] | None = None,
                   precision: str | None = None):
    """-> (counts (H, 3): top-1 hits, top-5 hits, samples; head names). As DeiT's engine, leaves the
    model in eval mode (train_one_epoch sets train mode)."""
    names = ["class", "distillation", "fused"] if is_distilled(model) else ["class"]
    counts = torch.zeros(len(names), 3, dtype=torch.float64, device=device)  # a rank may have none
    model.eval()
    for images, labels, _ in eval_batches(shard_set, recipe, batch_size, shards):
        with autocast(device, precision):
            logits = head_logits(model, images.to(device))
        labels = labels.to(device)
        for i, name in enumerate(names):
            counts[i, :2] += _hits(logits[name], labels)
            counts[i, 2] += len(labels)
    return counts.cpu(), names


def load_student(checkpoint, device: torch.device, use_ema: bool = False):
    """A checkpoint of train-student -> (model in eval mode, recipe, checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    model = create_student(StudentConfig.from_checkpoint(ckpt), distilled_training=False)
    state = ckpt["model"]
    if use_ema:
        if ckpt.get("ema") is None:
            raise StudentError(f"{checkpoint} has no EMA weights (train with --ema-decay to keep "
                               "them)")
        state = clean_state_dict(ckpt["ema"])
    model.load_state_dict(state)
    try:
        recipe = AugRecipe.from_dict(ckpt["recipe"])
    except (TypeError, ValueError) as exc:
        raise StudentError(f"{checkpoint}: its recipe is not valid ({exc})") from None
    return model.to(device).eval(), recipe, ckpt


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, shards: str, batch_size: int = 128,
                        teacher: str | None = None, teacher_model: str | None = None,
                        cache: str | None = None, aug_seed: int = 0, use_ema: bool = False,
                        device: str = "auto") -> dict:
    dev = resolve_device(device)
    model, recipe, ckpt = load_student(checkpoint, dev, use_ema)
    shard_set = ShardSet.open(shards)
    num_classes = StudentConfig.from_checkpoint(ckpt).num_classes
    if shard_set.num_classes != num_classes:
        raise StudentError(f"{shards} has {shard_set.num_classes} classes, the student "
                           f"{num_classes}; evaluate on shards of the training classes")
    if teacher and cache:
        raise StudentError("give either --teacher or --cache, not both")
    teacher_net = (load_online_teacher(teacher, num_classes, dev, teacher_model, "--teacher")
                   if teacher else None)
    hits, teacher_hits, agree, split, n = Counter(), 0, Counter(), dict.fromkeys(SPLIT, 0), 0
    for images, labels, _ in eval_batches(shard_set, recipe, batch_size):
        images, labels = images.to(dev), labels.to(dev)
        logits = head_logits(model, images)
        for name, out in logits.items():
            hits[name] += _hits(out, labels)
        if teacher_net is not None:        # its accuracy, agreement, who is right (default head)
            t_logits = teacher_net(images).float()
            teacher_hits, t_pred = teacher_hits + _hits(t_logits, labels), t_logits.argmax(dim=1)
            _count_agreement(agree, logits, t_pred)
            s_ok, t_ok = logits[default_head(logits)].argmax(dim=1) == labels, t_pred == labels
            for key, mask in zip(SPLIT, (s_ok & t_ok, s_ok & ~t_ok, ~s_ok & t_ok, ~s_ok & ~t_ok)):
                split[key] += int(mask.sum())
        n += len(labels)
    if n == 0:
        raise StudentError(f"{shards} holds no samples")
    report = {"checkpoint": str(checkpoint), "shards": str(shards), "num_samples": n,
              "epoch": ckpt["epoch"], "weights": "ema" if use_ema else "model", "transform": "eval",
              "default_head": default_head(hits),
              "heads": {name: {"top1": h[0].item() / n, "top5": h[1].item() / n}
                        for name, h in hits.items()}}
    if teacher_net is not None:
        report["teacher"] = {"source": teacher, "name": teacher_net.teacher_info["name"],
                             "top1": teacher_hits[0].item() / n, "top5": teacher_hits[1].item() / n,
                             "agreement": {name: a / n for name, a in agree.items()},
                             "disagreement": {"head": report["default_head"], **split}}
    if cache:
        report["cache_agreement"] = cache_agreement(model, shard_set, cache, aug_seed, batch_size,
                                                    dev)
    return report


def default_head(heads) -> str:
    return "fused" if "fused" in heads else "class"


def _count_agreement(agree: Counter, logits: dict, teacher_pred: torch.Tensor) -> None:
    for name, out in logits.items():
        agree[name] += int((out.argmax(dim=1) == teacher_pred).sum())


@torch.no_grad()
def cache_agreement(model, shard_set: ShardSet, cache_path: str, aug_seed: int, batch_size: int,
                    device) -> dict:
    """Student heads vs the cached teacher on the replayed training images of one seed."""
    from teacher_cache.cache import TeacherCache
    cache = TeacherCache.open(cache_path)
    cache.check_compatible(shard_set, cache.recipe)
    if not 0 <= aug_seed < cache.num_seeds:
        raise StudentError(f"--aug-seed {aug_seed} is not cached (the cache holds seeds "
                           f"0..{cache.num_seeds - 1})")
    agree, in_topk, n = Counter(), Counter(), 0
    items = [item for shard in range(shard_set.num_shards)
             for item in unit_items(shard_set.shard_counts[shard], shard, aug_seed, batch_size)]
    teacher = CachedTeacher(cache, device)      # as training reads it: digests checked
    for item in iter_items(shard_set, items, cache.recipe):
        images = finish_item(item, cache.recipe, device)
        t, logits = teacher.item_targets(item, images), head_logits(model, images)
        _count_agreement(agree, logits, t.label)
        for name, out in logits.items():
            in_topk[name] += int((out.argmax(dim=1).view(-1, 1) == t.topk_indices).any(dim=1).sum())
        n += len(item)
    return {"cache": str(cache_path), "aug_seed": aug_seed, "num_samples": n, "topk": cache.topk,
            "agreement": {name: a / n for name, a in agree.items()},
            "student_top1_in_teacher_topk": {name: a / n for name, a in in_topk.items()}}
