"""Gossip topologies and their mixing matrices (docs/gossip.md).

Both sides of the relay read the same graph: phones to know whom to send to and whom to average
with, the server to forward messages only along its edges. A topology is a list of phone names
and, for each round, a set of undirected edges between their indices: fixed for ring, torus,
random d-regular, exponential and complete graphs and edges files; drawn afresh each round for
time-varying random matchings (from ``numpy.random.default_rng([seed, round])``, so every party
draws the same matching without talking); the ring's edges split into matchings taken in turn
(``ring-matchings``: one neighbour per phone and round, every ring edge once in two rounds).

Mixing weights are Metropolis-Hastings (Xiao & Boyd 2004): ``w_ij = 1 / (1 + max(d_i, d_j))`` on
an edge, ``w_ii = 1 - sum_j w_ij``; the matrix is symmetric and doubly stochastic, so gossip keeps
the phones' average.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Edge = tuple[int, int]  # (i, j) with i < j
STATIC = ("ring", "torus", "exponential", "complete")
EVERY_NEIGHBOUR = "*"  # the recipient a posted gossip message's signature names: every neighbour of its round
TO_HEADER = "X-Fedfleet-To"  # on a relayed message: the recipient its signature names (a phone, or EVERY_NEIGHBOUR)
SPECS = "ring | ring-matchings | torus | regular:D | exponential | complete | matching | edges:PATH"
TIME_VARYING = ("matching", "ring-matchings")  # topologies whose edges change from round to round


class TopologyError(ValueError):
    """A topology that cannot be used: unknown kind, a bad edges file, a disconnected graph."""


@dataclass(frozen=True)
class Topology:
    """Phone names (node i is ``names[i]``) and the edges of each round."""

    spec: str
    names: tuple[str, ...]
    fixed: frozenset[Edge] | None  # None: time-varying (``cycle``, or a fresh random matching every round)
    seed: int = 0
    cycle: tuple[frozenset[Edge], ...] = ()  # edge sets taken in turn, round 1 the first

    def edges(self, round_: int) -> frozenset[Edge]:
        if self.fixed is not None:
            return self.fixed
        if self.cycle:
            return self.cycle[(round_ - 1) % len(self.cycle)]
        return _round_matching(len(self.names), self.seed, round_)

    def neighbours(self, round_: int) -> list[list[int]]:
        """Each node's neighbours in ``round_``, in increasing order."""
        out: list[list[int]] = [[] for _ in self.names]
        for i, j in sorted(self.edges(round_)):
            out[i].append(j)
            out[j].append(i)
        return [sorted(n) for n in out]

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def weights(self, round_: int) -> np.ndarray:
        return metropolis_weights(len(self.names), self.edges(round_))


def phone_names(prefix: str, n: int) -> list[str]:
    """The names a fleet gives its phones (``{prefix}-00000`` ...), the nodes of a generated topology."""
    return [f"{prefix}-{i:05d}" for i in range(n)]


def parse_topology(spec: str, names: Sequence[str], seed: int = 0) -> Topology:
    """``SPECS`` over ``names``.
    Random graphs draw from ``numpy.random.default_rng(seed)``. Raises TopologyError (one line)."""
    names = tuple(names)
    n = len(names)
    if len(set(names)) != n:
        raise TopologyError("phone names must be distinct")
    if n < 2:
        raise TopologyError(f"a gossip topology needs at least 2 phones, got {n}")
    kind, _, arg = spec.partition(":")
    if kind == "matching" and not arg:
        return Topology(spec, names, None, seed)
    if kind == "ring-matchings" and not arg:
        return Topology(spec, names, None, seed, ring_matchings(n))
    if kind == "edges" and arg:
        edges = load_edges(arg, names)
    elif kind in STATIC and not arg:
        edges = {"ring": ring_edges, "torus": torus_edges, "exponential": exponential_edges,
                 "complete": complete_edges}[kind](n)
    elif kind == "regular" and arg:
        edges = regular_edges(n, _degree(arg, n), np.random.default_rng(seed))
    else:
        raise TopologyError(f"unknown topology {spec!r}; use {SPECS}")
    check_connected(n, edges, spec)
    return Topology(spec, names, frozenset(edges), seed)


def _degree(text: str, n: int) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) < n:
        raise TopologyError(f"regular:D needs a whole degree D in 1..{n - 1} for {n} phones, got {text!r}")
    d = int(text)
    if n * d % 2:
        raise TopologyError(f"no {d}-regular graph on {n} phones: phones x degree must be even")
    return d


def _edge(i: int, j: int) -> Edge:
    return (i, j) if i < j else (j, i)


