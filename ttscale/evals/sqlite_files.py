"""Opening the SQLite files that several runners share (results store, trace bank)."""

import sqlite3
import time
from pathlib import Path

BUSY_TIMEOUT_S = 30.0


def connect_shared(path: str | Path, timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """An autocommit connection in WAL mode, waiting up to `timeout` for other writers.

    Switching a new file to WAL takes an exclusive lock and SQLite answers "database is locked" at once, without
    its busy handler, when another process holds the file at that moment (runners started together on one new
    `--db`): the switch is retried until `timeout`. The mode is stored in the file, so later opens skip it.
    """
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                conn.close()
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn
