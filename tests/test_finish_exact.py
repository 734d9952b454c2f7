"""Finishing (uint8 item -> normalised, erased, mixed float32) gives the same bits on every device.

Checked without a GPU in two ways: the values against independent references (exact rational
arithmetic, Python floats, NumPy float32), and the ops finish_item runs against an allowlist of
ops whose result cannot depend on the device's arithmetic. With a GPU, CPU and CUDA bit for bit.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                  IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
from torch.utils._python_dispatch import TorchDispatchMode

from data_shards import AugRecipe, ShardSet, finish_item, replay_slice
from data_shards.finishing import finish_images
from data_shards.recipe import NOISE_BANK_SIZE

MIXING = AugRecipe(input_size=32, reprob=0.5)     # DeiT's Mixup and CutMix, erasing at p 0.5
OTHER_CONSTANTS = ((0.1, 0.2, 0.3), (0.7, 0.11, 0.123))


def every_pixel_value() -> torch.Tensor:
    """(2, 16, 16, 3) uint8: each channel takes every value 0..255, placed differently per channel
    and image."""
    values = torch.arange(256, dtype=torch.uint8).view(16, 16)
    return torch.stack([torch.stack([values.roll(7 * c + 100 * n) for c in range(3)], dim=-1)
                        for n in range(2)])


def nearest_float32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational q (ties to even), by exact comparison."""
    f = np.float32(float(q))
    candidates = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - q),
                                          int(np.array(c).view(np.uint32)) & 1))


def reference_normalised(images: np.ndarray, mean, std, exact: bool) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, element by element: the exact value of
    (v/255 - mean)/std rounded to float32, or the same in Python (float64) floats rounded once."""
    out = np.empty((images.shape[0], 3, *images.shape[1:3]), dtype=np.float32)
    for c in range(3):
        if exact:
            value = [nearest_float32((Fraction(v, 255) - Fraction(mean[c])) / Fraction(std[c]))
                     for v in range(256)]
        else:
            value = [np.float32((v / 255 - mean[c]) / std[c]) for v in range(256)]
        out[:, c] = np.asarray(value, dtype=np.float32)[images[..., c]]
    return out


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(np.asarray(a)), np.ascontiguousarray(np.asarray(b))
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("mean, std", [(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                                       (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
                                       OTHER_CONSTANTS], ids=["deit", "inception", "other"])
def test_every_pixel_value_of_every_channel_is_normalised_with_one_rounding(mean, std):
    recipe = AugRecipe(input_size=16, mean=mean, std=std)
    images = every_pixel_value()
    got = finish_images(images, torch.zeros(2, 5, dtype=torch.int64), recipe)
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float32 and got.is_contiguous()
    assert same_bits(got, reference_normalised(images.numpy(), mean, std, exact=False))
    if mean != OTHER_CONSTANTS[0]:
        # For these constants the float64 value rounded once is also the correctly rounded exact
        # value (for arbitrary ones it can be one float32 step off: 1 of 768 for OTHER_CONSTANTS).
        assert same_bits(got, reference_normalised(images.numpy(), mean, std, exact=True))


@pytest.fixture(scope="module")
def mixed_item(digits_shards):
    """A real replay item whose samples are erased, Mixup-blended and CutMix-pasted."""
    shard_set = ShardSet.open(digits_shards["train"])
    item = replay_slice(shard_set.read_shard(0), 1, MIXING, 0, 24)
    weights, boxes = item.mix_weights, item.cut_boxes
    assert (weights[:, 1] > 0).any() and (boxes[:, 1] > boxes[:, 0]).any()     # Mixup, CutMix
    assert (item.erase[:, 2] > 0).any()                                          # erasing
    return item


def test_erasing_and_mixing_equal_numpy_float32_arithmetic(mixed_item):
    item, m = mixed_item, len(mixed_item)
    x = reference_normalised(item.images.numpy(), MIXING.mean, MIXING.std, exact=False)
    bank = np.random.Generator(np.random.PCG64(20240521)).standard_normal(NOISE_BANK_SIZE,
                                                                          dtype=np.float32)
    for n, (top, left, h, w, offset) in enumerate(item.erase.tolist()):
        if h > 0:
            x[n, :, top:top + h, left:left + w] = bank[offset:offset + 3 * h * w].reshape(3, h, w)
    w = item.mix_weights.numpy()[:, :, None, None, None]
    d = item.partner_offset
    assert d == 2 and len(item.images) == m + d         # seed 1 of its pairing group: partner k + 2
    expected = x[:m] * w[:, 0] + x[d:m + d] * w[:, 1]    # float32 *, *, then +: one rounding each
    for k, (yl, yh, xl, xh) in enumerate(item.cut_boxes.tolist()):
        expected[k, :, yl:yh, xl:xh] = x[k + d, :, yl:yh, xl:xh]
    assert expected.dtype == np.float32
    assert same_bits(finish_item(item, MIXING), expected)


# Ops whose result is the same bits on any device: views, copies, gathers, allocation ...
EXACT_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.permute.default",
             "aten.select.int", "aten.slice.Tensor", "aten.alias.default", "aten.expand.default",
             "aten.empty.memory_format", "aten.empty_strided.default", "aten._to_copy.default",
             "aten.copy_.default", "aten.clone.default", "aten.index_select.default",
             "aten.index.Tensor", "aten.gather.default", "aten.take.default",
             "aten.lift_fresh.default", "aten.detach.default"}
# ... and single IEEE float operations between two tensors (one rounding each, in separate kernels).
ELEMENTWISE_OPS = {"aten.mul.Tensor", "aten.add.Tensor"}


class RecordOps(TorchDispatchMode):
    """Every aten op run inside the block, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def device_dependent_ops(calls) -> list[str]:
    """The calls that are not exact on every device, with the reason."""
    bad = []
    for name, args, kwargs in calls:
        if name in ELEMENTWISE_OPS:
            operands = [a for a in args if not isinstance(a, torch.Tensor) or a.dim() == 0]
            if operands or kwargs.get("alpha", 1) != 1:
                bad.append(f"{name} with a scalar operand {operands or kwargs}")
            elif any(a.dtype != torch.float32 for a in args):
                bad.append(f"{name} on {[a.dtype for a in args]}")
        elif name not in EXACT_OPS:
            bad.append(name)
    return bad


