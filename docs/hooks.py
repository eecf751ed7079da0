"""MkDocs hook: the reference pages' markers replaced by what optimsweep.reference writes
from the code (the sweep-file keys, training values, sampler and pruner options, commands)."""

from __future__ import annotations

from optimsweep.reference import fill


def on_page_markdown(markdown, page, config, files):
    return fill(markdown)
