"""Server strategies: one per file, registered by name.

``strategy.name`` in a scenario is a registered name (``fedens list`` shows them),
``package.module:Class`` or ``path/to/file.py:Class``. Every strategy is a subclass of Flower's
``flwr.serverapp.strategy.Strategy``, so Flower's strategies run in fedens and fedens
strategies run in any Flower app.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedens.registry import PluginError, Registry, load_object

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def resolve_strategy(name: str, base_dir: Path | None = None) -> type[Strategy]:
    """The Strategy class for a registered name or a plug-in reference."""
    cls = STRATEGIES.get(name) if name in STRATEGIES or ":" not in name else load_object(name, base_dir)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise PluginError(f"{name!r} is not a subclass of flwr.serverapp.strategy.Strategy")
    if inspect.isabstract(cls):
        raise PluginError(f"{name!r} is abstract (it does not implement every Strategy method)")
    return cls


def build_strategy(cls: type[Strategy], defaults: dict[str, Any], params: dict[str, Any]) -> Strategy:
    """Construct ``cls`` with the scenario's ``params``, adding those of ``defaults`` (sampling
    fractions, node counts) that its constructor accepts and the params do not set."""
    sig = inspect.signature(cls)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    kwargs = {k: v for k, v in defaults.items() if takes_any or k in sig.parameters}
    kwargs.update(params)
    return cls(**kwargs)


# Every module of this package registers its strategies; adding one is adding a file.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")
