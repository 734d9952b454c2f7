"""Batched geometric pixel ops on any torch device, bit-identical to the Pillow calls of the CPU
recipe (issue 19, first part): decode, timm's crop-then-resize, horizontal flip and RandAugment's
five affine ops (`GEOMETRY_OPS`), for a whole batch with per-sample parameters. The
crop-then-resize itself (Resample.c's maths) is in device_resample.py, re-exported here.

Split of the work (why: the bits must not depend on the batch, its size or its order):
  * the CPU computes each sample's small tables in float64 / Python exactly as Pillow's C does
    (resampling coefficients and their 22-bit integer weights; affine matrices);
  * the device does gathers, integer multiply-sums (exact in any order) and, for the affine
    ops, Pillow's float64 interpolation as separate elementwise ops in Pillow's operation order
    (no fused multiply-add, no float reduction).
A sample's output therefore depends only on its own pixels and parameters. Exactness against
Pillow 13.0.0 on x86-64 is tested (tests/test_device_geometry.py): decode (CPU), resized_crop,
hflip and all five affine ops, both filters, are bit-identical on the CPU, no bound needed.
Not testable here: CUDA (the same ops, so the same bits are expected: integer sums are exact,
and separate float64 kernels cannot contract into fused multiply-adds; a test compares CUDA
with the CPU where a GPU is present). nvJPEG need not decode as libjpeg-turbo does, so
decoded pixels depend on the device kind. Pillow's C is assumed free of fused multiply-adds:
the x86-64 wheel matches on every coordinate tested; an aarch64 build (compilers contract by
default there) may differ in the last bit of a coordinate. The pass order of crop-resize
follows Pillow 13 (`vertical_first`); Pillow <= 12 gives other bytes for some crops.

The five affine ops differ only in their per-sample matrices (`affine_matrices`): one
`affine_transform` call can run a RandAugment layer's geometric ops for all its samples.

Every batched op works in chunks bounded by `max_elements` (gather intermediates), so a batch
of large images cannot exhaust device memory; chunking never changes a sample's bits. On a
CPU this code is correct but slow (tens of images per second and core, Pillow does hundreds):
it is built for a GPU: a batch of 128 costs ~64 launches for resized_crop and ~75 per chunk of
an affine op (bench/bench_device_geometry.py).
"""
from __future__ import annotations

import io
import logging
import math
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image

# crop-resize lives in device_resample.py; its public names stay importable from here
from .device_resample import (MAX_GATHER_ELEMENTS, MAX_GATHER_ELEMENTS_CUDA,  # noqa: F401
                              default_budget, index_chunks, resample_coefficients, resample_name,
                              resized_crop, vertical_first)
from .pixels_pil import decode_image

log = logging.getLogger(__name__)

DECODE_CHUNK_PIXELS = 1 << 26        # ~64 M pixels (~190 MB of RGB) decoded at once


# ----------------------------------------------------------------------------- decoding

def _header(data: bytes, name: str) -> tuple[int, int, bool]:
    """(width, height, whether torchvision's JPEG decoder takes it) from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, img.format == "JPEG" and img.mode == "RGB"
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"sample {name}: not a readable image ({type(exc).__name__}: {exc}); "
                         "re-create the shard from a good copy of the file") from None


def _pillow_decode(data: bytes, name: str, device) -> torch.Tensor:
    """The CPU recipe's decode (Pillow + pixels_pil._to_rgb) -> (3, H, W) uint8 on `device`."""
    try:
        rgb = np.array(decode_image(data))
    except Exception as exc:
        raise ValueError(f"sample {name}: cannot decode the image ({type(exc).__name__}: {exc}); "
                         "re-create the shard from a good copy of the file") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(device)


