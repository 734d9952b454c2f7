"""Stage zero: WebDataset shards, their manifest, and the replayable DeiT augmentation."""
from .augment import (AugRecipe, ReplayedSample, augment_image, augment_seeds, decode_image, eval_image,
                      mixed_targets, recipe_fingerprint, replay_shard, tensor_digest)
from .shards import ShardSample, ShardSet, ShardsError
from .writer import make_shards
from .sources import SourceError

__all__ = ["AugRecipe", "ReplayedSample", "ShardSample", "ShardSet", "ShardsError", "SourceError",
           "augment_image", "augment_seeds", "decode_image", "eval_image", "make_shards", "mixed_targets",
           "recipe_fingerprint", "replay_shard", "tensor_digest"]
