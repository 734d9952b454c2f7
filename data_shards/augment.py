"""DeiT's training augmentation, replayable bit-exactly from (recipe, sample key, aug seed).

Why not timm's transforms as they are: they draw from the global Python / NumPy / torch
RNGs (Python random, NumPy, torch), so the image depends on worker count, order and process.
Here every random choice is drawn from ONE explicit generator

    rng(recipe fingerprint, "sample", key, aug_seed)        (NumPy PCG64, seeded by sha256)

and the image operations themselves are timm's (RandAugment ops) and torchvision's
(resized_crop, horizontal_flip, erase), applied with those explicit parameters; normalisation is an
exact table lookup (`finish_images`: the same bits on every device).
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

import functools
import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Sequence

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

from .io import text_seed, text_sha256

# Bump when the parameter maths or the draw order changes: old caches must stop matching.
REPLAY_ALGORITHM_VERSION = 3
# What each version changed (named when a cache of an older version is refused).
REPLAY_ALGORITHM_CHANGES = {
    2: "uint8 items finished on the device, noise-bank erasing fill, draft decoding",
    3: "finishing changed: exact normalisation by a per-channel table, the same bits on any device",
}

_INTERPOLATION = {"bicubic": (InterpolationMode.BICUBIC, Image.Resampling.BICUBIC),
                  "bilinear": (InterpolationMode.BILINEAR, Image.Resampling.BILINEAR)}
_RESIZE_BACKENDS = ("pil", "torch")
# Fields added after caches were first written: left out of to_dict (so of manifests, checkpoints
# and the fingerprint) while at their default, so existing recipes keep their fingerprint.
LATER_FIELD_DEFAULTS = {"resize_backend": "pil", "rand_augment_interpolation": None}
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
    decode_draft: bool = True                            # JPEG DCT-scaled decoding when the crop allows it
    pairing_seeds: int = 3                               # seeds g*P..g*P+P-1 share one mixing order
    resize_backend: str = "pil"                          # crop-resize: "pil" (timm's, portable bytes) or
                                                         # "torch" (uint8 antialiased kernel, ~2.5x faster)
    rand_augment_interpolation: str | None = None        # RandAugment's affine ops; None: `interpolation`

    def __post_init__(self):
        # Every field checked for type and range (a message naming the field and its form), and numbers
        # normalised so that (0.35, 1) and (0.35, 1.0) are the same recipe (same fingerprint).
        for name in self.__dataclass_fields__:
            object.__setattr__(self, name, self.check_field(name, getattr(self, name)))
        if self.rand_augment_interpolation == self.interpolation:   # the same pixels: the same fingerprint
            object.__setattr__(self, "rand_augment_interpolation", None)
        _check_erasing_fits_noise_bank(self)

    @classmethod
    def check_field(cls, name: str, value):
        """`value` of field `name`, normalised; ValueError naming the field and the expected form."""
        if name not in cls.__dataclass_fields__:
            raise ValueError(f"unknown recipe field {name!r}; the fields are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        form, in_range = RECIPE_FIELD_FORMS.get(name, (None, None))
        default = cls.__dataclass_fields__[name].default
        try:
            value = _typed_field(name, value, default)
            if value is not None and in_range is not None and not in_range(value):
                raise ValueError
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"recipe field {name} expects {form or _form_of(default)}, got {shown!r}"
                             f"{detail}") from None
        return value

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(asdict(self)))
        return {k: v for k, v in d.items() if k not in LATER_FIELD_DEFAULTS or v != LATER_FIELD_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "AugRecipe":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def with_overrides(self, **changes) -> "AugRecipe":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @functools.lru_cache(maxsize=64)     # asked for every sample replayed
    def fingerprint(self) -> str:
        return recipe_fingerprint(self)


def _probability(v: float) -> bool:
    return 0.0 <= v <= 1.0


def _rand_augment_ok(v: str) -> bool:
    parse_rand_augment(v)          # raises ValueError with the reason
    return True


PROBABILITY = "a probability in [0, 1]"
# Each field's expected form (shown in messages) and its range check; the type comes from the default.
RECIPE_FIELD_FORMS = {
    "input_size": ("a whole number >= 1, like 224", lambda v: v >= 1),
    "scale": ("two numbers 0 < low <= high <= 1, like [0.08, 1]", lambda v: 0 < v[0] <= v[1] <= 1),
    "ratio": ("two numbers 0 < low <= high, like [0.75, 1.3333]", lambda v: 0 < v[0] <= v[1]),
    "interpolation": (f"one of {', '.join(map(repr, _INTERPOLATION))}", lambda v: v in _INTERPOLATION),
    "hflip": (f"{PROBABILITY}, like 0.5", _probability),
    "rand_augment": ("null or a timm RandAugment string, like 'rand-m9-mstd0.5-inc1'", _rand_augment_ok),
    "mean": ("three numbers, like [0.485, 0.456, 0.406]", None),
    "std": ("three numbers > 0, like [0.229, 0.224, 0.225]", lambda v: min(v) > 0),
    "reprob": (f"{PROBABILITY}, like 0.25", _probability),
    "re_area": ("two numbers 0 <= low <= high <= 1, like [0.02, 0.3333]", lambda v: 0 <= v[0] <= v[1] <= 1),
    "re_aspect": ("a number in (0, 1], like 0.3 (erased boxes' aspect ratios lie between it and its inverse)",
                  lambda v: 0 < v <= 1),
    "mixup_alpha": ("a number >= 0 (0: no Mixup), like 0.8", lambda v: v >= 0),
    "cutmix_alpha": ("a number >= 0 (0: no CutMix), like 1.0", lambda v: v >= 0),
    "mix_prob": (f"{PROBABILITY}, like 1.0", _probability),
    "switch_prob": (f"{PROBABILITY}, like 0.5", _probability),
    "smoothing": (f"{PROBABILITY}, like 0.1", _probability),
    "eval_crop_pct": ("a number in (0, 1], like 0.875", lambda v: 0 < v <= 1),
    "decode_draft": ("true or false", None),
    "pairing_seeds": ("a whole number >= 1, like 3", lambda v: v >= 1),
    "resize_backend": (f"one of {', '.join(map(repr, _RESIZE_BACKENDS))}", lambda v: v in _RESIZE_BACKENDS),
    "rand_augment_interpolation": (f"null or one of {', '.join(map(repr, _INTERPOLATION))}",
                                   lambda v: v in _INTERPOLATION),
}
_NULLABLE_FIELDS = {"rand_augment", "rand_augment_interpolation"}


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    return float(value)


def _typed_field(name: str, value, default):
    """`value` converted to the type of the field's default (float, int, bool, str, tuple of numbers);
    ValueError (empty message) when it is not of that form."""
    if name in _NULLABLE_FIELDS and value in (None, ""):
        return None
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):   # kept as given: 0 and False have kept
            return value                                        # their own fingerprints so far
        raise ValueError
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if isinstance(default, float):
        return _number(value)
    if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(default):
            raise ValueError
        return tuple(_number(v) for v in value)
    if isinstance(default, str) or name in _NULLABLE_FIELDS:
        if not isinstance(value, str):
            raise ValueError
        return value
    return value


def _form_of(default) -> str:
    """A field's expected form from its default (for fields RECIPE_FIELD_FORMS does not list)."""
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        type(default), f"{len(default)} numbers" if isinstance(default, tuple) else repr(type(default)))


