"""Request batching: a bounded queue, a max wait, a max batch size, one worker thread running `generate`.

The oldest waiting job opens a batch; jobs with the same `batch_key` (same sampler) join it, in
arrival order, until the batch holds `max_batch_rows` rows or the oldest job has waited
`max_wait_ms`. While a batch runs, new jobs queue up and form the next one. `max_batch_rows=1`
turns batching off (every job runs alone; a job's own n rows are always one call). A full queue
refuses new jobs (`QueueFull` → 503 with Retry-After); `close()` stops taking jobs, lets the
running and queued ones finish within a grace period, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dlmoe._checks import check_float, check_int
from dlmoe.serve.engine import Engine
from dlmoe.serve.jobs import Job, Outcome
from dlmoe.serve.metrics import ServeMetrics
from dlmoe.serve.protocol import RequestError


@dataclass(frozen=True)
class BatchSettings:
    max_batch_rows: int = 16  # rows (prompts × n) per generate call; 1 = no batching
    max_wait_ms: float = 10.0  # how long the oldest job waits for batch-mates
    max_queue: int = 256  # waiting jobs before new ones get 503

    def __post_init__(self) -> None:
        check_int("max_batch_rows", self.max_batch_rows, low=1)
        check_float("max_wait_ms", self.max_wait_ms, low=0.0)
        check_int("max_queue", self.max_queue, low=1)


class QueueFull(RequestError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, status=503)
        self.retry_after = retry_after


class Batcher:
    """Owns the queue and the worker thread; `submit` from request handlers, `run` as a task."""

    def __init__(self, engine: Engine, settings: BatchSettings, metrics: ServeMetrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.closing = False
        self._wakeup = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlmoe-generate")
        self._last_batch_seconds = 1.0

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when the server is stopping or the queue is full."""
        if self.closing:
            self.metrics.rejected.labels("shutting_down").inc()
            raise QueueFull("the server is shutting down", retry_after=5)
        if len(self.pending) >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            retry = max(1, round(self._last_batch_seconds * len(self.pending) / max(1, self.settings.max_batch_rows)))
            raise QueueFull(f"the request queue is full ({self.settings.max_queue} waiting); retry later", retry)
        self.pending.append(job)
        self.metrics.queue_depth.set(len(self.pending))
        self._wakeup.set()

    async def run(self) -> None:
        """Form and run batches until closed and drained."""
        loop = asyncio.get_running_loop()
        while not (self.closing and not self.pending):
            if not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._next_batch()
            if batch:
                await self._run(loop, batch)

    async def _next_batch(self) -> list[Job]:
        """Wait (up to max_wait_ms after the oldest job arrived) for batch-mates, then take them."""
        first = self.pending[0]
        deadline = first.created + self.settings.max_wait_ms / 1000
        if not self.engine.rows_interact:
            while self._rows_like(first) < self.settings.max_batch_rows and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
        return self._take(first)

    def _rows_like(self, first: Job) -> int:
        return sum(job.rows for job in self.pending if job.batch_key == first.batch_key and not job.cancelled)

    def _take(self, first: Job) -> list[Job]:
        """The oldest job and the compatible jobs after it that fit; cancelled waiting jobs are dropped."""
        key, rows, batch, kept = first.batch_key, 0, [], deque()
        alone, limit = self.engine.rows_interact or self.settings.max_batch_rows == 1, self.settings.max_batch_rows
        for job in self.pending:
            if job.cancelled:
                self.metrics.cancelled.inc()
                job.finish(Outcome(cancelled=True, status=499, error="cancelled"))
            elif job.batch_key == key and (not batch or (not alone and rows + job.rows <= limit)):
                batch.append(job)
                rows += job.rows
            else:
                kept.append(job)
        self.pending = kept
        self.metrics.queue_depth.set(len(kept))
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        self.running = batch
        self.metrics.running.set(len(batch))
        started = time.monotonic()
        try:
            outcomes = await loop.run_in_executor(self._worker, self.engine.run_batch, batch)
        finally:
            self.running = []
            self.metrics.running.set(0)
        self._last_batch_seconds = time.monotonic() - started
        if any(o.retried_alone or o.status == 500 for o in outcomes):
            self.metrics.batch_failures.inc()
        stats = next((o.stats for o in outcomes if o.stats is not None), None)
        self.metrics.batch_done(len(batch), sum(job.rows for job in batch), stats)
        for job, outcome in zip(batch, outcomes, strict=True):
            if outcome.cancelled:
                self.metrics.cancelled.inc()
            job.finish(outcome)

    async def close(self, grace_s: float) -> None:
        """Stop taking jobs; let queued and running ones finish for `grace_s`, then cancel the rest."""
        self.closing = True
        self._wakeup.set()
        deadline = time.monotonic() + grace_s
        while (self.pending or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for job in [*self.pending, *self.running]:
            job.cancel()
        for job in list(self.pending):
            job.finish(Outcome(cancelled=True, status=503, error="the server shut down before this request ran"))
        self.pending.clear()
        while self.running:
            await asyncio.sleep(0.02)
        self._worker.shutdown(wait=True)
