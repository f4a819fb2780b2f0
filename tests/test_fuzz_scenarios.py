"""Generated hostile scenarios (hypothesis): ``fedens validate`` either accepts one or exits 2
with exactly one line on stderr; never a traceback, never another exit code."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedens import cli

VALID = yaml.safe_load((Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml").read_text())

# Where a mutation lands: real keys (at every depth the schema has), misspelt ones, and new ones.
PATHS = [
    "name", "seed", "rounds", "mode", "fraction_train", "fraction_evaluate", "round_timeout_s",
    "data", "data.dataset", "data.num_clients", "data.val_fraction", "data.partition", "data.partition.kind",
    "data.partition.alpha", "model", "model.kind", "model.hidden", "learner", "learner.kind", "learner.members",
    "train", "train.lr", "train.local_epochs", "train.batch_size", "train.optimizer", "train.momentum",
    "strategy", "strategy.name", "strategy.params", "strategy.params.mu", "strategy.params.k",
    "strategy.params.fraction_train", "evaluate.every", "evaluate.n_bins", "resources.num_cpus",
    "resources.num_gpus", "output.dir", "output.checkpoint_every", "faults.crash_prob", "faults.nan_prob",
    "faults.byzantine.fraction", "faults.byzantine.kind", "topology.kind", "gossip.rule", "gossip.drop_prob",
    "engine.ray_num_cpus", "lerner", "data.num_client", "strategy.parms", "train.lr.value",
]
VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10**15, max_value=10**15),
    st.sampled_from([0, -1, 1, 2, 10**12, 1e300, float("inf"), float("-inf"), float("nan"), 1e-300, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["fedavg", "fedprox", "swarm", "krum", "mlp", "cnn1d", "ivon", "lora_ensemble", "ring",
                     "decentralized", "../../x", "/etc/passwd", "pkg.mod:Cls", "a:b:c", "\u00e9\u4e2d", "1e12"]),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=4),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        if not isinstance(node, dict):
            return
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if isinstance(node, dict):
        node[last] = value


@st.composite
def scenarios(draw: st.DrawFn) -> str:
    """A YAML text: the quickstart with 1 to 4 keys set to hostile values, or broken YAML."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        set_path(doc, draw(st.sampled_from(PATHS)), draw(VALUES))
    text = yaml.safe_dump(doc, allow_unicode=True)
    damage = draw(st.sampled_from(["none", "none", "truncate", "junk", "tabs", "alias", "dup"]))
    if damage == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "junk":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["{", "]", ": :", "\t", "&a [*a]", "!!python/object:os.system x", "\x00",
                                                  "- - -", "? "])) + text[at:]
    elif damage == "tabs":
        text = text.replace("  ", "\t")
    elif damage == "alias":
        text = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
               "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n" + text
    elif damage == "dup":
        text = text + "rounds: 3\n"
    return text


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=scenarios())
def test_validate_accepts_or_refuses_in_one_line(text: str, capsys: pytest.CaptureFixture[str]):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        capsys.readouterr()
        try:
            code = cli.main(["validate", str(path)])
        except SystemExit as stop:  # argparse
            code = stop.code
        out, err = capsys.readouterr()
    assert code in (0, 2), (code, err[-2000:])
    if code == 0:
        assert ": ok (" in out and not err.strip(), (out, err)
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
        assert len(lines[0]) < 2000, lines[0][:300]


def test_a_key_with_a_line_separator_is_escaped_in_the_one_line_error(tmp_path, capsys):
    """Found by the generator: U+001E (a line boundary for str.splitlines) in a key."""
    path = tmp_path / "s.yaml"
    path.write_text('rounds: 2\nstrategy:\n  "\\x1E\\u2028": 0\n', encoding="utf-8")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "\\x1e" in err and "unknown key" in err, err
