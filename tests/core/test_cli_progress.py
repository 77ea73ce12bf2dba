"""`ttscale` shows the engine's start-up progress (kernels compiled ahead, CUDA-graph captures) on stderr,
and leaves logging alone when whoever runs it configured it."""

import logging

from ttscale import cli


def _fresh(monkeypatch, root_handlers):
    log = logging.getLogger("ttscale.engine")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "handlers", root_handlers)
    return log


def test_engine_progress_reaches_stderr(monkeypatch, capsys):
    log = _fresh(monkeypatch, [])
    cli.show_engine_progress()
    log.info("captured CUDA graph %d (%d tokens)", 7, 64)
    log.debug("not shown")
    err = capsys.readouterr().err
    assert "captured CUDA graph 7 (64 tokens)" in err
    assert "not shown" not in err


def test_configured_logging_is_left_alone(monkeypatch):
    mine = logging.StreamHandler()
    log = _fresh(monkeypatch, [mine])
    cli.show_engine_progress()
    assert log.handlers == [] and log.level == logging.NOTSET
