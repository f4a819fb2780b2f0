"""Flower's deployment engine: a scenario as a Flower App for ``flwr run`` against a SuperLink
with SuperNodes, instead of the simulation engine.

``fedens export-app SCENARIO DIR`` (``export_app``) writes ``DIR/pyproject.toml``, which names
this module's ``server_app`` and ``client_app`` as the app's components and carries the checked
scenario (as JSON) and the run folder in its run config (``[tool.flwr.app.config]``). Plug-in
files are copied into ``DIR/fedens_app_plugins/`` and referred to as modules of it, because
Flower ships the app folder's Python files to the SuperLink and every SuperNode (its FAB) and
puts that folder first on their ``sys.path``. fedens itself, and its dependencies, must be
installed where the SuperLink and the SuperNodes run.

- **The ServerApp** (on the SuperLink's machine) is the simulation's ServerApp: the same
  strategy, the same ``FedensGrid`` (which learns each node's partition id with one
  ``query.info`` message), the same recorder; the run folder is written on that machine.
- **The ClientApp** (on each SuperNode) is the simulation's ClientApp for the scenario in the
  message's run config, built once per process. Each SuperNode simulates the partition of its
  node config (``flower-supernode --node-config "partition-id=0"``) and builds the data from
  the scenario itself, seeded as in simulation, so a deployed run computes what the simulated
  run computes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedens.cluster import FILE_REF, map_strings
from fedens.scenario import Scenario, ScenarioError

PLUGINS = "fedens_app_plugins"  # the app folder's package of copied plug-in files
# every message type the fedens ClientApp answers (fedens.client_app)
HANDLERS = (("train", None), ("evaluate", None), ("query", "info"), ("query", "validate"), ("query", "conformal"),
            ("query", "temperature"), ("query", "gossip"))


# --------------------------------------------------------------------------- export


def export_app(scn: Scenario, folder: Path, out: str | None = None, overwrite: bool = False) -> Path:
    """Write the Flower App of ``scn`` (checked, with absolute plug-in paths) into ``folder``.

    out : the run folder on the SuperLink's machine (None: ``output.dir/<name>-<timestamp>``
        there, resolved when the run starts)."""
    from fedens.learners import resolve_learner

    learner = resolve_learner(scn.learner.kind, scn.base_dir)
    if learner.prepares(learner.Options.model_validate(scn.learner.options)):
        raise ScenarioError(f"{scn.source}: learner.kind: {scn.learner.kind} prepares files before the run (e.g. a "
                            "pretrained backbone), which the deployment engine has no way to ship to the SuperNodes yet; "
                            "give the prepared file (e.g. learner.backbone) as a path every SuperNode can read")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ScenarioError(f"export-app {folder}: is not empty; use --overwrite to replace it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = _with_plugins(scn.model_dump(mode="json"), folder / PLUGINS)
    name = re.sub(r"[^a-z0-9-]+", "-", scn.name.lower()).strip("-") or "scenario"
    config = {"scenario": json.dumps(raw, sort_keys=True), "out": out or "", "overwrite": False}
    lines = [
        "# A Flower App written by `fedens export-app`: run it with `flwr run . <connection>`.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "fedens-{name}"', 'version = "1.0.0"',
        f'description = "fedens scenario {_toml(scn.name)[1:-1]} on Flower\'s deployment engine"',
        'license = "Apache-2.0"', 'dependencies = ["fedens"]', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "fedens"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedens.deploy:server_app"', 'clientapp = "fedens.deploy:client_app"', "",
        "[tool.flwr.app.config]", *(f"{k} = {_toml(v)}" for k, v in config.items()), "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines), encoding="utf-8")
    (folder / "scenario.yaml").write_text(Scenario.model_validate(raw).to_yaml(), encoding="utf-8")
    return folder


def _toml(value: Any) -> str:
    """A TOML value: JSON's string escapes are TOML basic-string escapes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _with_plugins(raw: dict[str, Any], package: Path) -> dict[str, Any]:
    """Copy every ``/abs/file.py:Name`` plug-in of the scenario into ``package`` (named by its
    content) and refer to it as ``fedens_app_plugins.<module>:Name``."""

    def walk(value: str) -> str:
        if (m := FILE_REF.match(value)) and Path(m["file"]).is_file():
            src = Path(m["file"])
            stem = re.sub(r"\W", "_", src.stem)
            module = f"{stem}_{hashlib.sha256(src.read_bytes()).hexdigest()[:10]}"
            package.mkdir(exist_ok=True)
            (package / "__init__.py").touch()
            shutil.copy2(src, package / f"{module}.py")
            return f"{PLUGINS}.{module}:{m['name']}"
        return value

    return map_strings(raw, walk)


# --------------------------------------------------------------------------- the apps


def _scenario(context: Context) -> Scenario:
    from fedens.checks import load_scenario

    try:
        return load_scenario(json.loads(str(context.run_config["scenario"])))
    except KeyError:
        raise ScenarioError("the run config has no 'scenario': export the app with `fedens export-app`") from None


server_app = ServerApp()


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    """Run the scenario's rounds against the SuperNodes and record them in the run folder."""
    from fedens.api import _root_message
    from fedens.decentralized.engine import run_gossip
    from fedens.results import RunRecorder, prepare_run_dir
    from fedens.server_app import run_strategy

    scn = _scenario(context)
    out = str(context.run_config.get("out", "")) or None
    recorder = RunRecorder(prepare_run_dir(scn, out, overwrite=bool(context.run_config.get("overwrite", False))), scn)
    recorder.engine = {"address": None, "deployment": True, "run_id": context.run_id}
    try:
        (run_gossip if scn.mode == "decentralized" else run_strategy)(scn, grid, recorder, None, None)
    except BaseException as err:  # the run folder says why; Flower reports the run as failed
        recorder.finish("failed", _root_message(err), failure="error")
        raise
    recorder.finish("ok")


_APPS: dict[str, ClientApp] = {}  # scenario JSON -> its ClientApp, built once per process


def _client_app_of(context: Context) -> ClientApp:
    from fedens.client_app import make_client_app

    key = str(context.run_config["scenario"])
    if key not in _APPS:
        _APPS.clear()
        _APPS[key] = make_client_app(_scenario(context))
    return _APPS[key]


client_app = ClientApp()


def _delegate(message: Message, context: Context) -> Message:
    return _client_app_of(context)(message, context)


for _kind, _action in HANDLERS:
    register = getattr(client_app, _kind)
    (register(_action) if _action else register())(_delegate)
