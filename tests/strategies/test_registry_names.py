"""Every issue-4 strategy is addressable by name, alias and spec string; configs default to the papers'."""

from __future__ import annotations

import pytest

from ttscale.errors import ConfigError
from ttscale.strategies.registry import get_strategy_class, make_strategy


@pytest.mark.parametrize("name,alias", [
    ("ffs", "first-finish"), ("ffs", "async-ffs"), ("sync-ffs", "sync-ffs"), ("ffs-k", "ffs-k@n"),
    ("short-m", "short-m@k"), ("last-finish", "lfs"), ("deepprune", "deepprune"), ("pdr", "parallel-distill-refine"),
    ("sr", "sequential-refinement"), ("atts", "atts"), ("deepconf", "deepconf"),
])
def test_names_and_aliases(name, alias):
    cls = get_strategy_class(alias)
    assert cls.name == name and cls.paper.startswith("arXiv") and cls.__doc__


def test_spec_strings_and_paper_defaults():
    assert make_strategy("ffs-8").config.n == 8
    f = make_strategy("ffs")
    assert (f.config.n, f.config.temperature, f.config.top_p, f.config.mode) == (4, 0.6, 0.95, "async")
    d = make_strategy("deepprune:tau=0.6,judge=lexical")
    from ttscale.judges.pairwise import LexicalJudge  # an untrained judge: the paper's 25-word prefix

    assert (d.config.tau, d.prefix_rule(LexicalJudge()), d.config.k2, d.config.n) == (0.6, {"words": 25}, 20, 512)
    a = make_strategy("atts")
    assert (a.config.samples, a.config.turns, a.config.step_tokens, a.config.temperature, a.config.alpha) == \
        (16, 15, 500, 0.8, 0.4)
    c = make_strategy("deepconf")
    assert (c.config.warmup, c.config.top_logprobs, c.config.window, c.config.variant,
            c.config.threshold_percentile) == (16, 20, 2048, "low", 90.0)
    assert make_strategy("pdr:schedule=[4,2,1],kappa=512").config.schedule == [4, 2, 1]
    assert make_strategy("sr:rounds=5").config.schedule == [1] * 5


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="mode"):
        make_strategy("ffs:mode=lockstep")
    with pytest.raises(ConfigError, match="warmup"):
        make_strategy("deepconf:n=4,warmup=8")
    with pytest.raises(ConfigError, match="alpha"):
        make_strategy("atts:alpha=2")
