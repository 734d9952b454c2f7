"""The `deit-pipeline` entry point `main`: the group (pipeline/group.py) with every stage's commands."""
from . import cache_commands, demo_commands, shard_commands, student_commands  # noqa: F401
from .group import main

__all__ = ["main"]
