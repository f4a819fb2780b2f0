"""Named registries and the plug-in loader.

Every extensible kind of thing in fedens (datasets, models, learners, strategies) lives in a
``Registry``: a name maps to an object, and ``resolve`` also accepts a plug-in reference,
``package.module:Name`` or ``path/to/file.py:Name``. No if/elif chains over names anywhere else.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class PluginError(ValueError):
    """A name or plug-in reference that cannot be resolved; the message is one line."""


class Registry(Generic[T]):
    """A mapping from names to objects of one kind, filled with the ``register`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("fedavg")`` on a class or function."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise PluginError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def resolve(self, ref: str, base_dir: Path | None = None) -> T:
        """A registered name, or a plug-in reference (``pkg.mod:Name``, ``file.py:Name``; a
        relative file against ``base_dir``, the scenario's folder, first). The one resolver of
        every kind: learners, strategies, gossip rules and datasets."""
        if ref in self._items:
            return self._items[ref]
        if ":" in ref:
            return load_object(ref, base_dir)  # type: ignore[return-value]
        return self.get(ref)


def load_object(ref: str, base_dir: Path | None = None) -> object:
    """Import ``package.module:Name`` or ``path/to/file.py:Name`` and return ``Name``.

    Relative file paths are tried against ``base_dir`` (the scenario's folder) first and then
    the working directory, so a scenario can sit next to its plug-in.
    """
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise PluginError(f"{ref!r} is not of the form 'package.module:Name' or 'file.py:Name'")
    if module_ref.endswith(".py"):
        module = _load_file(module_ref, base_dir)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as err:
            raise PluginError(f"cannot import module {module_ref!r}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{module_ref!r} has no attribute {attr!r}") from None


def _load_file(path_str: str, base_dir: Path | None) -> object:
    candidates = [Path(path_str)]
    if base_dir is not None and not Path(path_str).is_absolute():
        candidates.insert(0, base_dir / path_str)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise PluginError(f"plug-in file {path_str!r} not found")
    path = path.resolve()
    # A stable module name per file, so loading the same file twice gives the same classes.
    name = "fedens_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load {path_str!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a plug-in's own import error must still be one line
        del sys.modules[name]
        raise PluginError(f"error while importing {path_str!r}: {type(err).__name__}: {err}") from None
    return module
