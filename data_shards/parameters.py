"""Every random choice of one sample's training augmentation, drawn before any pixel is touched.
timm draws from the global RNGs (images would depend on workers, order and process); here one
generator per sample, rng(recipe fingerprint, "sample", key, aug_seed), draws the crop, flip,
RandAugment ops and args and the erasing box, in that order, into `SampleParams` for a pixel
path to apply. The maths mirrors torchvision / timm (cited at each step)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from timm.data.auto_augment import LEVEL_TO_ARG

from .hashing import text_seed
from .recipe import NOISE_BANK_SIZE, AugRecipe, parse_rand_augment

NO_ERASING = (0, 0, 0, 0, 0)
# The unsigned part of timm's _rotate/_shear/_translate_*_level_to_arg (level in [0, 1]), which
# draw the sign from the global RNG: we draw it from our own generator.
SIGNED_LEVEL = {"Rotate": lambda level, hp: level * 30.0,
                **dict.fromkeys(("ShearX", "ShearY"), lambda level, hp: level * 0.3),
                **dict.fromkeys(("TranslateX", "TranslateY"),
                                lambda level, hp: level * float(hp["translate_const"])),
                **dict.fromkeys(("TranslateXRel", "TranslateYRel"),
                                lambda level, hp: level * hp.get("translate_pct", 0.45))}
_SIGNED_ENHANCE_OPS = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing"}


@dataclass(frozen=True)
class SampleParams:
    """What one sample's augmentation drew; applying it needs no generator."""
    crop: tuple[int, int, int, int]         # (top, left, height, width) in the full-size image
    flip: bool                              # left-right, after the crop-resize
    ops: tuple[tuple[str, tuple], ...]      # RandAugment ops applied: (timm op name, its args)
    erase: tuple[int, int, int, int, int]   # (top, left, h, w, noise-bank offset); h=0: none


def make_rng(fingerprint: str, *parts: object) -> np.random.Generator:
    """One explicit generator per purpose, seeded from sha256(fingerprint | parts)."""
    seed = text_seed("|".join([fingerprint, *map(str, parts)]), 16)
    return np.random.Generator(np.random.PCG64(seed))


def draw_sample(key: str, aug_seed: int, recipe: AugRecipe, size: tuple[int, int]) -> SampleParams:
    """The draws of sample `key` for `aug_seed`; `size`: the full (width, height), from the header."""
    rng = make_rng(recipe.fingerprint(), "sample", key, int(aug_seed))
    width, height = size
    crop = resized_crop_params(rng, height, width, recipe.scale, recipe.ratio)
    flip = bool(rng.random() < recipe.hflip)
    ops = rand_augment_ops(rng, recipe) if recipe.rand_augment else ()
    erase = erasing_params(rng, recipe) if recipe.reprob > 0 else NO_ERASING
    return SampleParams(crop, flip, ops, erase)


def resized_crop_params(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params maths, drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio, w, h = width / height, width, height   # fallback: central crop, as torchvision
    if in_ratio < min(ratio):
        h = int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w = int(round(height * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=16)
def rand_augment_hparams(recipe: AugRecipe) -> dict:
    return {"translate_const": int(recipe.input_size * 0.45),
            "img_mean": tuple(min(255, round(255 * x)) for x in recipe.mean)}


def rand_augment_ops(rng: np.random.Generator, recipe: AugRecipe) -> tuple[tuple[str, tuple], ...]:
    """timm RandAugment (RandAugment.__call__ / AugmentOp.__call__) with explicit draws: the ops
    that apply, each with the args timm's op takes (`NAME_TO_OP[name](img, *args, ...)`)."""
    cfg = parse_rand_augment(recipe.rand_augment)     # cached: parsed once per config
    hparams = rand_augment_hparams(recipe)
    ops = []
    for index in rng.choice(len(cfg["ops"]), cfg["num_layers"], replace=True):
        name = cfg["ops"][index]
        # A fixed number of draws per op keeps the stream aligned whatever is applied.
        gate, noise, sign_draw = rng.random(), rng.standard_normal(), rng.random()
        if cfg["prob"] < 1.0 and gate > cfg["prob"]:
            continue
        magnitude = cfg["magnitude"]
        if cfg["mstd"] == float("inf"):
            magnitude = rng.uniform(0, magnitude)
        elif cfg["mstd"] > 0:
            magnitude = magnitude + cfg["mstd"] * noise
        magnitude = max(0.0, min(magnitude, cfg["mmax"]))
        sign = -1.0 if sign_draw > 0.5 else 1.0
        if name in SIGNED_LEVEL:
            # timm's level functions for these negate with the global RNG; same maths, our sign.
            args = (sign * SIGNED_LEVEL[name](magnitude / 10.0, hparams),)
        elif name in _SIGNED_ENHANCE_OPS:   # _enhance_increasing_level_to_arg
            args = (max(0.1, 1.0 + sign * (magnitude / 10.0) * 0.9),)
        else:
            level_fn = LEVEL_TO_ARG[name]
            args = tuple(level_fn(magnitude, hparams)) if level_fn is not None else ()
        ops.append((name, args))
    return tuple(ops)


def erasing_params(rng: np.random.Generator, recipe: AugRecipe) -> tuple[int, int, int, int, int]:
    """timm RandomErasing(mode='pixel', count=1) maths -> (top, left, h, w, noise-bank offset);
    h=0: none. The fill is not drawn: it is noise_bank[offset : offset + 3*h*w] (finishing)."""
    if rng.random() > recipe.reprob:
        return NO_ERASING
    height = width = recipe.input_size
    area = height * width
    log_aspect = (math.log(recipe.re_aspect), math.log(1 / recipe.re_aspect))
    for _ in range(10):
        target_area = rng.uniform(recipe.re_area[0], recipe.re_area[1]) * area
        aspect_ratio = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            needed = 3 * h * w
            if needed > NOISE_BANK_SIZE:
                raise ValueError(f"random erasing of {h}x{w} pixels needs more than the noise "
                                 f"bank's {NOISE_BANK_SIZE} values; lower input_size or re_area")
            return (top, left, h, w, int(rng.integers(0, NOISE_BANK_SIZE - needed + 1)))
    return NO_ERASING
