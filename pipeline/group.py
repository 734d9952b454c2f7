"""The `deit-pipeline` click group and the helpers every command module shares.

The command modules import from here and register themselves on `main`; pipeline/cli.py imports
them, so the arrows go one way: cli → *_commands → group.
"""
from __future__ import annotations

import json

import click

from data_shards import SourceError
from data_shards.devices import DeviceError
from data_shards.shards import ShardsError
from student.errors import StudentError
from teacher_cache.errors import CacheError


class UserError(click.ClickException):
    """A problem with the user's input: printed as one clear line, exit code 2."""
    exit_code = 2


# Errors raised by the library for bad input; the CLI shows their message without a traceback.
USER_ERRORS = (SourceError, ShardsError, DeviceError, FileNotFoundError, CacheError, StudentError)


def run_or_explain(fn, *args, **kwargs):
    """Call a library function; turn known input errors into a clean CLI error."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as exc:
        raise UserError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deit-pipeline", message="deit-pipeline %(version)s")
def main():
    """Distil DeiT students from a teacher whose predictions are cached once and replayed."""


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))
