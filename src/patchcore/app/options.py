"""PatchCoreConfig <-> argparse: one --option per config field, with the field's default and help, so the
command line and the config cannot drift (tests/test_cli.py checks every field round-trips)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from ..config import PatchCoreConfig


def parse_size(text: str) -> int | tuple[int, int] | None:
    """'256' -> 256 (shorter side), '640,256' or '640x256' -> (640, 256) as H,W, 'none' -> None."""
    text = text.strip().lower()
    if text == "none":
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, H,W or none, got {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"expected N, H,W or none, got {text!r}")


def _number(text: str, kind: type, low: float | None, *, strict: bool = False):
    """A command-line number of `kind` (int or float), finite, and >= low (> low when strict): one usage error
    naming the rule, never a traceback later ('nan' and 'inf' parse as floats)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got "
                                         f"{text!r}") from None
    bad = not math.isfinite(value) or (low is not None and (value <= low if strict else value < low))
    if bad:
        rule = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise argparse.ArgumentTypeError(f"expected a finite {'whole number' if kind is int else 'number'}{rule}, "
                                         f"got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float, None)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0)


def positive_finite_float(text: str) -> float:
    return _number(text, float, 0, strict=True)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0)


def positive_int(text: str) -> int:
    return _number(text, int, 1)


def parse_int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_optional(kind):
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    return parse


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_SPECIAL_PARSERS = {"resize": parse_size, "crop": parse_size, "feature_strides": parse_int_tuple,
                    "exclude_outliers": parse_bool}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One --option per PatchCoreConfig field, with the field's default and help."""
    group = parser.add_argument_group("model options (saved in the model file)")
    hints = typing.get_type_hints(PatchCoreConfig)
    for f in dataclasses.fields(PatchCoreConfig):
        parse = _SPECIAL_PARSERS.get(f.name)
        if parse is None:
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if args else hint
            parse = _parse_optional(base) if type(None) in typing.get_args(hint) else base
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse, default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} (default: {shown})")


def config_from_args(args: argparse.Namespace, base: PatchCoreConfig | None = None) -> PatchCoreConfig:
    names = {f.name for f in dataclasses.fields(PatchCoreConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return dataclasses.replace(base or PatchCoreConfig(), **given)