def _decode_jpegs(datas: list[bytes], device) -> list[torch.Tensor | None]:
    """torchvision's decode_jpeg on a list (nvJPEG on CUDA); None where it refuses an image."""
    if not datas:
        return []

    def run(batch):
        with warnings.catch_warnings():   # deprecated for TorchCodec since 0.29
            warnings.simplefilter("ignore")
            return torchvision.io.decode_jpeg(
                [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in batch],
                mode=torchvision.io.ImageReadMode.RGB, device=device)
    try:
        images = list(run(datas))
    except RuntimeError:      # one bad image fails the list: find which, one at a time
        images = []
        for data in datas:
            try:
                images.append(run([data])[0])
            except RuntimeError:
                images.append(None)
    # the CPU decoder's CHW is a view of HWC pixels: one layout for every device
    return [None if img is None else img.contiguous() for img in images]


def _chunks_by_pixels(pixels: Sequence[int], limit: int) -> Iterator[list[int]]:
    """Consecutive index runs whose pixel total stays <= limit (one image alone may exceed it)."""
    run, total = [], 0
    for i, p in enumerate(pixels):
        if run and total + p > limit:
            yield run
            run, total = [], 0
        run.append(i)
        total += p
    if run:
        yield run


def decode_chunks(datas: Sequence[bytes], device: torch.device | str = "cpu",
                  keys: Sequence[str] | None = None, max_pixels: int = DECODE_CHUNK_PIXELS
                  ) -> Iterator[tuple[list[int], list[torch.Tensor], int]]:
    """Decode in chunks of at most `max_pixels` pixels (from the headers): yields (indices,
    contiguous (3, H, W) uint8 images on `device`, Pillow fallbacks in the chunk).

    Colour JPEGs go through torchvision.io.decode_jpeg as a list (nvJPEG on CUDA, libjpeg-turbo
    on the CPU: byte-identical to Pillow's full decode there); grey / CMYK JPEGs, other formats
    and JPEGs decode_jpeg refuses go through Pillow and augment's RGB conversion, then to the
    device. A caller that crops each chunk before the next keeps only one chunk of full-size
    images alive. A sample that neither can read raises ValueError naming it."""
    device = torch.device(device)
    names = list(keys) if keys is not None else [f"#{i}" for i in range(len(datas))]
    headers = [_header(data, name) for data, name in zip(datas, names)]
    for run in _chunks_by_pixels([w * h for w, h, _ in headers], max_pixels):
        jpegs = [i for i in run if headers[i][2]]
        decoded = dict(zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device)))
        images, fallbacks = [], 0
        for i in run:
            image = decoded.get(i)
            if image is None:
                fallbacks += 1
                log.debug("sample %s: decoded by Pillow (%s)", names[i],
                          "decode_jpeg refused it" if i in decoded else "not a colour JPEG")
                image = _pillow_decode(datas[i], names[i], device)
            images.append(image)
        yield run, images, fallbacks


def decode_images(datas: Sequence[bytes], device: torch.device | str = "cpu",
                  keys: Sequence[str] | None = None, max_pixels: int = DECODE_CHUNK_PIXELS
                  ) -> tuple[list[torch.Tensor], int]:
    """All of `datas` decoded (see decode_chunks): ((3, H, W) uint8 images, Pillow fallbacks)."""
    images, fallbacks = [], 0
    for _, chunk, count in decode_chunks(datas, device, keys, max_pixels):
        images.extend(chunk)
        fallbacks += count
    return images, fallbacks


def decode_resized_crops(datas: Sequence[bytes], boxes: torch.Tensor, size: int,
                         interpolation: str = "bicubic", device: torch.device | str = "cpu",
                         keys: Sequence[str] | None = None, max_pixels: int = DECODE_CHUNK_PIXELS
                         ) -> tuple[torch.Tensor, int]:
    """decode + resized_crop chunk by chunk, so the full-size images of one chunk at a time are
    alive: ((N, 3, size, size) uint8 on `device`, Pillow fallbacks)."""
    out = torch.empty((len(datas), 3, size, size), dtype=torch.uint8, device=device)
    fallbacks = 0
    for run, images, count in decode_chunks(datas, device, keys, max_pixels):
        rows = slice(run[0], run[-1] + 1)
        out[rows] = resized_crop(images, boxes[rows], size, interpolation)
        fallbacks += count
    return out, fallbacks


