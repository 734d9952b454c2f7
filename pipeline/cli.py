"""The `deit-pipeline` command line: thin click wrappers over the library functions.

The group and shared helpers live in pipeline/group.py; each stage's commands register
themselves on it from their own module, imported here (the entry point is `main`).
"""
from . import cache_commands, demo_commands, shard_commands, student_commands  # noqa: F401
from .group import main

__all__ = ["main"]
