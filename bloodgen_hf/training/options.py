"""Typed options whose fields are command-line flags.

The options every run shares (`core.TrainConfig`) and each model family's own (`DDPMOptions`, `GANOptions`,
...) are dataclasses. `add_dataclass_arguments` makes each field a --flag: its name with dashes, its default,
and its type (int, float, a bool as --x/--no-x, anything else a string); a field written with `option(...)`
adds its help and argparse's `choices`, `type`, `nargs`, `metavar` or `required`. `options_from_args` reads the
parsed flags back into the dataclass.

A family's options travel in `TrainConfig.extra`, and runs record them flat, under "extra" in train_config.json
and beside the shared settings in each checkpoint (`options_record`); `options_of` turns such a record (or a
plain dict) back into the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from bloodgen_hf.errors import UsageError

T = TypeVar("T")


def option(
    default: Any = None,
    help: str | None = None,
    *,
    factory: Callable[[], Any] | None = None,
    flag: bool = True,
    absent: Any = dataclasses.MISSING,
    **argparse_settings: Any,
) -> Any:
    """A dataclass field that is a --flag, with its default (or `factory`), help and argparse settings.

    `flag=False`: a setting for callers (as augment-study's classifiers), not on the command line.
    `absent`: what a record from before the option existed meant (when that is not the default)."""
    metadata = {"help": help, "flag": flag, "argparse": argparse_settings}
    if absent is not dataclasses.MISSING:
        metadata["absent"] = absent
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, **defaults: Any) -> argparse.ArgumentParser:
    """Every flag field of the dataclass `cls` as a --flag; `defaults` replace the fields' own defaults."""
    values, hints = cls(**defaults), typing.get_type_hints(cls)
    for f in flag_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        settings = {"default": getattr(values, f.name), **f.metadata.get("argparse", {})}
        if f.metadata.get("help") is not None:
            settings["help"] = f.metadata["help"]
        kind = value_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **settings)
        else:
            parser.add_argument(flag, **{"type": kind if kind in (int, float) else str, **settings})
    return parser


def value_type(hint: Any) -> Any:
    """The type a flag parses to: `int | None` is an int flag whose default is None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        return kinds[0] if len(kinds) == 1 else str
    return hint


def channel_widths(text: str) -> tuple[int, ...]:
    """Comma-separated positive widths ("32,64,64") as a tuple. The refusal says why without naming a flag:
    `parse_channels` names it, argparse does for `channels_argument`."""
    try:
        channels = tuple(int(c) for c in str(text).split(","))
    except ValueError:
        raise UsageError(f"takes comma-separated integers such as 32,64,64; got {text!r}") from None
    if min(channels) < 1:
        raise UsageError(f"must be positive, got {text!r}")
    return channels


def parse_channels(text: str | None, flag: str = "--channels") -> tuple[int, ...] | None:
    """A comma-separated widths option as a tuple, None when not given (the preset's); `flag` names the option
    in the error, as a string flag is parsed only when the model is built (a recorded run's too)."""
    if text is None:
        return None
    try:
        return channel_widths(text)
    except UsageError as err:
        raise UsageError(f"{flag} {err}") from None


def channels_argument(text: str) -> list[int]:
    """The widths as an argparse `type` (a list, as such an option records them). argparse's error line names
    the flag ("argument --channels: takes ..."); a UsageError, being a ValueError, it would print as "invalid
    channels_argument value", hence ArgumentTypeError."""
    try:
        return list(channel_widths(text))
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def options_from_args(args: argparse.Namespace, cls: type[T]) -> T:
    """The dataclass of the parsed flags (fields that are no flags keep their defaults)."""
    values = vars(args)
    return cls(**{f.name: values[f.name] for f in flag_fields(cls)})


def options_of(cls: type[T], value: T | Mapping[str, Any] | None) -> T:
    """`value` as a `cls`: itself, or one made from a mapping of its fields (a run's recorded "extra", a
    test's dict); a field the mapping lacks takes its `absent` value if it has one, else its default."""
    if isinstance(value, cls):
        return value
    given = dict(value or {})
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}")
    absent = {f.name: f.metadata["absent"] for f in dataclasses.fields(cls) if "absent" in f.metadata}
    return cls(**{**absent, **given})


def options_record(options: Any) -> dict[str, Any]:
    """The options as a run records them: a flat dict of field values (a plain dict stays as it is)."""
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {})
