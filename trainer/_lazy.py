"""Lazy public names for a package (PEP 562), shared by ``trainer`` and ``trainer.store``: each
name imports its submodule on first use, so importing the package imports none of them."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], extra: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name to the
    module that defines it (absolute, or relative to ``package`` when it starts with a dot).
    A loaded name is cached in the package's namespace; ``extra``: further names for dir()."""
    namespace = importlib.import_module(package).__dict__

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(names) | set(extra))

    return getattr_, dir_