# ----------------------------------------------------------------------------- flip

def hflip(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) with the samples where flags (N,) is True flipped left-right (exact)."""
    flags = torch.as_tensor(flags, dtype=torch.bool).to(images.device).view(-1, 1, 1, 1)
    return torch.where(flags, images.flip(-1), images)


# ----------------------------------------------------------------------------- affine ops
# Pillow's Image.transform(size, AFFINE, matrix, resample, fillcolor) = Geometry.c
# ImagingGenericTransform with affine_transform and bilinear/bicubic_filter32RGB.

def rotate_matrix(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """The affine matrix Pillow's Image.rotate(degrees) uses (no center / translate / expand).
    Its fast paths (0: copy, 180, and 90 / 270 on a square image: transposes) are returned as the
    exact integer matrices that sample the same pixels."""
    angle = degrees % 360.0
    w, h = width, height
    if angle == 0:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if angle == 180:
        return (-1.0, 0.0, float(w), 0.0, -1.0, float(h))
    if angle in (90, 270) and w == h:
        if angle == 90:
            return (0.0, -1.0, float(w), 1.0, 0.0, 0.0)
        return (0.0, 1.0, 0.0, -1.0, 0.0, float(h))
    center = (w / 2, h / 2)
    angle = -math.radians(angle)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    x, y = -center[0] - 0, -center[1] - 0
    c, f = a * x + b * y + 0.0, d * x + e * y + 0.0
    return (a, b, c + center[0], d, e, f + center[1])


def affine_matrices(name: str, args: torch.Tensor | np.ndarray, height: int, width: int
                    ) -> np.ndarray:
    """(N, 6) float64 Pillow affine matrices of timm op `name` for per-sample args (N, 1)."""
    args = np.asarray(torch.as_tensor(args).cpu(), dtype=np.float64).reshape(len(args), -1)
    values = [float(v) for v in args[:, 0]]
    if name == "Rotate":
        rows = [rotate_matrix(v, width, height) for v in values]
    elif name == "ShearX":
        rows = [(1, v, 0, 0, 1, 0) for v in values]
    elif name == "ShearY":
        rows = [(1, 0, 0, v, 1, 0) for v in values]
    elif name == "TranslateXRel":
        rows = [(1, 0, v * width, 0, 1, 0) for v in values]        # timm: pct * img.size[0]
    elif name == "TranslateYRel":
        rows = [(1, 0, 0, 0, 1, v * height) for v in values]
    else:
        raise ValueError(f"not a geometric RandAugment op: {name!r}")
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def _horner(p1, p2, p3, p4, d):
    return p1 + d * (p2 + d * (p3 + d * p4))      # Geometry.c BICUBIC's last line


def _cubic_taps(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Geometry.c BICUBIC over the last axis of integer taps (v1..v4): its p2, p3, p4 are integer
    expressions in C too (UINT8 operands), so exact in int16; then the float64 Horner step."""
    v1, v2, v3, v4 = v.to(torch.int16).unbind(-1)
    p2 = v3 - v1
    p3 = (v1 - v2) * 2 + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return _horner(*(p.to(torch.float64) for p in (v2, p2, p3, p4)), d)


def _cubic(v1, v2, v3, v4, d):
    """Geometry.c BICUBIC on doubles, the C's operation order (-a + b is b - a exactly)."""
    return _horner(v2, v3 - v1, ((v1 - v2) * 2 + v3) - v4, ((v2 - v1) - v3) + v4, d)


def _linear(a, b, d):
    return a + (b - a) * d          # Geometry.c BILINEAR


