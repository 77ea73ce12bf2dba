"""Cyclic-GC settings while engine threads run (see `QuietGC`)."""

from __future__ import annotations

import gc
import threading


class QuietGC:
    """Process-wide cyclic-GC settings while any engine thread runs (counted over engines).

    Imports and the model leave ~0.5M objects that are never garbage; a full collection walks them all
    (~1 s on a 2-core CPU, with the GIL held, so the engine thread and the event loop both stop), and at
    512 live branches the allocations of metadata, outputs and Deltas set one off every few seconds, plus
    a young collection every 700 allocations. So while engines run, what exists at the first start is
    frozen (`gc.freeze`: reference counting still frees it, the cycle collector skips it) and the
    young-generation threshold is raised; the last `stop` restores both."""

    lock = threading.Lock()
    users = 0
    saved: tuple[int, int, int] | None = None

    @classmethod
    def enter(cls, gen0: int) -> None:
        with cls.lock:
            cls.users += 1
            if cls.users == 1:
                cls.saved = gc.get_threshold()
                gc.freeze()
                gc.set_threshold(max(cls.saved[0], gen0), *cls.saved[1:])

    @classmethod
    def exit(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users == 0 and cls.saved is not None:
                gc.set_threshold(*cls.saved)
                gc.unfreeze()
                cls.saved = None
