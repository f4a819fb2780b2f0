"""The simulation engine: Flower's simulation runtime on a warm Ray session. With
``fedens.linkstate`` (one run's message flow), the one place that knows how ServerApps and
ClientApps are executed.

The apps are Flower's (a ``ServerApp`` running a ``Strategy`` against a ``Grid``, a ``ClientApp``
per simulated node on Ray actors), and so are the pieces that carry messages between them:
Flower's in-memory ``LinkState`` stores every message and reply and validates them, its
``InMemoryGrid`` is the ServerApp's grid, ``flwr.server.run_serverapp.run`` executes the
ServerApp, and each ClientApp call goes through Flower's ``VirtualClientEngineActor.run`` on a
Ray actor, with the node's ``Context`` (``context.state`` persists across rounds). What differs
from ``flwr.simulation.run_simulation``, measured on a 2-core machine (``bench/bench_engine.py``):

- **Warm.** ``run_simulation`` starts Ray and its actors for every run and ``RayBackend.terminate``
  ends with ``ray.shutdown()``. An ``Engine`` keeps one Ray session and one actor pool for many
  runs (a ``fedens compare``, a seed sweep, the test suite); each run gets a fresh LinkState,
  grid and node contexts, so a warm run gives exactly the rows of the same run cold (tested).
- **Event-driven.** Flower's runtime polls: a thread looks for new messages of every node every
  0.1 s (``add_messages_to_queue``, O(nodes x messages) per pass) and the grid pulls replies
  every 0.1 s. Here the LinkState hands each stored message straight to the actors' queue and
  wakes the grid when a reply is stored, so a round costs the clients' work, not polling.
- **Start-up independent of the number of nodes.** Nodes are registered in the LinkState at
  once, their contexts are made when a node first gets a message, the grid lists nodes without
  scanning the LinkState, and it knows each node's partition id (``partition_of``) without
  asking the nodes.
- **Shipped once.** The ClientApp (with the scenario) and the data go to Ray's object store
  once per run and per (data, seed), not with every message; an actor keeps the run's app, so a
  learner is built once per actor and run.
- **Batched.** An actor gets its share of a round in one call, planned from the nodes'
  previous durations (``fedens.linkstate``), and arguments travel inside the call.
- **Lean start.** Ray's workers preload fedens' client code while Ray starts
  (``preload_python_modules``), Ray starts in its own thread while the driver prepares the run,
  and the services a simulation does not use (dashboard API server, autoscaler monitor, log
  monitor) are not started.

Quiet by default: Flower's console log is raised to ERROR, Ray logs at ERROR and actors' output
is not forwarded, unless ``verbose``. Telemetry: Flower's is off unless ``engine.telemetry`` is
true (``fedens/__init__`` sets ``FLWR_TELEMETRY_ENABLED=0`` before Flower is imported, because
Flower reads it at import time); Ray's usage statistics are always off.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Flower's modules take ~0.7 s to import: Ray starts without waiting for them
    from fedens.cluster import Shipment
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

log = logging.getLogger("fedens")

# What Ray's worker processes import before they accept work: everything a ClientApp call
# needs (torch, Flower, fedens' learners), paid while Ray is still starting.
PRELOAD = ["fedens.client_app", "fedens.simulate", "torch._dynamo"]
Resources = dict[str, float]
SHARED = 4  # shipped objects (data builds) an engine keeps in the object store, newest first


def configure_engine(telemetry: bool, verbose: bool) -> None:
    """Telemetry and log levels for this process and the Ray workers it starts."""
    import flwr.supercore.telemetry as flwr_telemetry
    from flwr.supercore.logger import console_handler

    flag = "1" if telemetry else "0"
    os.environ["FLWR_TELEMETRY_ENABLED"] = flag  # inherited by Ray's processes
    flwr_telemetry.FLWR_TELEMETRY_ENABLED = flag  # already read at import in this process
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray warns about a future change of CUDA_VISIBLE_DEVICES handling on every start.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    console_handler.setLevel(logging.DEBUG if verbose else logging.ERROR)
    logging.getLogger("fedens").setLevel(logging.DEBUG)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


class EngineError(RuntimeError):
    """The engine could not start or lost its Ray session."""


# --------------------------------------------------------------------------- the engine


class Engine:
    """One Ray session and one pool of Ray actors, reused by every run given to ``run``.

    ``Engine(...).start()`` returns at once: Ray starts in a thread of its own (Linux ends Ray's
    processes when the thread that started them exits, so that thread lives until ``close``)
    while the caller prepares its run; ``run`` waits for it. Use it as a context manager, or
    call ``close`` (which stops the actors and Ray). A run that asks for other per-client
    resources than the pool has gets a new pool; the Ray session stays.

    ray_num_cpus : CPUs Ray may use (None: all of the machine's).
    resources : the per-client resources (``num_cpus``, ``num_gpus``) of the first pool,
        created as soon as Ray is up, so the actors start while the driver prepares.
    address : a running Ray cluster (``host:port`` of its head, or ``auto``) to connect to
        instead of starting Ray; ``close`` disconnects and leaves it running. fedens' code
        travels in the job's runtime environment, a run's files in its actors' (``fedens.cluster``).
    """

    def __init__(self, *, ray_num_cpus: int | None = None, resources: Resources | None = None,
                 verbose: bool = False, telemetry: bool = False, address: str | None = None) -> None:
        self.ray_num_cpus = ray_num_cpus
        self.address = address
        self.verbose = verbose
        self.telemetry = telemetry
        self._first_resources = dict(resources or {"num_cpus": 1.0, "num_gpus": 0.0})
        self._pool: _ActorPool | None = None
        self._shared: OrderedDict[Hashable, Any] = OrderedDict()  # key -> ObjectRef, the newest SHARED kept
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._owns_ray = False  # this engine started Ray (else it uses the process's session or a cluster)
        self._uploaded: dict[Path, str] = {}  # staged working directory -> its URI on the cluster
        self.runs = 0  # runs done in this session
        self.started_at: float | None = None
        self.ready_at: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._ready.clear()
            self._stop.clear()
            self._error = None
            configure_engine(self.telemetry, self.verbose)
            self.started_at = time.perf_counter()
            self._thread = threading.Thread(target=self._ray_main, name="fedens-ray", daemon=True)
            self._thread.start()
        return self

    def _ray_main(self) -> None:
        import ray

        started = False  # Ray started by this engine (and so stopped by it)
        connected = False  # connected by this engine to a cluster (and so disconnected by it)
        try:
            if ray.is_initialized():  # the caller's own Ray session: use it, leave it running
                log.info("using the Ray session this process already has")
            elif self.address is not None:
                _connect(self.address, self.verbose, self.telemetry)
                connected = True
            else:
                # Workers inherit the driver's environment (raylet is its child): the driver's
                # sys.path lets actors import what the driver can (plug-ins as module:Class).
                paths = [p for p in sys.path if p] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
                os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
                _start_local_ray(self.ray_num_cpus, self.verbose)
                started = True
            self._pool = _ActorPool(self._first_resources, shared_ray=not started, address=self.address)
            self._owns_ray = started
            self.ready_at = time.perf_counter()
        except BaseException as err:  # reported to the thread that waits for the engine
            self._error = err
        finally:
            self._ready.set()
        self._stop.wait()
        try:
            if self._pool is not None:
                self._pool.terminate()
            if started or connected:
                ray.shutdown()  # a cluster keeps running: this only disconnects the driver
        finally:
            if started:
                _stop_lean_node()

    def wait(self, timeout: float | None = 300.0) -> None:
        """Block until Ray and the first actor pool are up; raise ``EngineError`` if they failed."""
        if self._thread is None:
            self.start()
        if not self._ready.wait(timeout):
            raise EngineError(f"Ray did not start within {timeout:.0f} s")
        if isinstance(self._error, EngineError):
            raise self._error
        if self._error is not None:
            raise EngineError(f"Ray failed to start: {type(self._error).__name__}: {self._error}") from self._error

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=60)
            self._thread = None
        self._pool = None
        self._shared.clear()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._error is None

    # ------------------------------------------------------------------ shipping
    def share(self, key: Hashable, make: Callable[[], Any]) -> _Shared:
        """``make()`` put once into Ray's object store under ``key`` (e.g. a data build per
        (config, seed)); the returned handle pickles small and gives the object back on any
        actor, without a copy for numpy arrays."""
        import ray

        self.wait()
        if key not in self._shared:
            self._shared[key] = ray.put(make())
            while len(self._shared) > SHARED:  # a long sweep must not fill the object store
                self._shared.popitem(last=False)
        self._shared.move_to_end(key)
        return _Shared(self._shared[key])

    # ------------------------------------------------------------------ one run
    def run(self, server_app: ServerApp, client_app: ClientApp, num_nodes: int,
            resources: Resources | None = None, node_states: dict[int, Any] | None = None,
            shipment: Shipment | None = None) -> Context:
        """Run ``server_app`` in this thread against ``num_nodes`` simulated nodes that execute
        ``client_app`` on the actor pool; returns the ServerApp's context. Node i simulates
        partition i (``context.node_config["partition-id"]``); ``node_states`` (partition id ->
        ``context.state``) starts nodes with the state they had when a run was checkpointed;
        ``shipment`` (``fedens.cluster.portable``) is the actors' working directory."""
        import ray

        self.wait()
        assert self._pool is not None
        wanted = dict(resources or self._first_resources)
        env = self._runtime_env(shipment)
        if self._pool.resources != wanted or self._pool.runtime_env != env:  # another share or other files
            self._pool.terminate()
            self._pool = _ActorPool(wanted, shared_ray=not self._owns_ray, runtime_env=env, address=self.address)
        from fedens.linkstate import SimulatedRun

        app = _Shared(ray.put(client_app))
        try:
            return SimulatedRun(num_nodes, self._pool, app, node_states).execute(server_app)
        finally:
            self.runs += 1

    def _runtime_env(self, shipment: Shipment | None) -> dict[str, Any] | None:
        """The actors' runtime environment for a run: its shipped files as their working
        directory (uploaded once per content), or none."""
        if not shipment:
            return None
        from fedens.cluster import staging_root, upload_working_dir

        folder = shipment.stage(staging_root())
        if folder not in self._uploaded:
            self._uploaded[folder] = upload_working_dir(folder)
        return {"working_dir": self._uploaded[folder]}

    def describe(self) -> dict[str, Any]:
        """Where the runs went, for ``summary.json``: the cluster's address (None: a local Ray),
        its live nodes and the nodes the current pool's actors run on."""
        import ray

        if self._pool is None or not ray.is_initialized():
            return {"address": self.address}
        try:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            actor_nodes = sorted(set(ray.get([a.node_id.remote() for a in self._pool.actors], timeout=30)))
        except Exception as err:  # the cluster went away: say so, do not fail the summary
            return {"address": self.address, "error": f"{type(err).__name__}: {err}"}
        return {"address": self.address, "nodes": nodes, "actors": len(self._pool.actors), "actor_nodes": len(actor_nodes)}


