"""Stage zero: WebDataset shards, their manifest, and the replayable DeiT augmentation."""
from .finishing import eval_image, finish_item, tensor_digest
from .items import ReplayItem, WorkItem, replay_item, replay_slice, slice_positions, unit_items
from .mixing import mixed_targets
from .pixels_pil import decode_image
from .recipe import AugRecipe
from .shards import ShardSample, ShardSet, ShardsError
from .sources import SourceError
from .writer import make_shards

__all__ = ["AugRecipe", "ReplayItem", "ShardSample", "ShardSet", "ShardsError", "SourceError", "WorkItem",
           "decode_image", "eval_image", "finish_item", "make_shards", "mixed_targets", "replay_item",
           "replay_slice", "slice_positions", "tensor_digest", "unit_items"]
