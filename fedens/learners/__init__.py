"""Learners: what a client trains (one file per learner, registered by name).

``learner.kind`` in a scenario is a registered name, ``package.module:Class`` or
``path/to/file.py:Class`` (a subclass of ``fedens.learners.base.Learner``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedens.registry import Registry

if TYPE_CHECKING:
    from fedens.learners.base import Learner

LEARNERS: Registry[type[Learner]] = Registry("learner")

from fedens.learners import single as _single  # noqa: E402,F401  (registrations)


def build_learner(scn, input_shape: tuple[int, ...], num_classes: int, device) -> Learner:  # noqa: ANN001
    """The scenario's learner over the scenario's model, on ``device``."""
    from fedens.models import build_model

    cls = LEARNERS.resolve(scn.learner.kind)

    def model_fn():  # noqa: ANN202
        return build_model(scn.model.kind, scn.model.options, input_shape, num_classes)

    return cls(model_fn, cls.Options.model_validate(scn.learner.options), scn.train, device)
