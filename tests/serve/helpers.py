"""Shared by the serve tests: engines with prompt-dependent outputs, direct generations to compare
with, SSE and Prometheus parsing, and engines whose batches can be held at a step."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.sampling import CapacityPolicy, SamplerConfig, generate
from dlmoe.serve import Engine

# greedy, cache-less: the tiny runs' own sampler (16 tokens, 2 blocks, one token per step)
LAYOUT = {"max_tokens": 16, "block_length": 8, "steps": 16, "temperature": 0}
PROMPTS = ["The king", "ROMEO:\nWhat say you", "O", "First Citizen:\nWe are accounted poor citizens"]


def varied(engine: Engine, seed: int = 0) -> Engine:
    """A copy of `engine` whose outputs depend on the prompt: the tiny trained runs answer every prompt
    with the same token (a space), which would make any equality of texts vacuous. Its weights are
    seeded N(0, 0.3²) draws (norm weights kept), and the output rows of tokens that do not decode
    to clean text on their own (byte fragments, control characters, special tokens) are zeroed, so
    two different generations never decode to the same '�…' text. Same architecture, tokenizer and
    sampler; `engine` itself is left untouched (it is the session's shared fixture)."""
    copied = Engine(copy.deepcopy(engine.model), engine.tokenizer, engine.defaults, engine.model_id)
    draws = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copied.model.parameters():
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=draws) * 0.3)
        tokenizer, head = engine.tokenizer, copied.transformer.lm_head.weight
        special = set(getattr(tokenizer, "all_special_ids", ())) | {engine.config.mask_id, engine.config.eos_id}
        for token in range(head.shape[0]):
            text = tokenizer.decode([token])
            clean = text and "\ufffd" not in text and (text.isprintable() or set(text) <= set(" \n\t"))
            if token in special or not clean:
                head[token] = 0.0
    return copied


def direct(engine: Engine, prompt: str, *, seed: int | None = None, **options: Any) -> str:
    """The text `dlmoe.generate` gives for `prompt` alone (the server's reference)."""
    layout = LAYOUT | options
    routing, capacity = layout.pop("block_routing", None), layout.pop("capacity", None)
    sampler = SamplerConfig(
        gen_length=layout.pop("max_tokens"), **layout,
        block_routing=None if routing is None else BlockRoutingConfig(**routing),
        capacity=None if capacity is None else CapacityPolicy(**capacity),
    )  # fmt: skip
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids = engine.tokenizer.encode(prompt)
    return engine.tokenizer.decode(generate(engine.model, [ids], sampler, generator=generator).generated[0].tolist())


def complete(client: httpx.Client, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return client.post(path, json=body, timeout=60)


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls on threads at once; their results in order (an exception is re-raised)."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as error:  # surfaced below, on the test's thread
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def sse(response: httpx.Response) -> list[Any]:
    """The data of every SSE event of a streamed response: JSON objects, then the string '[DONE]'."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


class Held:
    """Makes an engine copy stop at a denoising step: `generate`'s callback posts the step's events,
    records the step, then (at `hold_at`, in the first batch that gets there) waits until every job of
    the batch is cancelled or `release()` is called. `steps`: the step indices the sampler ran, in order."""

    def __init__(self, engine: Engine, hold_at: int = 0) -> None:
        self.engine = copy.copy(engine)
        self.steps: list[int] = []
        self.reached, self.released, self.hold_at = threading.Event(), threading.Event(), hold_at
        callback = self.engine._callback

        def held_callback(jobs: list) -> Callable:
            inner = callback(jobs)

            def on_step(info: Any) -> None:
                inner(info)  # raises Cancelled once every job is cancelled
                self.steps.append(info.step)
                if info.step == self.hold_at and not self.reached.is_set():  # the first batch only
                    self.reached.set()
                    deadline = time.monotonic() + 30  # never hang the suite
                    while not self.released.is_set() and not all(job.cancelled for job in jobs):
                        if time.monotonic() > deadline:
                            raise RuntimeError("held batch: neither released nor cancelled within 30 s")
                        self.released.wait(0.01)

            return on_step

        self.engine._callback = held_callback

    def release(self) -> None:
        self.released.set()
