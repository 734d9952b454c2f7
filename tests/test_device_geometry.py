"""data_shards.device_geometry: batched decode, crop-resize, flip and RandAugment's affine ops,
bit-identical to the Pillow / timm calls of the CPU recipe on real photos, whatever the batch."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import sample_photo_paths
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

from data_shards.parameters import SIGNED_LEVEL, rand_augment_hparams, resized_crop_params
from data_shards.pixels_pil import decode_image
from data_shards.recipe import AugRecipe
from data_shards.device_geometry import (GEOMETRY_OPS, affine_matrices, affine_transform,
                                         decode_chunks, decode_images, decode_resized_crops,
                                         hflip, resized_crop, vertical_first)

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
FILL = rand_augment_hparams(AugRecipe())["img_mean"]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [decode_image(path.read_bytes()) for path in sample_photo_paths()]


@pytest.fixture(scope="module")
def digit() -> Image.Image:
    import sklearn.datasets
    pixels = (sklearn.datasets.load_digits().images[3] * 15.9).astype(np.uint8)
    return Image.fromarray(pixels, "L").convert("RGB")


def chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------------------- decode

def odd_encodings(photos) -> dict[str, bytes]:
    china, flower = photos
    return {
        "colour": sample_photo_paths()[0].read_bytes(),
        "progressive": encode(flower, "JPEG", progressive=True, quality=85),
        "grey": encode(china.convert("L"), "JPEG", quality=90),
        "cmyk": encode(flower.convert("CMYK"), "JPEG", quality=90),
        "png": encode(china.resize((300, 200)), "PNG"),
        "png-alpha": encode(flower.resize((90, 60)).convert("RGBA"), "PNG"),
    }


def test_decode_matches_pillow_for_every_kind_and_counts_fallbacks(photos):
    encodings = odd_encodings(photos)
    images, fallbacks = decode_images(list(encodings.values()), "cpu", keys=list(encodings))
    for (name, data), image in zip(encodings.items(), images):
        assert image.shape[0] == 3 and image.dtype == torch.uint8 and image.is_contiguous(), name
        assert np.array_equal(hwc(image), np.array(decode_image(data))), name
    assert fallbacks == 4          # grey, CMYK and the two PNGs go through Pillow


def test_decode_chunks_stay_under_the_pixel_bound(photos):
    encodings = list(odd_encodings(photos).values())
    limit = 640 * 427 + 1                       # one full photo per chunk at most
    seen, whole = [], decode_images(encodings)[0]
    for indices, images, _ in decode_chunks(encodings, max_pixels=limit):
        pixels = [img.shape[1] * img.shape[2] for img in images]
        assert len(images) == 1 or sum(pixels) <= limit
        seen.extend(indices)
        for i, img in zip(indices, images):
            assert torch.equal(img, whole[i])
    assert seen == list(range(len(encodings)))
    assert len(list(decode_chunks(encodings, max_pixels=limit))) >= 3


def test_decode_resized_crops_equals_decode_then_crop(photos):
    encodings = list(odd_encodings(photos).values())
    images = decode_images(encodings)[0]
    boxes = torch.tensor([[5, 7, img.shape[1] - 10, img.shape[2] - 9] for img in images])
    out, fallbacks = decode_resized_crops(encodings, boxes, 32, "bicubic", max_pixels=300 * 300)
    assert torch.equal(out, resized_crop(images, boxes, 32, "bicubic")) and fallbacks == 4


def test_bad_images_raise_naming_the_sample(photos):
    good = sample_photo_paths()[0].read_bytes()
    with pytest.raises(ValueError, match=r"sample shard3/cut.*truncated"):
        decode_images([good, good[: len(good) // 2]], keys=["shard3/ok", "shard3/cut"])
    with pytest.raises(ValueError, match=r"sample #1: not a readable image"):
        decode_images([good, b"not an image at all"])


# ----------------------------------------------------------------------------- crop + resize

def rrc_batch(photos, digit, count: int, seed: int):
    """(images, boxes) with boxes drawn as torchvision's RandomResizedCrop (resized_crop_params) on
    photos of several sizes: full (640x427), portrait, downsized, upsized, small, an 8x8 digit."""
    china, flower = photos
    sources = [china, flower, flower.transpose(Image.Transpose.ROTATE_90),
               china.resize((113, 87)), flower.resize((900, 601)), digit, flower.resize((48, 36))]
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for k in range(count):
        img = sources[k % len(sources)]
        boxes.append(resized_crop_params(rng, img.height, img.width, (0.08, 1.0), (3 / 4, 4 / 3)))
        images.append(chw(img))
    return images, torch.tensor(boxes)


def pillow_crop_resize(image: torch.Tensor, box, size: int, interpolation: str) -> np.ndarray:
    top, left, height, width = (int(v) for v in box)
    img = Image.fromarray(hwc(image)).crop((left, top, left + width, top + height))
    return np.array(img.resize((size, size), PIL_FILTERS[interpolation]))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [224, 32])
def test_resized_crop_is_bit_identical_to_pillow_crop_then_resize(photos, digit, interpolation,
                                                                  size):
    images, boxes = rrc_batch(photos, digit, 30, seed=size)
    out = resized_crop(images, boxes, size, interpolation)
    assert out.shape == (30, 3, size, size) and out.dtype == torch.uint8
    for k in range(len(images)):
        expected = pillow_crop_resize(images[k], boxes[k], size, interpolation)
        assert np.array_equal(hwc(out[k]), expected), k
    # both pass orders, down- and up-scaling are in the batch
    order = vertical_first(boxes[:, 2].numpy(), boxes[:, 3].numpy(), size)
    assert order.any() and not order.all()
    assert (boxes[:, 3] < size).any() and (boxes[:, 3] > size).any()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_pass_order_follows_pillow_at_its_boundary(photos, interpolation):
    """Pillow 13 resizes vertically first when h - size > 2 (w - size); on each side of the
    boundary the bytes are Pillow's (a Pillow that changes the rule fails here)."""
    image, size = chw(photos[0]), 32
    boxes = [(3, 5, h, w) for w in (33, 40, 57, 100) for h in (2 * w - size, 2 * w - size + 1)]
    boxes += [(0, 0, 33, 20), (0, 0, 32, 20), (0, 0, 100, 32), (0, 0, 32, 32)]
    out = resized_crop([image] * len(boxes), torch.tensor(boxes), size, interpolation)
    for k, box in enumerate(boxes):
        assert np.array_equal(hwc(out[k]), pillow_crop_resize(image, box, size, interpolation)), box
    flags = vertical_first(np.array([b[2] for b in boxes]), np.array([b[3] for b in boxes]), size)
    assert flags.tolist() == [False, True] * 4 + [True, False, True, False]


