"""Flower's simulation engine with the Ray backend: the one place that calls it.

``run_simulation`` is deprecated in favour of ``flwr run`` from Flower 1.41 on; keeping the
call here means swapping it touches one function (``run_engine``).

Quiet by default: Flower's console log is raised to WARNING, Ray logs at ERROR and actors' output
is not forwarded, unless ``verbose``. Everything Flower logs still goes to the run's ``run.log``.
Telemetry: Flower's is off unless ``engine.telemetry`` is true (``fedens/__init__`` sets
``FLWR_TELEMETRY_ENABLED=0`` before Flower is imported, because Flower reads it at import time);
Ray's usage statistics are always off.
"""

from __future__ import annotations

import logging
import os
import warnings

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedens.scenario import Scenario


def configure_engine(scn: Scenario, verbose: bool) -> None:
    """Telemetry and log levels for this process and the Ray workers it starts."""
    import flwr.supercore.telemetry as telemetry
    from flwr.supercore.logger import console_handler

    flag = "1" if scn.engine.telemetry else "0"
    os.environ["FLWR_TELEMETRY_ENABLED"] = flag  # inherited by Ray workers
    telemetry.FLWR_TELEMETRY_ENABLED = flag  # already read at import in this process
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Flower warns that run_simulation is deprecated on every call; say it once in the docs instead.
    console_handler.setLevel(logging.DEBUG if verbose else logging.ERROR)
    logging.getLogger("fedens").setLevel(logging.DEBUG)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


def backend_config(scn: Scenario, verbose: bool) -> dict:
    """Ray backend settings: per-client resources, and Ray's own start arguments."""
    init_args: dict = {
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    if scn.engine.ray_num_cpus is not None:
        init_args["num_cpus"] = scn.engine.ray_num_cpus
    return {
        "client_resources": {"num_cpus": scn.resources.num_cpus, "num_gpus": scn.resources.num_gpus},
        "init_args": init_args,
    }


def run_engine(server_app: ServerApp, client_app: ClientApp, scn: Scenario, verbose: bool = False) -> None:
    """Run the apps on Flower's simulation engine with ``data.num_clients`` simulated nodes."""
    from flwr.simulation import run_simulation

    configure_engine(scn, verbose)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=scn.data.num_clients,
        backend_name=scn.engine.backend,
        backend_config=backend_config(scn, verbose),
        verbose_logging=verbose,
    )
