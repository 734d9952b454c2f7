"""The faster replay paths: torchvision JPEG decoding (same bytes as Pillow, DeiT's recipe
unchanged) and the opt-in fast recipe (torch resize, bilinear RandAugment affine ops)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import sample_photo_paths
from data_shards import AugRecipe, ShardSet, replay_slice
from data_shards import pixels_pil
from data_shards.parameters import make_rng, rand_augment_ops
from data_shards.pixels_pil import apply_rand_augment, augment_uint8, crop_resize
from data_shards.recipe import REPLAY_ALGORITHM_VERSION, pixel_library_versions, torch_resize_kernel_class
from replay_helpers import decode_drawn_crop

FAST = AugRecipe(resize_backend="torch", rand_augment_interpolation="bilinear")
PLAIN = AugRecipe(rand_augment=None, reprob=0.0, hflip=0.0)     # crop-resize only


def reencoded_photos() -> list[bytes]:
    """The sample photos re-encoded: sizes that are and are not whole MCUs, every chroma
    subsampling, baseline and progressive, two qualities."""
    out = []
    for n, path in enumerate(sample_photo_paths()):
        photo = Image.open(path).convert("RGB")
        for size in (photo.size, (500, 375), (333, 251)):
            for subsampling in (0, 1, 2):
                buf = io.BytesIO()
                photo.resize(size, Image.Resampling.BILINEAR).save(
                    buf, "JPEG", quality=(95, 75)[n], subsampling=subsampling, progressive=subsampling == 1)
                out.append(buf.getvalue())
    return out


@pytest.fixture
def pillow_decoding_only(monkeypatch):
    monkeypatch.setattr(pixels_pil, "_decode_colour_jpeg", lambda data: None)


def test_torchvision_decoding_gives_pillows_bytes():
    for data in reencoded_photos():
        pixels = pixels_pil._decode_colour_jpeg(data)
        assert pixels is not None and pixels.flags.c_contiguous
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    truncated = reencoded_photos()[0][:5000]
    assert pixels_pil._decode_colour_jpeg(truncated) is None       # Pillow then raises, as before


def _replay_photos(recipe: AugRecipe) -> list[bytes]:
    return [augment_uint8(data, f"p{i}", seed, recipe)[0].tobytes()
            for i, data in enumerate(reencoded_photos()) for seed in (0, 1)]


def test_default_recipe_replays_photos_as_with_pillow_decoding(monkeypatch):
    used = []
    real = pixels_pil._decode_colour_jpeg
    monkeypatch.setattr(pixels_pil, "_decode_colour_jpeg", lambda data: used.append(1) or real(data))
    recipe = AugRecipe(input_size=128, decode_draft=True)   # ~300-640 px photos: some crops drafted
    fast_decoded = _replay_photos(recipe)
    assert 0 < len(used) < len(fast_decoded)    # both paths were taken
    monkeypatch.setattr(pixels_pil, "_decode_colour_jpeg", lambda data: None)
    assert _replay_photos(recipe) == fast_decoded


def test_digits_shards_replay_the_same_with_pillow_decoding(digits_shards, monkeypatch):
    samples = ShardSet.open(digits_shards["train"]).read_shard(0)[:40]
    recipe = AugRecipe(input_size=32)
    new = replay_slice(samples, 3, recipe, 0, 40).images
    monkeypatch.setattr(pixels_pil, "_decode_colour_jpeg", lambda data: None)
    assert torch.equal(replay_slice(samples, 3, recipe, 0, 40).images, new)


def test_grey_and_cmyk_jpegs_stay_with_pillow():
    photo = Image.open(sample_photo_paths()[0])
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        photo.convert(mode).save(buf, "JPEG")
        pixels, _ = decode_drawn_crop(buf.getvalue(), make_rng("t", 0), AugRecipe(decode_draft=False))
        assert isinstance(pixels, Image.Image) and pixels.mode == "RGB"


# ----------------------------------------------------------------------------- recipe fields

def test_old_recipe_dicts_keep_their_fingerprint():
    old = AugRecipe().to_dict()
    assert set(old) == {"input_size", "scale", "ratio", "interpolation", "hflip", "rand_augment", "mean", "std",
                        "reprob", "re_area", "re_aspect", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob",
                        "smoothing", "eval_crop_pct", "decode_draft", "pairing_seeds"}    # as manifests hold them
    # The fingerprint as it was computed before these fields existed.
    blob = json.dumps({"recipe": old, "libraries": pixel_library_versions(),
                       "algorithm": REPLAY_ALGORITHM_VERSION}, sort_keys=True)
    assert AugRecipe.from_dict(old).fingerprint() == hashlib.sha256(blob.encode()).hexdigest()
    assert FAST.to_dict()["resize_backend"] == "torch" and AugRecipe.from_dict(FAST.to_dict()) == FAST


def test_backends_and_cpu_kernel_classes_have_their_own_fingerprints(monkeypatch):
    torch_resize = AugRecipe(resize_backend="torch")
    prints = {}
    try:
        for capability in ("AVX2", "AVX512", "DEFAULT"):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            AugRecipe.fingerprint.cache_clear()
            prints[capability] = (AugRecipe().fingerprint(), torch_resize.fingerprint())
    finally:
        AugRecipe.fingerprint.cache_clear()     # no fingerprint of a pretended class stays cached
    assert len({pil for pil, _ in prints.values()}) == 1            # Pillow's bytes do not depend on it
    assert prints["AVX2"][1] == prints["AVX512"][1] != prints["DEFAULT"][1]
    assert prints["AVX2"][0] != prints["AVX2"][1]


def test_rand_augment_interpolation_is_validated_and_normalised():
    assert AugRecipe(rand_augment_interpolation="bicubic") == AugRecipe()   # = interpolation: same pixels
    assert AugRecipe(rand_augment_interpolation="bilinear").fingerprint() != AugRecipe().fingerprint()
    with pytest.raises(ValueError, match="rand_augment_interpolation"):
        AugRecipe(rand_augment_interpolation="nearest")
    with pytest.raises(ValueError, match="resize_backend"):
        AugRecipe(resize_backend="cv2")


def test_cli_overrides_reach_the_new_fields():
    import click

    from pipeline.group import recipe_from_options

    recipe = recipe_from_options(None, None, ("resize_backend=torch", "rand_augment_interpolation=bilinear"))
    assert recipe == FAST
    with pytest.raises(click.BadParameter, match="resize_backend"):
        recipe_from_options(None, None, ("resize_backend=opencv",))


def test_cache_mismatch_names_the_backend_and_kernel_class():
    from teacher_cache.manifest import recipe_differences

    cache = {"recipe": AugRecipe().to_dict(), "library_versions": pixel_library_versions()}
    run = {"recipe": FAST.to_dict(), "library_versions": {**pixel_library_versions(), "torch_cpu_kernel": "default"}}
    text = "\n".join(recipe_differences(cache, run))
    assert "resize_backend: cache 'pil', this run 'torch'" in text
    assert "rand_augment_interpolation: cache None, this run 'bilinear'" in text
    assert "torch_cpu_kernel: cache None, this run default" in text


# ----------------------------------------------------------------------------- pixels of the fast recipe

@pytest.mark.parametrize("size, draft, bound", [(224, False, 1.5), (64, True, 6.0)])
def test_torch_resize_stays_close_to_pillows(size, draft, bound):
    pil = dataclasses.replace(PLAIN, input_size=size, decode_draft=draft)
    fast = dataclasses.replace(pil, resize_backend="torch")
    diffs = []
    for i, path in enumerate(sample_photo_paths()):
        for seed in range(4):
            # The same generator for both: the same crop box (the fingerprints differ).
            rng_a, rng_b = make_rng("same", i, seed), make_rng("same", i, seed)
            a = crop_resize(*decode_drawn_crop(path.read_bytes(), rng_a, pil), pil)
            b = crop_resize(*decode_drawn_crop(path.read_bytes(), rng_b, fast), fast)
            diffs.append(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())
    # Another cubic (a=-0.75 vs Pillow's -0.5) and, with draft decoding, a box rounded to whole
    # reduced pixels (up to 4 full pixels at 1/8): a few grey levels apart on average, where a
    # wrong crop is tens apart.
    assert 0 < max(diffs) < bound


def test_rand_augment_interpolation_changes_only_the_affine_ops():
    img = Image.open(sample_photo_paths()[1]).convert("RGB").resize((96, 96))
    bilinear = AugRecipe(input_size=96, rand_augment_interpolation="bilinear")
    bicubic = dataclasses.replace(bilinear, rand_augment_interpolation=None)
    differ = 0
    for seed in range(24):
        a = apply_rand_augment(img, rand_augment_ops(make_rng("ra", seed), bicubic), bicubic)
        b = apply_rand_augment(img, rand_augment_ops(make_rng("ra", seed), bilinear), bilinear)
        differ += not np.array_equal(np.asarray(a), np.asarray(b))
    assert 0 < differ < 24       # two of 15 ops per image: some draws hit an affine op, some none


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_fast_recipe_cache_verifies_and_is_refused_on_another_kernel_class(tmp_path, small_shards,
                                                                           teacher_checkpoint, monkeypatch):
    from cache_fixtures import cache_options
    from teacher_cache import CacheError, TeacherCache, cache_teacher
    from teacher_cache.verification import verify_cache

    out = tmp_path / "cache"
    recipe = dataclasses.replace(FAST, input_size=32)
    cache_teacher(cache_options(small_shards, out, teacher_checkpoint, workers=2, recipe=recipe, seeds=2))
    # Stage one's images (two loader workers) replayed again by verify-cache: the same digests.
    report = verify_cache(out, small_shards, samples=24, device="cpu")
    assert report["digests_checked"] > 0 and report["digest_mismatches"] == []
    cache, shard_set = TeacherCache.open(out), ShardSet.open(small_shards)
    assert cache.manifest["library_versions"]["torch_cpu_kernel"] == torch_resize_kernel_class()
    cache.check_compatible(shard_set, recipe)
    other = "DEFAULT" if torch_resize_kernel_class() != "default" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    AugRecipe.fingerprint.cache_clear()
    try:
        with pytest.raises(CacheError, match="torch_cpu_kernel"):
            cache.check_compatible(shard_set, recipe)
    finally:
        AugRecipe.fingerprint.cache_clear()     # no fingerprint of the pretended class stays cached