def _check_erasing_fits_noise_bank(recipe: "AugRecipe") -> None:
    """Random erasing fills from a fixed bank of NOISE_BANK_SIZE values: refuse a recipe whose largest
    erased box (input_size² · re_area[1], its sides rounded) could need more, before any work starts."""
    if recipe.reprob <= 0:
        return
    area = recipe.re_area[1] * recipe.input_size ** 2
    # h·w <= (sqrt(area·a) + ½)(sqrt(area/a) + ½) over the aspect ratios a in [re_aspect, 1/re_aspect]
    largest = area + 0.5 * math.sqrt(area) * (math.sqrt(recipe.re_aspect) + 1 / math.sqrt(recipe.re_aspect)) + 0.25
    if 3 * largest > NOISE_BANK_SIZE:
        raise ValueError(f"recipe fields input_size {recipe.input_size} and re_area [{recipe.re_area[0]:g}, "
                         f"{recipe.re_area[1]:g}]: erased boxes of up to {int(largest)} pixels (3 values each) need "
                         f"more than the {NOISE_BANK_SIZE} values of the erasing noise bank; lower re_area's upper "
                         "bound or input_size, or set reprob 0")


RESIZE_KERNEL_KEY = "torch_cpu_kernel"


def torch_resize_kernel_class() -> str:
    """Which of torch's uint8 antialiased resize kernels this process runs: the AVX2 one (also run
    at AVX512) or the generic one, reported to differ in bytes (torch 2.14.1 on one AVX512 machine
    gave the same bytes for all three); kept apart, like any other class, to be safe."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return "vectorised" if capability in ("avx2", "avx512") else capability


def pixel_library_versions(recipe: AugRecipe | None = None) -> dict[str, str]:
    """Versions of the libraries whose code decides the augmented pixels (of `recipe`: with
    resize_backend "torch", also the class of torch's CPU kernels, which changes its bytes)."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                "pillow": PIL.__version__, "numpy": np.__version__}
    if recipe is not None and recipe.resize_backend == "torch":
        versions[RESIZE_KERNEL_KEY] = torch_resize_kernel_class()
    return versions


def recipe_fingerprint(recipe: AugRecipe) -> str:
    libraries = pixel_library_versions(recipe)
    return fingerprint_of(recipe.to_dict(), libraries, REPLAY_ALGORITHM_VERSION)


def fingerprint_of(recipe: dict, libraries: dict, algorithm: int) -> str:
    """The fingerprint of a recipe dict (`to_dict`) with these pixel libraries under that replay
    algorithm: also how the algorithm of a manifest that does not record it is found."""
    blob = {"recipe": recipe, "libraries": libraries, "algorithm": algorithm}
    return text_sha256(json.dumps(blob, sort_keys=True))


def make_rng(fingerprint: str, *parts: object) -> np.random.Generator:
    """One explicit generator per purpose, seeded from sha256(fingerprint | parts)."""
    return np.random.Generator(np.random.PCG64(text_seed("|".join([fingerprint, *map(str, parts)]), 16)))


# ----------------------------------------------------------------------------- decoding

def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> 8-bit RGB PIL image (CMYK, palette, 16-bit and alpha handled)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode -> 8-bit RGB (alpha composited on black)."""
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
    return img if img.mode == "RGB" else img.convert("RGB")


# ----------------------------------------------------------------------------- one sample

@functools.lru_cache(maxsize=16)
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


@functools.lru_cache(maxsize=16)
def _rand_augment_hparams(recipe: AugRecipe) -> dict:
    return {"translate_const": int(recipe.input_size * 0.45),
            "img_mean": tuple(min(255, round(255 * x)) for x in recipe.mean)}


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
    cfg = parse_rand_augment(recipe.rand_augment)     # cached: parsed once per config
    hparams = _rand_augment_hparams(recipe)
    resample = _INTERPOLATION[recipe.rand_augment_interpolation or recipe.interpolation][1]
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


def _erasing_params(rng: np.random.Generator, recipe: AugRecipe) -> tuple[int, int, int, int, int]:
    """timm RandomErasing(mode='pixel', count=1) maths -> (top, left, h, w, noise-bank offset); h=0: none.

    The per-pixel fill is not drawn here: it is NOISE_BANK[offset : offset + 3*h*w], a fixed
    bank of normal values built on whatever device finishes the image (no device RNG)."""
    if rng.random() > recipe.reprob:
        return (0, 0, 0, 0, 0)
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
                raise ValueError(f"random erasing of {h}x{w} pixels needs more than the noise bank's "
                                 f"{NOISE_BANK_SIZE} values; lower input_size or re_area")
            return (top, left, h, w, int(rng.integers(0, NOISE_BANK_SIZE - needed + 1)))
    return (0, 0, 0, 0, 0)


NOISE_BANK_SIZE = 1 << 21
_NOISE_BANKS: dict[str, torch.Tensor] = {}


def noise_bank(device: torch.device | str) -> torch.Tensor:
    """float32 N(0, 1) values from a fixed-seed NumPy generator, built once per device."""
    name = str(torch.device(device))
    if name not in _NOISE_BANKS:
        values = np.random.Generator(np.random.PCG64(20240521)).standard_normal(NOISE_BANK_SIZE, dtype=np.float32)
        _NOISE_BANKS[name] = torch.from_numpy(values).to(device)
    return _NOISE_BANKS[name]


def _open_and_crop_box(data: bytes, rng: np.random.Generator, recipe: AugRecipe):
    """Open the image, draw the crop from its full size (header only), then decode.

    With recipe.decode_draft, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling)
    when the crop stays at least input_size pixels wide and high there; the crop box is mapped
    onto the reduced image as floats and resampled from it. Returns a PIL image, or an (H, W, 3)
    uint8 array for a full-size colour JPEG (decoded by torchvision: the same bytes, faster)."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    i, j, h, w = _rrc_params(rng, height, width, recipe.scale, recipe.ratio)
    box = (float(j), float(i), float(j + w), float(i + h))
    if recipe.decode_draft and img.format == "JPEG":
        size = recipe.input_size
        drafted = img.draft(img.mode, (max(1, width * size // w), max(1, height * size // h)))
        if drafted is not None:
            scale = width / drafted[1][2]
            box = tuple(v / scale for v in box)
    if img.format == "JPEG" and img.mode == "RGB" and img.size == (width, height):
        pixels = _decode_colour_jpeg(data)
        if pixels is not None:
            return pixels, box
    img.load()
    return _to_rgb(img), box


def _decode_colour_jpeg(data: bytes) -> np.ndarray | None:
    """A colour JPEG -> (H, W, 3) uint8 by torchvision's libjpeg-turbo: byte-identical to Pillow's
    full-size decode (tested on photos), ~20% faster. None when it refuses: Pillow decides then."""
    decode_jpeg = getattr(torchvision.io, "decode_jpeg", None)
    if decode_jpeg is None:
        return None
    try:
        with warnings.catch_warnings():   # deprecated for TorchCodec since 0.29; Pillow takes over when it goes
            warnings.simplefilter("ignore", DeprecationWarning)
            chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                              mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        return None
    return chw.permute(1, 2, 0).numpy()       # decode_jpeg's CHW is a view of an HWC buffer


def _crop_resize(pixels: Image.Image | np.ndarray, box: tuple[float, ...], recipe: AugRecipe) -> Image.Image:
    """The crop box resized to input_size square, by the recipe's resize backend."""
    size = recipe.input_size
    if recipe.resize_backend == "torch":
        return Image.fromarray(_torch_crop_resize(pixels, box, size, recipe.interpolation))
    img = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels
    return img.resize((size, size), _INTERPOLATION[recipe.interpolation][1], box=box)


def _torch_crop_resize(pixels: Image.Image | np.ndarray, box: tuple[float, ...], size: int, mode: str) -> np.ndarray:
    """torch's uint8 antialiased resize of the crop (what torchvision's resize calls). It takes whole
    pixels: a draft-decoded (fractional) box is rounded, under half a reduced pixel off."""
    left, top, right, bottom = (int(round(v)) for v in box)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    if isinstance(pixels, Image.Image):    # copy out the crop only
        pixels = np.array(pixels.crop((left, top, right, bottom)))
        left, top, right, bottom = 0, 0, right - left, bottom - top
    # An NCHW view of HWC pixels has channels-last strides: torch's fast uint8 kernel, HWC output.
    crop = torch.from_numpy(pixels)[None].permute(0, 3, 1, 2)[:, :, top:bottom, left:right]
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def augment_uint8(data: bytes, key: str, aug_seed: int, recipe: AugRecipe, fingerprint: str | None = None,
                  out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int, int, int, int]]:
    """The PIL/uint8 part of the training augmentation of one image, and its erasing parameters.

    Returns the (H, W, 3) uint8 image after crop-resize, flip and RandAugment (written into
    `out` if given) and (top, left, h, w, bank offset) for `finish_images`."""
    rng = make_rng(fingerprint or recipe.fingerprint(), "sample", key, int(aug_seed))
    pixels, box = _open_and_crop_box(data, rng, recipe)
    img = _crop_resize(pixels, box, recipe)
    if rng.random() < recipe.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if recipe.rand_augment:
        img = _rand_augment(img, rng, recipe)
    erase = _erasing_params(rng, recipe) if recipe.reprob > 0 else (0, 0, 0, 0, 0)
    pixels = np.asarray(img)
    if out is None:
        return pixels, erase
    out[...] = pixels
    return out, erase


@functools.lru_cache(maxsize=16)
def normalise_table(mean: tuple, std: tuple, device: str) -> torch.Tensor:
    """(3, 256) float32: row c, column v = ((v / 255) - mean[c]) / std[c], computed on the CPU in
    float64 (NumPy, IEEE) and rounded once to float32. Built once per device (one host-to-device
    copy); the device only indexes it, so its bits cannot depend on the device's arithmetic."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = (np.asarray(v, dtype=np.float64)[:, None] for v in (mean, std))
    table = (values[None, :] - mean) / std
    return torch.from_numpy(table.astype(np.float32)).to(device)


def finish_images(images: torch.Tensor, erase: torch.Tensor, recipe: AugRecipe) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: scale, normalise, erase; on images.device.

    The same bits on every device, by construction (tested on the CPU against NumPy, op by op):
      * scale + normalise (torchvision's to_dtype(scale=True) + normalize, in one step) is a
        lookup in `normalise_table`, built on the CPU in float64 and rounded once: per channel,
        a uint8 -> int32 conversion (exact), `index_select` (a gather: copies table values) and a
        strided copy into the output. No float arithmetic runs on the device. (Why not arithmetic:
        CUDA divides a tensor by a Python scalar as a multiply by its float32 reciprocal, the CPU
        divides: up to 9.5e-7 apart, measured on an H200.)
      * erasing copies values from `noise_bank` (float32 built by NumPy on the CPU, copied).
    `erase`: an (N, 5) CPU int64 tensor of (top, left, h, w, bank offset) rows (h=0: no erasing)."""
    device = images.device
    n, height, width, _ = images.shape
    table = normalise_table(recipe.mean, recipe.std, str(device))
    x = torch.empty((n, 3, height, width), dtype=torch.float32, device=device)
    for c in range(3):
        indices = images[..., c].to(torch.int32).reshape(-1)
        x[:, c] = table[c].index_select(0, indices).view(n, height, width)
    for index, (top, left, h, w, offset) in enumerate(erase.tolist()):
        if h > 0:     # the bank is built on first use, once per device
            x[index, :, top:top + h, left:left + w] = noise_bank(device)[offset:offset + 3 * h * w].view(3, h, w)
    return x


def eval_image(img: Image.Image, recipe: AugRecipe) -> torch.Tensor:
    """Evaluation transform: resize shorter side to size/crop_pct (bicubic), centre crop, normalise."""
    resize = int(math.floor(recipe.input_size / recipe.eval_crop_pct))
    img = TF.resize(img, [resize], interpolation=_INTERPOLATION[recipe.interpolation][0], antialias=True)
    x = TF.to_dtype(TF.pil_to_tensor(TF.center_crop(img, [recipe.input_size, recipe.input_size])),
                    torch.float32, scale=True)
    return TF.normalize(x, list(recipe.mean), list(recipe.std))


# ----------------------------------------------------------------------------- mixing

@dataclass(frozen=True)
class MixParams:
    lam: float                 # weight of the primary sample's label (box-corrected for CutMix)
    use_cutmix: bool
    box: tuple[int, int, int, int] | None = None   # (y_low, y_high, x_low, x_high) pasted from the partner


def mixing_order(keys: Sequence[str], aug_seed: int, recipe: AugRecipe, fingerprint: str | None = None) -> list[int]:
    """Seeded cyclic order of a shard: sample order[k] is mixed with order[(k+1) % n].

    Seeds g*P .. g*P+P-1 (P = recipe.pairing_seeds) share one order (repeated augmentation).
    A recipe that does not mix keeps the shard order."""
    if not recipe.mixing:
        return list(range(len(keys)))
    group = int(aug_seed) // recipe.pairing_seeds
    rng = make_rng(fingerprint or recipe.fingerprint(), "pairing", text_sha256("\n".join(keys)), group)
    return [int(i) for i in rng.permutation(len(keys))]


def mixing_partners(keys: Sequence[str], aug_seed: int, recipe: AugRecipe, fingerprint: str | None = None) -> list[int]:
    """partners[i]: the position sample i is mixed with (itself when the recipe does not mix)."""
    if not recipe.mixing:
        return list(range(len(keys)))
    order = mixing_order(keys, aug_seed, recipe, fingerprint)
    successor = dict(zip(order, order[1:] + order[:1]))
    return [successor[i] for i in range(len(order))]


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


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                  num_classes: int, smoothing: float) -> torch.Tensor:
    """λ·smooth(y) + (1-λ)·smooth(y_partner), timm's mixup_target maths per sample."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(labels, num_classes, on_value=on_value, off_value=off_value)
    y2 = one_hot(partner_labels, num_classes, on_value=on_value, off_value=off_value)
    lam = lam.to(torch.float32).view(-1, 1)
    return y1 * lam + y2 * (1.0 - lam)


# ----------------------------------------------------------------------------- work items

@dataclass
class ReplayItem:
    """Samples order[start:stop] of a shard's mixing order for one seed, before finishing.

    `images` holds one more image than samples when the recipe mixes: order[stop % n], the
    last sample's partner. Everything random after the uint8 stage is in per-sample parameters
    (erasing boxes, mix weights, CutMix boxes), so `finish_item` needs no generator.
    """
    shard: int
    aug_seed: int
    start: int
    stop: int
    keys: list[str]
    partner_keys: list[str]
    positions: torch.Tensor        # (m,) int64 shard positions
    labels: torch.Tensor           # (m,) int64
    partner_labels: torch.Tensor   # (m,) int64
    lam: torch.Tensor              # (m,) float64 label weight of the primary (box-corrected)
    mix_weights: torch.Tensor      # (m, 2) float32 pixel weights of (primary, partner); (1, 0) for CutMix
    cut_boxes: torch.Tensor        # (m, 4) int64 (y_low, y_high, x_low, x_high) from the partner; zeros: none
    erase: torch.Tensor            # (m or m+1, 5) int64 (top, left, h, w, bank offset); h=0: none
    images: torch.Tensor           # (m or m+1, H, W, 3) uint8, after crop-resize, flip, RandAugment

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "ReplayItem":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously
        (a copy from pageable memory makes the host wait for the GPU: a sync per step)."""
        for name in ("images", "positions", "labels", "partner_labels", "lam", "mix_weights"):
            setattr(self, name, getattr(self, name).pin_memory())
        return self

    def nbytes(self) -> int:
        return sum(t.nbytes for t in vars(self).values() if isinstance(t, torch.Tensor))


def replay_slice(samples: Sequence, aug_seed: int, recipe: AugRecipe, start: int, stop: int,
                 keys: Sequence[str] | None = None, order: Sequence[int] | None = None) -> ReplayItem:
    """Replay samples order[start:stop] of one shard for `aug_seed` (uint8, not yet finished).

    `samples` are ShardSample-like (key, label, data, shard, position) indexed by shard position
    - either the whole shard, or a mapping/list holding at least the positions this slice needs
    (`slice_positions`). `keys` are all the shard's keys in position order (from the manifest;
    needed when `samples` is not the whole shard). Replaying (0, n) is the whole shard; any cut
    into slices gives the same finished images.
    """
    if keys is None:
        keys = [s.key for s in sorted(samples, key=lambda s: s.position)]
    n = len(keys)
    if not 0 <= start < stop <= n:
        raise ValueError(f"slice {start}:{stop} is not within a shard of {n} samples")
    fingerprint = recipe.fingerprint()
    order = mixing_order(keys, aug_seed, recipe, fingerprint) if order is None else order
    by_position = samples if isinstance(samples, dict) else {s.position: s for s in samples}
    primaries = [by_position[order[k]] for k in range(start, stop)]
    augmented = primaries + ([by_position[order[stop % n]]] if recipe.mixing else [])
    size = recipe.input_size
    images = np.empty((len(augmented), size, size, 3), dtype=np.uint8)
    erase = []
    for i, sample in enumerate(augmented):
        erase.append(augment_uint8(sample.data, sample.key, aug_seed, recipe, fingerprint, out=images[i])[1])
    m = len(primaries)
    partners = augmented[1:] if recipe.mixing else primaries
    lam, weights, boxes = [], np.zeros((m, 2), dtype=np.float32), np.zeros((m, 4), dtype=np.int64)
    for i, (primary, partner) in enumerate(zip(primaries, partners)):
        params = mix_params(primary.key, partner.key, aug_seed, recipe, fingerprint)
        lam.append(params.lam)
        if params.use_cutmix:
            weights[i] = (1.0, 0.0)
            boxes[i] = params.box
        else:
            weights[i] = (params.lam, 1.0 - params.lam)    # rounded once to float32, on the host
    return ReplayItem(
        int(primaries[0].shard), int(aug_seed), start, stop, [s.key for s in primaries],
        [s.key for s in partners], torch.tensor([s.position for s in primaries], dtype=torch.int64),
        torch.tensor([s.label for s in primaries], dtype=torch.int64),
        torch.tensor([s.label for s in partners], dtype=torch.int64), torch.tensor(lam, dtype=torch.float64),
        torch.from_numpy(weights), torch.from_numpy(boxes), torch.tensor(erase, dtype=torch.int64).view(-1, 5),
        torch.from_numpy(images))


def slice_positions(keys: Sequence[str], aug_seed: int, recipe: AugRecipe, start: int, stop: int,
                    order: Sequence[int] | None = None) -> list[int]:
    """Shard positions a slice reads: order[start:stop], and order[stop % n] (the last one's partner)
    when the recipe mixes."""
    order = mixing_order(keys, aug_seed, recipe) if order is None else order
    last = stop + 1 if recipe.mixing else stop
    return sorted({order[k % len(keys)] for k in range(start, last)})


def finish_item(item: ReplayItem, recipe: AugRecipe, device: torch.device | str | None = None) -> torch.Tensor:
    """A replay item -> its (m, 3, H, W) float32 training images, on `device` (default: where the images are).

    Normalise and erase every augmented image (`finish_images`), then mix sample k with image
    k+1 of the item: x*w0 + partner*w1 for Mixup (w = (1, 0) otherwise), then paste the CutMix
    box. The small parameter tensors stay on the host (no device syncs); only images and weights
    move. The same bits on every device, by construction; every op and why it is exact:
      * host-to-device copies of the uint8 images and the float32 weights (rounded once on the
        host by `replay_slice`): copies;
      * `finish_images`: table lookups and copies, no device arithmetic (see there);
      * the blend: two tensor-by-tensor multiplies and one tensor-tensor add, each its own
        elementwise kernel, so each result is one IEEE round-to-nearest float32 operation on any
        device (nothing to fuse into a multiply-add across kernels; add's alpha is 1, and
        a + 1*b is a + b even if a kernel contracts it). No division, no Python-scalar operand
        (CUDA turns a scalar divisor into a reciprocal multiply). Denormals are kept on CPU and
        CUDA by default; torch.set_flush_denormal(True) would break equality for tiny weights;
      * the CutMix paste: a strided copy.
    tests/test_finish_exact.py checks the values against NumPy and the ops against an allowlist.
    """
    device = torch.device(device) if device is not None else item.images.device
    images = item.images.to(device, non_blocking=True)
    x = finish_images(images, item.erase, recipe)
    m = len(item)
    if not recipe.mixing:
        return x
    weights = item.mix_weights.to(device, non_blocking=True)
    primary, partner = x[:m], x[1:m + 1]
    out = primary * weights[:, 0].view(m, 1, 1, 1) + partner * weights[:, 1].view(m, 1, 1, 1)
    for k, (yl, yh, xl, xh) in enumerate(item.cut_boxes.tolist()):
        if yh > yl and xh > xl:
            out[k, :, yl:yh, xl:xh] = partner[k, :, yl:yh, xl:xh]
    return out


def tensor_digest(x: torch.Tensor) -> str:
    """A hash of a tensor's exact bytes, shape and dtype (compared across stages)."""
    t = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode("ascii"))
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]
