"""Errors of stage two that the CLI shows as one clear line (they name the problem and the fix)."""
from __future__ import annotations


class StudentError(ValueError):
    """Bad options or inputs for train-student / evaluate."""
