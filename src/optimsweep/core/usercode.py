"""The user's own code, named in sweep files by import strings ("module:attribute").

Resolved with the sweep file's folder importable (so a `my_models.py` beside the sweep file
is found), checked before anything runs (module importable, attribute callable, keyword
arguments accepted), and described by the best version it has (its package's version, else
the git commit of its folder, else a hash of its file) so runs say what code trained them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

from optimsweep.errors import UserCodeError
from optimsweep.util.provenance import git

IMPORT_STRING = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_string(value) -> bool:
    return isinstance(value, str) and IMPORT_STRING.fullmatch(value) is not None


def importable(code_dir: str | None) -> None:
    """Make `code_dir` (the sweep file's folder) importable, ahead of installed packages."""
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)


def resolve(ref: str, code_dir: str | None = None) -> Callable:
    """"pkg.module:attr.sub" -> the callable it names."""
    if not is_import_string(ref):
        raise UserCodeError(f"{ref!r} is not an import string; write it as module:callable, "
                            "e.g. my_models:build")
    module_name, attr = ref.split(":")
    importable(code_dir)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f" (searched the sweep file's folder {code_dir} and the installed packages)" \
            if code_dir else ""
        raise UserCodeError(f"{ref!r}: module {exc.name!r} not found{where}") from exc
    except Exception as exc:  # noqa: BLE001  (the user's module failed while importing)
        raise UserCodeError(f"{ref!r}: importing {module_name} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and
                            callable(getattr(obj, n)))
            raise UserCodeError(f"{ref!r}: {module_name} has no attribute {part!r}; callables "
                                f"there: {', '.join(public[:12]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(f"{ref!r}: {type(obj).__name__} is not callable; name a function "
                            "or a class")
    return obj


def check_arguments(ref: str, fn: Callable, names: list[str], complete: bool = True) -> None:
    """Would `fn(**{name: ... for name in names})` bind? Say which name it refuses, and
    (when `names` are all it will get) which required argument is missing."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: it will tell when called
    params = signature.parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in names:
        if not takes_any and name not in accepted:
            raise UserCodeError(f"{ref!r} takes no argument {name!r}; it takes: "
                                f"{', '.join(accepted) or 'none'}")
    missing = complete and [p.name for p in params if p.default is p.empty and p.name not in names
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise UserCodeError(f"{ref!r} needs {', '.join(missing)}: give "
                            f"{'it' if len(missing) == 1 else 'them'} under kwargs")


@cache
def _distributions() -> dict[str, list[str]]:
    """{top-level module: the installed packages that provide it}, read once a process:
    reading it walks every installed package's file list (0.4 to 0.7 s beside torch and
    MLflow), and each of a config's references to the user's code (model, data, loss, from
    each folder) asked for it anew; what is installed does not change under a process."""
    return dict(metadata.packages_distributions())


@cache
def code_version(ref: str, code_dir: str | None = None) -> str:
    """What can be known of the version of the code `ref` names: "DIST VERSION" when an
    installed package provides it, else "git COMMIT[-dirty] (FILE)", else "sha256 ... (FILE)"."""
    module_name = ref.split(":")[0]
    try:
        resolve(ref, code_dir)
    except UserCodeError:
        return "unknown"
    top = module_name.split(".")[0]
    for dist in _distributions().get(top, []):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    if not source:
        return "unknown"
    path = Path(source).resolve()
    commit = git(path.parent, "rev-parse", "HEAD")
    if commit and git(path.parent, "ls-files", "--error-unmatch", path.name):
        dirty = git(path.parent, "status", "--porcelain", "--untracked-files=no", "--", ".")
        return f"git {commit}{'-dirty' if dirty else ''} ({path})"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"sha256 {digest} ({path})"
