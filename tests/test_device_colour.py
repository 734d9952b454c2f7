"""data_shards/device_colour.py: bit-identical to timm's Pillow ops, per sample, in any batch.

Images: scikit-learn's digits upscaled to 32 px (as the recipe's crop-resize does), the two sample
photos resized to 224x224 and 57x43 and cropped at native pixels to 101x77, an image holding all
256 values in every channel (every LUT entry is used) and uniform noise (extreme differences for
the float32 blend and filter). Arguments: every value the recipe reaches for bits, thresholds and
added values; enhance factors on a grid over 0.1..1.9 and drawn as parameters.py draws them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data.auto_augment import NAME_TO_OP

from _student_helpers import one_thread  # noqa: F401  (autouse: one torch thread, see there)
from conftest import sample_photo_paths
from data_shards.recipe import parse_rand_augment
from data_shards import device_colour
from data_shards.device_colour import COLOUR_OPS, _blend, _luma, _smooth

FILL = (124, 116, 104)
BICUBIC = Image.Resampling.BICUBIC   # the recipe's img_mean; colour ops ignore it, as timm's do
NO_ARG_OPS = ("AutoContrast", "Equalize", "Invert")
ENHANCE_OPS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
               "SharpnessIncreasing")
# Every argument the recipe can reach (timm's level functions; mmax > 10 reaches bits < 0 and
# add up to 128): Posterize 4 - int(4 m / 10), Solarize 256 - min(256, int(25.6 m)),
# SolarizeAdd min(128, int(11 m)). Posterize 5..8 and -1 are beyond, for the op's own semantics.
LUT_OP_ARGS = {"PosterizeIncreasing": range(-1, 9), "SolarizeIncreasing": range(0, 257),
               "SolarizeAdd": range(0, 129)}


def enhance_factors(count: int = 40) -> list[float]:
    """A grid over 0.1..1.9 plus factors drawn as parameters.py does for rand-m9-mstd0.5-inc1."""
    rng = np.random.default_rng(19)
    magnitudes = np.clip(9 + 0.5 * rng.standard_normal(count), 0, 10)
    signs = np.where(rng.random(count) > 0.5, -1.0, 1.0)
    drawn = [max(0.1, 1.0 + s * (m / 10.0) * 0.9) for s, m in zip(signs, magnitudes)]
    return [float(f) for f in np.linspace(0.1, 1.9, 37)] + drawn


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arrays = np.stack([np.asarray(im) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def timm_op(name: str, image: Image.Image, args: tuple) -> Image.Image:
    if name.startswith("Posterize") and args[0] <= 0:   # as data_shards/pixels_pil.py
        return Image.new(image.mode, image.size)
    return NAME_TO_OP[name](image, *args, fillcolor=FILL, resample=BICUBIC)


def assert_same_as_timm(name: str, images: list[Image.Image], arg_rows: list[tuple]) -> None:
    """Every image with every argument row, as one batch per image."""
    args = torch.tensor(arg_rows, dtype=torch.float64).reshape(len(arg_rows), -1)
    for image in images:
        batch = to_tensor([image]).expand(len(arg_rows), -1, -1, -1).contiguous()
        out = COLOUR_OPS[name](batch, args, FILL, "bicubic")
        assert out.shape == batch.shape and out.dtype == torch.uint8
        want = np.stack([np.asarray(timm_op(name, image, row)) for row in arg_rows])
        got = out.permute(0, 2, 3, 1).numpy()
        if not np.array_equal(got, want):
            i = next(i for i in range(len(arg_rows)) if not np.array_equal(got[i], want[i]))
            diff = np.abs(got[i].astype(int) - want[i])
            raise AssertionError(f"{name}{arg_rows[i]} on {image.size}: {np.count_nonzero(diff)} "
                                 f"bytes differ, max {diff.max()}")


@pytest.fixture(scope="module")
def image_groups() -> dict[str, list[Image.Image]]:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:12]
    grey = np.clip(np.round(digits * (255.0 / 16.0)), 0, 255).astype(np.uint8)   # as sources.py
    photos = [Image.open(p).convert("RGB") for p in sample_photo_paths()]
    rng = np.random.default_rng(0)
    ramp = np.stack([rng.permutation(256) for _ in range(3)], -1).astype(np.uint8)
    return {
        "digits32": [Image.fromarray(g, "L").convert("RGB").resize((32, 32), BICUBIC)
                     for g in grey],
        "photo224": [p.resize((224, 224), BICUBIC) for p in photos],
        "photo57x43": [p.resize((57, 43), BICUBIC) for p in photos],
        "photo_crop101x77": [p.crop((150, 100, 251, 177)) for p in photos],
        "ramp16": [Image.fromarray(ramp.reshape(16, 16, 3))],
        "noise31x29": [Image.fromarray(rng.integers(0, 256, (29, 31, 3), dtype=np.uint8))],
    }


@pytest.mark.parametrize("name", NO_ARG_OPS)
def test_ops_without_arguments_match_timm(name, image_groups):
    for images in image_groups.values():
        assert_same_as_timm(name, images, [()])


@pytest.mark.parametrize("name", sorted(LUT_OP_ARGS))
def test_lut_ops_match_timm_at_every_reachable_argument(name, image_groups):
    rows = [(value,) for value in LUT_OP_ARGS[name]]
    for group, images in image_groups.items():
        assert_same_as_timm(name, images[:3] if group == "digits32" else images, rows)


@pytest.mark.parametrize("name", ENHANCE_OPS)
def test_enhance_ops_match_timm_over_the_factor_range(name, image_groups):
    rows = [(f,) for f in enhance_factors()]
    for group, images in image_groups.items():
        assert_same_as_timm(name, images[:4] if group == "digits32" else images, rows)


def test_flat_and_degenerate_histograms_match_timm():
    """Pillow's early returns: one value per channel (autocontrast, equalize keep the image),
    a channel with too few pixels below its top value (equalize step 0), and an equalize LUT
    whose top entry is 256 (Image.point clips it to 255)."""
    flat = np.zeros((9, 11, 3), np.uint8) + np.array([30, 200, 0], np.uint8)
    one_flat_channel = flat.copy()
    one_flat_channel[..., 1] = np.arange(99, dtype=np.uint8).reshape(9, 11)
    two_values = flat.copy()
    two_values[0, :3] = 250                                    # 3 pixels at 250: step 96 // 255 = 0
    overflow = np.zeros((16, 32, 3), np.uint8)
    overflow[0, 0] = 255                                       # 511 zeros, one 255: lut[255] = 256
    for array in (flat, one_flat_channel, two_values, overflow):
        for name in ("AutoContrast", "Equalize"):
            assert_same_as_timm(name, [Image.fromarray(array)], [()])


def test_contrast_rounds_a_half_way_mean_luma_up():
    """ImageStat's mean 100.5 gives int(100.5 + 0.5) = 101 (round-half-even would give 100)."""
    grey = np.full((4, 6, 3), 100, np.uint8)
    grey[:2] = 101
    assert_same_as_timm("ContrastIncreasing", [Image.fromarray(grey)], [(0.1,), (0.5,), (1.9,)])


