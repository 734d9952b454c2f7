"""Work items: slices (shard, seed, start, stop) of a shard's seeded mixing order, replayed alone
by both stages: a worker reads only the slice's samples and returns the uint8 `ReplayItem`; the
consumer finishes it on its device (`finish_item`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .mixing import mix_params, mixing_order, partner_offset
from .pixels_pil import augment_uint8
from .recipe import AugRecipe
from .shards import ShardSet


@dataclass(frozen=True)
class WorkItem:
    """Samples order[start:stop] of shard `shard`'s mixing order for seed `aug_seed`."""
    shard: int
    aug_seed: int
    start: int
    stop: int


@dataclass(frozen=True, eq=False)    # compared as its WorkItem: tensors give no single bool
class ReplayItem(WorkItem):
    """A work item's samples replayed up to the uint8 stage, with per-sample parameters of the
    rest (`finish_item` needs no generator). When mixing, `images` holds d = partner_offset more,
    order[stop .. stop + d - 1] (mod n): sample k's partner is image k + d."""
    keys: list[str]
    partner_keys: list[str]
    positions: torch.Tensor        # (m,) int64 shard positions
    labels: torch.Tensor           # (m,) int64
    partner_labels: torch.Tensor   # (m,) int64
    lam: torch.Tensor              # (m,) float64 label weight of the primary (box-corrected)
    mix_weights: torch.Tensor      # (m, 2) float32 pixel weights (primary, partner); CutMix (1, 0)
    cut_boxes: torch.Tensor        # (m, 4) int64 partner box (y_low, y_high, x_low, x_high); 0: none
    erase: torch.Tensor            # (m + d, 5) int64 (top, left, h, w, bank offset); h=0: none
    images: torch.Tensor           # (m + d, H, W, 3) uint8, after crop-resize, flip, RandAugment

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def partner_offset(self) -> int:
        """d: sample k is mixed with image k + d (0 when the recipe does not mix)."""
        return len(self.images) - len(self.keys)

    def pin_memory(self) -> "ReplayItem":
        """For DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        names = ("images", "positions", "labels", "partner_labels", "lam", "mix_weights")
        return replace(self, **{name: getattr(self, name).pin_memory() for name in names})

    def nbytes(self) -> int:
        return sum(t.nbytes for t in vars(self).values() if isinstance(t, torch.Tensor))


def replay_slice(samples: Sequence, aug_seed: int, recipe: AugRecipe, start: int, stop: int,
                 keys: Sequence[str] | None = None, order: Sequence[int] | None = None) -> ReplayItem:
    """Replay samples order[start:stop] of one shard for `aug_seed` (uint8, not yet finished).
    `samples`: ShardSample-likes, the whole shard or at least the positions `slice_positions`
    names (a list, or a dict by position; then `keys`, all the shard's keys in position order).
    Any cut of (0, n) into slices gives the same finished images."""
    if keys is None:
        keys = [s.key for s in sorted(samples, key=lambda s: s.position)]
    n = len(keys)
    if not 0 <= start < stop <= n:
        raise ValueError(f"slice {start}:{stop} is not within a shard of {n} samples")
    order = mixing_order(keys, aug_seed, recipe) if order is None else order
    by_position = samples if isinstance(samples, dict) else {s.position: s for s in samples}
    primaries = [by_position[order[k]] for k in range(start, stop)]
    offset = partner_offset(n, aug_seed, recipe)      # 0 when the recipe does not mix
    augmented = primaries + [by_position[order[k % n]] for k in range(stop, stop + offset)]
    images = np.empty((len(augmented), recipe.input_size, recipe.input_size, 3), dtype=np.uint8)
    erase = [augment_uint8(sample.data, sample.key, aug_seed, recipe, out=images[i])[1]
             for i, sample in enumerate(augmented)]
    m = len(primaries)
    partners = augmented[offset:offset + m]
    lam, weights, boxes = [], np.zeros((m, 2), dtype=np.float32), np.zeros((m, 4), dtype=np.int64)
    for i, (primary, partner) in enumerate(zip(primaries, partners)):
        params = mix_params(primary.key, partner.key, aug_seed, recipe)
        lam.append(params.lam)
        if params.use_cutmix:
            weights[i] = (1.0, 0.0)
            boxes[i] = params.box
        else:
            weights[i] = (params.lam, 1.0 - params.lam)    # rounded once to float32, on the host
    as_int64 = functools.partial(torch.tensor, dtype=torch.int64)
    return ReplayItem(int(primaries[0].shard), int(aug_seed), start, stop, [s.key for s in primaries],
                      [s.key for s in partners], as_int64([s.position for s in primaries]),
                      as_int64([s.label for s in primaries]), as_int64([s.label for s in partners]),
                      torch.tensor(lam, dtype=torch.float64), torch.from_numpy(weights),
                      torch.from_numpy(boxes), as_int64(erase).view(-1, 5), torch.from_numpy(images))


def slice_positions(keys: Sequence[str], aug_seed: int, recipe: AugRecipe, start: int, stop: int,
                    order: Sequence[int] | None = None) -> list[int]:
    """Shard positions a slice reads: order[start:stop], and the next partner_offset ones (mod
    n: the last samples' partners) when the recipe mixes."""
    order = mixing_order(keys, aug_seed, recipe) if order is None else order
    last = stop + partner_offset(len(keys), aug_seed, recipe)
    return sorted({order[k % len(keys)] for k in range(start, last)})


def replay_item(shard_set: ShardSet, item: WorkItem, recipe: AugRecipe,
                keys_cache: dict[int, list[str]] | None = None) -> ReplayItem:
    """Read only the slice's samples (one seek each) and replay them (uint8, unfinished)."""
    keys_cache = {} if keys_cache is None else keys_cache
    if item.shard not in keys_cache:
        keys_cache.clear()       # one shard's keys at a time: memory independent of the shard count
        keys_cache[item.shard] = shard_set.shard_keys(item.shard)
    keys = keys_cache[item.shard]
    order = mixing_order(keys, item.aug_seed, recipe)
    positions = slice_positions(keys, item.aug_seed, recipe, item.start, item.stop, order)
    samples = shard_set.read_samples(item.shard, positions)
    return replay_slice(samples, item.aug_seed, recipe, item.start, item.stop, keys, order)


def order_part(n: int, part: int, parts: int) -> tuple[int, int]:
    """Positions [start, stop) of part `part` of `parts` of a mixing order of n samples: epoch j
    of a seed group (student/samplers.py) trains on part j; stage one records digests there."""
    return part * n // parts, (part + 1) * n // parts


def digest_positions(n: int, parts: int) -> list[int]:
    """Mixing-order positions whose finished images stage one records as digests: the first `parts`
    (= recipe.pairing_seeds) of each part (order_part); why these: DESIGN.md, "Replay digests"."""
    positions: list[int] = []
    for part in range(parts):
        start, stop = order_part(n, part, parts)
        positions += range(start, min(stop, start + parts))
    return positions


def unit_items(n: int, shard: int, aug_seed: int, size: int) -> list[WorkItem]:
    """A whole unit (n samples) as consecutive items of `size` samples: the teacher's batches."""
    return [WorkItem(shard, aug_seed, start, min(n, start + size)) for start in range(0, n, size)]
