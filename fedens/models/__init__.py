"""Small networks for the embedded datasets, behind a registry.

A model spec has an ``Options`` schema (the scenario's ``model:`` keys besides ``kind``), a
``check(options, input_shape)`` that says why a model cannot take an input (or ``None``), and
``build(options, input_shape, num_classes) -> nn.Module`` mapping ``(batch, *input_shape)`` to
logits ``(batch, num_classes)``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from torch import nn

from fedens.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    Options: type[BaseModel]
    build: Callable[[Any, tuple[int, ...], int], nn.Module]
    check: Callable[[Any, tuple[int, ...]], str | None] = lambda opts, shape: None


MODELS: Registry[ModelSpec] = Registry("model")


def build_model(kind: str, options: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model ``kind`` (a registered name or a ``file.py:SPEC`` plug-in) from its
    (unvalidated) option dict."""
    spec = MODELS.resolve(kind)
    return spec.build(spec.Options.model_validate(options), tuple(input_shape), num_classes)


# Every module of this package registers its models; adding a model is adding a file.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
