"""Method registry: name -> (generator class, config class), filled by discovering methods/*.py.

Why discovery: adding a generator must touch one new file. Every module in this package (except
the shared ``base``/``registry``) is imported once, and its ``@register`` decorators run.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from defectforge.config import MethodConfigBase
    from defectforge.methods.base import Generator

_GENERATORS: dict[str, type[Generator]] = {}
_DISCOVERED = False
_SKIP = {"base", "registry"}


def register(cls: type[Generator]) -> type[Generator]:
    """Class decorator: registers a Generator subclass under ``cls.config_class``'s name."""
    name = cls.method_name()
    existing = _GENERATORS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} registered twice: {existing} and {cls}")
    _GENERATORS[name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import defectforge.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _SKIP and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _DISCOVERED = True


def generators() -> dict[str, type[Generator]]:
    _discover()
    return dict(_GENERATORS)


def config_classes() -> dict[str, type[MethodConfigBase]]:
    return {name: cls.config_class for name, cls in generators().items()}


def get(name: str) -> type[Generator]:
    gens = generators()
    if name not in gens:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(gens))}")
    return gens[name]
