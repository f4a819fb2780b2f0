"""Server strategies: one per file, registered by name.

The folder sits at the top of the repository and installs as ``fedens.strategies`` (a
package-dir mapping in pyproject.toml), so nothing named ``strategies`` lands in site-packages.
``strategy.name`` in a scenario is a registered name (``fedens list`` shows them),
``package.module:Class`` or ``path/to/file.py:Class``. Every strategy is a subclass of Flower's
``flwr.serverapp.strategy.Strategy``, so Flower's strategies run in fedens and fedens
strategies run in any Flower app.
"""

from __future__ import annotations

if __name__ != "fedens.strategies":  # imported as top-level `strategies` from the repository root
    raise ImportError("this folder installs as fedens.strategies: import fedens.strategies instead")

import importlib
import inspect
import pkgutil
import typing
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedens.registry import PluginError, Registry

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def resolve_strategy(name: str, base_dir: Path | None = None) -> type[Strategy]:
    """The Strategy class for a registered name or a plug-in reference."""
    cls = STRATEGIES.resolve(name, base_dir)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise PluginError(f"{name!r} is not a subclass of flwr.serverapp.strategy.Strategy")
    if inspect.isabstract(cls):
        raise PluginError(f"{name!r} is abstract (it does not implement every Strategy method)")
    return cls


# Ranges of Flower's FedAvg-family constructor arguments, which its signature only types.
FEDAVG_RANGES: dict[str, dict[str, float]] = {
    "fraction_train": {"ge": 0, "le": 1}, "fraction_evaluate": {"ge": 0, "le": 1},
    "min_train_nodes": {"ge": 0}, "min_evaluate_nodes": {"ge": 0}, "min_available_nodes": {"ge": 0},
}


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Every keyword a class's constructor takes, following ``**kwargs`` up the MRO (a fedens
    strategy passes the rest to Flower's FedAvg)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        for name, p in sig.parameters.items():
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params
    return params


def check_params(cls: type[Strategy], params: dict[str, Any]) -> str | None:
    """Why ``params`` cannot be ``cls``'s constructor arguments, as ``"<key>: problem"``, or
    None. The strategy's ``Options`` model (a fedens strategy's parameters) validates its own
    keys; the others (Flower's FedAvg arguments, or a plug-in's constructor without ``Options``)
    are checked by name, by type from the constructor's annotations and by range (Flower's
    FedAvg arguments). Checks a constructor makes beyond these run when ``build_strategy`` is
    called at load, also before Ray starts."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

    from fedens.options import first_error

    options = getattr(cls, "Options", None)
    fields = options.model_fields if isinstance(options, type) and issubclass(options, BaseModel) else {}
    accepted = set(fields) | set(constructor_parameters(cls))
    for key in params:
        if key not in accepted:
            return f"{key}: unknown parameter of {cls.__name__} (it takes: {', '.join(sorted(accepted)) or 'none'})"
    own = {k: v for k, v in params.items() if k in fields}
    if fields:
        try:
            options.model_validate(own)
        except ValidationError as err:
            return first_error(err, own)
    rest = {k: v for k, v in params.items() if k not in fields}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be resolved: check names only
        hints = {}
    model = create_model(f"{cls.__name__}Params", __config__=ConfigDict(arbitrary_types_allowed=True, strict=False),
                         **{k: (hints.get(k, Any), Field(..., **FEDAVG_RANGES.get(k, {}))) for k in rest})
    try:
        model.model_validate(rest)
    except ValidationError as err:
        return first_error(err, rest)
    return None


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
