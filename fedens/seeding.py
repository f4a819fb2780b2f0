"""Seeds derived from (scenario seed, round, partition id), so that every client's randomness in
every round is fixed by the scenario and independent of which Ray actor runs it or in what order.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. ``derive_seed(seed, round, partition_id)``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``keys``; also seeds torch's global RNG (dropout,
    initialisers), because layers draw from it and not from a generator we can pass in."""
    seed = derive_seed(*keys)
    seed_torch(seed)
    return torch.Generator().manual_seed(seed)


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the generators in use: the CPU one, and CUDA's once CUDA
    is initialised. ``torch.manual_seed`` also queues a seed for a CUDA that may never start,
    capturing a stack trace each time (about 0.3 ms, paid by every message)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