def test_resized_crop_does_not_depend_on_the_batch(photos, digit):
    images, boxes = rrc_batch(photos, digit, 12, seed=7)
    whole = resized_crop(images, boxes, 64)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted = resized_crop([images[i] for i in perm], boxes[perm], 64)
    assert torch.equal(permuted, whole[perm])
    for i in (0, 5, 11):
        assert torch.equal(resized_crop(images[i:i + 1], boxes[i:i + 1], 64)[0], whole[i])
    # small gather chunks, and decode_jpeg's HWC-backed layout, give the same bytes
    hwc_backed = [img.permute(1, 2, 0).contiguous().permute(2, 0, 1) for img in images]
    assert torch.equal(resized_crop(hwc_backed, boxes, 64, max_elements=5000), whole)


def test_resized_crop_refuses_a_box_outside_its_image(photos):
    image = chw(photos[0])
    with pytest.raises(ValueError, match="sample 1: crop box"):
        resized_crop([image, image], torch.tensor([[0, 0, 10, 10], [400, 0, 30, 30]]), 16)


# ----------------------------------------------------------------------------- flip

def test_hflip_flips_only_flagged_samples(photos):
    batch = torch.stack([chw(p.resize((50, 40))) for p in photos] * 2)
    flags = torch.tensor([True, False, False, True])
    out = hflip(batch, flags)
    for k in range(4):
        img = Image.fromarray(hwc(batch[k]))
        ref = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flags[k] else img
        assert np.array_equal(hwc(out[k]), np.array(ref))


# ----------------------------------------------------------------------------- affine ops

def drawn_args(name: str, count: int, rng: np.random.Generator) -> torch.Tensor:
    """Arguments as parameters.rand_augment_ops draws them for rand-m9-mstd0.5: magnitude N(9, 0.5)
    clipped to [0, 10], random sign, timm's level maths; plus the extremes and zero."""
    hparams = rand_augment_hparams(AugRecipe())
    magnitudes = np.clip(9 + 0.5 * rng.standard_normal(count), 0, 10)
    signs = np.where(rng.random(count) > 0.5, -1.0, 1.0)
    if count >= 3:
        magnitudes[:3], signs[1:3] = (0.0, 10.0, 10.0), (1.0, -1.0)
    args = [[s * SIGNED_LEVEL[name](m / 10, hparams)] for m, s in zip(magnitudes, signs)]
    return torch.tensor(args, dtype=torch.float64)


