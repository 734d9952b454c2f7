"""Click options shared by several commands (the augmentation recipe)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from data_shards import AugRecipe


def recipe_options(fn):
    """--input-size, --recipe FILE|JSON and repeatable --aug KEY=VALUE, DeiT's defaults otherwise."""
    fn = click.option("--aug", "aug_overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one recipe field, e.g. --aug hflip=0 --aug scale=[0.35,1] "
                           "--aug rand_augment=null (values are JSON). Faster, not timm's bytes: "
                           "--aug resize_backend=torch --aug rand_augment_interpolation=bilinear.")(fn)
    fn = click.option("--recipe", "recipe_source", default=None, metavar="FILE|JSON",
                      help="Augmentation recipe as a JSON file or string (fields of AugRecipe; missing ones "
                           "are DeiT's), or a cache's manifest.json to reuse its recipe.")(fn)
    fn = click.option("--input-size", type=int, default=None, help="Training input size (default 224).")(fn)
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


def recipe_given(input_size: int | None, recipe_source: str | None, aug_overrides: tuple[str, ...]) -> bool:
    return input_size is not None or bool(recipe_source) or bool(aug_overrides)


def recipe_from_options(input_size: int | None, recipe_source: str | None, aug_overrides: tuple[str, ...]) -> AugRecipe:
    fields: dict = {}
    if recipe_source:
        text = recipe_source
        if not recipe_source.lstrip().startswith("{"):   # a JSON object is never a path; a long one is no valid file name
            try:
                text = Path(recipe_source).read_text()
            except OSError as exc:
                raise click.BadParameter(f"cannot read recipe file {recipe_source}: {exc.strerror or exc}",
                                         param_hint="--recipe") from None
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not a JSON file or JSON object: {exc}", param_hint="--recipe") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("recipe"), dict):
            loaded = loaded["recipe"]          # a cache's manifest.json: reuse its recipe
        if not isinstance(loaded, dict):
            raise click.BadParameter("expected a JSON object of recipe fields", param_hint="--recipe")
        fields.update(loaded)
    fields.update(parse_key_values(aug_overrides, "--aug"))
    if input_size is not None:
        fields["input_size"] = input_size
    try:
        return AugRecipe.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--recipe/--aug") from None
