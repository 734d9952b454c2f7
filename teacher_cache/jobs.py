"""Which job am I? Flags first, then torchrun, then a SLURM array, then SLURM tasks, else 0 of 1."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .errors import CacheError


@dataclass(frozen=True)
class JobSlot:
    index: int
    count: int
    source: str        # where the numbers came from, for the log

    def __str__(self) -> str:
        return f"job {self.index} of {self.count} ({self.source})"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise CacheError(f"environment variable {name}={env[name]!r} is not an integer") from None


def resolve_job(num_jobs: int | None = None, job_index: int | None = None,
                env: Mapping[str, str] | None = None) -> JobSlot:
    env = os.environ if env is None else env
    if (num_jobs is None) != (job_index is None):
        raise CacheError("--num-jobs and --job-index go together: give both or neither")
    if num_jobs is not None:
        slot = JobSlot(job_index, num_jobs, "--num-jobs/--job-index")
    elif "WORLD_SIZE" in env and "RANK" in env:
        slot = JobSlot(_int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun RANK/WORLD_SIZE")
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # Array ids need not start at 0 (--array=1-100) and may be strided (--array=0-98:2).
        first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        offset = _int(env, "SLURM_ARRAY_TASK_ID") - first
        if step < 1 or offset % step:
            raise CacheError(f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} is not on the "
                             f"array's grid (min {first}, step {step}); pass "
                             f"--num-jobs/--job-index instead")
        slot = JobSlot(offset // step, _int(env, "SLURM_ARRAY_TASK_COUNT"), "SLURM array")
    elif _int_or(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        slot = JobSlot(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), "SLURM tasks")
    else:
        slot = JobSlot(0, 1, "single job")
    if slot.count < 1 or not 0 <= slot.index < slot.count:
        raise CacheError(f"job index {slot.index} is not in 0..{slot.count - 1} (from "
                         f"{slot.source})")
    return slot


def _int_or(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        return default
