"""Learners: what a client trains (one file per learner, registered by name).

``learner.kind`` in a scenario is a registered name, ``package.module:Class`` or
``path/to/file.py:Class`` (a subclass of ``fedens.learners.base.Learner``). Every module in this
package is imported below, so adding a learner is adding a file that registers itself.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import TYPE_CHECKING, Any

from fedens.registry import PluginError, Registry

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from fedens.learners.base import Learner
    from fedens.scenario import Scenario

LEARNERS: Registry[type[Learner]] = Registry("learner")


def resolve_learner(kind: str, base_dir: Path | None = None) -> type[Learner]:
    """The Learner class for a registered name or a plug-in reference."""
    from fedens.learners.base import Learner

    cls = LEARNERS.resolve(kind, base_dir)
    if not (inspect.isclass(cls) and issubclass(cls, Learner)) or inspect.isabstract(cls):
        raise PluginError(f"{kind!r} is not a concrete subclass of fedens.learners.base.Learner")
    return cls


def build_learner(scn: Scenario, input_shape: tuple[int, ...], num_classes: int, device: torch.device) -> Learner:
    """The scenario's learner over the scenario's model, on ``device``."""
    from fedens.models import build_model

    cls = resolve_learner(scn.learner.kind, scn.base_dir)

    def model_fn(**overrides: Any):  # noqa: ANN202
        return build_model(scn.model.kind, {**scn.model.options, **overrides}, input_shape, num_classes)

    # For learners that build modules around the model (early exits' heads need feature sizes).
    model_fn.input_shape, model_fn.num_classes = tuple(input_shape), num_classes  # type: ignore[attr-defined]
    return cls(model_fn, cls.Options.model_validate(scn.learner.options), scn.train, device)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")
