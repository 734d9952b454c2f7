"""Test-only views of the replay: a whole shard sample by sample, one image per seed unmixed.

The library replays slices (`replay_slice` + `finish_item`); these helpers cut a shard into
slices and unpack the items per sample, so tests can compare samples across cuts and processes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from data_shards import AugRecipe, finish_item, replay_slice
from data_shards.finishing import finish_images
from data_shards.mixing import mixing_order
from data_shards.parameters import resized_crop_params
from data_shards.pixels_pil import augment_uint8, decode_crop


@dataclass
class ReplayedSample:
    key: str
    label: int
    partner_key: str
    partner_label: int
    lam: float
    image: torch.Tensor = field(repr=False)   # mixed, augmented, normalised float32 CHW
    shard: int = -1
    position: int = -1


def replay_shard(samples: Sequence, aug_seed: int, recipe: AugRecipe, slice_size: int = 64) -> Iterator[ReplayedSample]:
    """Every sample of one shard, augmented, finished and mixed for `aug_seed`, in mixing order,
    as `replay_slice`s of `slice_size`; neither the order of `samples` nor `slice_size` changes it."""
    by_index = dict(enumerate(sorted(samples, key=lambda s: (s.position, s.key))))
    keys = [s.key for s in by_index.values()]
    n = len(keys)
    order = mixing_order(keys, aug_seed, recipe)
    for start in range(0, n, slice_size):
        item = replay_slice(by_index, aug_seed, recipe, start, min(n, start + slice_size), keys, order)
        images = finish_item(item, recipe)
        for i, key in enumerate(item.keys):
            yield ReplayedSample(key, int(item.labels[i]), item.partner_keys[i], int(item.partner_labels[i]),
                                 float(item.lam[i]), images[i], item.shard, int(item.positions[i]))


def augment_seeds(data: bytes, key: str, aug_seeds: Iterable[int], recipe: AugRecipe) -> list[torch.Tensor]:
    """The (unmixed) training augmentation of one image for each seed: float32 CHW, normalised."""
    out = []
    for seed in aug_seeds:
        pixels, erase = augment_uint8(data, key, seed, recipe)
        out.append(finish_images(torch.from_numpy(pixels.copy())[None], torch.tensor([erase]), recipe)[0])
    return out


def decode_drawn_crop(data: bytes, rng: np.random.Generator, recipe: AugRecipe):
    """`decode_crop` of a crop drawn from `rng` as the recipe draws it (the same generator state:
    the same crop box, whatever the recipe's other fields) -> (pixels, box)."""
    img = Image.open(io.BytesIO(data))
    crop = resized_crop_params(rng, img.height, img.width, recipe.scale, recipe.ratio)
    return decode_crop(img, data, crop, recipe)
