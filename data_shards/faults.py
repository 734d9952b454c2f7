"""Crash points for the reliability tests: a real `kill -9` at a known place.

With DEIT_PIPELINE_CRASH_AT="NAME:N" in the environment, the process sends itself SIGKILL
the N-th time it reaches `crash_point("NAME")` (no cleanup handler, no finally block runs,
exactly as if the node died). Without the variable a crash point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "DEIT_PIPELINE_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
