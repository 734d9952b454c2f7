"""The augmentation recipe: `AugRecipe` (every parameter, checked), its fingerprint (recipe,
pixel library versions, replay algorithm) and the RandAugment config string it names."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import PIL
import timm
import torch
import torchvision
from PIL import Image
from timm.data.auto_augment import rand_augment_choices
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode

from .hashing import text_sha256

# Bump when the parameter maths or the draw order changes: old caches must stop matching. What
# each version changed is named when a cache of an older version is refused.
REPLAY_ALGORITHM_VERSION = 3
REPLAY_ALGORITHM_CHANGES = {
    2: "uint8 items finished on the device, noise-bank erasing fill, draft decoding",
    3: "finishing changed: exact normalisation by a per-channel table, the same bits on any device"
       "; DeiT's pixels by default: no draft decoding, crop then resize as timm (fast recipe: "
       "decode_draft); the seeds of a pairing group mix each image with different partners",
}

INTERPOLATION = {"bicubic": (InterpolationMode.BICUBIC, Image.Resampling.BICUBIC),
                 "bilinear": (InterpolationMode.BILINEAR, Image.Resampling.BILINEAR)}
_RESIZE_BACKENDS = ("pil", "torch")
# Fields added later: left out of to_dict (manifests, checkpoints, the fingerprint) while at
# their default, so existing recipes keep their fingerprint.
LATER_FIELD_DEFAULTS = {"resize_backend": "pil", "rand_augment_interpolation": None}
# Values in the erasing noise bank (finishing.noise_bank); erasing draws offsets into it.
NOISE_BANK_SIZE = 1 << 21
RESIZE_KERNEL_KEY = "torch_cpu_kernel"


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
    eval_crop_pct: float = 224 / 256              # eval: resize to size/crop_pct, centre crop
    decode_draft: bool = False     # JPEG DCT-scaled decoding where the crop allows (not timm's)
    pairing_seeds: int = 3         # seeds g*P..g*P+P-1 share one mixing order (partners 1..P ahead)
    resize_backend: str = "pil"    # "pil" (timm's, portable bytes) or "torch" (uint8, ~2.5x faster)
    rand_augment_interpolation: str | None = None  # RandAugment's affine ops; None: interpolation

    def __post_init__(self):
        # Numbers normalised: (0.35, 1) and (0.35, 1.0) are the same recipe (and fingerprint).
        for name in self.__dataclass_fields__:
            object.__setattr__(self, name, self.check_field(name, getattr(self, name)))
        if self.rand_augment_interpolation == self.interpolation:   # same pixels, same fingerprint
            object.__setattr__(self, "rand_augment_interpolation", None)
        _check_erasing_fits_noise_bank(self)

    @classmethod
    def check_field(cls, name: str, value):
        """`value` of field `name`, normalised; ValueError naming the field and its form."""
        if name not in cls.__dataclass_fields__:
            raise ValueError(f"unknown recipe field {name!r}; the fields are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        form, in_range = RECIPE_FIELD_FORMS[name]
        try:
            value = _typed_field(name, value, cls.__dataclass_fields__[name].default)
            if value is not None and in_range is not None and not in_range(value):
                raise ValueError
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"recipe field {name} expects {form}, got {shown!r}{detail}") from None
        return value

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(asdict(self)))
        return {k: v for k, v in d.items()
                if k not in LATER_FIELD_DEFAULTS or v != LATER_FIELD_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "AugRecipe":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @functools.lru_cache(maxsize=64)     # asked for every sample replayed
    def fingerprint(self) -> str:
        return fingerprint_of(self.to_dict(), pixel_library_versions(self),
                              REPLAY_ALGORITHM_VERSION)


def _probability(v: float) -> bool:
    return 0.0 <= v <= 1.0


PROBABILITY = "a probability in [0, 1]"
# Each field's expected form (shown in messages) and its range check; the type is the default's.
RECIPE_FIELD_FORMS = {
    "input_size": ("a whole number >= 1, like 224", lambda v: v >= 1),
    "scale": ("two numbers 0 < low <= high <= 1, like [0.08, 1]", lambda v: 0 < v[0] <= v[1] <= 1),
    "ratio": ("two numbers 0 < low <= high, like [0.75, 1.3333]", lambda v: 0 < v[0] <= v[1]),
    "interpolation": (f"one of {', '.join(map(repr, INTERPOLATION))}",
                      lambda v: v in INTERPOLATION),
    "hflip": (f"{PROBABILITY}, like 0.5", _probability),
    "rand_augment": ("null or a timm RandAugment string, like 'rand-m9-mstd0.5-inc1'",
                     lambda v: bool(parse_rand_augment(v))),     # or its ValueError, saying why
    "mean": ("three numbers, like [0.485, 0.456, 0.406]", None),
    "std": ("three numbers > 0, like [0.229, 0.224, 0.225]", lambda v: min(v) > 0),
    "reprob": (f"{PROBABILITY}, like 0.25", _probability),
    "re_area": ("two numbers 0 <= low <= high <= 1, like [0.02, 0.3333]",
                lambda v: 0 <= v[0] <= v[1] <= 1),
    "re_aspect": ("a number in (0, 1], like 0.3 (erased boxes' aspect ratios lie between it and "
                  "its inverse)", lambda v: 0 < v <= 1),
    "mixup_alpha": ("a number >= 0 (0: no Mixup), like 0.8", lambda v: v >= 0),
    "cutmix_alpha": ("a number >= 0 (0: no CutMix), like 1.0", lambda v: v >= 0),
    "mix_prob": (f"{PROBABILITY}, like 1.0", _probability),
    "switch_prob": (f"{PROBABILITY}, like 0.5", _probability),
    "smoothing": (f"{PROBABILITY}, like 0.1", _probability),
    "eval_crop_pct": ("a number in (0, 1], like 0.875", lambda v: 0 < v <= 1),
    "decode_draft": ("true or false", None),
    "pairing_seeds": ("a whole number >= 1, like 3", lambda v: v >= 1),
    "resize_backend": (f"one of {', '.join(map(repr, _RESIZE_BACKENDS))}",
                       lambda v: v in _RESIZE_BACKENDS),
    "rand_augment_interpolation": (f"null or one of {', '.join(map(repr, INTERPOLATION))}",
                                   lambda v: v in INTERPOLATION),
}
_NULLABLE_FIELDS = {"rand_augment", "rand_augment_interpolation"}


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    return float(value)


def _typed_field(name: str, value, default):
    """`value` as the type of the field's default; ValueError (no message) when not of that form."""
    if name in _NULLABLE_FIELDS and value in (None, ""):
        return None
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):   # kept as given: 0 and False have
            return value                                        # kept their own fingerprints
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
    if not isinstance(value, str):      # str fields, and the nullable ones given a value
        raise ValueError
    return value


