"""The docs' reference pages, written from the code: the sweep-file keys from the table the
parser takes them from (sweep/keys.py), training values from TrainConfig's fields, sampler
and pruner options from their signatures, commands from the argument parser. The docs build
(docs/hooks.py) puts these where the pages hold their markers, so they cannot drift."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

from optimsweep.cli import build_parser
from optimsweep.core.train import CONDITIONS, TrainConfig
from optimsweep.sweep import keys
from optimsweep.sweep.samplers import PRUNERS, SAMPLERS, allowed_options
from optimsweep.sweep.spec import NOT_SEARCHABLE

OPTUNA_API = "https://optuna.readthedocs.io/en/stable/reference/generated/"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_file_keys() -> str:
    """Every key of a sweep file, in the parser's order."""
    return _table(("key", "type", "default", "allowed", "meaning"),
                  ((f"`{k.name}`", k.type, k.default, k.allowed, k.meaning)
                   for k in keys.KEYS))


def training_values() -> str:
    """What `fixed` and `search_space` may name: TrainConfig's fields the file doesn't set
    elsewhere, with their defaults, allowed values and when they apply."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_SEARCHABLE or f.type == "dict":
            continue
        allowed = ", ".join(map(str, f.metadata["choices"])) or f.metadata["allowed"] \
            or f.type
        parent, values = CONDITIONS.get(f.name, (None, ()))
        when = f"{parent}: {', '.join(values)}" if parent else "always"
        default = f.default if f.default is not None else "unset"
        rows.append((f"`{f.name}`", f.type.replace(" | None", ""), default, allowed, when,
                     f.metadata["doc"]))
    rows.append(("`model.NAME`", "any", "the factory's", "what the model factory takes",
                 "always", "an argument of the model factory"))
    return _table(("name", "type", "default", "allowed", "applies when", "meaning"), rows)


def _options(registry: dict, package: str) -> str:
    parts = []
    for name, cls in registry.items():
        options = allowed_options(cls)
        params = inspect.signature(cls.__init__).parameters
        public = f"{package}.{cls.__name__}"  # where Optuna's docs have it
        link = (f"[{cls.__name__}]({OPTUNA_API}{public}.html)"
                if cls.__module__.startswith("optuna.") else
                f"`{cls.__module__}.{cls.__qualname__}`")
        parts.append(f"**`{name}`**: {link}")
        if options:
            parts.append(_table(("option", "type", "default"),
                                ((f"`{o}`", t, _default(params[o])) for o, t in
                                 options.items())))
        else:
            parts.append("No options.")
    return "\n\n".join(parts)


def _default(param: inspect.Parameter) -> str:
    return "required" if param.default is inspect.Parameter.empty else repr(param.default)


def sampler_options() -> str:
    return _options(SAMPLERS, "optuna.samplers")


def pruner_options() -> str:
    return _options(PRUNERS, "optuna.pruners")


def _commands(parser: argparse.ArgumentParser):
    """(name, help, subparser) of each command, in the parser's order."""
    for action in parser._actions:  # argparse has no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def arguments(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(argument, default, help) of each of a parser's arguments, but --help."""
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += f" {action.metavar or action.dest.upper()}"
        else:
            name = action.metavar or action.dest.upper()
            if action.choices:
                name = "{" + ",".join(action.choices) + "}"
        default = "" if action.default in (None, False, argparse.SUPPRESS) or \
            action.required else str(action.default)
        rows.append((name, default, (action.help or "").replace("%%", "%")))
    return rows


def command_line() -> str:
    """Each command: what it does, its usage and its arguments."""
    parser = build_parser()
    parts = [_table(("option", "default", "meaning"),
                    ((f"`{a}`", d, h) for a, d, h in arguments(parser)))]
    for name, help_, sub in _commands(parser):
        usage = "\n".join(line.removeprefix(" " * len("usage: ")) for line in
                          sub.format_usage().removeprefix("usage: ").strip().splitlines())
        parts += [f"## optimsweep {name}", f"{help_}.", f"```text\n{usage}\n```",
                  _table(("argument", "default", "meaning"),
                         ((f"`{a}`", d, h) for a, d, h in arguments(sub)))]
    return "\n\n".join(parts)


# The markers the reference pages hold, and what replaces each.
MARKERS = {
    "<!-- reference: sweep-file-keys -->": sweep_file_keys,
    "<!-- reference: training-values -->": training_values,
    "<!-- reference: sampler-options -->": sampler_options,
    "<!-- reference: pruner-options -->": pruner_options,
    "<!-- reference: command-line -->": command_line,
}


def fill(markdown: str) -> str:
    """A page's markdown with each marker replaced by its reference."""
    for marker, write in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, write())
    return markdown
