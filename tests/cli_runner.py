"""The tests' one way to run the command line: `run_cli([CLI, "command", ...])`.

In-process through click by default (fast, and an unexpected exception shows up as a traceback
in stderr, as it would in a terminal). A real process when the test needs one: environment
variables (crash points kill the process), another program (bash), or process=True (exit codes
of the installed script; reruns compared byte for byte with a reference: the pytest process's
torch state, left by earlier tests, is not a fresh run's).
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

CLI = str(Path(sys.executable).with_name("deit-pipeline"))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list, env: dict | None = None, *, process: bool = False, **popen_kwargs) -> CliResult:
    """Run `args` (program first: CLI or "deit-pipeline" run the pipeline's own command line)."""
    args = [str(a) for a in args]
    if process or env is not None or Path(args[0]).name != "deit-pipeline":
        done = subprocess.run(args, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300,
                              **popen_kwargs)
        return CliResult(done.returncode, done.stdout, done.stderr)
    from click.testing import CliRunner
    from pipeline.cli import main
    result = CliRunner().invoke(main, args[1:], catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)
