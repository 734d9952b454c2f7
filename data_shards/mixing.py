"""Mixup / CutMix replay: each shard's seeded mixing order (who is mixed with whom), each pair's
mix parameters, and the mixed soft targets. The rule both stages share is in DESIGN.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from timm.data.mixup import one_hot

from .hashing import text_sha256
from .parameters import make_rng
from .recipe import AugRecipe


@dataclass(frozen=True)
class MixParams:
    lam: float                 # weight of the primary sample's label (box-corrected for CutMix)
    use_cutmix: bool
    box: tuple[int, int, int, int] | None = None   # (y_low, y_high, x_low, x_high) of the partner


def mixing_order(keys: Sequence[str], aug_seed: int, recipe: AugRecipe) -> list[int]:
    """Seeded cyclic order of a shard: order[k] is mixed with order[(k + d) % n], d =
    partner_offset. Seeds g*P .. g*P+P-1 (P = pairing_seeds) share one order (it splits a group's
    images into epochs: items.order_part); a recipe that does not mix keeps shard order."""
    if not recipe.mixing:
        return list(range(len(keys)))
    group = int(aug_seed) // recipe.pairing_seeds
    rng = make_rng(recipe.fingerprint(), "pairing", text_sha256("\n".join(keys)), group)
    return [int(i) for i in rng.permutation(len(keys))]


def partner_offset(n: int, aug_seed: int, recipe: AugRecipe) -> int:
    """How far along a mixing order of n samples each sample's partner lies: 1 + (aug_seed mod P),
    so the P seeds of a pairing group give an image P different partners (DeiT draws fresh ones
    each epoch); taken mod n - 1 so no sample is its own partner. 0 when the recipe does not mix."""
    if not recipe.mixing:
        return 0
    return 1 + (int(aug_seed) % recipe.pairing_seeds) % max(1, n - 1)


def mixing_partners(keys: Sequence[str], aug_seed: int, recipe: AugRecipe) -> list[int]:
    """partners[i]: the position sample i is mixed with (itself when the recipe does not mix)."""
    order = mixing_order(keys, aug_seed, recipe)
    d = partner_offset(len(order), aug_seed, recipe)
    partner = dict(zip(order, order[d:] + order[:d]))
    return [partner[i] for i in range(len(order))]


def mix_params(key: str, partner_key: str, aug_seed: int, recipe: AugRecipe) -> MixParams:
    """timm Mixup._params_per_batch + cutmix_bbox_and_lam, drawn from the pair's generator."""
    if not recipe.mixing or key == partner_key:
        return MixParams(1.0, False)
    rng = make_rng(recipe.fingerprint(), "mix", key, partner_key, int(aug_seed))
    if rng.random() >= recipe.mix_prob:
        return MixParams(1.0, False)
    if recipe.mixup_alpha > 0 and recipe.cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < recipe.switch_prob)
    else:
        use_cutmix = recipe.mixup_alpha <= 0
    alpha = recipe.cutmix_alpha if use_cutmix else recipe.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(lam, False)
    size = recipe.input_size  # timm rand_bbox maths, then lam corrected to the box area
    cut = math.sqrt(1 - lam)
    cut_h = cut_w = int(size * cut)
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, size)), int(np.clip(cy + (cut_h + 1) // 2, 0, size))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, size)), int(np.clip(cx + (cut_w + 1) // 2, 0, size))
    lam = 1.0 - (yh - yl) * (xh - xl) / float(size * size)
    return MixParams(lam, True, (yl, yh, xl, xh))


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                  num_classes: int, smoothing: float) -> torch.Tensor:
    """λ·smooth(y) + (1-λ)·smooth(y_partner), timm's mixup_target maths per sample."""
    off_value = smoothing / num_classes
    y1, y2 = (one_hot(y, num_classes, on_value=1.0 - smoothing + off_value, off_value=off_value)
              for y in (labels, partner_labels))
    lam = lam.to(torch.float32).view(-1, 1)
    return y1 * lam + y2 * (1.0 - lam)
