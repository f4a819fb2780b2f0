"""Client-side objective terms: what a server strategy adds to a client's training loss.

The ADMM family (FedProx, FedDyn, FedADMM, FedLap, ...) changes the *client's* objective: a
proximal term to the global model, a dual (Lagrangian) term, a prior. Each algorithm's client
term lives beside its server step in ``fedens/algorithms/<algorithm>.py``, an ``Objective``
subclass registered under the algorithm's name, which shares the ``Options`` model of its
strategy. The strategy puts ``Term.message_config(options)`` in the train messages' config
(``"objective": <name>`` plus ``"objective.<option>"`` per option); the ClientApp rebuilds the
term with ``objective_from_config`` from that config, the client's persistent state
(``context.state``) and the global arrays of the message, hands it to the learner, and stores
the state it returns after training. The learner adds ``penalty(params)`` to its mean minibatch
loss in its own loop, so there is one training loop per learner, not one per algorithm.

State of a client that is not sampled for a while: it stays in ``context.state`` untouched (a
dual is not decayed while its client is away) and is used as it is when the client is next
sampled; this is what the papers' algorithms do under partial participation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from fedens.options import Options
from fedens.registry import Registry

Arrays = dict[str, np.ndarray]
PREFIX = "objective."


class Objective:
    """A term added to a client's loss. ``options`` are the algorithm's ``Options`` (or a mapping
    of them, validated here), as the strategy sent them; ``state`` the client's persistent arrays
    (empty at first); ``global_arrays`` the arrays the round started from, by payload name;
    ``server_round`` the round of the message. Learners minimise the *mean* loss over their N_k
    examples, so a term the paper adds to the summed loss ``N_k l_k(w)`` is divided by N_k here."""

    name: ClassVar[str] = ""  # the registered name, sent as "objective"
    Options: ClassVar[type[BaseModel]] = Options  # the algorithm's parameters, shared with its strategy

    def __init__(self, options: BaseModel | Mapping[str, Any], state: Arrays, global_arrays: Arrays,
                 device: torch.device, num_examples: int = 1, server_round: int = 0) -> None:
        self.options: Any = options if isinstance(options, BaseModel) else self.Options.model_validate(dict(options))
        self.server_round = server_round
        self.state = dict(state)
        self.device = device
        self.global_arrays = global_arrays
        self.num_examples = num_examples  # N_k: terms written for a summed loss are divided by it
        self._tensors: dict[str, torch.Tensor] = {}

    @classmethod
    def message_config(cls, options: BaseModel) -> dict[str, Any]:
        """What a strategy puts in its train messages' config to have clients train under this
        term: ``{"objective": name, "objective.<option>": value, ...}``."""
        return {"objective": cls.name, **{PREFIX + k: v for k, v in options.model_dump().items()}}

    def tensor(self, name: str, source: Mapping[str, np.ndarray]) -> torch.Tensor:
        """``source[name]`` as a float32 tensor on the device, converted once and cached."""
        key = f"{id(source)}:{name}"
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(np.asarray(source[name]), dtype=torch.float32, device=self.device)
        return self._tensors[key]

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The term for the current parameters (by payload name), added to the mean loss."""
        raise NotImplementedError

    def measure(self, learner: Any, data: Any) -> None:
        """After training, before ``after_fit``: look at the trained learner and its data (e.g.
        curvature at the trained weights). Default: nothing."""

    def after_fit(self, trained: Arrays) -> Arrays:
        """The state to keep for the next time this client trains (default: unchanged)."""
        return self.state

    def reply_arrays(self) -> Arrays:
        """Extra arrays the client sends back with its trained ones (default: none)."""
        return {}

    def ivon_setup(self, names: list[str], num_examples: int) -> IVONSetup | None:
        """For a learner that trains with IVON: the prior, Lagrangian terms and starting
        posterior to train under instead of a loss penalty (``names`` = the network's parameter
        names in order). Default: ``None``, plain IVON."""
        return None


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@dataclass(frozen=True)
class IVONSetup:
    """How an IVON learner trains under IVON-ADMM (``fedens.optim.ivon_prior.IVONPrior``); flat
    float32 tensors ``(num_params,)`` in the network's parameter order."""

    ess: float  # λ_k = (N_k / τ) / ρ_s
    prior_mean: torch.Tensor  # m_g
    prior_precision: torch.Tensor  # S_g (δ = S_g / λ_k)
    v_tilde: torch.Tensor  # v_k / (N_k / τ)
    V_tilde: torch.Tensor  # V_k / (N_k / τ)
    start_at_prior: bool  # posterior ← (m_g, S_g); False: the mean m_g with hess = hess_init
    rescale_lr: bool


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: ``OBJECTIVES.add(cls.name, cls)``."""
    OBJECTIVES.add(cls.name, cls)
    return cls


def objective_from_config(config: Mapping[str, Any], state: Arrays, global_arrays: Arrays, device: torch.device,
                          num_examples: int = 1, server_round: int = 0) -> Objective | None:
    """The objective a train message asks for (``message_config``), or ``None``. The algorithm
    modules that register objectives are imported by ``fedens.algorithms``."""
    name = config.get("objective")
    if not name:
        return None
    options = {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}
    return OBJECTIVES.get(str(name))(options, state, global_arrays, device, num_examples, server_round)
