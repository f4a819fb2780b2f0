"""The checks of a scenario that need the registries (datasets, models, learners, strategies,
gossip rules), after ``fedens.scenario`` has checked the schema: every name resolves, every
option is valid, the strategy and the learner fit together, the graph can be built. They all
run before Ray starts (``fedens validate`` makes exactly these checks); each failure is one
``ScenarioError`` line naming the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedens.decentralized.topology import RingTopology, TopologyError, check_topology
from fedens.registry import PluginError
from fedens.scenario import (
    GossipConfig,
    LearnerConfig,
    Scenario,
    ScenarioError,
    StrategyConfig,
    _first_error,
    parse_scenario,
)


def load_scenario(
    source: str | Path | Mapping[str, Any] | Scenario,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Scenario:
    """``parse_scenario`` (the schema) and then ``check_references`` (the registries)."""
    return check_references(parse_scenario(source, overrides))


def check_references(scn: Scenario) -> Scenario:
    """Check every name the scenario refers to (dataset, model, learner, strategy) resolves,
    and that their options are valid. Imports the registries lazily.

    Returns the scenario with relative file paths (dataset folders, plug-in files) made
    absolute against the scenario's folder, so they mean the same in every process and in the
    resolved ``scenario.yaml`` of the run folder."""
    from fedens.data import DATASETS
    from fedens.data.base import DatasetSpec
    from fedens.learners import resolve_learner
    from fedens.models import MODELS, ModelSpec
    from fedens.strategies import build_strategy, check_params, resolve_strategy

    label = scn.source
    ds = _spec(DATASETS, DatasetSpec, scn.data.dataset, scn, "data.dataset")
    params = _absolute_paths(ds.Options, scn.data.params, scn.base_dir)
    ds_opts = _validate_options(ds.Options, params, label, "data.params")
    try:  # cheap look-ups (e.g. the class folders of image_folder), no data is loaded
        shape, num_classes = ds.input_shape(ds_opts), ds.num_classes(ds_opts)
    except ValueError as err:
        raise ScenarioError(f"{label}: {err}") from None

    model_spec = _spec(MODELS, ModelSpec, scn.model.kind, scn, "model.kind")
    model_opts = _validate_options(model_spec.Options, scn.model.options, label, "model")
    problem = model_spec.check(model_opts, shape)
    if problem:
        raise ScenarioError(f"{label}: model.kind: {problem}")

    try:
        learner_cls = resolve_learner(scn.learner.kind, scn.base_dir)
    except PluginError as err:
        raise ScenarioError(f"{label}: learner.kind: {err}") from None
    learner_options = _absolute_paths(learner_cls.Options, scn.learner.options, scn.base_dir)
    learner_opts = _validate_options(learner_cls.Options, learner_options, label, "learner")
    check = getattr(learner_cls, "check_scenario", None)
    problem = check(learner_opts, scn) if check is not None else None
    if problem:
        raise ScenarioError(f"{label}: {problem}")

    if scn.evaluate.conformal is not None and scn.data.val_fraction <= 0:
        raise ScenarioError(f"{label}: data.val_fraction: evaluate.conformal calibrates on the clients' validation "
                            "splits: must be > 0")
    if scn.data.partition.kind == "pathological" and scn.data.partition.classes_per_client > num_classes:
        raise ScenarioError(
            f"{label}: data.partition.classes_per_client: must be <= the {num_classes} classes"
        )

    if scn.mode == "decentralized":
        if scn.distill is not None:
            raise ScenarioError(f"{label}: distill: only in federated mode (there is no global model to distil)")
        return _check_decentralized(scn, params, learner_options)
    if scn.distill is not None and scn.data.server_fraction <= 0:
        raise ScenarioError(f"{label}: distill: needs data.server_fraction > 0 (the public split the student learns on)")
    for key, default in (("topology", RingTopology()), ("gossip", GossipConfig())):
        if getattr(scn, key) != default:
            raise ScenarioError(f"{label}: {key}: only used in decentralized mode (set mode: decentralized)")

    try:
        cls = resolve_strategy(scn.strategy.name, scn.base_dir)
    except PluginError as err:
        raise ScenarioError(f"{label}: strategy.name: {err}") from None
    problem = check_params(cls, scn.strategy.params)
    if problem:
        raise ScenarioError(f"{label}: strategy.params.{problem}")
    try:  # the constructor's own checks (ranges, choices), here rather than after Ray starts
        build_strategy(cls, {"fraction_train": scn.fraction_train}, scn.strategy.params)
    except (TypeError, ValueError) as err:
        raise ScenarioError(f"{label}: strategy.params{_named(str(err), scn.strategy.params)}") from None
    supported = getattr(cls, "supported_learners", None)
    if supported is not None:
        from fedens.learners import LEARNERS

        if not any(name in LEARNERS and issubclass(learner_cls, LEARNERS.get(name)) for name in supported):
            raise ScenarioError(
                f"{label}: learner.kind: strategy {scn.strategy.name!r} does not support learner "
                f"{scn.learner.kind!r} (it supports: {', '.join(supported)})"
            )
    check = getattr(cls, "check_scenario", None)
    problem = check(scn) if check is not None else None
    if problem:
        raise ScenarioError(f"{label}: {problem}")

    return scn.model_copy(update={
        **_plugin_refs(scn, params),
        "strategy": scn.strategy.model_copy(update={"name": _absolute_ref(scn.strategy.name, scn.base_dir)}),
        "learner": LearnerConfig(kind=_absolute_ref(scn.learner.kind, scn.base_dir), **learner_options),
    })


def _plugin_refs(scn: Scenario, data_params: dict[str, Any]) -> dict[str, Any]:
    """The data and model sections with plug-in file references (``file.py:Name``) and the
    dataset's path options made absolute, so they mean the same in every process."""
    data = scn.data.model_copy(update={"params": data_params, "dataset": _absolute_ref(scn.data.dataset, scn.base_dir)})
    return {"data": data, "model": scn.model.model_copy(update={"kind": _absolute_ref(scn.model.kind, scn.base_dir)})}