def op_images(photos, digit) -> list[torch.Tensor]:
    """Batches of one size each: 224x224 crops of the photos, 96x96 and non-square 57x40
    resizes, the 8x8 digit."""
    china, flower = photos
    crops = [p.crop((x, y, x + 224, y + 224))
             for p in (china, flower) for x, y in ((0, 0), (300, 150))]
    return [torch.stack([chw(c) for c in crops]),
            torch.stack([chw(p.resize((96, 96))) for p in photos]),
            torch.stack([chw(p.resize((57, 40))) for p in photos] * 2), chw(digit)[None]]


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
@pytest.mark.parametrize("name", sorted(GEOMETRY_OPS))
def test_geometry_ops_are_bit_identical_to_timm(photos, digit, name, resample):
    rng = np.random.default_rng(len(name))
    for batch in op_images(photos, digit):
        n = len(batch)
        args = drawn_args(name, n, rng)
        out = GEOMETRY_OPS[name](batch, args, FILL, resample)
        assert out.shape == batch.shape and out.dtype == torch.uint8
        for k in range(n):
            ref = NAME_TO_OP[name](Image.fromarray(hwc(batch[k])), float(args[k, 0]),
                                   fillcolor=FILL, resample=PIL_FILTERS[resample])
            assert np.array_equal(hwc(out[k]), np.array(ref)), (batch.shape, float(args[k, 0]))


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_rotate_special_angles_match_pillow(photos, resample):
    """Pillow's fast paths (0: copy, 180, 90 / 270 on a square) and the same angles elsewhere."""
    for size in ((64, 64), (57, 40)):
        batch = torch.stack([chw(p.resize(size)) for p in photos] * 4)
        angles = torch.tensor([[0.0], [-0.0], [90.0], [-90.0], [180.0], [270.0], [360.0], [-180.0]],
                              dtype=torch.float64)
        out = GEOMETRY_OPS["Rotate"](batch, angles, FILL, resample)
        for k in range(len(batch)):
            ref = Image.fromarray(hwc(batch[k])).rotate(
                float(angles[k, 0]), resample=PIL_FILTERS[resample], fillcolor=FILL)
            assert np.array_equal(hwc(out[k]), np.array(ref)), (size, float(angles[k, 0]))


def test_geometry_ops_do_not_depend_on_the_batch(photos, digit):
    batch = torch.stack([chw(p.resize((96, 80))) for p in photos]
                        + [chw(photos[0].crop((9, 9, 105, 89)))])
    batch = torch.cat([batch, batch.flip(0)])
    args = drawn_args("Rotate", len(batch), np.random.default_rng(3))
    whole = GEOMETRY_OPS["Rotate"](batch, args, FILL, "bicubic")
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(1))
    permuted = GEOMETRY_OPS["Rotate"](batch[perm], args[perm], FILL, "bicubic")
    assert torch.equal(permuted, whole[perm])
    assert torch.equal(GEOMETRY_OPS["Rotate"](batch[2:3], args[2:3], FILL, "bicubic")[0], whole[2])
    matrices = affine_matrices("Rotate", args, *batch.shape[-2:])
    assert torch.equal(affine_transform(batch, matrices, FILL, "bicubic", max_elements=1), whole)


def test_one_affine_call_runs_different_ops_per_sample(photos):
    """The five ops differ only in their matrices: one affine_transform call with each sample's
    own op gives every op's bytes (what a RandAugment layer can do for all its samples)."""
    batch = torch.stack([chw(p.resize((64, 48))) for p in photos] * 3)[:5]
    names = sorted(GEOMETRY_OPS)
    args = [drawn_args(name, 1, np.random.default_rng(i)) for i, name in enumerate(names)]
    matrices = np.concatenate([affine_matrices(name, a, 48, 64) for name, a in zip(names, args)])
    mixed = affine_transform(batch, matrices, FILL, "bilinear")
    for k, (name, a) in enumerate(zip(names, args)):
        assert torch.equal(mixed[k], GEOMETRY_OPS[name](batch[k:k + 1], a, FILL, "bilinear")[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_bytes(photos, digit):
    images, boxes = rrc_batch(photos, digit, 12, seed=11)
    cpu = resized_crop(images, boxes, 224)
    assert torch.equal(resized_crop([i.cuda() for i in images], boxes, 224).cpu(), cpu)
    args = drawn_args("ShearX", len(cpu), np.random.default_rng(0))
    for name in GEOMETRY_OPS:
        for resample in ("bicubic", "bilinear"):
            expected = GEOMETRY_OPS[name](cpu, args, FILL, resample)
            got = GEOMETRY_OPS[name](cpu.cuda(), args.cuda(), FILL, resample)
            assert torch.equal(got.cpu(), expected)
    flags = torch.arange(len(cpu)) % 3 == 0
    assert torch.equal(hflip(cpu.cuda(), flags.cuda()).cpu(), hflip(cpu, flags))
