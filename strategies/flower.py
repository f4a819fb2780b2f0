"""Flower's own message-API strategies, registered under lower-case names.

They run unchanged: the fedens grid hands them replies in partition-id order and counts the
bytes. FedProx is left out here on purpose: it needs a proximal term on the client, which comes
with the ADMM family.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from fedens.strategies import STRATEGIES

for _name, _cls in {
    "fedavg": fl.FedAvg,  # McMahan et al. 2017
    "fedavgm": fl.FedAvgM,  # Hsu et al. 2019, server momentum
    "fedadagrad": fl.FedAdagrad,  # Reddi et al. 2021 (adaptive federated optimisation)
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedmedian": fl.FedMedian,  # Yin et al. 2018, coordinate-wise median
    "fedtrimmedavg": fl.FedTrimmedAvg,  # Yin et al. 2018, trimmed mean
    "krum": fl.Krum,  # Blanchard et al. 2017
    "multikrum": fl.MultiKrum,
    "bulyan": fl.Bulyan,  # El Mhamdi et al. 2018
}.items():
    STRATEGIES.add(_name, _cls)
