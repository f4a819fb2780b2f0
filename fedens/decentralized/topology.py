"""Communication graphs of decentralized learning: who may talk to whom in a round.

A scenario names one with ``topology: {kind: ..., ...}`` (``TopologyConfig``, a pydantic union
discriminated on ``kind``); ``build_graph`` turns it into a boolean adjacency matrix ``(n, n)``,
symmetric, without self loops. Kinds:

``ring``         cycle 0-1-...-(n-1)-0; degree 2, n edges (n >= 3).
``torus``        ``rows x cols`` grid with wraparound, node ``r * cols + c``; degree 4, 2n edges.
                 ``rows=None`` picks the most square factorisation; both sides must be >= 3
                 (a side of 1 or 2 would wrap onto itself and give duplicate edges).
``complete``     every pair; n(n-1)/2 edges.
``erdos_renyi``  each pair independently with probability ``p``.
``regular``      uniform random ``k``-regular graph (n k even, k < n).
``small_world``  Watts-Strogatz: ring lattice of even degree ``k``, each edge rewired with
                 probability ``p`` (``p=0`` is the lattice itself).
``edges``        a text file, one edge ``i j`` (or ``i,j``) per line, 0-based ids, ``#``
                 comments; a first line that is not two integers is skipped as a CSV header.
                 A relative path is relative to the working directory.

Seeding. A graph is a function of ``(cfg, n, seed, round)``. Without ``resample`` the round is
ignored (one graph for the whole run, the one ``resample`` draws in round 0). With ``resample``
every round draws a fresh graph, as gossip learning's random peer sampling does: the random
kinds draw anew, ``ring`` and ``torus`` keep their shape but place the nodes at a random
permutation of the positions (so neighbours change), ``complete`` and ``edges`` are fixed.

Connectivity. A disconnected graph (isolated nodes included) is an error unless
``allow_disconnected``. The random kinds first redraw up to ``MAX_DRAWS`` times (attempt a is
seeded from ``(seed, round, a)``, like networkx's ``connected_watts_strogatz_graph``), so the
graph is a draw conditioned on being connected.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # networkx and matplotlib only where used: the scenario schema imports this module everywhere
    import networkx as nx
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_DRAWS = 10  # connected redraws of a random kind before giving up


class TopologyError(ValueError):
    """A graph that cannot be built for this scenario; ``str(err)`` is one line."""


# --------------------------------------------------------------------------- configs


class _Topology(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    resample: bool = Field(False, description="draw a new graph every round (random peer sampling)")
    allow_disconnected: bool = Field(False, description="accept a graph with several components")


class RingTopology(_Topology):
    """Cycle 0-1-...-(n-1)-0."""

    kind: Literal["ring"] = "ring"


class TorusTopology(_Topology):
    """2-D grid with wraparound; ``rows=None`` picks the most square rows x cols = n."""

    kind: Literal["torus"] = "torus"
    rows: int | None = Field(None, ge=3)


class CompleteTopology(_Topology):
    """Every node talks to every other node."""

    kind: Literal["complete"] = "complete"


class ErdosRenyiTopology(_Topology):
    """G(n, p): each pair is an edge independently with probability ``p``."""

    kind: Literal["erdos_renyi"] = "erdos_renyi"
    p: float = Field(gt=0, le=1)


class RegularTopology(_Topology):
    """Uniform random ``k``-regular graph."""

    kind: Literal["regular"] = "regular"
    k: int = Field(ge=1)


class SmallWorldTopology(_Topology):
    """Watts-Strogatz: ring lattice of degree ``k`` with each edge rewired with prob ``p``."""

    kind: Literal["small_world"] = "small_world"
    k: int = Field(ge=2)
    p: float = Field(ge=0, le=1)

    @field_validator("k")
    @classmethod
    def _even(cls, k: int) -> int:
        if k % 2:
            raise ValueError("must be even (k/2 neighbours on each side)")
        return k


class EdgesTopology(_Topology):
    """An edge list read from ``file``: ``i j`` or ``i,j`` per line, 0-based, ``#`` comments."""

    kind: Literal["edges"] = "edges"
    file: str = Field(min_length=1)


