"""RandAugment's ten colour ops on a batch of uint8 images on any device, bit-identical to timm's.

timm's ops (timm/data/auto_augment.py) are Pillow calls on one RGB image; each function here
takes a batch `images` (N, 3, H, W) uint8 and `args` (N, k) float64, row i holding the positional
arguments data_shards/parameters.py `rand_augment_ops` draws for `NAME_TO_OP[name]`, sample i, and
replays Pillow 13.0.0's arithmetic (src/PIL/ImageOps.py, ImageEnhance.py, ImageStat.py;
src/libImaging/Blend.c, Convert.c, Filter.c) with explicit parameters, because exact replay needs
the same bytes as the CPU recipe:

  - LUT ops (AutoContrast, Equalize): integer histograms / min-max per image and channel, the
    LUT built with Pillow's integer (Equalize) or double (AutoContrast) operations in the same
    order, clipped to 0..255 as Image.point does, applied with one gather;
  - Invert, Posterize, Solarize, SolarizeAdd: their LUTs are closed forms on integers;
  - Color, Contrast, Brightness, Sharpness: Image.blend(degenerate, image, factor), i.e.
    `(UINT8)(in1 + (float)factor * (in2 - in1))` in float32 (mul, then add: two roundings), both
    branches' clipping; the degenerate images are the ITU-R 601 fixed-point luma of
    convert("L"), the rounded mean of that luma (exact integer sum, then int / int + 0.5 in
    double), black, and the SMOOTH 3x3 filter in float32 with Pillow's tap order, +0.5 offset,
    clamp-then-truncate and its border rule (outer rows and columns, and images under 3x3, kept).

Exactness: every reduction is an integer one (histograms by scatter_add, sums, min, max) and
every float op is elementwise in the dtype Pillow uses, so a sample's bytes do not depend on the
batch, and CUDA's IEEE float32/float64 mul, add and div give the CPU's bytes (no fused ops, no
`python_float / tensor`). tests/test_device_colour.py checks bit-identity with timm's ops (Pillow
13.0.0) over every argument value the recipe can reach (bits, thresholds, added values all;
factors 0.1..1.9 on a grid and as parameters.py draws them) on the digits and the sklearn photos at
several sizes: no difference, so no bound to state. Caveats: Pillow's own float code could round
differently on a build that fuses multiply-adds (aarch64 GCC contracts by default); the x86-64
wheel does not. Bits and added values are truncated to integers (timm's level functions give
integers); thresholds are exact for any real value.

Speed: a fixed number of kernels per op and batch (1 to about 30, bench/bench_device_colour.py)
and no host-device sync once args are on the images' device (CPU args are copied per call, which
torch synchronises). On the CPU the batch runs in chunks of about CPU_CHUNK_VALUES values.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

# ITU-R 601-2 luma in 16-bit fixed point, as Convert.c's L24 (rgb2l).
_LUMA_WEIGHTS = (19595, 38470, 7471)
# ImageFilter.SMOOTH: kernel (1 1 1 / 1 5 1 / 1 1 1) / 13, divided in float32 (_imaging.c _filter).
_SMOOTH_SIDE = float(np.float32(1) / np.float32(13))
_SMOOTH_CENTRE = float(np.float32(5) / np.float32(13))
# On the CPU an op runs on chunks of images of about this many values, so that its float32
# temporaries stay in cache (2-5x faster here than whole-batch passes through memory); the bytes
# are the same, as every op is per sample. On other devices the whole batch is one call.
CPU_CHUNK_VALUES = 1 << 17

ColourOp = Callable[..., torch.Tensor]


def _check(images: torch.Tensor, args: torch.Tensor | None, nargs: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        got = (f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f"colour ops take images as an (N, 3, H, W) uint8 tensor, got {got}")
    if nargs and (args is None or args.dim() != 2 or args.shape[0] != images.shape[0]
                  or args.shape[1] < nargs):
        got = None if args is None else tuple(args.shape)
        raise ValueError(f"this colour op needs args of shape ({images.shape[0]}, >={nargs}), "
                         f"one row per image, got {got}")


def _colour_op(nargs: int) -> Callable[[ColourOp], ColourOp]:
    """The contract's signature op(images, args, fill, resample) (fill and resample unused by
    colour ops), input checks, and the CPU chunking (see CPU_CHUNK_VALUES)."""
    def wrap(op: ColourOp) -> ColourOp:
        @functools.wraps(op)
        def apply(images: torch.Tensor, args: torch.Tensor | None = None, fill=None,
                  resample=None) -> torch.Tensor:
            _check(images, args, nargs)
            n, c, h, w = images.shape
            step = max(1, CPU_CHUNK_VALUES // max(1, c * h * w))
            if images.device.type != "cpu" or n <= step:
                return op(images, args)
            return torch.cat([op(images[i:i + step], None if args is None else args[i:i + step])
                              for i in range(0, n, step)])
        return apply
    return wrap


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(N,) parameters (prepared on the args' device) -> (N, 1, 1, 1) on the images' device."""
    return values.to(images.device).view(-1, 1, 1, 1)


