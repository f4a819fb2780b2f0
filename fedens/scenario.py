"""The scenario: a typed, frozen, validated description of one simulation.

YAML is read with ``yaml.safe_load``, ``--set KEY=VALUE`` overrides are applied to the raw
mapping, and the result is validated into ``Scenario``. Nothing below this module sees a raw
dict. Every way a scenario can be wrong ends in one ``ScenarioError`` whose message is a single
line naming the file and the key path, e.g. ``quick.yaml: data.partition.alpha: must be > 0``.

All defaults live in the field declarations below; this file is the reference for them. It is
the schema only and imports no registry: what needs the registries (does the learner exist, are
the strategy's parameters valid) is checked in ``fedens.checks``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedens.decentralized.topology import RingTopology, TopologyConfig
from fedens.options import first_error as _first_error


class ScenarioError(ValueError):
    """An invalid scenario or usage. ``str(err)`` is one line: ``file: key.path: problem``.
    Control characters (a key or value may hold any, also line breaks such as U+001E) are
    written as escapes, so the message stays one line whatever the input."""

    def __init__(self, message: object = "") -> None:
        super().__init__(_one_line(str(message)))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Open(BaseModel):
    """A config whose extra keys are the options of the registered kind it names."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# --------------------------------------------------------------------------- data


class IidPartition(_Strict):
    """Every client gets an equal-sized uniform random share."""

    kind: Literal["iid"] = "iid"


class DirichletPartition(_Strict):
    """Label skew: per class, shares drawn from Dirichlet(alpha); smaller alpha = more skew."""

    kind: Literal["dirichlet"]
    alpha: float = Field(0.5, gt=0)
    min_partition_size: int = Field(10, ge=0, description="resample until every client has this many")


class PathologicalPartition(_Strict):
    """Each client holds examples of exactly ``classes_per_client`` classes."""

    kind: Literal["pathological"]
    classes_per_client: int = Field(2, ge=1)


PartitionConfig = Annotated[
    Union[IidPartition, DirichletPartition, PathologicalPartition], Field(discriminator="kind")
]


class ShiftConfig(_Strict):
    """The shifted copy of the test set: Gaussian noise plus rotation at a severity 1..5.

    Severity s adds noise of standard deviation ``0.1 * s`` (in units of the standardised
    inputs) and rotates images by ``6 * s`` degrees in a random direction (vectors are only
    noised).
    """

    severity: int = Field(3, ge=1, le=5)


class OodConfig(_Strict):
    """The out-of-distribution set of the OOD AUROC, as many inputs as the test set
    (docs/methods.md#ood-sets).

    ``auto``: the dataset's own OOD set where it declares one (digits: MNIST-1D signals as 8x8
    images; mnist1d: blank signals of its generator; synthetic: new classes), else ``noise``.
    ``noise``: standard-normal noise in the standardised input space (fedens' only set before).
    ``dataset``: the dataset's own set, an error for a dataset that declares none.
    """

    kind: Literal["auto", "noise", "dataset"] = "auto"


class DataConfig(_Strict):
    dataset: str = "digits"
    params: dict[str, Any] = Field(default_factory=dict, description="options of the dataset")
    num_clients: int = Field(10, ge=1, le=10_000_000)
    partition: PartitionConfig = Field(default_factory=IidPartition)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out global test set")
    server_fraction: float = Field(
        0.0, ge=0, lt=1, description="of the non-test pool, a server-held public split (pretraining, distillation)"
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="of each client's partition")
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    ood: OodConfig = Field(default_factory=OodConfig, description="the OOD set of the OOD AUROC")


# --------------------------------------------------------------------------- model and training


class ModelConfig(_Open):
    """``kind`` names a registered model; the other keys are its options (see fedens.models)."""

    kind: str = "mlp"


class LearnerConfig(_Open):
    """``kind`` names a registered learner; the other keys are its options."""

    kind: str = "single"


class TrainConfig(_Strict):
    local_epochs: int = Field(1, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=10_000_000)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class StrategyConfig(_Strict):
    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict, description="constructor kwargs")