def test_blend_matches_pillow_on_every_pair_of_values():
    """Blend.c's float32 arithmetic for all 65,536 (degenerate, image) byte pairs, factors in both
    of its branches (inside and outside [0, 1]) and its 0 / 1 shortcuts."""
    values = np.arange(256, dtype=np.uint8)
    first, second = np.repeat(values, 256).reshape(256, 256), np.tile(values, 256).reshape(256, 256)
    im1 = Image.fromarray(np.stack([first, second, 255 - first], -1))
    im2 = Image.fromarray(np.stack([second, first, first], -1))
    factors = enhance_factors(20)[::2] + [0.0, 1.0, 0.5, -0.25, 2.5, 1.0000001]
    out = _blend(to_tensor([im1]).expand(len(factors), -1, -1, -1),
                 to_tensor([im2]).expand(len(factors), -1, -1, -1),
                 torch.tensor(factors, dtype=torch.float64))
    for factor, got in zip(factors, out):
        want = np.asarray(Image.blend(im1, im2, factor))
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want), factor


def test_luma_matches_convert_l():
    values = np.arange(256, dtype=np.uint8)
    red, green, blue = np.meshgrid(values, values, values[::3], indexing="ij")
    colours = np.stack([red, green, blue], -1).reshape(2048, -1, 3)
    want = np.asarray(Image.fromarray(colours).convert("L"))
    assert np.array_equal(_luma(to_tensor([Image.fromarray(colours)]))[0, 0].numpy(), want)


