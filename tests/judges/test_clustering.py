"""Online greedy clustering (DeepPrune): pure logic, property tests."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.judges.clustering import OnlineClustering, select_survivors


def cluster(labels: list[int], tau=0.5, k=32, p=5) -> OnlineClustering:
    oc = OnlineClustering(tau=tau, max_clusters=k, p=p)
    lab = {f"t{i}": g for i, g in enumerate(labels)}
    for key in lab:
        oc.add_with(key, lambda a, b: float(lab[a] == lab[b]))
    return oc


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40))
def test_perfect_judge_recovers_the_groups(labels):
    oc = cluster(labels)
    got = sorted(sorted(c.members) for c in oc.clusters)
    want = sorted(sorted(f"t{i}" for i, g in enumerate(labels) if g == x) for x in set(labels))
    assert got == want and oc.unassigned == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(1, 6))
def test_every_trace_is_placed_once_and_k_is_respected(labels, k):
    oc = cluster(labels, k=k)
    placed = [m for c in oc.clusters for m in c.members] + oc.unassigned
    assert sorted(placed) == sorted(f"t{i}" for i in range(len(labels)))
    assert len(oc.clusters) <= k


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.integers(1, 5), st.integers(1, 5))
def test_largest_rule_keeps_the_largest_cluster_or_the_fallback(labels, k2, k3):
    oc = cluster(labels)
    keys = [f"t{i}" for i in range(len(labels))]
    s = select_survivors(oc, keys, random.Random(0), rule="largest", k2=k2, k3=k3)
    if s.rule == "largest-cluster":
        big = max(len(c.members) for c in oc.clusters)
        assert big > 1 and len(s.keep) == min(k2, big)
        assert len({labels[int(k[1:])] for k in s.keep}) == 1
    else:
        assert oc.all_singletons and len(s.keep) == min(k3, len(keys)) and len(set(s.keep)) == len(s.keep)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.integers(1, 3))
def test_representatives_keep_every_answer_and_weigh_every_trace(labels, per_cluster):
    """With a perfect judge every distinct label keeps a survivor, and the weights add up to n."""
    oc = cluster(labels)
    keys = [f"t{i}" for i in range(len(labels))]
    s = select_survivors(oc, keys, random.Random(0), per_cluster=per_cluster, k3=len(keys))
    assert {labels[int(k[1:])] for k in s.keep} == set(labels)
    if s.rule == "representatives":
        assert sum(s.weights.values()) == pytest.approx(len(labels))
        assert all(sum(k in c.members for k in s.keep) == min(per_cluster, len(c.members)) for c in oc.clusters)
    else:
        assert oc.all_singletons and sorted(s.keep) == sorted(keys)


def test_unknown_survivor_rule_is_named():
    oc = cluster([0, 0, 1])
    with pytest.raises(ValueError, match="'biggest'"):
        select_survivors(oc, ["t0", "t1", "t2"], random.Random(0), rule="biggest")


def test_only_p_members_are_compared():
    oc = OnlineClustering(tau=0.5, p=2)
    for key in "abcd":
        oc.add_with(key, lambda x, y: 1.0)
    assert oc.compare_with() == {0: ["a", "b"]}
    with pytest.raises(ValueError, match="no judge score"):
        oc.add("e", {"a": 1.0})


def test_join_needs_a_score_strictly_above_tau():
    oc = OnlineClustering(tau=0.5)
    oc.add("a", {})
    assert oc.add("b", {"a": 0.5}).opened
    assert oc.add("c", {"a": 0.51, "b": 0.9}).cluster == 1