class ConformalConfig(_Strict):
    """Split-conformal prediction sets of the global predictive (docs/methods.md#conformal)."""

    alpha: float = Field(0.1, gt=0, lt=1, description="miscoverage: sets hold the true label with probability >= 1 - alpha")
    score: Literal["lac", "aps"] = Field("lac", description="non-conformity score: 1 - p_y (lac) or adaptive sets (aps)")
    method: Literal["pooled", "quantile_of_quantiles"] = Field(
        "pooled", description="threshold from every client's scores, or from their local quantiles only (one-shot)")


class DistillConfig(_Strict):
    """Distil the global predictive into one network on the server's public split at every
    evaluation (docs/methods.md#distillation)."""

    epochs: int = Field(30, ge=1, le=100_000, description="epochs over the public split per evaluation")
    temperature: float = Field(1.0, gt=0, description="targets ∝ p^(1/T): 1 distils the predictive itself, < 1 sharpens")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)


class EvaluateConfig(_Strict):
    every: int = Field(1, ge=1, le=1_000_000, description="evaluate every N rounds (and round 0 and the last)")
    n_bins: int = Field(10, ge=2, le=10_000, description="equal-width ECE bins, as in the IVON and LoRA-Ensemble papers")
    batch_size: int = Field(512, ge=1, le=10_000_000)
    max_clients: int | None = Field(
        100, ge=1, description="at most this many clients evaluate per round (a seeded sample); None: no cap"
    )
    diverge_loss: float | None = Field(
        100.0, gt=0, le=1e12,
        description="a round whose mean training loss exceeds this x log C ends the run as diverged; None: never",
    )
    conformal: ConformalConfig | None = Field(
        None, description="calibrate prediction sets on the clients' validation splits at every evaluation; None: off")
    temperature: Literal["final", "every", "off"] = Field(
        "final", description="temperature scaling of the global predictive, fitted on the clients' validation splits "
        "(gossip: each node on its own): rows gain temperature, nll_ts, ece_ts at the final evaluation, at every one, or never")
    test_sets: bool = Field(
        True, description="evaluate on the global test, shifted and OOD sets; false (as while tuning): the run never "
        "reads them and reports only the clients' validation metrics")


class StopConfig(_Strict):
    """Early stopping under the ``rounds`` cap: the run ends at the first evaluated round ``r >=
    min_rounds`` whose ``scope`` metric has not improved (by more than ``min_delta``) on its best
    value for ``patience`` rounds, i.e. the best was reached at a round ``<= r - patience``. That
    round's model is the run's final one (docs/comparisons.md#early-stopping)."""

    metric: str = Field("nll", min_length=1, description="a metric of the scope's rows (e.g. nll, accuracy, train_loss)")
    scope: Literal["clients", "nodes-val", "train"] = Field(
        "clients", description="clients: the clients' validation splits (federated); nodes-val: the nodes' own (gossip); "
        "train: the training loss")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="None: maximize accuracy-like metrics")
    patience: int = Field(10, ge=1, le=1_000_000, description="rounds without improvement before stopping")
    min_rounds: int = Field(0, ge=0, le=1_000_000, description="never stop before this round")
    min_delta: float = Field(0.0, ge=0, description="an improvement must exceed this")


