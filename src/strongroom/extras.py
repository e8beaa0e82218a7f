"""Optional features and the extra that installs each (`pyproject.toml`'s optional-dependencies).

A module needed only by an optional feature is imported through `require`, inside the function
that needs it, so `strongroom` runs without the extra and a user who asks for the feature is told
which extra to install instead of reading a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import click


class MissingExtra(click.ClickException):
    """A feature's optional dependency is not installed; the message names the extra."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only the module itself missing means the extra is absent; a broken install of it is not.
        if exc.name is None or exc.name.partition(".")[0] != module.partition(".")[0]:
            raise
        raise MissingExtra(
            f"{feature} needs the optional dependency {module!r}: pip install 'strongroom[{extra}]'"
        ) from None
