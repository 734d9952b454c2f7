"""The `deit-pipeline` click group and what every command module shares: run_or_explain, option
types, the shared options. Commands register on `main`; cli.py imports them (cli → *_commands →
group). Bad values are refused while parsing (exit code 2, one line naming the option), before any
work; the library (torch) is imported only to check a given value, show a default it holds, or run
a command: `--help` starts without it."""
from __future__ import annotations

import functools
import importlib
import json
import math
from pathlib import Path

import click


class UserError(click.ClickException):
    """A problem with the user's input: printed as one clear line, exit code 2."""
    exit_code = 2


def run_or_explain(fn, *args, **kwargs):
    """Call a library function; its errors for bad input become a clean CLI error (no traceback)."""
    from data_shards import ShardsError, SourceError
    from data_shards.devices import DeviceError
    from student.errors import StudentError
    from teacher_cache.errors import CacheError
    try:
        return fn(*args, **kwargs)
    except (SourceError, ShardsError, DeviceError, FileNotFoundError, CacheError,
            StudentError) as exc:
        raise UserError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deit-pipeline", message="deit-pipeline %(version)s")
def main():
    """Distil DeiT students from a teacher whose predictions are cached once and replayed."""


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


class LibraryOption(click.Option):
    """click.Option whose default and help may be functions, called when the option is parsed or
    its help shown: how the CLI shows the library's defaults without importing it at start-up."""

    def __init__(self, *decls, help=None, **kwargs):
        super().__init__(*decls, help=None if callable(help) else help, **kwargs)
        self.help = help if callable(help) else self.help

    def get_default(self, ctx, call=True):
        return super().get_default(ctx, call=True)       # help shows the value, not "(dynamic)"

    def get_help_record(self, ctx):
        self.help = self.help() if callable(self.help) else self.help
        return super().get_help_record(ctx)


option = functools.partial(click.option, cls=LibraryOption)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (click lets them through any range)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


COUNT = click.IntRange(min=1)                                   # sizes, counts, epochs
NON_NEGATIVE = click.IntRange(min=0)                            # workers, indices, seeds
SEED = click.IntRange(min=0, max=2**63 - 1)
PROBABILITY = FiniteFloatRange(0.0, 1.0)
NON_NEGATIVE_FLOAT = FiniteFloatRange(min=0.0)
POSITIVE_FLOAT = FiniteFloatRange(min=0.0, min_open=True)
PRECISION = click.Choice(["fp32", "bf16", "fp16"])
FOLDER, FILE = click.Path(file_okay=False), click.Path(dir_okay=False)


def library_value(module: str, name: str):
    """A function that imports `module` and returns its `name`: a LibraryOption's default or help."""
    return lambda: getattr(importlib.import_module(module), name)


device_form = library_value("data_shards.devices", "DEVICE_FORM")


def check_device(ctx, param, value):
    """--device: auto, cpu, cuda or cuda:N (whether this machine has it is checked when the command runs)."""
    from data_shards.devices import DeviceError, check_device_name
    try:
        return check_device_name(value)
    except DeviceError:
        raise click.BadParameter(f"{value!r} is not a device: expected {device_form()}", ctx,
                                 param) from None


def device_option(help=lambda: f"{device_form()}.", default="auto"):
    return option("--device", default=default, show_default=True, callback=check_device, help=help)


def recipe_options(fn):
    """--input-size, --recipe FILE|JSON and repeatable --aug KEY=VALUE, DeiT's defaults otherwise."""
    fn = option("--aug", "aug_overrides", multiple=True, metavar="KEY=VALUE",
                callback=_check_recipe_fields,
                help="Override one recipe field, e.g. --aug hflip=0 --aug scale=[0.35,1] --aug "
                     "rand_augment=null (values are JSON). Faster, not timm's bytes: --aug "
                     "resize_backend=torch --aug rand_augment_interpolation=bilinear.")(fn)
    fn = option("--recipe", "recipe_source", metavar="FILE|JSON", callback=_check_recipe_fields,
                help="Augmentation recipe as a JSON file or string (fields of AugRecipe; missing "
                     "ones are DeiT's), or a cache's manifest.json to reuse its recipe.")(fn)
    return option("--input-size", type=COUNT, help="Training input size (default 224).")(fn)


def parse_key_values(items: tuple[str, ...], option: str) -> dict:
    """Repeatable KEY=VALUE options; values are JSON, or bare strings such as bilinear."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_json_object(text: str, param_hint: str, what: str, expected: str) -> dict:
    """An option's JSON object (--recipe, --teacher-kwargs): one error naming the option otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not a JSON object ({exc})", param_hint=param_hint) from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"expected {expected}, got a JSON {type(value).__name__}",
                                 param_hint=param_hint)
    return value


def json_object_option(ctx, param, text: str | None) -> dict | None:
    """Callback of an option whose value is a JSON object (--teacher-kwargs), checked while parsing."""
    if text is None:
        return None
    return parse_json_object(text, param.get_error_hint(ctx), repr(text),
                             "a JSON object like '{\"img_size\": 32}'")


def _check_recipe_fields(ctx, param, value):
    """Callback of --aug and --recipe: each field's type and range (AugRecipe.check_field), naming
    the option on the first bad one."""
    option = param.opts[0]
    fields = (parse_key_values(value, option) if param.multiple
              else read_recipe_source(value) if value else {})
    if not fields:
        return value
    from data_shards import AugRecipe
    for key, field_value in fields.items():
        try:
            AugRecipe.check_field(key, field_value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    return value


def read_recipe_source(source: str) -> dict:
    """--recipe's fields: a JSON object, a JSON file, or a cache's manifest.json (its recipe)."""
    text = source
    # a JSON object is never a path; a long one is no valid file name
    if not source.lstrip().startswith("{"):
        try:
            text = Path(source).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read recipe file {source}: "
                                     f"{getattr(exc, 'strerror', None) or exc}",
                                     param_hint="--recipe") from None
    loaded = parse_json_object(text, "--recipe", source if text is not source else "the text",
                               "a JSON object of recipe fields")
    if isinstance(loaded.get("recipe"), dict):
        loaded = loaded["recipe"]          # a cache's manifest.json: reuse its recipe
    return loaded


def recipe_from_options(input_size: int | None, recipe_source: str | None,
                        aug_overrides: tuple[str, ...]):
    """The AugRecipe of --recipe, --aug and --input-size; None when none is given."""
    if input_size is None and not recipe_source and not aug_overrides:
        return None
    from data_shards import AugRecipe
    fields: dict = read_recipe_source(recipe_source) if recipe_source else {}
    fields.update(parse_key_values(aug_overrides, "--aug"))
    if input_size is not None:
        fields["input_size"] = input_size
    try:
        return AugRecipe.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--recipe/--aug/--input-size") from None