TopologyConfig = Annotated[
    Union[
        RingTopology,
        TorusTopology,
        CompleteTopology,
        ErdosRenyiTopology,
        RegularTopology,
        SmallWorldTopology,
        EdgesTopology,
    ],
    Field(discriminator="kind"),
]

_RANDOM_KINDS = ("erdos_renyi", "regular", "small_world")


# --------------------------------------------------------------------------- building


def _derived_seed(seed: int, round: int, attempt: int = 0) -> int:
    """A 32-bit seed for one draw; independent streams for every (seed, round, attempt)."""
    return int(np.random.SeedSequence([seed, round, attempt]).generate_state(1)[0])


def _from_edges(n: int, edges: np.ndarray) -> np.ndarray:
    """edges: int (m, 2) -> symmetric bool adjacency (n, n)."""
    adj = np.zeros((n, n), dtype=bool)
    if len(edges):
        adj[edges[:, 0], edges[:, 1]] = True
        adj[edges[:, 1], edges[:, 0]] = True
    return adj


def _from_nx(g: nx.Graph, n: int) -> np.ndarray:
    return _from_edges(n, np.asarray(list(g.edges()), dtype=int).reshape(-1, 2))


def torus_shape(cfg: TorusTopology, n: int) -> tuple[int, int]:
    """(rows, cols) of the torus on n nodes; raises TopologyError if there is none."""
    if cfg.rows is not None:
        if n % cfg.rows:
            raise TopologyError(f"topology: torus rows={cfg.rows} does not divide {n} nodes")
        if n // cfg.rows < 3:
            raise TopologyError(f"topology: torus {cfg.rows}x{n // cfg.rows} has a side < 3 (duplicate edges)")
        return cfg.rows, n // cfg.rows
    # the most square factorisation: the largest divisor <= sqrt(n) that leaves both sides >= 3
    rows = max((r for r in range(3, int(np.sqrt(n)) + 1) if n % r == 0), default=None)
    if rows is None:
        raise TopologyError(f"topology: {n} nodes have no torus rows x cols with both sides >= 3")
    return rows, n // rows


def _ring(n: int) -> np.ndarray:
    i = np.arange(n)
    return _from_edges(n, np.stack([i, (i + 1) % n], axis=1))


