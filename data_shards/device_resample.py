"""Pillow's Resample.c on any torch device: timm's crop-then-resize for a batch (`resized_crop`),
bit-identical to Pillow 13's `img.crop(box).resize((size, size), filter)` (issue 19, first part;
split out of device_geometry.py, which re-exports these names).

The CPU computes each sample's resampling coefficients and their 22-bit integer weights in
float64 exactly as Pillow's C does; the device does gathers and integer multiply-sums (exact in
any order), so a sample's bytes depend only on its own pixels and crop box. The pass order
follows Pillow 13 (`vertical_first`). Work is cut into chunks of at most `max_elements` gather
elements (`default_budget`), which never changes a sample's bits; the affine ops of
device_geometry.py share that budget, `index_chunks` and `resample_name`.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

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


def index_chunks(total: int, per_item: int, max_elements: int) -> Iterator[tuple[int, int]]:
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
    for lo, hi in index_chunks(len(starts), 3 * size * k, budget):
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
    for lo, hi in index_chunks(rows, k * 3 * width, budget):
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