def test_finishing_runs_only_ops_that_are_exact_on_every_device(mixed_item):
    finish_item(mixed_item, MIXING)             # tables and noise bank built outside the recording
    with RecordOps() as recorded:
        finish_item(mixed_item, MIXING)
    assert device_dependent_ops(recorded.calls) == []
    names = {name for name, _, _ in recorded.calls}
    assert "aten.index_select.default" in names and "aten.mul.Tensor" in names   # lookup, blend ran
    # The checker itself: a division by a Python float (what CUDA turns into a reciprocal multiply),
    # a subtraction and a multiply by a Python float are caught; a tensor-tensor add is not.
    a, b = torch.ones(2, 3), torch.ones(3)
    with RecordOps() as control:
        a / 255.0, a - b, a * 0.5, a + b
    assert [bad.split()[0] for bad in device_dependent_ops(control.calls)] == [
        "aten.div.Tensor", "aten.sub.Tensor", "aten.mul.Tensor"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast", [False, True], ids=["deit", "fast"])
def test_cpu_and_cuda_finish_to_the_same_bits(digits_shards, fast):
    recipe = AugRecipe(input_size=32, reprob=0.5, **({"resize_backend": "torch"} if fast else {}))
    samples = ShardSet.open(digits_shards["train"]).read_shard(1)
    for start in range(0, 96, 24):
        item = replay_slice(samples, 2, recipe, start, start + 24)
        assert same_bits(finish_item(item, recipe, "cpu"), finish_item(item, recipe, "cuda").cpu())
