"""One HTTP request's generation as the batcher and the engine see it: a `Job`, its rows and its outcome.

A job is created on the event loop and finished there; the engine's worker thread only reads it
and posts stream events back through `Job.post` (thread-safe). `cancel()` may come from either side.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dlmoe.sampling import GenerationStats
from dlmoe.serve.protocol import RequestSampler

_ids = itertools.count()


@dataclass(frozen=True)
class Outcome:
    """What a job produced: one text per row, or an error (status, message)."""

    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    stats: GenerationStats | None = None
    batch_rows: int = 0  # rows of the generate call that produced it (1 job or several)
    error: str | None = None
    status: int = 200
    cancelled: bool = False
    retried_alone: bool = False  # its batch failed, so it ran again on its own


@dataclass(eq=False)
class Job:
    """A request's rows (each prompt × n), its sampler, and how its results travel back."""

    prompts: list[str]  # one per row, the text the model continues
    prompt_ids: list[list[int]]  # one per row
    sampler: RequestSampler
    seed: int | None
    stream: bool
    return_routing: bool
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: f"cmpl-{next(_ids)}")
    created: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(init=False)
    events: asyncio.Queue | None = field(init=False)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()
        self.events = asyncio.Queue() if self.stream else None

    @property
    def rows(self) -> int:
        return len(self.prompt_ids)

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys may share a `generate` call. A sampled (temperature > 0) job with its
        own seed runs alone, so that its seed alone decides its draws."""
        if self.sampler.temperature > 0 and self.seed is not None:
            return f"alone:{self.id}"
        return repr(self.sampler)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client went away (or the server is stopping): the work stops at the next step."""
        self._cancelled.set()

    def post(self, event: dict[str, Any]) -> None:
        """Send a stream event from any thread (dropped when the job does not stream)."""
        if self.events is not None and not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def finish(self, outcome: Outcome) -> None:
        """Deliver the outcome (on the event loop); streaming jobs get it as their last event."""
        if not self.future.done():
            self.future.set_result(outcome)
        if self.events is not None:
            self.events.put_nowait(outcome)
