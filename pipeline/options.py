"""Click options and types shared by several commands: the augmentation recipe, numbers in a range,
the device. Every bad value is refused while the options are parsed (exit code 2, one line naming
the option), before a command starts any work."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from data_shards import AugRecipe
from data_shards.devices import DEVICE_FORM, DeviceError, check_device_name


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


def check_device(ctx, param, value):
    """--device: auto, cpu, cuda or cuda:N (whether this machine has it is checked when the command runs)."""
    try:
        return check_device_name(value)
    except DeviceError:
        raise click.BadParameter(f"{value!r} is not a device: expected {DEVICE_FORM}", ctx, param) from None


def device_option(help: str = f"{DEVICE_FORM}.", default: str = "auto"):
    return click.option("--device", default=default, show_default=True, callback=check_device,
                        help=help)


def recipe_options(fn):
    """--input-size, --recipe FILE|JSON and repeatable --aug KEY=VALUE, DeiT's defaults otherwise."""
    fn = click.option("--aug", "aug_overrides", multiple=True, metavar="KEY=VALUE", callback=_check_aug,
                      help="Override one recipe field, e.g. --aug hflip=0 --aug scale=[0.35,1] "
                           "--aug rand_augment=null (values are JSON). Faster, not timm's bytes: "
                           "--aug resize_backend=torch --aug rand_augment_interpolation=bilinear.")(fn)
    fn = click.option("--recipe", "recipe_source", default=None, metavar="FILE|JSON", callback=_check_recipe,
                      help="Augmentation recipe as a JSON file or string (fields of AugRecipe; "
                           "missing ones are DeiT's), or a cache's manifest.json to reuse its "
                           "recipe.")(fn)
    fn = click.option("--input-size", type=COUNT, default=None, help="Training input size (default "
                      "224).")(fn)
    return fn


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


def _check_fields(fields: dict, option: str) -> None:
    """Each recipe field's type and range (AugRecipe.check_field), naming `option` on the first bad one."""
    for key, value in fields.items():
        try:
            AugRecipe.check_field(key, value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None


def _check_aug(ctx, param, items: tuple[str, ...]) -> tuple[str, ...]:
    _check_fields(parse_key_values(items, "--aug"), "--aug")
    return items


def _check_recipe(ctx, param, source: str | None) -> str | None:
    if source:
        _check_fields(read_recipe_source(source), "--recipe")
    return source


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


def recipe_given(input_size: int | None, recipe_source: str | None, aug_overrides: tuple[str, ...]) -> bool:
    return input_size is not None or bool(recipe_source) or bool(aug_overrides)


def recipe_from_options(input_size: int | None, recipe_source: str | None, aug_overrides: tuple[str, ...]) -> AugRecipe:
    fields: dict = read_recipe_source(recipe_source) if recipe_source else {}
    fields.update(parse_key_values(aug_overrides, "--aug"))
    if input_size is not None:
        fields["input_size"] = input_size
    try:
        return AugRecipe.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--recipe/--aug/--input-size") from None
