"""Batched geometric pixel ops on any torch device, bit-identical to the Pillow calls of the CPU
recipe (issue 19, first part): decode, timm's crop-then-resize, horizontal flip and RandAugment's
five affine ops (`GEOMETRY_OPS`), for a whole batch with per-sample parameters.

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

from .pixels_pil import decode_image

log = logging.getLogger(__name__)

DECODE_CHUNK_PIXELS = 1 << 26        # ~64 M pixels (~190 MB of RGB) decoded at once
MAX_GATHER_ELEMENTS = 1 << 24        # elements of one gather intermediate on a CPU
MAX_GATHER_ELEMENTS_CUDA = 1 << 27   # ... on a GPU (1 GiB of int64 index)
PRECISION_BITS = 22                  # Resample.c: 32 - 8 - 2
_RESAMPLE_NAMES = {"bicubic": "bicubic", "bilinear": "bilinear",
                   int(Image.Resampling.BICUBIC): "bicubic",
                   int(Image.Resampling.BILINEAR): "bilinear"}


def resample_name(resample: str | int) -> str:
    """'bicubic' | 'bilinear' from a name or a PIL resampling constant."""
    key = resample.lower() if isinstance(resample, str) else int(resample)
    if key not in _RESAMPLE_NAMES:
        raise ValueError(f"resample must be 'bicubic', 'bilinear' or the PIL constant, "
                         f"got {resample!r}")
    return _RESAMPLE_NAMES[key]


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


# ----------------------------------------------------------------------------- crop + resize
# Resample.c's filters and coefficient maths, vectorised over (samples, outputs, taps) in
# float64 with the C's operation order: IEEE elementwise ops give the C's doubles exactly.

def _bicubic_filter(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)              # a = -0.5: (a + 2.0) = 1.5, (a + 3.0) = 2.5 exactly
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear_filter(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic_filter, 2.0), "bilinear": (_bilinear_filter, 1.0)}


def resample_coefficients(in_sizes: np.ndarray, out_size: int, interpolation: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample.c precompute_coeffs + normalize_coeffs_8bpc for resizing each of `in_sizes`
    (whole pixels, box (0, in_size)) to `out_size`: (first tap (N, out) int64, taps used
    (N, out) int64, 22-bit integer weights (N, out, K) int32, zero past each output's taps)."""
    filter_fn, filter_support = _FILTERS[resample_name(interpolation)]
    in_sizes = np.asarray(in_sizes, dtype=np.int64).reshape(-1, 1)
    scale = in_sizes.astype(np.float64) / out_size           # (double)(in1 - in0) / outSize
    filterscale = np.maximum(scale, 1.0)
    support = filter_support * filterscale
    center = 0.0 + (np.arange(out_size) + 0.5) * scale         # in0 + (xx + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)   # C (int): truncation
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_sizes)
    taps = xmax - xmin
    inv_filterscale = 1.0 / filterscale
    kmax = int(taps.max())
    weights = np.zeros(taps.shape + (kmax,), dtype=np.float64)
    total = np.zeros(taps.shape, dtype=np.float64)
    for x in range(kmax):                                     # ww += w, in tap order
        w = filter_fn(((x + xmin).astype(np.float64) - center + 0.5) * inv_filterscale)
        w = np.where(x < taps, w, 0.0)
        weights[..., x] = w
        total = total + w
    weights /= np.where(total != 0.0, total, 1.0)[..., None]    # if (ww != 0.0) k[x] /= ww
    rounding = np.where(weights < 0, -0.5, 0.5)                 # (int)(+-0.5 + k * (1 << 22))
    weights *= 1 << PRECISION_BITS
    weights += rounding
    return xmin, taps, np.trunc(weights, out=weights).astype(np.int32)


def _check_boxes(images: Sequence[torch.Tensor], boxes: np.ndarray) -> None:
    if boxes.shape != (len(images), 4):
        raise ValueError(f"boxes must be ({len(images)}, 4) (top, left, height, width), "
                         f"got {boxes.shape}")
    for i, (image, (top, left, height, width)) in enumerate(zip(images, boxes.tolist())):
        h, w = image.shape[-2:]
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > h or left + width > w:
            raise ValueError(f"sample {i}: crop box (top {top}, left {left}, {height}x{width}) "
                             f"is not within its {h}x{w} image")


