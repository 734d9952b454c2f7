"""Crash points for the reliability tests: a real `kill -9` at a known place. With
DEIT_PIPELINE_CRASH_AT="NAME:N", the process SIGKILLs itself the N-th time it reaches
`crash_point("NAME")` (no cleanup or finally block runs, as if the node died)."""
from __future__ import annotations

import os
import signal

ENV = "DEIT_PIPELINE_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    target, _, count = os.environ.get(ENV, "").partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
