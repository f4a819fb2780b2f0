"""``partial_avg``: FedAvg over partial models, each tensor averaged over the clients that hold it
(docs/methods.md#early-exit).

Clients with a depth budget (the ``early_exit`` learner's ``depth_budget``) train and send only
the blocks, exits and gates they hold. For every name, with n_k the data sizes of the clients
that sent it,

    w_name = (1 / sum_{k holds name} n_k) * sum_{k holds name} n_k w_k,name

and a tensor no sampled client holds keeps its global value. This is the aggregation of HeteroFL
(Diao et al., ICLR 2021) applied to depth, as in DepthFL (Kim et al., ICLR 2023). When every
client sends every tensor it is FedAvg exactly (tests/strategies/test_partial_avg.py).

No params (besides Flower's FedAvg sampling arguments).
"""

from __future__ import annotations

from fedens.strategies import STRATEGIES
from fedens.strategies.base import FedensStrategy


class PartialAveraging(FedensStrategy):
    """FedAvg whose replies may hold different subsets of the model's tensors."""

    partial_replies = True  # the default aggregate_arrays is element-wise and stateless


STRATEGIES.add("partial_avg", PartialAveraging)
