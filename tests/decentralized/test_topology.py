import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from pydantic import TypeAdapter, ValidationError

from fedens.decentralized.topology import (
    TopologyConfig,
    TopologyError,
    build_graph,
    check_topology,
    neighbours,
    num_components,
    num_edges,
    plot_topology,
)

parse = TypeAdapter(TopologyConfig).validate_python


def graph(n: int, seed: int = 0, round: int = 0, **cfg) -> np.ndarray:
    adj = build_graph(parse(cfg), n, seed, round)
    # every graph: bool, symmetric, no self loops
    assert adj.dtype == bool and adj.shape == (n, n)
    assert (adj == adj.T).all() and not adj.diagonal().any()
    return adj


def test_ring():
    adj = graph(10, kind="ring")
    assert (adj.sum(1) == 2).all() and num_edges(adj) == 10
    assert neighbours(adj)[0] == [1, 9] and neighbours(adj)[4] == [3, 5]


def test_torus():
    adj = graph(20, kind="torus", rows=4)
    assert (adj.sum(1) == 4).all() and num_edges(adj) == 40
    assert neighbours(adj)[0] == [1, 4, 5, 15]  # 4 x 5, node r*5+c: right, left wrap, down, up wrap
    # rows=None: the most square factorisation, 3 x 4 for 12; 5 x 5 for 25
    assert num_edges(graph(12, kind="torus")) == 24
    assert neighbours(graph(25, kind="torus"))[0] == [1, 4, 5, 20]


@pytest.mark.parametrize("n, rows", [(20, 3), (10, None), (8, None), (20, 10)])
def test_torus_bad_shape(n, rows):
    with pytest.raises(TopologyError, match="torus"):
        build_graph(parse({"kind": "torus", "rows": rows}), n, 0)


def test_complete():
    adj = graph(7, kind="complete")
    assert num_edges(adj) == 21 and (adj.sum(1) == 6).all()


def test_regular():
    adj = graph(20, seed=3, kind="regular", k=3)
    assert (adj.sum(1) == 3).all() and num_edges(adj) == 30


def test_regular_bad_params():
    with pytest.raises(TopologyError, match="n\\*k must be even"):
        check_topology(parse({"kind": "regular", "k": 3}), 9, 0)
    with pytest.raises(TopologyError, match="must be < the 5 nodes"):
        check_topology(parse({"kind": "regular", "k": 5}), 5, 0)


def test_small_world_p0_is_ring_lattice():
    adj = graph(12, kind="small_world", k=4, p=0.0)
    assert (adj.sum(1) == 4).all() and num_edges(adj) == 24
    assert neighbours(adj)[0] == [1, 2, 10, 11]


def test_small_world_rewired_keeps_edge_count():
    adj = graph(30, seed=1, kind="small_world", k=4, p=0.5)
    assert num_edges(adj) == 60 and not (adj.sum(1) == 4).all()


def test_erdos_renyi_density_and_seeding():
    adj = graph(200, seed=7, kind="erdos_renyi", p=0.1)
    expected = 0.1 * 200 * 199 / 2  # 1990, sd ~42
    assert abs(num_edges(adj) - expected) < 200
    assert (graph(200, seed=7, kind="erdos_renyi", p=0.1) == adj).all()
    assert (graph(200, seed=8, kind="erdos_renyi", p=0.1) != adj).any()


@pytest.mark.parametrize(
    "cfg", [{"kind": "erdos_renyi", "p": 0.3}, {"kind": "regular", "k": 4}, {"kind": "small_world", "k": 4, "p": 0.3}]
)
def test_resample(cfg):
    fixed = [graph(16, seed=1, round=r, **cfg) for r in range(3)]
    assert all((g == fixed[0]).all() for g in fixed)
    drawn = [graph(16, seed=1, round=r, resample=True, **cfg) for r in range(3)]
    assert (drawn[0] != drawn[1]).any() and (drawn[1] != drawn[2]).any()
    # round 0 of a resampled run is the fixed graph; each round is reproducible
    assert (drawn[0] == fixed[0]).all()
    assert (graph(16, seed=1, round=2, resample=True, **cfg) == drawn[2]).all()


def test_resample_ring_permutes_positions():
    a, b = graph(12, round=0, kind="ring", resample=True), graph(12, round=1, kind="ring", resample=True)
    assert (a != b).any()
    for adj in (a, b):
        assert (adj.sum(1) == 2).all() and num_edges(adj) == 12 and num_components(adj) == 1


def test_disconnected_raises_unless_allowed():
    cfg = {"kind": "erdos_renyi", "p": 0.001}
    with pytest.raises(TopologyError, match=r"erdos_renyi graph on 50 nodes is disconnected \(\d+ components\)"):
        check_topology(parse(cfg), 50, 0)
    adj = graph(50, allow_disconnected=True, **cfg)
    assert num_components(adj) > 1


def test_edges_file(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("# a path and a triangle\n0 1\n1 2  # inline comment\n\n2 3\n3 0\n")
    adj = graph(4, kind="edges", file=str(f))
    assert neighbours(adj) == [[1, 3], [0, 2], [1, 3], [0, 2]]
    csv = tmp_path / "g.csv"
    csv.write_text("i,j\n0,1\n1,2\n2,0\n")
    assert num_edges(graph(3, kind="edges", file=str(csv))) == 3


def test_edges_file_errors(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("0 1\n2 3\n")  # two components
    with pytest.raises(TopologyError, match=r"disconnected \(2 components\)"):
        graph(4, kind="edges", file=str(f))
    assert num_components(graph(4, kind="edges", file=str(f), allow_disconnected=True)) == 2
    with pytest.raises(TopologyError, match=r"disconnected \(3 components\)"):
        graph(5, kind="edges", file=str(f))  # node 4 isolated
    with pytest.raises(TopologyError, match="outside 0..2"):
        graph(3, kind="edges", file=str(f))
    f.write_text("0 1\n1 x\n")
    with pytest.raises(TopologyError, match="g.txt:2"):
        graph(3, kind="edges", file=str(f))
    with pytest.raises(TopologyError, match="cannot read"):
        graph(3, kind="edges", file=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    "cfg",
    [
        {"kind": "erdos_renyi", "p": 0.0},
        {"kind": "erdos_renyi", "p": 1.5},
        {"kind": "small_world", "k": 3, "p": 0.1},
        {"kind": "small_world", "k": 4, "p": -0.1},
        {"kind": "torus", "rows": 2},
        {"kind": "ring", "p": 0.5},
        {"kind": "star"},
        {"kind": "regular"},
    ],
)
def test_invalid_config(cfg):
    with pytest.raises(ValidationError):
        parse(cfg)


def test_config_is_frozen():
    cfg = parse({"kind": "ring"})
    with pytest.raises(ValidationError):
        cfg.resample = True


def test_plot_topology():
    adj = graph(12, kind="torus")
    fig, ax = plot_topology(adj, title="torus")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert sum(isinstance(c, PathCollection) for c in ax.collections) == 1
    fig, ax = plot_topology(graph(40, seed=0, kind="erdos_renyi", p=0.2), values=np.linspace(0.5, 0.9, 40))
    assert len(fig.axes) == 2  # plus the colorbar
    nodes = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(nodes) == 1 and len(nodes[0].get_array()) == 40
    fig.savefig(__import__("io").BytesIO(), format="png")  # renders headless
