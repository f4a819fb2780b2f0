"""What a run needs to continue where it stopped: ``state.pkl`` in the run folder.

Written (atomically: a temporary file, then a rename) after every ``output.checkpoint_every``
rounds, once that round's rows are in ``metrics.jsonl``. It holds:

- ``round``: the last round finished, and ``rows``: how many rows ``metrics.jsonl`` had then
  (a resumed run cuts the file back to them and computes the rest again);
- federated mode: the global arrays after that round and the strategy object itself (pickled
  without what ``bind`` gives it back: the scenario, the server's data, its learner), so its
  server state (duals, sites, momentum, swarm history, random generators) carries over;
- decentralized mode: the router's state (the mailbox with messages still in flight, the
  server's copies of every node's model, their last validation metrics);
- every node's ``context.state`` (duals, sites, a gossip node's own model), by partition id;
- the driver's global random states (Python, NumPy, torch), though fedens reseeds them per
  round and evaluation, for a strategy that draws from them.

A resumed run gives exactly the rows the uninterrupted run would have, apart from their
``time_s`` (tested for FedAvg, FedDyn, IVON-ADMM, swarm, and gossip with drops and delays).
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILE = "state.pkl"
VERSION = 1


class CheckpointError(RuntimeError):
    """The checkpoint could not be written (the previous one is intact) or read."""


@dataclass
class ResumeState:
    round: int
    rows: int
    arrays: dict[str, np.ndarray] | None = None  # federated: the global arrays after ``round``
    strategy: Any = None  # federated: the strategy object
    gossip: Any = None  # decentralized: the router's state
    node_states: dict[int, Any] = field(default_factory=dict)  # partition id -> context.state
    rng: dict[str, Any] = field(default_factory=dict)
    reliability: dict[str, Any] | None = None
    student: dict[str, np.ndarray] | None = None  # federated ``distill``: the student's arrays
    version: int = VERSION


def rng_states() -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(states: dict[str, Any]) -> None:
    import torch

    if states:
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])


def save(run_dir: Path, state: ResumeState) -> None:
    """``state`` into ``run_dir/state.pkl``, replacing the previous checkpoint only once the
    new one is complete. Raises ``CheckpointError`` (one line) if it cannot be written."""
    path = Path(run_dir) / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint of round {state.round} not written ({type(err).__name__}: {err}); "
                              f"the previous one is kept") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)  # no stray temporary file (also after a full disk)
        except OSError:
            pass  # not a file we can remove: the error above says what went wrong


def load(run_dir: Path) -> ResumeState:
    path = Path(run_dir) / FILE
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from ({FILE}); the run stopped before its first "
                              "checkpoint (output.checkpoint_every)") from None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, ResumeState) or state.version != VERSION:
        raise CheckpointError(f"{path}: not a checkpoint of this fedens version")
    return state