class _Shared:
    """A handle on an object in Ray's object store. The reference travels inside a list, so
    Ray does not resolve it when the handle is an argument of a remote call."""

    def __init__(self, ref: Any) -> None:
        self.box = [ref]

    def __call__(self) -> Any:
        import ray

        return ray.get(self.box[0])


def _connect(address: str, verbose: bool, telemetry: bool) -> None:
    """Connect to the Ray cluster at ``address`` with fedens' code in the job's runtime
    environment (so the nodes import the driver's fedens) and the driver's telemetry setting in
    its workers' environment (they are not the driver's children and do not inherit it)."""
    import ray

    from fedens.cluster import stage_fedens, staging_root

    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:  # ray.init would retry for a minute before it gives up
        try:
            socket.create_connection((host, int(port)), timeout=5.0).close()
        except OSError as err:
            raise EngineError(f"cannot connect to the Ray cluster at {address!r}: nothing answers there "
                              f"({type(err).__name__}); start it with `ray start --head --port={port}`") from None
    env = {"py_modules": [str(stage_fedens(staging_root()))],
           "env_vars": {"FLWR_TELEMETRY_ENABLED": "1" if telemetry else "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}
    try:
        ray.init(address=address, runtime_env=env, logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EngineError(f"cannot connect to the Ray cluster at {address!r}: {err}".splitlines()[0]) from None


def _start_local_ray(num_cpus: int | None, verbose: bool) -> None:
    """A local Ray head without the services a simulation does not use, then connect to it.

    ``ray.init`` always starts the dashboard's API server (even with ``include_dashboard=False``,
    waiting about a second for it), the autoscaler's monitor and the log monitor. A head node
    started through ``ray._private.node.Node`` with ``no_monitor`` and without the log monitor,
    and with the API server left out, starts the GCS and the raylet only (plus the raylet's
    agents). The workers it prestarts import ``PRELOAD`` at once. With ``verbose`` the stock
    ``ray.init`` is used, so actors' output and Ray's logs reach the console."""
    import ray

    system_config = {
        "preload_python_modules": PRELOAD,
        "enable_metrics_collection": False,  # else the raylet waits ~1 s for a metrics agent
        # Arguments and results up to this size travel inside the call instead of through the
        # object store: a batch of three quickstart messages (~120 kB) took 5.4 ms per round
        # trip through the store and 1.9 ms inline here.
        "max_direct_call_object_size": 32 * 2**20,
        "task_rpc_inlined_bytes_limit": 64 * 2**20,
    }
    level = logging.INFO if verbose else logging.ERROR
    if verbose:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=level, log_to_driver=True,
                 _system_config=system_config)
        return
    global _LEAN_NODE
    try:
        _LEAN_NODE = _lean_head_node(num_cpus, system_config)
    except (TypeError, AttributeError) as err:  # Ray's internal Node API differs (not ray 2.55)
        log.warning("lean Ray start unavailable (%s); starting Ray with ray.init", err)
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=level, log_to_driver=False,
                 _system_config=system_config)
        return
    ray.init(address=_LEAN_NODE.address, logging_level=level, log_to_driver=False)


# The head node this process started (one per process, as Ray allows one session per process).
_LEAN_NODE: Any = None


def _lean_head_node(num_cpus: int | None, system_config: dict) -> Any:
    import ray._private.node
    import ray._private.parameter

    class LeanNode(ray._private.node.Node):
        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            self._webui_url = ""  # no dashboard, no job or state API: a simulation uses none

    params = ray._private.parameter.RayParams(
        num_cpus=num_cpus if num_cpus is not None else os.cpu_count(), include_dashboard=False,
        no_monitor=True, include_log_monitor=False, _system_config=system_config,
    )
    # shutdown_at_exit would install a SIGTERM handler, which only the main thread may do;
    # the engine stops the node itself (and at exit, below).
    node = LeanNode(params, head=True, shutdown_at_exit=False, spawn_reaper=True)
    atexit.register(_stop_lean_node)
    return node


def _stop_lean_node() -> None:
    global _LEAN_NODE
    if _LEAN_NODE is not None:
        _LEAN_NODE.kill_all_processes(check_alive=False, allow_graceful=True)
        _LEAN_NODE = None


# --------------------------------------------------------------------------- actors


def _client_actor_class() -> Any:
    """The Ray actor class, made on first use so that importing this module needs no Ray."""
    global _ClientActor
    if _ClientActor is None:
        import ray
        from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

        class ClientActor(VirtualClientEngineActor):
            """Runs ClientApp calls with Flower's ``VirtualClientEngineActor.run``; keeps the
            current run's ClientApp, fetched from the object store on the run's first call."""

            def __init__(self) -> None:
                self._key: int | None = None
                self._app: ClientApp | None = None

            def ready(self) -> bool:
                return True

            def node_id(self) -> str:
                return ray.get_runtime_context().get_node_id()

            def call(self, key: int, app: _Shared, jobs: list[tuple[Message, Context]]) -> list[tuple[Any, ...]]:
                """For each ``(message, context)``: ``(reply, context, None, seconds)``, or
                ``(None, None, (reason, traceback), seconds)`` when the ClientApp raised. A
                plain value is cheaper than Ray's wrapped exception and keeps the reason one
                line; ``seconds`` lets the engine hand out the longest messages first."""
                if key != self._key:
                    self._app, self._key = app(), key
                results = []
                for message, context in jobs:
                    start = time.perf_counter()
                    try:
                        _, out, context = self.run(lambda: self._app, message, "", context)
                    except Exception as err:
                        cause = err.__cause__ or err
                        failure = (f"{type(cause).__name__}: {cause}", "".join(traceback.format_exception(cause)))
                        results.append((None, None, failure, time.perf_counter() - start))
                        continue
                    results.append((out, context, None, time.perf_counter() - start))
                return results

        _ClientActor = ray.remote(ClientActor)
    return _ClientActor


_ClientActor: Any = None


class _ActorPool:
    """As many actors as the per-client ``resources`` fit on the Ray cluster (Flower's
    ``pool_size_from_resources``), created at once; they start while the caller goes on."""

    def __init__(self, resources: Resources, shared_ray: bool = False, runtime_env: dict[str, Any] | None = None,
                 address: str | None = None) -> None:
        import ray
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        self.resources = dict(resources)
        self.runtime_env = runtime_env
        self.address = address
        self.size = pool_size_from_resources(self.resources)
        if shared_ray:  # a Ray session someone else uses: only what is free now (else the actors never start)
            # A node's resources reach the GCS a moment after it has joined: wait a little for them.
            deadline = time.monotonic() + (10.0 if address else 0.0)
            while True:
                free = ray.available_resources()
                fits = [int(free.get("CPU", 0) // self.resources["num_cpus"])]
                if self.resources.get("num_gpus", 0) > 0:
                    fits.append(int(free.get("GPU", 0) // self.resources["num_gpus"]))
                if min(fits) >= min(self.size, 1) and (min(fits) >= self.size or time.monotonic() > deadline - 8.0):
                    break  # all the pool wants is free, or at least one client and 2 s have passed
                if time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            self.size = min(self.size, *fits)
            if self.size < 1:
                where = f"the Ray cluster at {address}" if address else "the process's Ray session"
                raise EngineError(f"{where} has no free resources for a client {self.resources} (free: "
                                  f"{ {k: v for k, v in free.items() if k in ('CPU', 'GPU')} }); other jobs hold them "
                                  "or no node is that large")
        self.actors = [self.new_actor() for _ in range(self.size)]

    def lost(self) -> EngineError | None:
        """After an actor died: an ``EngineError`` if the Ray cluster itself went away (its head
        no longer accepts connections), else None. Ray's driver would wait for the cluster for a
        minute and then end the whole process; the run fails at once instead, keeping its rounds."""
        if self.address is None:
            return None
        import ray

        try:
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
            socket.create_connection((host, int(port)), timeout=3.0).close()
        except (OSError, ValueError, AttributeError) as err:
            return EngineError(f"the Ray cluster at {self.address} went away during the run "
                               f"(its head refuses connections: {type(err).__name__}); the finished rounds are kept")
        return None

    def new_actor(self) -> Any:
        options: dict[str, Any] = dict(self.resources)
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        return _client_actor_class().options(**options).remote()

    def terminate(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


