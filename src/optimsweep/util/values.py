"""YAML values as sweep files and configs mean them: one set of rules for every reader.

YAML 1.1 reads `1e-4` as a string; a number is meant. `true` is a truth value, and so is the
string "true" a command line hands over. Each reader words its own errors: these functions
raise `Unfit`, whose text says what the value is not ("not an integer").
"""

from __future__ import annotations

import math
import numbers

# What a value of each kind is, in words: "'8' is not an integer".
WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
         "None": "null", "dict": "a mapping"}


class Unfit(ValueError):
    """A value is not of the kind asked for; str(exc) says what it is not."""


def number(value, kind: type = float) -> int | float:
    """The number a YAML value means: an int or a float, or a string that reads as one
    (`1e-4`). Not a bool, not infinite; `kind=int` also wants a whole number (64.0 is 64)."""
    if isinstance(value, bool):
        raise Unfit("not a number")
    try:
        value = float(value) if isinstance(value, str) else value
    except ValueError:
        raise Unfit("not a number") from None
    if not isinstance(value, numbers.Real):  # numpy's scalars too, as Optuna may hand back
        raise Unfit("not a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise Unfit("not a finite number")
    if kind is int:
        if float(value) != int(value):
            raise Unfit("not an integer")
        return int(value)
    return float(value)


def truth(value) -> bool:
    """true or false, or the strings "true" and "false" in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise Unfit("not true or false")


_IS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "dict": lambda v: isinstance(v, dict),
}
KINDS = tuple(_IS)


def is_a(value, kind: str) -> bool:
    """True when `value` already is of `kind` (a name in KINDS) as YAML handed it over,
    with no reading of strings: for values passed on untouched, such as sampler options."""
    return _IS[kind](value)