def _spec(registry: Any, spec_type: type, ref: str, scn: Scenario, key: str) -> Any:
    """A registered name or a ``file.py:NAME`` plug-in, which must be a ``spec_type``."""
    try:
        spec = registry.resolve(ref, scn.base_dir)
    except PluginError as err:
        raise ScenarioError(f"{scn.source}: {key}: {err}") from None
    if not isinstance(spec, spec_type):
        raise ScenarioError(f"{scn.source}: {key}: {ref!r} is not a {spec_type.__module__}.{spec_type.__name__}")
    return spec


def _named(message: str, params: dict[str, Any]) -> str:
    """A constructor's error as ``.<key>: message`` when it names exactly one of the params
    (``mu must be >= 0, got -1`` -> ``.mu: mu must be >= 0, got -1``), else ``: message``."""
    message = message.splitlines()[0] if message else "invalid value"
    named = [k for k in params if k in message.replace(":", " ").replace(",", " ").split()]
    return f".{named[0]}: {message}" if len(named) == 1 else f": {message}"


def _check_decentralized(scn: Scenario, data_params: dict[str, Any], learner_options: dict[str, Any]) -> Scenario:
    """The decentralized part of ``check_references``: no strategy, a valid gossip rule, a
    graph that can be built (connected unless allowed). Returns the scenario with the edges
    file (if any) made absolute against the scenario's folder."""
    from fedens.decentralized.rules import GOSSIP_RULES, GossipRule, Swarm, make_rule

    label = scn.source
    if scn.strategy != StrategyConfig():
        raise ScenarioError(f"{label}: strategy: not used in decentralized mode; use gossip.rule")
    for key in ("fraction_train", "fraction_evaluate"):
        if getattr(scn, key) != Scenario.model_fields[key].default:
            raise ScenarioError(f"{label}: {key}: not used in decentralized mode; use gossip.active_fraction")
    try:
        cls = GOSSIP_RULES.resolve(scn.gossip.rule, scn.base_dir)
    except PluginError as err:
        raise ScenarioError(f"{label}: gossip.rule: {err}") from None
    if cls.__init__ is GossipRule.__init__:  # its Options are its parameters; a rule with a constructor of
        _validate_options(cls.Options, scn.gossip.params, label, "gossip.params")  # its own (a dataclass) checks below
    try:  # also a plug-in rule's own checks, and the renamed-option hint
        rule = make_rule(scn.gossip.rule, scn.gossip.params, scn.base_dir)
    except ValueError as err:
        raise ScenarioError(f"{label}: gossip.params: {err}") from None
    if isinstance(rule, Swarm) and scn.data.val_fraction <= 0:
        raise ScenarioError(f"{label}: data.val_fraction: the swarm gossip rule scores models on the nodes' "
                            "validation splits: must be > 0")
    topology = scn.topology
    if topology.kind == "edges":
        topology = topology.model_copy(update={"file": _absolute(topology.file, scn.base_dir)})
    try:
        check_topology(topology, scn.data.num_clients, scn.seed)
    except TopologyError as err:
        raise ScenarioError(f"{label}: {err}") from None
    return scn.model_copy(update={
        **_plugin_refs(scn, data_params),
        "learner": LearnerConfig(kind=_absolute_ref(scn.learner.kind, scn.base_dir), **learner_options),
        "topology": topology,
    })


def _absolute_paths(options_cls: type[BaseModel], values: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """``values`` with the options that ``options_cls.path_fields`` names made absolute."""
    fields = getattr(options_cls, "path_fields", ())
    return {k: _absolute(v, base_dir) if k in fields else v for k, v in values.items()}


def _absolute_ref(ref: str, base_dir: Path | None) -> str:
    """``file.py:Name`` with the file made absolute; other references unchanged."""
    module_ref, _, attr = ref.rpartition(":")
    return f"{_absolute(module_ref, base_dir)}:{attr}" if module_ref.endswith(".py") else ref


def _absolute(path: Any, base_dir: Path | None) -> Any:
    """``path`` made absolute against ``base_dir`` (or the working directory) if it exists
    there; anything else is returned unchanged, for the option's own check to report."""
    if not isinstance(path, str) or Path(path).is_absolute():
        return path
    for base in ([base_dir] if base_dir is not None else []) + [Path.cwd()]:
        if (base / path).exists():
            return str((base / path).resolve())
    return path


def _validate_options(options_cls: type[BaseModel], values: dict[str, Any], label: str, prefix: str) -> Any:
    try:
        return options_cls.model_validate(values)
    except ValidationError as err:
        raise ScenarioError(f"{label}: {_first_error(err, values, prefix)}") from None
