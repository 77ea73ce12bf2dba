"""Online greedy clustering of traces by their prefixes (DeepPrune, arXiv 2510.08483): pure logic.

A trace that reaches its prefix is compared with up to `p` members of every open cluster; a cluster's
score is the mean judge probability "same answer". The trace joins the best cluster when that score is
above `tau`; otherwise it opens a new cluster while fewer than `max_clusters` exist, else it stays
unassigned (a singleton that no cluster took). Scores are passed in, so the judge may be sync or async
and this module stays free of I/O. `select_survivors` then picks the traces that run to completion:
one representative per cluster with the cluster's size as vote weight (keeps every answer the judge
tells apart), or the largest cluster only, or the paper's k3 random traces when all are singletons.
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

    def cluster_of(self, key: str) -> Cluster | None:
        """The cluster `key` belongs to (None when it is unassigned or unknown)."""
        return next((c for c in self.clusters if key in c.members), None)

    def largest(self) -> Cluster | None:
        """The biggest cluster; ties go to the one opened first."""
        return max(self.clusters, key=lambda c: (len(c.members), -c.id), default=None)


@dataclass
class Survivors:
    """The traces that run to completion, the rule that chose them, and each one's vote weight."""

    keep: list[str]
    rule: str
    weights: dict[str, float]


def select_survivors(
    clustering: OnlineClustering, keys_in_order: Sequence[str], rng: random.Random, *,
    rule: str = "representatives", per_cluster: int = 1, k2: int = 20, k3: int = 8,
) -> Survivors:
    """Which traces run to completion.

    - every cluster a singleton (the judge saw no redundancy): `k3` random traces, weight 1 (paper's
      fallback), whatever the rule;
    - `representatives` (default): the first `per_cluster` members of every cluster run on, each weighted
      by its cluster's size over the representatives kept, so the vote counts every trace the judge deemed
      redundant for the answer its representative reaches, and every cluster's answer stays a candidate;
    - `largest`: only the largest cluster's first `k2` members, weight 1 (the reading that drops every
      other cluster's answer).
    Unassigned traces (no cluster matched once `max_clusters` were open) are pruned under either rule.
    """
    if clustering.all_singletons:
        pool = list(keys_in_order)
        keep = sorted(rng.sample(pool, min(k3, len(pool))), key=pool.index)
        return Survivors(keep, "fallback-k3", {k: 1.0 for k in keep})
    if rule == "largest":
        big = clustering.largest()
        assert big is not None
        keep = big.members[:k2]
        return Survivors(keep, "largest-cluster", {k: 1.0 for k in keep})
    if rule != "representatives":
        raise ValueError(f"unknown survivor rule {rule!r}; known: representatives, largest")
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be >= 1, got {per_cluster}")
    keep, weights = [], {}
    for c in clustering.clusters:
        reps = c.members[:per_cluster]
        keep += reps
        weights.update({k: len(c.members) / len(reps) for k in reps})
    return Survivors(keep, "representatives", weights)