def affine_transform(images: torch.Tensor, matrices: torch.Tensor | np.ndarray,
                     fill: Sequence[int], resample: str | int = "bicubic",
                     max_elements: int | None = None) -> torch.Tensor:
    """Pillow's `img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fill)` per
    sample: images (N, 3, H, W) uint8, matrices (N, 6) float64 -> (N, 3, H, W) uint8.

    Output pixel (x, y) reads the source at (a0 xi + a1 yi + a2, a3 xi + a4 yi + a5), xi = x + 0.5,
    yi = y + 0.5, interpolated in float64 exactly as Geometry.c (clamped taps, truncation to
    uint8, bicubic clipped to [0, 255]); outside the source: `fill`."""
    n, channels, height, width = images.shape
    kind = resample_name(resample)
    device = images.device
    a = torch.as_tensor(matrices, dtype=torch.float64).to(device).view(n, 6, 1, 1)
    fill_value = torch.tensor([int(v) for v in fill], dtype=torch.uint8, device=device)
    fill_value = fill_value.view(1, 3, 1, 1)
    out = torch.empty_like(images)
    # the 16 taps of each pixel, and a few float64 planes of 4 taps, are alive at once
    budget = max_elements or default_budget(device)
    for lo, hi in index_chunks(n, channels * height * width * 16, budget):
        out[lo:hi] = _affine_chunk(images[lo:hi], a[lo:hi], fill_value, kind)
    return out


def _affine_chunk(images: torch.Tensor, a: torch.Tensor, fill_value: torch.Tensor, kind: str
                  ) -> torch.Tensor:
    n, channels, height, width = images.shape
    device = images.device
    xi = torch.arange(width, dtype=torch.float64, device=device).add_(0.5).view(1, 1, width)
    yi = torch.arange(height, dtype=torch.float64, device=device).add_(0.5).view(1, height, 1)
    xs = (a[:, 0] * xi + a[:, 1] * yi) + a[:, 2]              # affine_transform
    ys = (a[:, 3] * xi + a[:, 4] * yi) + a[:, 5]
    outside = (xs < 0.0) | (xs >= width) | (ys < 0.0) | (ys >= height)
    xs, ys = xs - 0.5, ys - 0.5
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = xs - x0, ys - y0
    # Far-outside coordinates are filled anyway; clamp them before the integer conversion.
    x0 = x0.clamp(-4, width + 4).to(torch.int64)
    y0 = y0.clamp(-4, height + 4).to(torch.int64)
    taps, first = (4, -1) if kind == "bicubic" else (2, 0)
    offsets = torch.arange(first, first + taps, device=device)
    pixels = height * width
    # Tap rows / columns clamped into the image: Geometry.c clamps columns (XCLIP) and repeats
    # the previous row for a row outside, which is the clamped row's value.
    cols = (x0.view(n, pixels, 1) + offsets).clamp_(0, width - 1)
    rows = (y0.view(n, pixels, 1) + offsets).clamp_(0, height - 1).mul_(width)
    index = (rows.unsqueeze(-1) + cols.unsqueeze(-2)).view(n, 1, -1).expand(n, channels, -1)
    v = images.reshape(n, channels, pixels).gather(2, index).view(n, channels, pixels, taps, taps)
    dx, dy = dx.view(n, 1, pixels, 1), dy.view(n, 1, pixels)
    if kind == "bicubic":          # horizontal for every tap row at once, then vertical
        value = _cubic(*_cubic_taps(v, dx).unbind(-1), dy)
    else:
        left, right = v.unbind(-1)
        top, bottom = (left + (right.to(torch.int16) - left).to(torch.float64) * dx).unbind(-1)
        value = _linear(top, bottom, dy)
    result = value.clamp_(0.0, 255.0).trunc_().to(torch.uint8).view(n, channels, height, width)
    return torch.where(outside.unsqueeze(1), fill_value, result)


def _geometry_op(name: str):
    def apply(images: torch.Tensor, args: torch.Tensor, fill: Sequence[int],
              resample: str | int = "bicubic") -> torch.Tensor:
        matrices = affine_matrices(name, args, images.shape[-2], images.shape[-1])
        return affine_transform(images, matrices, fill, resample)
    apply.__name__ = name
    apply.__doc__ = (f"timm's {name}(img, *args, fillcolor=fill, resample=resample) on each "
                     "sample: images (N, 3, H, W) uint8, args (N, 1) float64.")
    return apply


GEOMETRY_OPS = {name: _geometry_op(name)
                for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")}