def _torus(rows: int, cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    right = r * cols + (c + 1) % cols
    down = ((r + 1) % rows) * cols + c
    i = np.arange(rows * cols)
    return _from_edges(rows * cols, np.concatenate([np.stack([i, right], 1), np.stack([i, down], 1)]))


def read_edges(path: str | Path) -> np.ndarray:
    """Parse an edge-list file -> int (m, 2). Raises TopologyError naming the bad line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise TopologyError(f"topology: cannot read edges file {path}: {err.strerror or err}") from None
    edges: list[tuple[int, int]] = []
    first = True
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            edges.append((int(fields[0]), int(fields[1])))
        except ValueError:
            if first and not any(f.lstrip("-").isdigit() for f in fields):
                first = False  # a CSV header such as "source,target"
                continue
            got = line.strip()
            raise TopologyError(f"topology: {path}:{lineno}: expected two node ids 'i j', got {got!r}") from None
        first = False
    return np.asarray(edges, dtype=int).reshape(-1, 2)


def _edges_file(cfg: EdgesTopology, n: int) -> np.ndarray:
    edges = read_edges(cfg.file)
    bad = edges[(edges < 0).any(1) | (edges >= n).any(1)]
    if len(bad):
        raise TopologyError(f"topology: {cfg.file}: edge {bad[0, 0]} {bad[0, 1]} names a node outside 0..{n - 1}")
    loops = edges[edges[:, 0] == edges[:, 1]]
    if len(loops):
        raise TopologyError(f"topology: {cfg.file}: self loop {loops[0, 0]} {loops[0, 1]}")
    return _from_edges(n, edges)


def _erdos_renyi(cfg: ErdosRenyiTopology, n: int, seed: int) -> np.ndarray:
    # upper triangle of uniforms, mirrored: one vectorised draw instead of a loop over pairs
    upper = np.triu(np.random.default_rng(seed).random((n, n)) < cfg.p, k=1)
    return upper | upper.T


def _regular(cfg: RegularTopology, n: int, seed: int) -> np.ndarray:
    import networkx as nx  # only here: every process imports this module via the scenario schema

    return _from_nx(nx.random_regular_graph(cfg.k, n, seed=seed), n)


def _small_world(cfg: SmallWorldTopology, n: int, seed: int) -> np.ndarray:
    import networkx as nx

    return _from_nx(nx.watts_strogatz_graph(n, cfg.k, cfg.p, seed=seed), n)


# kind -> (cfg, n, 32-bit seed) -> adjacency (n, n); the fixed kinds ignore the seed
_DRAW = {
    "complete": lambda cfg, n, seed: ~np.eye(n, dtype=bool),
    "ring": lambda cfg, n, seed: _ring(n),
    "torus": lambda cfg, n, seed: _torus(*torus_shape(cfg, n)),
    "edges": lambda cfg, n, seed: _edges_file(cfg, n),
    "erdos_renyi": _erdos_renyi,
    "regular": _regular,
    "small_world": _small_world,
}


def _draw(cfg: TopologyConfig, n: int, seed: int) -> np.ndarray:
    """One graph of kind cfg.kind from a 32-bit seed (the fixed kinds ignore it)."""
    if cfg.kind not in _DRAW:
        raise TopologyError(f"topology: unknown kind {cfg.kind!r}")
    return _DRAW[cfg.kind](cfg, n, seed)


def _check_params(cfg: TopologyConfig, n: int) -> None:
    """Constraints that depend on n, which the pydantic model cannot see."""
    if n < 1:
        raise TopologyError(f"topology: need at least 1 node, got {n}")
    if cfg.kind == "ring" and n < 3:
        raise TopologyError(f"topology: a ring needs at least 3 nodes, got {n} (use complete)")
    if cfg.kind == "torus":
        torus_shape(cfg, n)
    if cfg.kind in ("regular", "small_world") and cfg.k >= n:
        raise TopologyError(f"topology: {cfg.kind} k={cfg.k} must be < the {n} nodes")
    if cfg.kind == "regular" and (n * cfg.k) % 2:
        raise TopologyError(f"topology: regular k={cfg.k} on {n} nodes: n*k must be even")


def num_components(adj: np.ndarray) -> int:
    """Connected components of adjacency (n, n), isolated nodes counting as one each."""
    adj = np.asarray(adj, dtype=bool)
    seen = np.zeros(len(adj), dtype=bool)
    count = 0
    for start in range(len(adj)):  # breadth-first search from every node not yet reached
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        frontier = np.array([start])
        while frontier.size:
            reached = adj[frontier].any(0) & ~seen
            seen |= reached
            frontier = np.flatnonzero(reached)
    return count


def build_graph(cfg: TopologyConfig, num_nodes: int, seed: int, round: int = 0) -> np.ndarray:
    """The communication graph of ``round``: bool adjacency (n, n), symmetric, no self loops.

    Deterministic in (cfg, num_nodes, seed, round); ``round`` only matters with ``resample``.
    Raises TopologyError for parameters that do not fit ``num_nodes`` and, unless
    ``cfg.allow_disconnected``, for a disconnected graph.
    """
    n = num_nodes
    _check_params(cfg, n)
    r = round if cfg.resample else 0
    draws = MAX_DRAWS if cfg.kind in _RANDOM_KINDS and not cfg.allow_disconnected else 1
    for attempt in range(draws):
        s = _derived_seed(seed, r, attempt)
        adj = _draw(cfg, n, s)
        if cfg.resample and cfg.kind in ("ring", "torus"):
            # same shape, nodes at new positions: a fresh set of neighbours every round
            perm = np.random.default_rng(s).permutation(n)
            adj = adj[np.ix_(perm, perm)]
        if cfg.allow_disconnected or (c := num_components(adj)) == 1:
            return adj
    raise TopologyError(
        f"topology: the {cfg.kind} graph on {n} nodes is disconnected ({c} components); "
        "set topology.allow_disconnected: true to allow it"
    )


def check_topology(cfg: TopologyConfig, num_nodes: int, seed: int) -> None:
    """Build the graphs a run would start with (rounds 0..2 with ``resample``) or raise TopologyError."""
    for r in range(3 if cfg.resample else 1):
        build_graph(cfg, num_nodes, seed, r)


def neighbours(adj: np.ndarray) -> list[list[int]]:
    """adjacency (n, n) -> for each node, its neighbours in ascending order."""
    return [np.flatnonzero(row).tolist() for row in np.asarray(adj, dtype=bool)]


def num_edges(adj: np.ndarray) -> int:
    """Undirected edges of a symmetric adjacency (n, n)."""
    return int(np.asarray(adj, dtype=bool).sum()) // 2


# --------------------------------------------------------------------------- picture


def _layout(g: nx.Graph, adj: np.ndarray) -> dict[int, np.ndarray]:
    """Circle for a cycle (in cycle order), grid for an identity-labelled torus (its wraparound
    edges run along the rows and columns), else spring layout with a fixed seed."""
    import networkx as nx

    n = len(adj)
    deg = adj.sum(1)
    if n >= 3 and (deg == 2).all() and nx.is_connected(g):
        order = [u for u, _ in nx.find_cycle(g, source=0)]  # walk the cycle: neighbours sit side by side
        theta = 2 * np.pi * np.arange(n) / n
        return {u: np.array([np.cos(t), np.sin(t)]) for u, t in zip(order, theta)}
    if n >= 9 and (deg == 4).all():
        for rows in range(3, n // 3 + 1):
            if n % rows == 0 and n // rows >= 3 and np.array_equal(adj, _torus(rows, n // rows)):
                cols = n // rows
                return {u: np.array([u % cols, -(u // cols)], dtype=float) for u in range(n)}
    return nx.spring_layout(g, seed=0)


def plot_topology(
    adj: np.ndarray, values: np.ndarray | None = None, title: str = ""
) -> tuple[Figure, Axes]:
    """Draw the graph adjacency (n, n); ``values`` (n,) (e.g. final per-node accuracy) colour
    the nodes, with a colorbar. Builds a bare ``Figure`` (no pyplot state, no screen needed)."""
    import networkx as nx
    from matplotlib.figure import Figure

    adj = np.asarray(adj, dtype=bool)
    g = nx.from_numpy_array(adj.astype(np.int8))
    pos = _layout(g, adj)
    fig = Figure(figsize=(5, 4.5), constrained_layout=True)
    ax = fig.add_subplot()
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.4, width=0.8)
    size = 300 if len(adj) <= 30 else 80
    if values is None:
        nx.draw_networkx_nodes(g, pos, ax=ax, node_size=size, node_color="tab:blue")
    else:
        values = np.asarray(values, dtype=float)
        if values.shape != (len(adj),):
            raise ValueError(f"values has shape {values.shape}, expected ({len(adj)},)")
        nodes = nx.draw_networkx_nodes(
            g, pos, ax=ax, node_size=size, node_color=values, cmap="viridis",
            vmin=float(values.min()), vmax=float(values.max()),
        )
        fig.colorbar(nodes, ax=ax, shrink=0.8)
    if len(adj) <= 30:
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=8, font_color="white")
    ax.set_title(title)
    ax.set_axis_off()
    return fig, ax
