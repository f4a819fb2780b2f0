"""An example plug-in strategy: FedAvg whose server step is damped by a mixing rate.

    w_global <- (1 - mix) * w_global + mix * FedAvg(client weights)

``mix = 1`` is FedAvg. Use it from a scenario with

    strategy:
      name: examples/custom_strategy.py:DampedFedAvg
      params: {mix: 0.5}

A strategy is any subclass of Flower's ``Strategy``; subclassing Flower's ``FedAvg`` and
overriding one method (as Flower's FedAdam does) is the usual way. fedens hands ``aggregate_train``
the replies in partition-id order, so the sum is the same on every run.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class DampedFedAvg(FedAvg):
    def __init__(self, mix: float = 0.5, **fedavg_kwargs) -> None:  # noqa: ANN003
        if not 0 < mix <= 1:
            raise ValueError("mix must be in (0, 1]")
        super().__init__(**fedavg_kwargs)
        self.mix = mix
        self.current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = arrays  # the global model this round starts from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self.current is None:
            return averaged, metrics
        mixed = {
            k: Array((1 - self.mix) * self.current[k].numpy() + self.mix * avg.numpy()) for k, avg in averaged.items()
        }
        return ArrayRecord(mixed), metrics
