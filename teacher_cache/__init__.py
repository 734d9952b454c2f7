"""Stage one: the teacher's outputs for every (sample, augmentation seed), cached in Zarr + Parquet.

Public API (see DESIGN.md for the layout):
    cache_teacher(CacheOptions(...))   compute (a job's share of) a cache, resumable
    TeacherCache.open(path)            read it: .read(shard, seed), .check_compatible(...), ...
    load_teacher(...), teacher_forward(...)   shared with stage two's online teacher
    inspect_cache(path), verify_cache(path, shards)
"""
from .build import CacheOptions, cache_teacher
from .cache import TeacherCache
from .errors import CacheError
from .layout import Unit
from .targets import TeacherTargets, encode_teacher_logits
from .teacher import (DEFAULT_TEACHER, TeacherError, load_teacher, read_checkpoint, teacher_forward,
                      teacher_logits, weights_sha256)

__all__ = ["CacheError", "CacheOptions", "DEFAULT_TEACHER", "TeacherCache", "TeacherError",
           "TeacherTargets", "Unit", "cache_teacher", "encode_teacher_logits", "load_teacher",
           "read_checkpoint", "teacher_forward", "teacher_logits", "weights_sha256"]
