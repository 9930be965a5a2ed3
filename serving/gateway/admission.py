"""Admission control: a bounded number of requests run against Triton, a bounded queue waits, the rest are refused."""
from __future__ import annotations

import asyncio
import contextlib

from ..validation import ApiError


class Limiter:
    """Admission control: at most `concurrency` requests at once and `queue` waiting; the next one is refused
    at once (RESOURCE_EXHAUSTED / HTTP 429)."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency, self.queue = concurrency, queue
        self._sem = asyncio.Semaphore(concurrency)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._sem.locked() and self.waiting >= self.queue:
            raise ApiError(f"server busy: {self.concurrency} requests running and {self.waiting} queued "
                           f"(max_queue {self.queue}); retry with backoff", code="RESOURCE_EXHAUSTED")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()
