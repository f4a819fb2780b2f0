"""The held-out sets of a run that may not read them (``evaluate.test_sets: false``).

Tuning selects on the clients' validation splits only; a trial that so much as looked at the
test, shifted or OOD set would make the later test numbers optimistic. Rather than trusting every
code path to check a flag, a run with ``test_sets: false`` gets ``Sealed`` objects in place of
those sets: any use of one (its length, inputs or labels) raises, so a leak fails the run loudly
instead of passing silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

from fedens.data import ServerData


class SealedSetError(RuntimeError):
    """A held-out set was read in a run that may not read it."""


class Sealed:
    """Stands in for a held-out ``ArrayDataset``; every use raises ``SealedSetError``."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _refuse(self, *_: Any) -> NoReturn:
        raise SealedSetError(f"the {object.__getattribute__(self, '_name')} set is sealed in this run "
                             "(evaluate.test_sets: false, as while tuning)")

    def __getattr__(self, item: str) -> NoReturn:
        self._refuse()

    __len__ = __iter__ = __getitem__ = __setattr__ = _refuse


def seal(data: ServerData) -> ServerData:
    """``data`` with its test, shifted and OOD sets sealed (the public split and facts stay)."""
    return dataclasses.replace(data, test=Sealed("test"), shift=Sealed("shifted"), ood=Sealed("OOD"))