@pytest.mark.parametrize("height,width", [(1, 1), (2, 9), (9, 2), (3, 3), (4, 7), (65, 64)])
def test_smooth_matches_pillow_including_borders_and_tiny_images(height, width):
    rng = np.random.default_rng(height * 100 + width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    want = np.asarray(image.filter(ImageFilter.SMOOTH))
    assert np.array_equal(_smooth(to_tensor([image]))[0].permute(1, 2, 0).numpy(), want)


def random_args(name: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    if name in NO_ARG_OPS:
        return torch.zeros(n, 0, dtype=torch.float64)
    if name in LUT_OP_ARGS:
        return torch.tensor(rng.choice(list(LUT_OP_ARGS[name]), (n, 1)), dtype=torch.float64)
    return torch.tensor(rng.uniform(0.1, 1.9, (n, 1)), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(COLOUR_OPS))
def test_a_sample_does_not_depend_on_its_batch(name, image_groups, monkeypatch):
    """op(batch)[i] == op(batch[i:i+1])[0] == op(permuted batch) at i's new place == op(batch
    with other companions) at i == op(batch in CPU chunks of 3) at i; the input is unchanged."""
    rng = np.random.default_rng(7)
    batch = to_tensor(image_groups["digits32"][:8])
    batch[5] = 77                                                # a flat image among them
    args = random_args(name, 8, rng)
    before = batch.clone()
    out = COLOUR_OPS[name](batch, args, FILL, "bicubic")
    assert torch.equal(batch, before)
    for i in range(8):
        alone = COLOUR_OPS[name](batch[i:i + 1], args[i:i + 1], FILL, "bicubic")
        assert torch.equal(alone[0], out[i])
    perm = torch.from_numpy(rng.permutation(8))
    assert torch.equal(COLOUR_OPS[name](batch[perm], args[perm], FILL, "bicubic"), out[perm])
    others = torch.from_numpy(rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    mixed = COLOUR_OPS[name](torch.cat([others, batch[2:4]]),
                             torch.cat([random_args(name, 3, rng), args[2:4]]), FILL, "bicubic")
    assert torch.equal(mixed[3:], out[2:4])
    monkeypatch.setattr(device_colour, "CPU_CHUNK_VALUES", 3 * batch[0].numel())
    assert torch.equal(COLOUR_OPS[name](batch, args, FILL, "bicubic"), out)


def test_colour_ops_are_the_non_geometric_ops_of_the_recipe():
    ops = parse_rand_augment("rand-m9-mstd0.5-inc1")["ops"]
    geometric = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    assert sorted(COLOUR_OPS) == sorted(set(ops) - geometric)


def test_bad_inputs_are_refused_with_a_clear_message():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"uint8 tensor, got \(2, 3, 4, 4\) torch.float32"):
        COLOUR_OPS["Invert"](images.float(), None, FILL, "bicubic")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) uint8 tensor, got \(3, 4, 4\)"):
        COLOUR_OPS["Equalize"](images[0], None, FILL, "bicubic")
    with pytest.raises(ValueError, match=r"args of shape \(2, >=1\).*got \(1, 1\)"):
        COLOUR_OPS["ColorIncreasing"](images, torch.ones(1, 1, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_bytes(image_groups):
    rng = np.random.default_rng(3)
    for images in image_groups.values():
        batch = to_tensor(images)
        for name, op in COLOUR_OPS.items():
            args = random_args(name, len(images), rng)
            assert torch.equal(op(batch.cuda(), args.cuda(), FILL, "bicubic").cpu(),
                               op(batch, args, FILL, "bicubic")), name
