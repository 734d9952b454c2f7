"""The Pillow pixel path: decoding, and the uint8 ops that apply one sample's drawn parameters
(crop-resize, flip, RandAugment): Pillow, timm's RandAugment ops and torch's resize."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torchvision
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

from .parameters import SampleParams, draw_sample, rand_augment_hparams
from .recipe import INTERPOLATION, AugRecipe


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
    if img.mode in ("P", "RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    return img if img.mode == "RGB" else img.convert("RGB")


def augment_uint8(data: bytes, key: str, aug_seed: int, recipe: AugRecipe,
                  out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """One image's (H, W, 3) uint8 training augmentation (crop-resize, flip, RandAugment; into
    `out` if given) and its erasing parameters (top, left, h, w, bank offset)."""
    img = Image.open(io.BytesIO(data))     # the header: the crop is drawn from the full size
    params = draw_sample(key, aug_seed, recipe, img.size)
    pixels = np.asarray(apply_params(img, data, params, recipe))
    if out is not None:
        out[...], pixels = pixels, out
    return pixels, params.erase


def apply_params(img: Image.Image, data: bytes, params: SampleParams, recipe: AugRecipe
                 ) -> Image.Image:
    """Decode `img` (opened from `data`, not loaded) for its crop, resize, flip, RandAugment."""
    img = crop_resize(*decode_crop(img, data, params.crop, recipe), recipe)
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return apply_rand_augment(img, params.ops, recipe) if params.ops else img


def decode_crop(img: Image.Image, data: bytes, crop: tuple[int, int, int, int], recipe: AugRecipe
                ) -> tuple[Image.Image | np.ndarray, tuple[float, ...]]:
    """Decode `img` (opened from `data`, not loaded) for the crop (top, left, height, width) ->
    (PIL pixels, or uint8 HWC for a full-size colour JPEG; the crop's (left, top, right, bottom)
    float box on them). decode_draft: a JPEG at 1/2..1/8 scale where the crop stays >= input_size."""
    (width, height), (i, j, h, w) = img.size, crop
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
    """A colour JPEG -> (H, W, 3) uint8 by torchvision: Pillow's bytes (tested), ~20% faster.
    None when it refuses: Pillow decides then."""
    decode_jpeg = getattr(torchvision.io, "decode_jpeg", None)   # deprecated for TorchCodec since
    if decode_jpeg is None:                                      # 0.29; Pillow takes over when gone
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                              mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        return None
    return chw.permute(1, 2, 0).numpy()       # decode_jpeg's CHW is a view of an HWC buffer


def crop_resize(pixels: Image.Image | np.ndarray, box: tuple[float, ...], recipe: AugRecipe
                ) -> Image.Image:
    """The crop box resized to input_size square, by the recipe's resize backend; with Pillow, a
    whole-pixel box is cropped then resized (timm's bytes)."""
    size = recipe.input_size
    if recipe.resize_backend == "torch":
        return Image.fromarray(_torch_crop_resize(pixels, box, size, recipe.interpolation))
    resample = INTERPOLATION[recipe.interpolation][1]
    if all(float(v).is_integer() for v in box):
        # timm's RandomResizedCropAndInterpolation (torchvision F.resized_crop): crop, then resize
        # (resize(box=) would also weigh pixels outside the box at its edges).
        left, top, right, bottom = (int(v) for v in box)
        img = (Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))
               if isinstance(pixels, np.ndarray) else pixels.crop((left, top, right, bottom)))
        return img.resize((size, size), resample)
    # A draft-decoded (fractional) box: resampled from the reduced image in place.
    img = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels
    return img.resize((size, size), resample, box=box)


def _torch_crop_resize(pixels: Image.Image | np.ndarray, box: tuple[float, ...], size: int,
                       mode: str) -> np.ndarray:
    """torch's uint8 antialiased resize of the crop (what torchvision's resize calls). It takes
    whole pixels: a draft-decoded (fractional) box is rounded, under half a reduced pixel off."""
    left, top, right, bottom = (int(round(v)) for v in box)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    if isinstance(pixels, Image.Image):    # copy out the crop only
        pixels = np.array(pixels.crop((left, top, right, bottom)))
        left, top, right, bottom = 0, 0, right - left, bottom - top
    # An NCHW view of HWC pixels has channels-last strides: torch's fast uint8 kernel, HWC output.
    crop = torch.from_numpy(pixels)[None].permute(0, 3, 1, 2)[:, :, top:bottom, left:right]
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def apply_rand_augment(img: Image.Image, ops: tuple[tuple[str, tuple], ...], recipe: AugRecipe
                       ) -> Image.Image:
    """timm's RandAugment ops (`NAME_TO_OP`) with their drawn args, in order."""
    fill = rand_augment_hparams(recipe)["img_mean"]
    resample = INTERPOLATION[recipe.rand_augment_interpolation or recipe.interpolation][1]
    for name, args in ops:
        if name.startswith("Posterize") and args[0] <= 0:
            # Pillow >= 12 refuses 0 bits; older Pillow (which timm targets) gave a black image.
            img = Image.new(img.mode, img.size)
        else:
            img = NAME_TO_OP[name](img, *args, fillcolor=fill, resample=resample)
    return img
