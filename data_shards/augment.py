"""DeiT's training augmentation, replayable bit-exactly from (recipe, sample key, aug seed).

Why not timm's transforms as they are: they draw from the global Python / NumPy / torch
RNGs (Python random, NumPy, torch), so the image depends on worker count, order and process.
Here every random choice is drawn from ONE explicit generator

    rng(recipe fingerprint, "sample", key, aug_seed)        (NumPy PCG64, seeded by sha256)

and the image operations themselves are timm's (RandAugment ops) and torchvision's
(resized_crop, horizontal_flip, normalize, erase), applied with those explicit parameters.
The parameter maths mirrors timm / torchvision line by line (cited at each step).

Mixup / CutMix replay rule (documented contract shared by stage one and stage two):
  * Partners are drawn within one shard. For aug seed s, the shard's samples are put in a
    seeded random cyclic order: perm = rng(fp, "pairing", shard_id, s).permutation(n),
    shard_id = sha256 of the shard's keys in shard order. The partner of perm[k] is
    perm[(k + 1) % n]: every sample is mixed once as the primary and once as a partner.
  * Both images are the samples' own augmentations under the same seed s.
  * Whether to mix, mixup vs cutmix, λ and the CutMix box come from
    rng(fp, "mix", key, partner_key, s), following timm's Mixup._params_per_batch and
    cutmix_bbox_and_lam (with λ corrected to the box area).
  * The target is λ·smooth(y_key) + (1-λ)·smooth(y_partner) (timm's mixup_target maths).
So the mixed image of (key, s) depends only on the recipe, the shard contents and s.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Iterator, Sequence

import numpy as np
import PIL
import timm
import torch
import torchvision
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, rand_augment_choices
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import one_hot
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# Bump when the parameter maths or the draw order changes: old caches must stop matching.
REPLAY_ALGORITHM_VERSION = 1

_INTERPOLATION = {"bicubic": (InterpolationMode.BICUBIC, Image.Resampling.BICUBIC),
                  "bilinear": (InterpolationMode.BILINEAR, Image.Resampling.BILINEAR)}
# RandAugment ops whose timm level function flips the sign at random with the global RNG;
# we take the magnitude from timm and draw the sign from our own generator.
_SIGNED_LEVEL = {  # unsigned part of timm's _rotate/_shear/_translate_*_level_to_arg (level in [0, 1])
    "Rotate": lambda level, hp: level * 30.0,
    "ShearX": lambda level, hp: level * 0.3,
    "ShearY": lambda level, hp: level * 0.3,
    "TranslateX": lambda level, hp: level * float(hp["translate_const"]),
    "TranslateY": lambda level, hp: level * float(hp["translate_const"]),
    "TranslateXRel": lambda level, hp: level * hp.get("translate_pct", 0.45),
    "TranslateYRel": lambda level, hp: level * hp.get("translate_pct", 0.45),
}
_SIGNED_ENHANCE_OPS = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


@dataclass(frozen=True)
class AugRecipe:
    """Every parameter of the training / evaluation augmentation. Defaults are DeiT's."""
    input_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"   # None or "" turns it off
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    reprob: float = 0.25                                 # RandomErasing probability ("pixel" mode)
    re_area: tuple[float, float] = (0.02, 1 / 3)
    re_aspect: float = 0.3
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    eval_crop_pct: float = 224 / 256                     # eval: resize to size/crop_pct, centre crop

    def __post_init__(self):
        # Normalise numbers so that (0.35, 1) and (0.35, 1.0) are the same recipe (same fingerprint).
        for f in self.__dataclass_fields__.values():
            value = getattr(self, f.name)
            if isinstance(f.default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif isinstance(f.default, tuple) and isinstance(value, (tuple, list)):
                object.__setattr__(self, f.name, tuple(float(v) for v in value))
        if self.rand_augment == "":
            object.__setattr__(self, "rand_augment", None)
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")
        for name in ("hflip", "reprob", "mix_prob", "switch_prob", "smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"recipe {name} must be in [0, 1], got {value}")
        if self.input_size < 1:
            raise ValueError(f"recipe input_size must be >= 1, got {self.input_size}")
        if self.rand_augment:
            parse_rand_augment(self.rand_augment)

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "AugRecipe":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def with_overrides(self, **changes) -> "AugRecipe":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def fingerprint(self) -> str:
        return recipe_fingerprint(self)


def pixel_library_versions() -> dict[str, str]:
    """Versions of the libraries whose code decides the augmented pixels."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def recipe_fingerprint(recipe: AugRecipe) -> str:
    blob = json.dumps({"recipe": recipe.to_dict(), "libraries": pixel_library_versions(),
                       "algorithm": REPLAY_ALGORITHM_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def make_rng(fingerprint: str, *parts: object) -> np.random.Generator:
    """One explicit generator per purpose, seeded from sha256(fingerprint | parts)."""
    text = "|".join([fingerprint, *map(str, parts)])
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "little")
    return np.random.Generator(np.random.PCG64(seed))


# ----------------------------------------------------------------------------- decoding

def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> 8-bit RGB PIL image (CMYK, palette, 16-bit and alpha handled)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


# ----------------------------------------------------------------------------- one sample

def parse_rand_augment(config: str) -> dict:
    """timm's RandAugment config string -> {ops, num_layers, prob, magnitude, mstd, mmax}."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand-', got {config!r}")
    out = {"num_layers": 2, "prob": 0.5, "magnitude": 10.0, "mstd": 0.0, "mmax": 10.0, "increasing": False}
    for part in parts[1:]:
        for name, key, conv in (("mstd", "mstd", float), ("mmax", "mmax", float), ("inc", "increasing", lambda v: bool(int(v))),
                                ("m", "magnitude", float), ("n", "num_layers", int), ("p", "prob", float)):
            if part.startswith(name) and part[len(name):][:1].isdigit():
                out[key] = conv(part[len(name):])
                break
        else:
            raise ValueError(f"unsupported RandAugment section {part!r} in {config!r}")
    if out["mstd"] > 100:
        out["mstd"] = float("inf")
    out["ops"] = list(rand_augment_choices("default", increasing=out["increasing"]))
    return out


def _rrc_params(rng: np.random.Generator, height: int, width: int,
                scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
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
    in_ratio = width / height  # fallback: central crop, as torchvision
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _rand_augment(img: Image.Image, rng: np.random.Generator, recipe: AugRecipe) -> Image.Image:
    """timm RandAugment (AugmentOp.__call__ / RandAugment.__call__) with explicit draws."""
    cfg = parse_rand_augment(recipe.rand_augment)
    hparams = {"translate_const": int(recipe.input_size * 0.45),
               "img_mean": tuple(min(255, round(255 * x)) for x in recipe.mean)}
    resample = _INTERPOLATION[recipe.interpolation][1]
    chosen = rng.choice(len(cfg["ops"]), cfg["num_layers"], replace=True)
    for index in chosen:
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
        if name in _SIGNED_LEVEL:
            # timm's level functions for these negate with the global RNG; same maths, our sign.
            args = (sign * _SIGNED_LEVEL[name](magnitude / 10.0, hparams),)
        elif name in _SIGNED_ENHANCE_OPS:
            args = (max(0.1, 1.0 + sign * (magnitude / 10.0) * 0.9),)  # _enhance_increasing_level_to_arg
        else:
            level_fn = LEVEL_TO_ARG[name]
            args = tuple(level_fn(magnitude, hparams)) if level_fn is not None else ()
        if name.startswith("Posterize") and args[0] <= 0:
            # Pillow >= 12 refuses 0 bits; older Pillow (which timm targets) gave a black image.
            img = Image.new(img.mode, img.size)
            continue
        img = NAME_TO_OP[name](img, *args, fillcolor=hparams["img_mean"], resample=resample)
    return img


def _random_erasing(x: torch.Tensor, rng: np.random.Generator, recipe: AugRecipe) -> torch.Tensor:
    """timm RandomErasing(mode='pixel', count=1) maths, fill drawn from `rng`."""
    if rng.random() > recipe.reprob:
        return x
    channels, height, width = x.shape
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
            fill = torch.from_numpy(rng.standard_normal((channels, h, w), dtype=np.float32))
            return TF.erase(x, top, left, h, w, fill)
    return x


def to_normalized_tensor(img: Image.Image, recipe: AugRecipe) -> torch.Tensor:
    x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
    return TF.normalize(x, list(recipe.mean), list(recipe.std))


def augment_image(img: Image.Image, key: str, aug_seed: int, recipe: AugRecipe,
                  fingerprint: str | None = None) -> torch.Tensor:
    """The (unmixed) training augmentation of one decoded image: float32 CHW, normalised."""
    rng = make_rng(fingerprint or recipe.fingerprint(), "sample", key, int(aug_seed))
    i, j, h, w = _rrc_params(rng, img.height, img.width, recipe.scale, recipe.ratio)
    size = [recipe.input_size, recipe.input_size]
    img = TF.resized_crop(img, i, j, h, w, size, interpolation=_INTERPOLATION[recipe.interpolation][0],
                          antialias=True)
    if rng.random() < recipe.hflip:
        img = TF.horizontal_flip(img)
    if recipe.rand_augment:
        img = _rand_augment(img, rng, recipe)
    x = to_normalized_tensor(img, recipe)
    if recipe.reprob > 0:
        x = _random_erasing(x, rng, recipe)
    return x


def augment_seeds(data: bytes, key: str, aug_seeds: Iterable[int], recipe: AugRecipe) -> list[torch.Tensor]:
    """Decode once, augment for every seed (stage one avoids decoding per seed)."""
    img = decode_image(data)
    fingerprint = recipe.fingerprint()
    return [augment_image(img, key, s, recipe, fingerprint) for s in aug_seeds]


def eval_image(img: Image.Image, recipe: AugRecipe) -> torch.Tensor:
    """Evaluation transform: resize shorter side to size/crop_pct (bicubic), centre crop, normalise."""
    resize = int(math.floor(recipe.input_size / recipe.eval_crop_pct))
    img = TF.resize(img, [resize], interpolation=_INTERPOLATION[recipe.interpolation][0], antialias=True)
    img = TF.center_crop(img, [recipe.input_size, recipe.input_size])
    return to_normalized_tensor(img, recipe)


# ----------------------------------------------------------------------------- mixing

@dataclass(frozen=True)
class MixParams:
    lam: float                 # weight of the primary sample's label (box-corrected for CutMix)
    use_cutmix: bool
    box: tuple[int, int, int, int] | None = None   # (y_low, y_high, x_low, x_high) pasted from the partner


def shard_id(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def mixing_order(keys: Sequence[str], aug_seed: int, recipe: AugRecipe, fingerprint: str | None = None) -> list[int]:
    """Seeded cyclic order of a shard: sample order[k] is mixed with order[(k+1) % n]."""
    rng = make_rng(fingerprint or recipe.fingerprint(), "pairing", shard_id(keys), int(aug_seed))
    return [int(i) for i in rng.permutation(len(keys))]


def mix_params(key: str, partner_key: str, aug_seed: int, recipe: AugRecipe, fingerprint: str | None = None) -> MixParams:
    """timm Mixup._params_per_batch + cutmix_bbox_and_lam, drawn from the pair's generator."""
    if not recipe.mixing or key == partner_key:
        return MixParams(1.0, False)
    rng = make_rng(fingerprint or recipe.fingerprint(), "mix", key, partner_key, int(aug_seed))
    if rng.random() >= recipe.mix_prob:
        return MixParams(1.0, False)
    if recipe.mixup_alpha > 0 and recipe.cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < recipe.switch_prob)
        lam = rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha) if use_cutmix else rng.beta(recipe.mixup_alpha, recipe.mixup_alpha)
    elif recipe.mixup_alpha > 0:
        use_cutmix, lam = False, rng.beta(recipe.mixup_alpha, recipe.mixup_alpha)
    else:
        use_cutmix, lam = True, rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha)
    lam = float(lam)
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


def apply_mix(x: torch.Tensor, partner: torch.Tensor, params: MixParams) -> torch.Tensor:
    if params.use_cutmix:
        yl, yh, xl, xh = params.box
        out = x.clone()
        out[:, yl:yh, xl:xh] = partner[:, yl:yh, xl:xh]
        return out
    if params.lam == 1.0:
        return x
    return x * params.lam + partner * (1.0 - params.lam)


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                  num_classes: int, smoothing: float) -> torch.Tensor:
    """λ·smooth(y) + (1-λ)·smooth(y_partner), timm's mixup_target maths per sample."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(labels, num_classes, on_value=on_value, off_value=off_value)
    y2 = one_hot(partner_labels, num_classes, on_value=on_value, off_value=off_value)
    lam = lam.to(torch.float32).view(-1, 1)
    return y1 * lam + y2 * (1.0 - lam)


# ----------------------------------------------------------------------------- a shard

@dataclass
class ReplayedSample:
    key: str
    label: int
    partner_key: str
    partner_label: int
    lam: float
    image: torch.Tensor = field(repr=False)   # mixed, augmented, normalised float32 CHW
    shard: int = -1
    position: int = -1
    aug_seed: int = -1


def replay_shard(samples: Sequence, aug_seed: int, recipe: AugRecipe,
                 decoded: dict[str, Image.Image] | None = None) -> Iterator[ReplayedSample]:
    """Yield every sample of one shard, augmented and mixed for `aug_seed`, in mixing order.

    `samples` are ShardSample-like (key, label, data, shard, position) in shard order.
    `decoded` may hold already-decoded images by key (decode once for many seeds).
    Each sample is augmented exactly once; the first one is kept to close the cycle.
    The result does not depend on the order of `samples` (they are sorted by position).
    """
    samples = sorted(samples, key=lambda s: (s.position, s.key))
    n = len(samples)
    if n == 0:
        return
    fingerprint = recipe.fingerprint()
    keys = [s.key for s in samples]
    order = mixing_order(keys, aug_seed, recipe, fingerprint) if recipe.mixing else list(range(n))

    def augmented(index: int) -> torch.Tensor:
        sample = samples[index]
        img = decoded[sample.key] if decoded is not None else decode_image(sample.data)
        return augment_image(img, sample.key, aug_seed, recipe, fingerprint)

    if not recipe.mixing:
        for index in order:
            sample = samples[index]
            yield ReplayedSample(sample.key, sample.label, sample.key, sample.label, 1.0, augmented(index),
                                 sample.shard, sample.position, int(aug_seed))
        return
    first = current = augmented(order[0])
    for k in range(n):
        primary, partner = samples[order[k]], samples[order[(k + 1) % n]]
        if n == 1:
            nxt = current
        elif k + 1 < n:
            nxt = augmented(order[k + 1])
        else:
            nxt = first
        params = mix_params(primary.key, partner.key, aug_seed, recipe, fingerprint)
        yield ReplayedSample(primary.key, primary.label, partner.key, partner.label, params.lam,
                             apply_mix(current, nxt, params), primary.shard, primary.position, int(aug_seed))
        current = nxt


def tensor_digest(x: torch.Tensor) -> str:
    """A hash of a tensor's exact bytes, shape and dtype (compared across stages)."""
    t = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode("ascii"))
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]
