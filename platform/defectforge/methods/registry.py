"""Method registry: name -> (generator class, config class), filled by discovering methods/*.py.

Why discovery: adding a generator must touch one new file. Every module in this package (except
the shared ``base``/``registry`` and ``_private`` helpers) is imported once, and its
``@register`` decorators run.

Methods outside the package (a user's own, or a test's): name folders in env
``DEFECTFORGE_PLUGINS`` (``os.pathsep``-separated). Each ``*.py`` in them is imported as a
top-level module named by its file (the folder is appended to ``sys.path``, so the standard
library and installed packages keep their names; keep only method files there), and
``<method_name_with_underscores>.yaml`` beside it is that method's search space (one name per
method, as for the built-ins: ``toy-blob`` -> ``toy_blob.py``, ``toy_blob.yaml``).
``cluster.ensure_ray`` passes the variable and the folders to Ray workers (``runtime_env``), so
Train workers, Tune trials and Ray Data actors see the same methods.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from defectforge.config import MethodConfigBase
    from defectforge.methods.base import Generator

_GENERATORS: dict[str, type[Generator]] = {}
_DISCOVERED = False
_SKIP = {"base", "registry"}
PLUGINS_ENV = "DEFECTFORGE_PLUGINS"


def plugin_dirs() -> list[Path]:
    """The folders named in ``DEFECTFORGE_PLUGINS`` (resolved), in order."""
    return [Path(p).expanduser().resolve() for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p.strip()]


def _import_plugins() -> None:
    from defectforge.errors import ConfigError

    for folder in plugin_dirs():
        if not folder.is_dir():
            raise ConfigError(f"{PLUGINS_ENV}: {folder} is not a folder")
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
        for path in sorted(folder.glob("*.py")):
            if path.stem.startswith("_"):
                continue
            module = importlib.import_module(path.stem)
            if Path(getattr(module, "__file__", "") or "").resolve() != path.resolve():
                raise ConfigError(f"{PLUGINS_ENV}: plugin {path} is shadowed by the module {path.stem!r} at "
                                  f"{getattr(module, '__file__', None)}; rename the file")


def register(cls: type[Generator]) -> type[Generator]:
    """Class decorator: registers a Generator subclass under ``cls.config_class``'s name."""
    name = cls.method_name()
    existing = _GENERATORS.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
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
    _import_plugins()
    _DISCOVERED = True


def generators() -> dict[str, type[Generator]]:
    _discover()
    return dict(_GENERATORS)


def config_classes() -> dict[str, type[MethodConfigBase]]:
    return {name: cls.config_class for name, cls in generators().items()}


def get(name: str) -> type[Generator]:
    """The generator class of ``name``. One name per method (``defect-gen`` lives in
    ``methods/defect_gen.py``), so a known built-in is imported alone: loading a Crop-Paste
    checkpoint does not import diffusers for Defect-Gen. Anything else discovers everything."""
    if name not in _GENERATORS and not _DISCOVERED:
        import defectforge.methods as pkg

        stem = name.replace("-", "_")
        if stem not in _SKIP and not stem.startswith("_") and any(
                info.name == stem for info in pkgutil.iter_modules(pkg.__path__)):
            importlib.import_module(f"{pkg.__name__}.{stem}")
    if name in _GENERATORS:
        return _GENERATORS[name]
    gens = generators()
    if name not in gens:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(gens))}")
    return gens[name]