def _clip8(acc: torch.Tensor) -> torch.Tensor:
    """Resample.c clip8 of an int32 accumulator (rounding bias already added)."""
    return torch.bitwise_right_shift(acc, PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _chunks(total: int, per_item: int, max_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, max_elements // max(1, per_item))
    for lo in range(0, total, step):
        yield lo, min(total, lo + step)


def vertical_first(heights: np.ndarray, widths: np.ndarray, size: int) -> np.ndarray:
    """Which crops Pillow 13 resizes to size x size vertical pass first (Pillow PR #9549, "if
    height is scaled down significantly more than width"; the two orders round differently).
    Its C was not at hand: the rule h > size and h - size > 2 (w - size) was measured on
    Pillow 13.0.0 on both sides of the boundary for many widths, at sizes 224 and 32, and is
    tested (tests/test_device_geometry.py). Pillow <= 12 always went horizontal first."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    return (heights > size) & (heights - size > 2 * (widths - size))


def _packed(images: Sequence[torch.Tensor], pad: int) -> tuple[torch.Tensor, np.ndarray]:
    """The images' pixels, each (3, H, W) contiguous, in one flat uint8 buffer (one copy) with
    `pad` zeros after them (so tap windows never run off the end), and each image's offset."""
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"images must be (3, H, W) uint8 tensors, got {tuple(image.shape)} "
                             f"{image.dtype}")
    flats = [image.contiguous().view(-1) for image in images]   # a copy only if not (3, H, W)
    flats.append(flats[0].new_zeros(pad))
    sizes = np.array([f.numel() for f in flats[:-1]], dtype=np.int64)
    return torch.cat(flats), np.cumsum(sizes) - sizes


def _padded(count: int, pad: int, device) -> torch.Tensor:
    """An uninitialised uint8 buffer of `count` elements followed by `pad` zeros."""
    buffer = torch.empty(count + pad, dtype=torch.uint8, device=device)
    buffer[count:].zero_()
    return buffer


def _window_sum(src: torch.Tensor, starts: np.ndarray, sample: np.ndarray, first: np.ndarray,
                weights: np.ndarray, out: torch.Tensor, budget: int) -> None:
    """Taps along a line (consecutive pixels): out[l, c, p] = clip8(sum_k weights[s, p, k] *
    src[starts[l, c] + first[s, p] + k]), s = sample[l]; starts (L, 3), first (S, P), weights
    (S, P, K).
    Gathers whole K-pixel windows (a view of src), so the index has one entry per output."""
    device, (_, size, k) = src.device, weights.shape
    windows = src.unfold(0, k, 1)
    put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    starts, sample, first = put(starts), put(sample), put(first)
    weights = put(weights.reshape(len(weights), -1))
    for lo, hi in _chunks(len(starts), 3 * size * k, budget):
        who = sample[lo:hi]
        index = starts[lo:hi, :, None] + first.index_select(0, who)[:, None, :]
        values = windows.index_select(0, index.view(-1)).view(hi - lo, 3, size, k)
        acc = (values * weights.index_select(0, who).view(hi - lo, 1, size, k)).sum(
            -1, dtype=torch.int32)
        out[lo:hi] = _clip8(acc.add_(1 << (PRECISION_BITS - 1)))


def _row_sum(src: torch.Tensor, starts: np.ndarray, weights: np.ndarray, width: int,
             out: torch.Tensor, budget: int) -> None:
    """Taps are whole rows: out[m, c, :] = clip8(sum_k weights[m, k] * src[starts[m, k, c] + (0 ..
    width)]); starts (M, K, 3), weights (M, K). Gathers `width`-pixel rows (a view of src)."""
    device, (rows, k) = src.device, weights.shape
    windows = src.unfold(0, width, 1)
    starts = torch.from_numpy(np.ascontiguousarray(starts)).to(device)
    weights = torch.from_numpy(np.ascontiguousarray(weights)).to(device)
    for lo, hi in _chunks(rows, k * 3 * width, budget):
        values = windows.index_select(0, starts[lo:hi].view(-1)).view(hi - lo, k, 3, width)
        acc = (values * weights[lo:hi].view(hi - lo, k, 1, 1)).sum(1, dtype=torch.int32)
        out[lo:hi] = _clip8(acc.add_(1 << (PRECISION_BITS - 1)))


def resized_crop(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                 interpolation: str = "bicubic", max_elements: int | None = None) -> torch.Tensor:
    """timm's training crop-resize, `img.crop((left, top, left + w, top + h)).resize((size, size),
    filter)` in Pillow, for a batch: images (3, H, W) uint8 of any sizes on one device, boxes
    (N, 4) int (top, left, height, width) -> (N, 3, size, size) uint8, bit-identical to Pillow.

    Resample.c's 8-bit path: two 1-D passes with a uint8 intermediate, horizontal first (over
    the rows the vertical pass needs) or vertical first (`vertical_first`); integer weights
    from resample_coefficients (CPU), integer multiply-sums on the device. The pixels of the
    batch are read from one flat buffer through windows of consecutive pixels (a horizontal
    tap window, or a whole row for a vertical tap): a few launches per pass per chunk for the
    whole batch, never per image. (Pillow skips a pass whose size does not change; its weights
    are the identity then, so computing it gives the same bytes.)"""
    boxes = torch.as_tensor(boxes).to("cpu", torch.int64).numpy().reshape(-1, 4)
    _check_boxes(images, boxes)
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    device = images[0].device
    budget = max_elements or default_budget(device)
    heights, widths = boxes[:, 2], boxes[:, 3]
    x = resample_coefficients(widths, size, interpolation)
    y = resample_coefficients(heights, size, interpolation)
    vfirst = vertical_first(heights, widths, size)
    widest = int(widths[vfirst].max()) if vfirst.any() else 0
    flat, base = _packed(images, max(x[2].shape[-1], widest))
    plane = np.array([img.shape[1] * img.shape[2] for img in images], dtype=np.int64)
    row = np.array([img.shape[2] for img in images], dtype=np.int64)
    # pixel (0, 0) of each crop, the step between channels and between rows
    layout = (base + boxes[:, 0] * row + boxes[:, 1], plane, row)
    out = torch.empty((len(images), size, 3, size), dtype=torch.uint8, device=device)
    for group, run in ((~vfirst, _horizontal_first), (vfirst, _vertical_first)):
        if group.any():
            pick = lambda t: tuple(a[group] for a in t)  # noqa: E731
            index = torch.from_numpy(np.flatnonzero(group)).to(device)
            out.index_copy_(0, index, run(flat, pick(layout), boxes[group], pick(x), pick(y),
                                          size, budget))
    return out.permute(0, 2, 1, 3).contiguous()


def _horizontal_first(flat, layout, boxes, x, y, size, budget) -> torch.Tensor:
    """Horizontal pass over crop rows ybox_first .. ybox_last, then vertical: (n, size, 3, size)."""
    corner, plane, row = layout
    n, (xmin, _, wx), (ymin, ytaps, wy) = len(boxes), x, y
    first = ymin[:, 0]
    rows = ymin[:, -1] + ytaps[:, -1] - first           # intermediate rows per sample
    sample = np.repeat(np.arange(n), rows)
    line = np.arange(len(sample)) - np.repeat(np.cumsum(rows) - rows, rows)
    starts = (corner + first * row)[sample] + line * row[sample]
    starts = starts[:, None] + np.arange(3) * plane[sample, None]
    middle = _padded(len(sample) * 3 * size, 0, flat.device)
    _window_sum(flat, starts, sample, xmin, wx, middle.view(-1, 3, size), budget)
    # vertical: output row (s, yy) sums intermediate rows; tap rows clamped into the sample's own
    # (zero weight past the taps used)
    ky = wy.shape[-1]
    tap = np.minimum((ymin - first[:, None])[..., None] + np.arange(ky), (rows - 1)[:, None, None])
    tap = tap + (np.cumsum(rows) - rows)[:, None, None]
    starts = (tap * 3 * size)[..., None] + np.arange(3) * size       # (n, size, ky, 3)
    out = torch.empty((n * size, 3, size), dtype=torch.uint8, device=flat.device)
    _row_sum(middle, starts.reshape(n * size, ky, 3), wy.reshape(n * size, ky), size, out, budget)
    return out.view(n, size, 3, size)


def _vertical_first(flat, layout, boxes, x, y, size, budget) -> torch.Tensor:
    """Vertical pass over every column of the crop, then horizontal: (n, size, 3, size)."""
    corner, plane, row = layout
    n, (xmin, _, wx), (ymin, _, wy) = len(boxes), x, y
    heights, widths = boxes[:, 2], boxes[:, 3]
    width = int(widths.max())                           # rows read whole, then cut to the crop
    ky = wy.shape[-1]
    tap = np.minimum(ymin[..., None] + np.arange(ky), (heights - 1)[:, None, None])
    starts = (corner[:, None, None] + tap * row[:, None, None])[..., None] \
        + (np.arange(3) * plane[:, None])[:, None, None, :]             # (n, size, ky, 3)
    kx = wx.shape[-1]
    middle = _padded(n * size * 3 * width, kx, flat.device)
    _row_sum(flat, starts.reshape(n * size, ky, 3), wy.reshape(n * size, ky), width,
             middle[:n * size * 3 * width].view(n * size, 3, width), budget)
    # horizontal: line (s, yy) of the intermediate; columns past a crop's width have weight 0
    lines = np.arange(n * size) * 3 * width
    starts = lines[:, None] + np.arange(3) * width
    out = torch.empty((n * size, 3, size), dtype=torch.uint8, device=flat.device)
    _window_sum(middle, starts, np.repeat(np.arange(n), size), xmin, wx, out, budget)
    return out.view(n, size, 3, size)


def default_budget(device: torch.device) -> int:
    """Elements of one gather intermediate: large on a GPU (few launches), small on a CPU."""
    return MAX_GATHER_ELEMENTS_CUDA if torch.device(device).type == "cuda" else MAX_GATHER_ELEMENTS


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
    for lo, hi in _chunks(n, channels * height * width * 16, budget):
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
