"""Dynamic batching: merge queries up to a maximum batch or a timeout, split large ones."""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """How a worker forms model batches from queries."""

    merge: bool  # False: each query is one forward, whatever its size
    max_batch_items: int = 0  # merge: cap of a merged batch, and the size large queries split to
    timeout_s: float = 0.0  # merge: the longest the oldest waiting query waits for company

    def __post_init__(self):
        if self.merge and self.max_batch_items < 1:
            raise ValueError("a merging batch policy needs max_batch_items >= 1")
        if self.timeout_s < 0:
            raise ValueError("batch timeout must be >= 0")

    @property
    def label(self) -> str:
        """A short name, for rows and plots."""
        if not self.merge:
            return "off"
        return f"on(max {self.max_batch_items}, {self.timeout_s * 1e3:g} ms)"

    def to_dict(self) -> dict:
        """The policy as params."""
        if not self.merge:
            return {"batching": "off"}
        return {"batching": "on", "max_batch_items": self.max_batch_items,
                "batch_timeout_ms": self.timeout_s * 1e3}


@dataclasses.dataclass(frozen=True)
class Query:
    """One LoadGen query as a worker sees it."""

    policy: int  # index of the run's BatchPolicy
    response_id: int  # LoadGen's id, returned with the response
    start: int  # first pool row
    items: int  # user-item pairs (model rows)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, start + items) of the pool in a batch, part (or all) of a query."""

    query: Query
    start: int
    items: int
    last: bool  # the query's final piece: after it, the query can be answered


class _Waiting:
    """A query with some rows not yet batched, and when it reached the worker."""

    def __init__(self, query: Query, arrived_s: float):
        self.query, self.arrived_s, self.done = query, arrived_s, 0


STOP = object()  # what receive returns once the worker is told to stop


class Batcher:
    """Forms batches from received queries under each query's BatchPolicy.

    receive(timeout_s) returns a Query, None when nothing came within timeout_s (None: wait
    for ever), or STOP; clock() reads seconds. The timeout starts when the oldest waiting query
    arrived, so a query never waits for company longer than the policy says."""

    def __init__(self, policies: list[BatchPolicy], receive: Callable[[Optional[float]], object],
                 clock: Callable[[], float]):
        self.policies, self.receive, self.clock = policies, receive, clock
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.stopping = False

    def _take(self, item) -> bool:
        """Queue a received item; False when it is not a query (timeout or STOP)."""
        if item is STOP:
            self.stopping = True
            return False
        if item is None:
            return False
        self.waiting.append(_Waiting(item, self.clock()))
        return True

    def _waiting_items(self, policy_index: int) -> int:
        return sum(entry.query.items - entry.done for entry in self.waiting
                   if entry.query.policy == policy_index)

    def next_batch(self) -> Optional[list[Piece]]:
        """The next batch's pieces; None once told to stop and nothing is left."""
        while not self.waiting:
            if self.stopping:
                return None
            self._take(self.receive(None))
        first = self.waiting[0]
        policy = self.policies[first.query.policy]
        if not policy.merge:
            self.waiting.popleft()
            return [Piece(first.query, first.query.start, first.query.items, True)]
        deadline_s = first.arrived_s + policy.timeout_s
        # Another policy's query means the run changed: close this batch without it.
        while (not self.stopping and self._waiting_items(first.query.policy)
               < policy.max_batch_items and self.waiting[-1].query.policy == first.query.policy):
            if not self._take(self.receive(max(0.0, deadline_s - self.clock()))):
                break
        return self._fill(first.query.policy, policy.max_batch_items)

    def _fill(self, policy_index: int, capacity: int) -> list[Piece]:
        """Up to capacity rows from the front of the waiting queries, splitting the last."""
        pieces = []
        while self.waiting and capacity > 0 and self.waiting[0].query.policy == policy_index:
            entry = self.waiting[0]
            query = entry.query
            count = min(capacity, query.items - entry.done)
            last = entry.done + count == query.items
            pieces.append(Piece(query, query.start + entry.done, count, last))
            entry.done += count
            capacity -= count
            if last:
                self.waiting.popleft()
        return pieces
