"""fedens: uncertainty-aware federated and decentralized learning on Flower + Ray.

Python API::

    import fedens
    result = fedens.run("scenarios/quickstart.yaml", overrides={"rounds": 5}, out="runs/q")
    result.rows        # the metrics.jsonl rows
    result.run_dir     # the results folder
    result.final["global-test"]["accuracy"]

    with fedens.session() as s:          # one warm engine (Ray + actors) for many runs
        for seed in range(5):
            s.run("scenarios/quickstart.yaml", {"seed": seed}, out=f"runs/q/seed-{seed}")

Invalid scenarios raise ``fedens.ScenarioError`` (one-line message), as the CLI's exit code 2.
"""

import os as _os

# Flower reads this once, at import: it must be set before anything imports flwr. The
# scenario key ``engine.telemetry: true`` turns it back on (fedens.simulate).
_os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
_os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

__version__ = "0.1.0"

from fedens.api import Interrupted, RunDiverged, RunFailed, RunResult, Session, load, resume, run, session  # noqa: E402
from fedens.scenario import Scenario, ScenarioError  # noqa: E402

__all__ = ["Interrupted", "RunDiverged", "RunFailed", "RunResult", "Scenario", "ScenarioError", "Session", "load",
           "resume", "run", "session", "__version__"]
