"""Stage zero: WebDataset shards, their manifest, and the replayable DeiT augmentation."""
from .augment import (AugRecipe, ReplayItem, decode_image, eval_image, finish_item, mixed_targets, recipe_fingerprint,
                      replay_slice, slice_positions, tensor_digest)
from .items import WorkItem, replay_item, unit_items
from .shards import ShardSample, ShardSet, ShardsError
from .writer import make_shards
from .sources import SourceError

__all__ = ["AugRecipe", "ReplayItem", "ShardSample", "ShardSet", "ShardsError", "SourceError", "decode_image",
           "eval_image", "finish_item", "make_shards", "mixed_targets", "recipe_fingerprint", "replay_slice",
           "slice_positions", "tensor_digest", "WorkItem", "replay_item", "unit_items"]