def _check_erasing_fits_noise_bank(recipe: AugRecipe) -> None:
    """Refuse, before any work, a recipe whose largest erased box (input_size² · re_area[1], sides
    rounded) could need more than the NOISE_BANK_SIZE values erasing fills from."""
    if recipe.reprob <= 0:
        return
    area = recipe.re_area[1] * recipe.input_size ** 2
    # h·w <= (sqrt(area·a) + ½)(sqrt(area/a) + ½) over aspect ratios a in [re_aspect, 1/re_aspect]
    aspect = math.sqrt(recipe.re_aspect)
    largest = area + 0.5 * math.sqrt(area) * (aspect + 1 / aspect) + 0.25
    if 3 * largest > NOISE_BANK_SIZE:
        raise ValueError(f"recipe fields input_size {recipe.input_size} and re_area [{recipe.re_area[0]:g}"
                         f", {recipe.re_area[1]:g}]: erased boxes of up to {int(largest)} pixels (3 "
                         f"values each) need more than the {NOISE_BANK_SIZE} values of the erasing "
                         "noise bank; lower re_area's upper bound or input_size, or set reprob 0")


@functools.lru_cache(maxsize=16)
def parse_rand_augment(config: str) -> dict:
    """timm's RandAugment config string -> {ops, num_layers, prob, magnitude, mstd, mmax}."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand-', got {config!r}")
    out = {"num_layers": 2, "prob": 0.5, "magnitude": 10.0, "mstd": 0.0, "mmax": 10.0,
           "increasing": False}
    sections = (("mstd", "mstd", float), ("mmax", "mmax", float),
                ("inc", "increasing", lambda v: bool(int(v))), ("m", "magnitude", float),
                ("n", "num_layers", int), ("p", "prob", float))
    for part in parts[1:]:
        for name, key, conv in sections:
            if part.startswith(name) and part[len(name):][:1].isdigit():
                out[key] = conv(part[len(name):])
                break
        else:
            raise ValueError(f"unsupported RandAugment section {part!r} in {config!r}")
    if out["mstd"] > 100:
        out["mstd"] = float("inf")
    out["ops"] = list(rand_augment_choices("default", increasing=out["increasing"]))
    return out


def torch_resize_kernel_class() -> str:
    """Which of torch's uint8 antialiased resize kernels runs here: the AVX2 one (also at AVX512)
    or the generic one, reported to differ in bytes (kept apart to be safe)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return "vectorised" if capability in ("avx2", "avx512") else capability


def pixel_library_versions(recipe: AugRecipe | None = None) -> dict[str, str]:
    """Versions of the libraries that decide the augmented pixels (+ torch's CPU kernel class)."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}
    if recipe is not None and recipe.resize_backend == "torch":
        versions[RESIZE_KERNEL_KEY] = torch_resize_kernel_class()
    return versions


def fingerprint_of(recipe: dict, libraries: dict, algorithm: int) -> str:
    """The fingerprint of a recipe dict under these pixel libraries and replay algorithm (also
    how the algorithm of a manifest that does not record it is found)."""
    blob = {"recipe": recipe, "libraries": libraries, "algorithm": algorithm}
    return text_sha256(json.dumps(blob, sort_keys=True))