class ResourcesConfig(_Strict):
    """Per-client (per Ray actor) resources; the device is CUDA when a GPU share is given."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class EngineConfig(_Strict):
    backend: Literal["ray"] = "ray"
    telemetry: bool = Field(False, description="Flower telemetry; off unless turned on here")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may use (default: all); not with address")
    address: str | None = Field(
        None, min_length=1,
        description="a running Ray cluster to run on (its head's host:port, as `ray start --head` prints, or "
        "'auto'); fedens connects, ships its code, the plug-in files and prepared files, and leaves the cluster "
        "running. None: the RAY_ADDRESS environment variable if set, else a local Ray started for the run",
    )

    @model_validator(mode="after")
    def _one_ray(self) -> EngineConfig:
        if self.address is not None and self.ray_num_cpus is not None:
            raise ValueError("engine.ray_num_cpus sizes a local Ray; a cluster (engine.address) has its own CPUs")
        return self


class OutputConfig(_Strict):
    dir: str = "runs"
    checkpoint: bool = Field(True, description="save the global model after every evaluation (checkpoint.npz)")
    checkpoint_every: int = Field(
        1, ge=0, le=1_000_000, description="write the resume checkpoint (state.pkl) every N rounds; 0: never"
    )
    tensorboard: bool = Field(
        False, description="also write every scope's metrics per round and the final plots as TensorBoard events "
        "(run folder/tensorboard; pip install fedens[tensorboard])"
    )


class ByzantineConfig(_Strict):
    """Clients that misbehave in every round they take part in: a seeded ``fraction`` of them.

    scale: send ``global + scale * (trained - global)``; sign_flip: ``global - (trained -
    global)``; gaussian: ``trained + scale * N(0, 1)`` per element; label_flip: train on labels
    ``C - 1 - y`` (data poisoning, ``scale`` unused)."""

    fraction: float = Field(0.0, ge=0, le=1)
    kind: Literal["scale", "sign_flip", "gaussian", "label_flip"] = "scale"
    scale: float = Field(10.0, ge=0, le=1e12)


class FaultsConfig(_Strict):
    """Injected faults, drawn per (seed, round, client) so a run is repeatable. A crash is an
    exception in the client (an error reply); a straggler replies ``straggler_delay_s`` late
    (dropped when it misses ``round_timeout_s``); a NaN client replies with NaN arrays (rejected
    before aggregation)."""

    crash_prob: float = Field(0.0, ge=0, le=1)
    straggler_prob: float = Field(0.0, ge=0, le=1)
    straggler_delay_s: float = Field(5.0, ge=0, le=3600)
    nan_prob: float = Field(0.0, ge=0, le=1)
    byzantine: ByzantineConfig = Field(default_factory=ByzantineConfig)

    @property
    def active(self) -> bool:
        return any((self.crash_prob, self.straggler_prob, self.nan_prob, self.byzantine.fraction))


class GossipConfig(_Strict):
    """The node rule and the asynchrony of decentralized mode (``mode: decentralized``).

    See ``docs/decentralized.md`` and ``fedens.decentralized`` (rules, mailbox, engine)."""

    rule: str = Field("average", description="a GOSSIP_RULES name: average | vca | swarm (or pkg.mod:Class)")
    params: dict[str, Any] = Field(default_factory=dict, description="the rule's options")
    active_fraction: float = Field(1.0, gt=0, le=1, description="share of nodes that wake up each round")
    drop_prob: float = Field(0.0, ge=0, le=1, description="each model copy lost with this probability")
    delay: int = Field(0, ge=0, description="node i's messages travel d_i extra rounds, d_i uniform in 0..delay")
    same_init: bool = Field(
        False, description="all nodes start from one model (default: each from its own seeded random init)"
    )


class Scenario(_Strict):
    name: str = Field("scenario", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$",
                      description="letters, digits and _ . = + -: it names the run folder inside output.dir")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    mode: Literal["federated", "decentralized"] = Field(
        "federated", description="decentralized: no global model; nodes gossip along `topology`"
    )
    rounds: int = Field(20, ge=1, le=1_000_000)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    stop: StopConfig | None = Field(None, description="early stopping on a validation metric under the rounds cap; None: off")
    distill: DistillConfig | None = Field(
        None, description="federated: distil the global model into one network (scopes global-*-student); None: off")
    round_timeout_s: float | None = Field(
        None, gt=0, le=86400, description="replies later than this (per message round) are dropped as stragglers"
    )
    # decentralized mode only (``mode: decentralized``)
    topology: TopologyConfig = Field(default_factory=RingTopology)
    gossip: GossipConfig = Field(default_factory=GossipConfig)
    # Where the scenario came from: plug-in paths are resolved against its folder.
    source: str = Field("<scenario>", exclude=True)

    @model_validator(mode="after")
    def _stop_scope(self) -> Scenario:
        if self.stop is not None:
            wanted = {"federated": ("clients", "train"), "decentralized": ("nodes-val", "train")}[self.mode]
            if self.stop.scope not in wanted:
                raise ValueError(f"stop.scope: {self.stop.scope!r} has no rows in {self.mode} mode; use one of {', '.join(wanted)}")
            if self.stop.scope != "train" and self.data.val_fraction == 0:
                raise ValueError("stop: the clients have no validation split (data.val_fraction is 0)")
        return self

    @property
    def evaluation_rounds(self) -> frozenset[int]:
        """The rounds the global model (or the nodes' models) is evaluated: round 0, every
        ``evaluate.every``-th round, and the last round."""
        return frozenset(r for r in range(self.rounds + 1) if r % self.evaluate.every == 0) | {self.rounds}

    def to_yaml(self) -> str:
        """The resolved scenario as YAML (defaults and overrides applied)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def base_dir(self) -> Path | None:
        p = Path(self.source)
        return p.parent if p.suffix in {".yaml", ".yml"} else None


# --------------------------------------------------------------------------- loading


def parse_scenario(
    source: str | Path | Mapping[str, Any] | Scenario,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Scenario:
    """A scenario from a YAML file, a mapping or a Scenario, with ``overrides`` (``"key.path=value"``
    strings, the value parsed as YAML, or a mapping from dotted paths to values) applied, checked
    against the schema only (types, ranges, unknown keys): no registry is imported. The checks
    that need the registries are ``fedens.checks``; ``fedens.checks.load_scenario`` does both.
    Raises ``ScenarioError`` with a one-line message."""
    if isinstance(source, Scenario):
        raw: Any = source.model_dump(mode="json")
        label = source.source
    elif isinstance(source, Mapping):
        raw, label = dict(source), "<scenario>"
    else:
        label = str(source)
        raw = _read_yaml(Path(source))
    if not isinstance(raw, dict):
        raise ScenarioError(f"{label}: the scenario must be a mapping of keys to values")
    raw = _apply_overrides(raw, overrides, label)
    try:
        return Scenario.model_validate({**raw, "source": label})
    except ValidationError as err:
        raise ScenarioError(f"{label}: {_first_error(err, raw)}") from None


# Bounds on what a scenario file may be: a configuration, not a data file. They keep hostile
# input (a YAML alias bomb, thousands of nested lists, a huge file) to a one-line error in
# milliseconds instead of gigabytes of memory or a RecursionError.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 40
MAX_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` in which a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a typo'd duplicate would override the intended value)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            duplicate = False
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_text(text: str) -> Any:
    """Parse YAML with the strict loader and check its size (``_bounded``). Raises
    ``yaml.YAMLError`` or ``ValueError`` (one line)."""
    if "\x00" in text:
        raise ValueError("the text contains a NUL byte")
    depth = deepest = 0
    for ch in text:  # flow-style nesting, counted before the parser recurses into it
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    _bounded(data)
    return data


def _bounded(data: Any) -> None:
    """Fail on more than ``MAX_DEPTH`` levels or ``MAX_VALUES`` values, counting every
    reference a YAML alias makes (so a document whose aliases expand to billions of values is
    refused after ``MAX_VALUES``)."""
    count = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ValueError(f"more than {MAX_VALUES} values (YAML aliases that expand?): not a scenario")
        if depth > MAX_DEPTH:
            raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ScenarioError(f"{path}: no such file")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ScenarioError(f"{path}: larger than {MAX_FILE_BYTES >> 10} kB: not a scenario file")
        return load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ScenarioError(f"{path}: {where}invalid YAML: {problem}") from None
    except ScenarioError:
        raise
    except ValueError as err:
        raise ScenarioError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ScenarioError(f"{path}: cannot read: {err}") from None


def parse_override(text: str, label: str = "--set") -> tuple[str, Any]:
    """``"data.num_clients=20"`` -> ``("data.num_clients", 20)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ScenarioError(f"{label}: {text!r}: expected KEY=VALUE")
    if len(text) > MAX_FILE_BYTES:
        raise ScenarioError(f"{label}: {key.strip()[:40]}: value too large")
    try:
        return key.strip(), load_yaml_text(value) if value.strip() else None
    except yaml.YAMLError:
        raise ScenarioError(f"{label}: {key}: value {value[:80]!r} is not valid YAML") from None
    except ValueError as err:
        raise ScenarioError(f"{label}: {key}: {err}") from None


def _apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any], label: str
) -> dict[str, Any]:
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    out = _deep_copy(raw)
    for key, value in pairs:
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise ScenarioError(f"{label}: {key}: {path} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x