def ring_edges(n: int) -> set[Edge]:
    return {_edge(i, (i + 1) % n) for i in range(n)}


def ring_matchings(n: int) -> tuple[frozenset[Edge], ...]:
    """The ring's edges as matchings taken in turn: (0,1), (2,3), ... then (1,2), (3,4), ...; an odd
    ring needs a third for its closing edge (n-1, 0). Two phones: the one edge, every round."""
    if n == 2:
        return (frozenset({(0, 1)}),)
    colour = [k % 2 for k in range(n)]  # edge k joins k and k + 1 (mod n)
    if n % 2:
        colour[n - 1] = 2
    return tuple(frozenset(_edge(k, (k + 1) % n) for k in range(n) if colour[k] == c)
                 for c in range(max(colour) + 1))


def complete_edges(n: int) -> set[Edge]:
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


def torus_edges(n: int) -> set[Edge]:
    """A rows x cols wrap-around grid, rows the largest divisor of ``n`` up to sqrt(n) (a prime
    number of phones makes a 1 x n torus: the ring)."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    cols = n // rows
    edges: set[Edge] = set()
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c):
                if j != i:
                    edges.add(_edge(i, j))
    return edges


def exponential_edges(n: int) -> set[Edge]:
    """Each phone i linked to i + 2^k (mod n), k = 0, 1, ...: degree O(log n), diameter O(log n)
    (the static exponential graph of Ying et al. 2021, undirected)."""
    edges: set[Edge] = set()
    hop = 1
    while hop < n:
        edges.update(_edge(i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
        hop *= 2
    return edges


def regular_edges(n: int, d: int, rng: np.random.Generator, attempts: int = 100) -> set[Edge]:
    """A connected random d-regular graph (networkx's generator, seeded from ``rng``)."""
    import networkx as nx  # here, not at the top: every server imports this module, few draw graphs

    for _ in range(attempts):
        g = nx.random_regular_graph(d, n, seed=int(rng.integers(2**31)))
        if nx.is_connected(g):
            return {_edge(int(i), int(j)) for i, j in g.edges()}
    raise TopologyError(f"no connected {d}-regular graph on {n} phones after {attempts} draws; raise D")


def matching_edges(n: int, rng: np.random.Generator) -> frozenset[Edge]:
    """A random matching: phones paired along a random permutation (one left out when n is odd)."""
    order = rng.permutation(n)
    return frozenset(_edge(int(order[k]), int(order[k + 1])) for k in range(0, n - 1, 2))


@functools.lru_cache(maxsize=4)
def _round_matching(n: int, seed: int, round_: int) -> frozenset[Edge]:
    """Round ``round_``'s matching, drawn once: the relay looks it up for every message of the round."""
    return matching_edges(n, np.random.default_rng([seed, round_]))


def load_edges(path: str, names: Sequence[str]) -> set[Edge]:
    """An edges file: one ``PHONE PHONE`` pair per line (spaces or a comma between), ``#`` comments.
    Errors name the file and line."""
    index = {name: i for i, name in enumerate(names)}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TopologyError(f"edges file {path}: {exc.strerror or exc}") from None
    edges: set[Edge] = set()
    for no, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].replace(",", " ").split()
        if not words:
            continue
        if len(words) != 2:
            raise TopologyError(f"edges file {path}, line {no}: expected two phone names, got {len(words)} fields")
        unknown = [w for w in words if w not in index]
        if unknown:
            raise TopologyError(f"edges file {path}, line {no}: unknown phone {unknown[0]!r}")
        a, b = index[words[0]], index[words[1]]
        if a == b:
            raise TopologyError(f"edges file {path}, line {no}: self-loop on {words[0]!r}")
        edges.add(_edge(a, b))
    return edges


def check_connected(n: int, edges: Iterable[Edge], spec: str) -> None:
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    parts = nx.number_connected_components(g)
    if parts > 1:
        raise TopologyError(f"topology {spec!r} is disconnected: {parts} separate groups of phones")


def metropolis_weights(n: int, edges: Iterable[Edge]) -> np.ndarray:
    """[n, n] Metropolis-Hastings mixing matrix of an undirected graph (symmetric, doubly stochastic)."""
    edges = list(edges)
    degree = np.zeros(n, dtype=np.int64)
    for i, j in edges:
        degree[i] += 1
        degree[j] += 1
    w = np.zeros((n, n), dtype=np.float64)
    for i, j in edges:
        w[i, j] = w[j, i] = 1.0 / (1 + max(degree[i], degree[j]))
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    return w
