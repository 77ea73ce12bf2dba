"""Which decode-step shapes get a CUDA graph (`GraphRunner(capture_on_repeat=True)`, the engine's): a shape the
step before also had, or one at its third step; every other step runs eagerly. Runs on CPU: the capture and the
replay are stand-ins that record what `GraphRunner.run` asked of them (the real ones: tests/engine/test_cuda.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine.cuda_graphs import GraphRunner, _Captured


class _Graph:
    def __init__(self, log: list, key) -> None:
        self.log, self.key = log, key

    def replay(self) -> None:
        self.log.append(("replay", self.key))


def _runner(log: list, max_graphs: int = 256) -> GraphRunner:
    g = GraphRunner.__new__(GraphRunner)  # no CUDA here: the fields `run` reads, without the device pool
    g.graphs, g.max_graphs, g.captures, g.eager_steps = {}, max_graphs, 0, 0
    g.capture_on_repeat, g._last_key, g._sightings = True, None, {}
    g._fn = lambda meta, st_, filtered, n_top: log.append(("eager", meta.key)) or "eager"

    def capture(key, meta, st_, filtered, n_top):
        log.append(("capture", meta.key))
        cap = _Captured(_Graph(log, meta.key), [torch.zeros(1), torch.zeros(1)], "graph")  # type: ignore[arg-type]
        g.graphs[key] = cap
        g.captures += 1
        return cap

    g._capture = capture  # type: ignore[method-assign]
    return g


def _step(g: GraphRunner, key: int):
    meta = SimpleNamespace(key=key, shape_key=lambda: (key,), flat=torch.zeros(1))
    return g.run(meta, SimpleNamespace(tensors=lambda: [torch.zeros(1)]), True, 0)  # type: ignore[arg-type]


def test_one_step_shapes_run_eagerly_and_repeated_ones_are_captured():
    log: list = []
    g = _runner(log)
    for key in [1, 2, 2, 2, 3, 2, 4]:  # a ramp (1), a steady shape (2), one-step shapes (3, 4)
        _step(g, key)
    assert log == [("eager", 1), ("eager", 2), ("capture", 2), ("replay", 2), ("eager", 3), ("replay", 2),
                   ("eager", 4)]
    assert g.eager_steps == 4 and g.captures == 1


def test_a_shape_that_recurs_apart_is_captured_at_its_third_step():
    log: list = []
    g = _runner(log)
    for key in [5, 6, 5, 6, 5, 5]:
        _step(g, key)
    assert log == [("eager", 5), ("eager", 6), ("eager", 5), ("eager", 6), ("capture", 5), ("replay", 5)]


def test_no_capture_beyond_max_graphs():
    log: list = []
    g = _runner(log, max_graphs=1)
    for key in [1, 1, 2, 2, 2]:
        _step(g, key)
    assert [k for k, _ in log] == ["eager", "capture", "eager", "eager", "eager"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40))
def test_every_step_either_replays_captures_or_runs_eagerly(keys):
    log: list = []
    g = _runner(log)
    for key in keys:
        _step(g, key)
    assert len(log) == len(keys)
    captured_at = {k: i for i, (what, k) in enumerate(log) if what == "capture"}
    for i, ((what, k), key) in enumerate(zip(log, keys, strict=True)):
        assert k == key
        assert (what == "replay") == (k in captured_at and i > captured_at[k])
        if what == "capture":  # the step before had this shape, or this is its third step
            assert (i > 0 and keys[i - 1] == key) or keys[:i + 1].count(key) == 3
