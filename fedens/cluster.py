"""What travels with a run to a Ray cluster that does not share the driver's files.

On one machine every Ray actor sees the driver's files: plug-ins are loaded by absolute path and
the LoRA backbone is read from the run folder. On a cluster (``engine.address``) the actors run
on other machines, so everything they need goes with the run, through Ray:

- **fedens' code**: a copy of the imported ``fedens`` package (with ``fedens.strategies``) in
  the job's runtime environment (``py_modules``), so the nodes need only fedens' dependencies
  (torch, flwr, ray, ... at the driver's versions) and import the driver's fedens, not theirs.
- **Files the ClientApp reads**: plug-in files (``file.py:Name``) and prepared files (the LoRA
  backbone, subnetwork masks, a topology file), i.e. every absolute path to a file in the
  scenario's learner, model, dataset reference and gossip sections, and the folders of plug-in
  packages (``pkg.mod:Name``) that are not installed. They are copied into a working directory,
  by content (``fedens-files/<sha>/<name>``), uploaded as the actors' Ray ``working_dir``, and
  the ClientApp gets a copy of the scenario with relative paths to them (``portable``): the
  actors' working directory is that folder, so they never use a path of the driver's machine.
- **The data** is built on the driver and shipped through Ray's object store (the engine
  does that on one machine too); the dataset's own files (``data.params``) stay on the driver.

The strategy, the server-side evaluation and the results stay on the driver; nothing is
written on the cluster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedens.scenario import Scenario

FILES = "fedens-files"  # the folder of shipped files inside the actors' working directory
FILE_REF = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][\w.]*)$")  # a plug-in file.py:Name
_MODULE_REF = re.compile(r"^(?P<module>[A-Za-z_][\w]*(\.[\w]+)*):(?P<name>[A-Za-z_][\w.]*)$")
# The sections the ClientApp resolves on an actor: its learner, model, dataset class and gossip
# rule. The strategy and the distillation run on the driver; data.params are read by the
# driver's data build only.
_CLIENT_SECTIONS = ("learner", "model", "gossip")


def cluster_address(scn: Scenario) -> str | None:
    """The Ray cluster a run goes to: ``engine.address``, else the ``RAY_ADDRESS`` convention
    (Ray's own tools read it too), else None: a local Ray for this run. ``RAY_ADDRESS=local``
    means a local Ray, as it does for ``ray.init``."""
    address = scn.engine.address or os.environ.get("RAY_ADDRESS", "").strip() or None
    return None if address in (None, "local") else address


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _installed(origin: Path) -> bool:
    """A module that lives in site-packages (or the standard library) is there on every node
    that has the same environment; anything else is the user's and has to travel."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    return any(origin.resolve().is_relative_to(Path(r).resolve()) for r in roots)


class Shipment:
    """Files for the actors' working directory: ``add_file`` returns the relative path an actor
    uses, ``add_package`` a top-level package (or module) to put beside them."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}  # relative path -> the driver's file
        self.packages: dict[str, Path] = {}  # top-level name -> the driver's folder or .py file

    def add_file(self, path: Path) -> str:
        rel = f"{FILES}/{_digest(path)}/{path.name}"
        self.files[rel] = path
        return rel

    def add_package(self, module: str) -> None:
        top = module.split(".")[0]
        if top == "fedens" or top in self.packages:
            return
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            return  # not importable here: the check at load time has reported it already
        origin = Path(spec.origin)
        where = origin.parent if spec.submodule_search_locations else origin
        if not _installed(origin):
            self.packages[top] = where

    def __bool__(self) -> bool:
        return bool(self.files or self.packages)

    def stage(self, root: Path) -> Path:
        """The working directory, under ``root``, named by its content (so an unchanged one is
        uploaded once)."""
        h = hashlib.sha256()
        for rel, src in sorted(self.files.items()):
            h.update(f"{rel}\0".encode())
        for name, src in sorted(self.packages.items()):
            h.update(f"{name}\0{src}\0{src.stat().st_mtime_ns}\0".encode())
        folder = root / f"workdir-{h.hexdigest()[:16]}"
        if folder.is_dir():
            return folder
        tmp = Path(tempfile.mkdtemp(dir=root))
        for rel, src in self.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
        for name, src in self.packages.items():
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, tmp / src.name)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process staged the same content meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (a scenario's JSON: dicts, lists, scalars) with ``fn`` applied to every string."""
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def portable(scn: Scenario) -> tuple[Scenario, Shipment]:
    """The scenario the ClientApp takes to the cluster, and the files it needs there.

    ``scn`` has been through ``check_references`` (plug-in files and path options are
    absolute). In the copy, every absolute path to a file in the client's sections, and the
    file of every ``file.py:Name`` reference, is replaced by its relative path in the shipped
    working directory; the copy has no source file, so relative paths resolve against the
    actor's working directory."""
    shipment = Shipment()

    def walk(value: str) -> str:
        if (m := FILE_REF.match(value)) and Path(m["file"]).is_absolute() and Path(m["file"]).is_file():
            return f"{shipment.add_file(Path(m['file']))}:{m['name']}"
        if (m := _MODULE_REF.match(value)) and "/" not in value:
            shipment.add_package(m["module"])
            return value
        if os.path.isabs(value) and Path(value).is_file():
            return shipment.add_file(Path(value))
        return value

    raw = scn.model_dump(mode="json")
    for section in _CLIENT_SECTIONS:
        raw[section] = map_strings(raw[section], walk)
    raw["data"]["dataset"] = map_strings(raw["data"]["dataset"], walk)
    return Scenario.model_validate(raw), shipment


def staging_root() -> Path:
    """Where the driver stages what it uploads (``$XDG_CACHE_HOME/fedens/cluster``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedens" / "cluster"
    root.mkdir(parents=True, exist_ok=True)
    return root


def stage_fedens(root: Path) -> Path:
    """A copy of the imported fedens package, ``fedens.strategies`` included (it is installed
    from the repository's ``strategies/`` folder), under ``root``, named by its content."""
    import fedens
    import fedens.strategies

    pkg, strategies = Path(fedens.__file__).parent, Path(fedens.strategies.__file__).parent
    sources = sorted((p, p.relative_to(pkg)) for p in pkg.rglob("*.py") if "__pycache__" not in p.parts
                     and not p.is_relative_to(strategies))
    sources += sorted((p, Path("strategies") / p.relative_to(strategies)) for p in strategies.rglob("*.py")
                      if "__pycache__" not in p.parts)
    h = hashlib.sha256()
    for src, rel in sources:
        h.update(str(rel).encode() + b"\0" + src.read_bytes())
    folder = root / f"fedens-{h.hexdigest()[:16]}" / "fedens"
    if not folder.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=root))
        for src, rel in sources:
            (tmp / "fedens" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / "fedens" / rel)
        try:
            os.replace(tmp, folder.parent)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def upload_working_dir(folder: Path) -> str:
    """Upload ``folder`` to the connected cluster's GCS (as ``ray.init`` does with a job's
    ``working_dir``) and return its ``gcs://`` URI, which actors may name in their own runtime
    environment (Ray accepts only URIs there, local folders only for the whole job)."""
    try:
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    except ImportError as err:  # Ray moved its uploader: fedens supports ray 2.40 to 2.55
        raise RuntimeError(f"this Ray cannot upload a working directory for the actors: {err}") from None
    env = upload_working_dir_if_needed({"working_dir": str(folder)}, include_gitignore=False,
                                       scratch_dir=str(folder.parent))
    return str(env["working_dir"])

