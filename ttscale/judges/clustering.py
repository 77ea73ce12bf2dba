"""Online greedy clustering of traces by their prefixes (DeepPrune, arXiv 2510.08483): pure logic.

A trace that reaches its prefix is compared with up to `p` members of every open cluster; a cluster's
score is the mean judge probability "same answer". The trace joins the best cluster when that score is
above `tau`; otherwise it opens a new cluster while fewer than `max_clusters` exist, else it stays
unassigned (a singleton that no cluster took). Scores are passed in, so the judge may be sync or async
and this module stays free of I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Cluster:
    """Traces judged to head for the same answer; `members[0]` opened it."""

    id: int
    members: list[str] = field(default_factory=list)


@dataclass
class Assignment:
    """What happened to one trace: joined cluster `cluster` (or opened it), with the per-cluster scores."""

    key: str
    cluster: int | None
    opened: bool
    scores: dict[int, float]


class OnlineClustering:
    """Greedy clustering state. Call `compare_with()` for the members to score, then `add(key, scores)`."""

    def __init__(self, tau: float = 0.5, max_clusters: int = 32, p: int = 5):
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        if max_clusters < 1 or p < 1:
            raise ValueError("max_clusters and p must be >= 1")
        self.tau, self.max_clusters, self.p = tau, max_clusters, p
        self.clusters: list[Cluster] = []
        self.unassigned: list[str] = []
        self.history: list[Assignment] = []

    def compare_with(self) -> dict[int, list[str]]:
        """Cluster id -> the (at most p, earliest) members a new trace is compared with."""
        return {c.id: c.members[: self.p] for c in self.clusters}

    def add(self, key: str, scores: Mapping[str, float]) -> Assignment:
        """Place `key` given judge scores against the members named by `compare_with()`."""
        per_cluster: dict[int, float] = {}
        for cid, members in self.compare_with().items():
            missing = [m for m in members if m not in scores]
            if missing:
                raise ValueError(f"no judge score for {key!r} against {missing}")
            per_cluster[cid] = sum(float(scores[m]) for m in members) / len(members)
        best = max(per_cluster, key=lambda c: (per_cluster[c], -c), default=None)
        if best is not None and per_cluster[best] > self.tau:
            self.clusters[best].members.append(key)
            a = Assignment(key, best, False, per_cluster)
        elif len(self.clusters) < self.max_clusters:
            c = Cluster(id=len(self.clusters), members=[key])
            self.clusters.append(c)
            a = Assignment(key, c.id, True, per_cluster)
        else:
            self.unassigned.append(key)
            a = Assignment(key, None, False, per_cluster)
        self.history.append(a)
        return a

    def add_with(self, key: str, judge: Callable[[str, str], float]) -> Assignment:
        """Convenience for sync judges: `judge(key, member) -> p_same`."""
        members = {m for ms in self.compare_with().values() for m in ms}
        return self.add(key, {m: judge(key, m) for m in members})

    @property
    def all_singletons(self) -> bool:
        return all(len(c.members) <= 1 for c in self.clusters)

    def largest(self) -> Cluster | None:
        """The biggest cluster; ties go to the one opened first."""
        return max(self.clusters, key=lambda c: (len(c.members), -c.id), default=None)


def select_survivors(
    clustering: OnlineClustering, keys_in_order: Sequence[str], k2: int, k3: int, rng: random.Random
) -> tuple[list[str], str]:
    """Which traces run to completion: the largest cluster's first `k2` members, or `k3` random traces
    when every cluster is a singleton (the paper's fallback). Returns (keys, rule)."""
    if clustering.all_singletons:
        pool = list(keys_in_order)
        return sorted(rng.sample(pool, min(k3, len(pool))), key=pool.index), "fallback-k3"
    big = clustering.largest()
    assert big is not None
    return big.members[:k2], "largest-cluster"
