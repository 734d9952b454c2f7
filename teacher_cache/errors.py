"""The one error type of stage one: a cache that is missing, incompatible or damaged."""
from __future__ import annotations


class CacheError(ValueError):
    """A teacher cache cannot be used as asked; the message names what is wrong and the fix."""