def _values(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H*W) int64: the pixel values as indices into per-image, per-channel tables."""
    n, c, h, w = images.shape
    return images.reshape(n, c, h * w).long()


def _apply_luts(images: torch.Tensor, luts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """images[n, c] mapped through luts[n, c] ((N, 3, 256) uint8): one gather."""
    return luts.gather(2, values).view(images.shape)


def _histograms(values: torch.Tensor) -> torch.Tensor:
    """(N, 3, 256) int64 pixel counts per image and channel (Image.histogram), exact."""
    counts = values.new_zeros(values.shape[0], values.shape[1], 256)
    ones = values.new_ones(1, 1, 1).expand(values.shape)
    return counts.scatter_add_(2, values, ones)


# ----------------------------------------------------------------------------- LUT ops

@_colour_op(nargs=0)
def auto_contrast(images: torch.Tensor, args: torch.Tensor | None) -> torch.Tensor:
    """ImageOps.autocontrast(img): per channel lo..hi to 0..255, lut = int(ix * scale + offset)."""
    n, c = images.shape[:2]
    lo, hi = images.reshape(n, c, -1).aminmax(dim=2)
    lo, hi = lo.double(), hi.double()
    ramp = torch.arange(256, dtype=torch.float64, device=images.device)
    span = (hi - lo).clamp_min(1.0)
    scale = torch.div(torch.full_like(span, 255.0), span)     # tensor / tensor: a true division
    offset = -lo * scale
    lut = torch.trunc(ramp * scale[..., None] + offset[..., None]).clamp_(0, 255)
    lut = torch.where((hi <= lo)[..., None], ramp, lut)      # one value: "don't bother"
    return _apply_luts(images, lut.to(torch.uint8), _values(images))


@_colour_op(nargs=0)
def equalize(images: torch.Tensor, args: torch.Tensor | None) -> torch.Tensor:
    """ImageOps.equalize(img): lut[i] = (step // 2 + #pixels below i) // step, all integers."""
    values = _values(images)
    counts = _histograms(values)
    present = counts > 0
    bins = torch.arange(256, device=images.device)
    last_bin = torch.where(present, bins, 0).amax(dim=2, keepdim=True)
    step = (counts.sum(dim=2, keepdim=True) - counts.gather(2, last_bin)) // 255
    below = counts.cumsum(dim=2) - counts
    lut = (step // 2 + below) // step.clamp_min(1)
    identity = (present.sum(dim=2, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, bins, lut).clamp_(0, 255)    # Image.point clips (CLIP8)
    return _apply_luts(images, lut.to(torch.uint8), values)


@_colour_op(nargs=0)
def invert(images: torch.Tensor, args: torch.Tensor | None) -> torch.Tensor:
    """ImageOps.invert(img): 255 - v."""
    return torch.bitwise_not(images)


@_colour_op(nargs=1)
def posterize(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize(img, bits): v & ~(2**(8-bits) - 1); bits >= 8 keeps the image (timm),
    bits <= 0 gives black (pixels_pil.py: Pillow >= 12 refuses 0 bits, older Pillow gave black)."""
    bits = args[:, 0].to(torch.int64).clamp(0, 8)               # int(): timm's bits are ints
    mask = 256 - torch.bitwise_left_shift(torch.ones_like(bits), 8 - bits)
    return images & _per_sample(mask.to(torch.uint8), images)


def _threshold(values: torch.Tensor) -> torch.Tensor:
    """v < t for bytes v is v < ceil(t) clamped to 0..256: exact for any real t, in int16."""
    return torch.ceil(values).clamp(0, 256).to(torch.int16)


@_colour_op(nargs=1)
def solarize(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize(img, threshold): v < threshold ? v : 255 - v."""
    below = images < _per_sample(_threshold(args[:, 0]), images)
    return torch.where(below, images, torch.bitwise_not(images))


@_colour_op(nargs=1)
def solarize_add(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add(img, add, thresh=128): v < thresh ? min(255, v + add) : v (an
    optional second column is thresh)."""
    add = _per_sample(args[:, 0].to(torch.int16), images)     # int(): timm's add is an int
    threshold = args[:, 1] if args.shape[1] > 1 else torch.full_like(args[:, 0], 128.0)
    below = images < _per_sample(_threshold(threshold), images)
    return torch.where(below, (images + add).clamp_(0, 255).to(torch.uint8), images)


# ----------------------------------------------------------------------------- enhance (blend) ops

def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, images, factor) (Blend.c): in1 + (float)alpha * (in2 - in1) in
    float32, a separate multiply and add (no fused multiply-add, as the C code compiles on x86-64),
    then clipped to 0..255 and truncated, which is both of Blend.c's branches (inside [0, 1] the
    value cannot leave 0..255). `degenerate` broadcasts against `images`; factor is (N,)."""
    alpha = _per_sample(factor.to(torch.float32), images)   # _imaging.c: (float)alpha
    base = degenerate.to(torch.float32)
    blended = images.to(torch.float32).sub_(base).mul_(alpha).add_(base)
    return blended.clamp_(0, 255).to(torch.uint8)          # float -> uint8 truncates


@functools.lru_cache(maxsize=8)
def _luma_weights(device: torch.device) -> torch.Tensor:
    """Made once per device: a fresh host-to-device copy per call would wait for the stream."""
    return torch.tensor(_LUMA_WEIGHTS, dtype=torch.int32, device=device).view(1, 3, 1, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) int32: convert("L") of RGB, (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    weights = _luma_weights(images.device)
    weighted = (images.to(torch.int32) * weights).sum(dim=1, keepdim=True, dtype=torch.int32)
    return (weighted + 0x8000) >> 16


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """img.filter(ImageFilter.SMOOTH) (Filter.c ImagingFilter3x3): ss = 0.5f; ss += row below,
    this row, row above, each ((left + centre) + right) of float32 products; clamp, truncate.
    Outer rows and columns are copied; an image under 3x3 is returned unchanged."""
    h, w = images.shape[2:]
    if h < 3 or w < 3:
        return images.clone()
    pixels = images.to(torch.float32)
    side = pixels * _SMOOTH_SIDE
    centre = pixels[..., 1:-1, 1:-1] * _SMOOTH_CENTRE
    rows = (side[..., :-2] + side[..., 1:-1]).add_(side[..., 2:])            # (.., H, W-2)
    total = (rows[..., 2:, :] + 0.5).add_(
        (side[..., 1:-1, :-2] + centre).add_(side[..., 1:-1, 2:])).add_(rows[..., :-2, :])
    out = images.clone()
    out[..., 1:-1, 1:-1] = total.clamp_(0, 255).to(torch.uint8)
    return out


@_colour_op(nargs=1)
def color(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color(img).enhance(factor): blend with the image's luma (convert L, RGB)."""
    return _blend(_luma(images), images, args[:, 0])


@_colour_op(nargs=1)
def contrast(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast(img).enhance(factor): blend with int(mean luma + 0.5), the mean
    as ImageStat computes it (exact integer sum / count, one division in double)."""
    n, _, h, w = images.shape
    luma_sum = _luma(images).sum(dim=(1, 2, 3), dtype=torch.int64).double()
    count = torch.full_like(luma_sum, float(h * w))
    mean = torch.floor(torch.div(luma_sum, count) + 0.5).view(n, 1, 1, 1)
    return _blend(mean, images, args[:, 0])


@_colour_op(nargs=1)
def brightness(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness(img).enhance(factor): blend with black."""
    return _blend(images.new_zeros(1, 1, 1, 1), images, args[:, 0])


@_colour_op(nargs=1)
def sharpness(images: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness(img).enhance(factor): blend with the SMOOTH-filtered image."""
    return _blend(_smooth(images), images, args[:, 0])


# timm op name (rand-m9-mstd0.5-inc1's colour ops) -> batched op, called as op(images, args,
# fill, resample) like data_shards/device_geometry.py's GEOMETRY_OPS (fill and resample unused).
COLOUR_OPS: dict[str, ColourOp] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness,
}
