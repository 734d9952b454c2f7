"""Finishing on the consumer's device: uint8 images -> normalised, erased, mixed float32, the
same bits on every device (table lookups, copies, and separate IEEE elementwise ops); the
evaluation transform; digests of the exact bytes."""
from __future__ import annotations

import functools
import hashlib
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .recipe import INTERPOLATION, NOISE_BANK_SIZE, AugRecipe

if TYPE_CHECKING:
    from .items import ReplayItem

_NOISE_BANKS: dict[str, torch.Tensor] = {}


def noise_bank(device: torch.device | str) -> torch.Tensor:
    """float32 N(0, 1) values from a fixed-seed NumPy generator, built once per device."""
    name = str(torch.device(device))
    if name not in _NOISE_BANKS:
        generator = np.random.Generator(np.random.PCG64(20240521))
        values = generator.standard_normal(NOISE_BANK_SIZE, dtype=np.float32)
        _NOISE_BANKS[name] = torch.from_numpy(values).to(device)
    return _NOISE_BANKS[name]


@functools.lru_cache(maxsize=16)
def normalise_table(mean: tuple, std: tuple, device: str) -> torch.Tensor:
    """(3, 256) float32: [c, v] = ((v / 255) - mean[c]) / std[c] in float64 on the CPU, rounded
    once; the device only indexes it, so its bits cannot depend on the device's arithmetic."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = (np.asarray(v, dtype=np.float64)[:, None] for v in (mean, std))
    table = (values[None, :] - mean) / std
    return torch.from_numpy(table.astype(np.float32)).to(device)


def finish_images(images: torch.Tensor, erase: torch.Tensor, recipe: AugRecipe) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 on images.device, no float arithmetic there (CUDA
    divides by a scalar as a multiply by its reciprocal): `normalise_table` lookups, then erasing
    copied from `noise_bank`. `erase`: (N, 5) CPU int64 (top, left, h, w, bank offset), h=0: none."""
    device, (n, height, width, _) = images.device, images.shape
    table = normalise_table(recipe.mean, recipe.std, str(device))
    x = torch.empty((n, 3, height, width), dtype=torch.float32, device=device)
    for c in range(3):
        indices = images[..., c].to(torch.int32).reshape(-1)
        x[:, c] = table[c].index_select(0, indices).view(n, height, width)
    for index, (top, left, h, w, offset) in enumerate(erase.tolist()):
        if h > 0:     # the bank is built on first use, once per device
            fill = noise_bank(device)[offset:offset + 3 * h * w]
            x[index, :, top:top + h, left:left + w] = fill.view(3, h, w)
    return x


def finish_item(item: ReplayItem, recipe: AugRecipe, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """A replay item -> its (m, 3, H, W) float32 training images on `device` (default: the
    images'): `finish_images`, then image k mixed with image k + item.partner_offset (x*w0 +
    partner*w1, then the CutMix box pasted; parameters on the host: no syncs). The same bits on
    every device (DESIGN.md): each op its own kernel, one IEEE rounding each, no scalar operand;
    torch.set_flush_denormal(True) would break that."""
    device = torch.device(device) if device is not None else item.images.device
    x = finish_images(item.images.to(device, non_blocking=True), item.erase, recipe)
    if not recipe.mixing:
        return x
    weights = item.mix_weights.to(device, non_blocking=True)
    m, d = len(item), item.partner_offset
    primary, partner = x[:m], x[d:m + d]
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


def eval_image(img: Image.Image, recipe: AugRecipe) -> torch.Tensor:
    """Evaluation: shorter side resized to size/crop_pct, centre crop, normalise."""
    resize = int(math.floor(recipe.input_size / recipe.eval_crop_pct))
    img = TF.resize(img, [resize], interpolation=INTERPOLATION[recipe.interpolation][0],
                    antialias=True)
    size = [recipe.input_size, recipe.input_size]
    x = TF.to_dtype(TF.pil_to_tensor(TF.center_crop(img, size)), torch.float32, scale=True)
    return TF.normalize(x, list(recipe.mean), list(recipe.std))
