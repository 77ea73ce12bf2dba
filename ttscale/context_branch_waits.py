"""Waiting on a Context's branches: their events as they happen, the first k to finish, all of them.

A base of `Context` (the state it reads is the Context's; the events come from its `_emit`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from ttscale.types import Branch, BranchStatus, Event


class BranchWaits:
    """The waiting half of `Context`."""

    branches: dict[str, Branch]
    _tasks: dict[str, asyncio.Task[None]]
    _watchers: list[tuple[set[str], asyncio.Queue[Event]]]

    async def watch(self, branches: Sequence[Branch]) -> AsyncIterator[Event]:
        """Yield the events of `branches` as they happen, until all of them are done."""
        ids = {b.id for b in branches}
        queue: asyncio.Queue = asyncio.Queue()
        entry = (ids, queue)
        self._watchers.append(entry)
        try:
            live = {b.id for b in branches if not b.done}
            while live:
                ev: Event = await queue.get()
                yield ev
                if ev.kind in ("finished", "aborted", "failed"):
                    live.discard(ev.branch_id)
        finally:
            self._watchers.remove(entry)

    async def first_finished(
        self,
        branches: Sequence[Branch],
        k: int = 1,
        *,
        accept: Callable[[Branch], bool] | None = None,
    ) -> list[Branch]:
        """The first `k` branches to finish, in finishing order (fewer when the rest end otherwise).

        A branch counts when it ends with status `finished` (EOS, stop string or length limit) and,
        if given, `accept(branch)` holds. Branches that fail or are aborted do not count.
        """
        accept = accept or (lambda b: True)
        won = [b for b in sorted((b for b in branches if b.done), key=lambda b: b.finish_order or 0)
               if b.status is BranchStatus.finished and accept(b)]
        if len(won) >= k or all(b.done for b in branches):
            return won[:k]
        async for ev in self.watch(branches):
            if ev.kind == "finished" and ev.branch_id is not None:
                b = self.branches[ev.branch_id]
                if b not in won and accept(b):
                    won.append(b)
                    if len(won) >= k:
                        break
        return won[:k]

    async def wait_all(self, branches: Sequence[Branch] | None = None) -> list[Branch]:
        """Wait until every branch (default: all of this Context's) is done."""
        pool = list(branches) if branches is not None else list(self.branches.values())
        tasks = [self._tasks[b.id] for b in pool if b.id in self._tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return pool
