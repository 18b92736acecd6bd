"""The FastAPI app: OpenAI-compatible endpoints over a `Batcher`, `/metrics`, `/health` and the page.

    POST /v1/completions        prompt (string or list), max_tokens, temperature, n, stream, seed, echo
                                + the diffusion options (`dlmoe.serve.protocol`)
    POST /v1/chat/completions   messages; only when the tokenizer has a chat template
    GET  /v1/models             the served model, its routing and the server's default sampler
    GET  /health                200 while serving, 503 once shutting down
    GET  /metrics               Prometheus text (`dlmoe.serve.metrics`)
    GET  /                      the page: prompt → the canvas filling in → experts per layer

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 names the
field, 404 an unknown model, 503 (with Retry-After) a full queue or a server shutting down, 500 a
generation that failed (its batch-mates are retried alone and unaffected).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from dlmoe.serve import responses
from dlmoe.serve.batcher import Batcher, BatchSettings, QueueFull
from dlmoe.serve.engine import Engine
from dlmoe.serve.jobs import Job, Outcome
from dlmoe.serve.metrics import ServeMetrics
from dlmoe.serve.protocol import ChatRequest, CompletionRequest, RequestError, SamplingOptions, sampler_for

DISCONNECT_POLL_S = 0.1
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def create_app(engine: Engine, settings: BatchSettings | None = None, *, shutdown_grace_s: float = 30.0) -> FastAPI:
    """The server for one loaded model; the batcher starts and stops with the app's lifespan."""
    settings = settings or BatchSettings()
    metrics = ServeMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = Batcher(engine, settings, metrics)
        task = asyncio.create_task(app.state.batcher.run())
        try:
            yield
        finally:
            await app.state.batcher.close(shutdown_grace_s)
            await asyncio.wait_for(task, timeout=5)

    app = FastAPI(title="dlmoe", summary="MoE diffusion LM server", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.state.shutdown_grace_s = shutdown_grace_s
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    _add_info_routes(app, engine, metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError("prompt must be a string or a non-empty list of strings", param="prompt")
        return await _generate(request, body, prompts, chat=False, echo=body.echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        prompt = engine.chat_prompt([m.model_dump() for m in body.messages])
        return await _generate(request, body, [prompt], chat=True, echo=False)

    return app


async def _generate(request: Request, body: SamplingOptions, prompts: list[str], *, chat: bool, echo: bool) -> Response:
    """Check, queue, then answer (JSON) or stream (SSE) one request."""
    app, started = request.app, time.monotonic()
    engine: Engine = app.state.engine
    if body.model is not None and body.model != engine.model_id:
        raise RequestError(f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                           param="model", status=404)  # fmt: skip
    sampler = sampler_for(body, engine.defaults, engine.default_guard)
    ids = engine.encode(prompts, sampler)
    rows = [i for i in range(len(prompts)) for _ in range(body.n)]
    job = Job([prompts[i] for i in rows], [ids[i] for i in rows], sampler, body.seed, body.stream,
              body.return_routing, asyncio.get_running_loop())  # fmt: skip
    app.state.batcher.submit(job)
    endpoint = request.url.path
    if body.stream:
        # on SIGTERM sse-starlette ends every stream at once unless given a grace period: give it ours
        events = _events(app, job, engine.model_id, chat, echo, endpoint, started)
        return EventSourceResponse(events, ping=15, shutdown_grace_period=app.state.shutdown_grace_s)
    outcome = await _wait(job, request)
    app.state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    if outcome is None:  # the client went away
        return Response(status_code=499)
    if outcome.error is not None:
        return JSONResponse(responses.error_body(outcome.error, outcome.status), status_code=outcome.status)
    return JSONResponse(responses.completion(job, outcome, engine.model_id, chat=chat, echo=echo))


async def _wait(job: Job, request: Request) -> Outcome | None:
    """The job's outcome; None (and the job cancelled) when the client disconnects first. A handler
    cancelled while it waits (uvicorn's graceful-shutdown timeout) cancels its job too."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
            if done:
                return job.future.result()
            if await request.is_disconnected():
                return None
    finally:
        if not job.future.done():
            job.cancel()


async def _events(
    app: FastAPI, job: Job, model: str, chat: bool, echo: bool, endpoint: str, started: float
) -> AsyncIterator[str]:
    """SSE data: one chunk per sampler event, the final chunk, then `[DONE]` (OpenAI's end marker).
    A client that disconnects ends this generator, which cancels the job at its next step."""
    try:
        while True:
            item = await job.events.get()
            if isinstance(item, Outcome):
                break
            yield json.dumps(responses.step_chunk(job, item, model, chat=chat))
        if item.error is not None:
            yield json.dumps(responses.error_body(item.error, item.status))
        else:
            yield json.dumps(responses.final_chunk(job, item, model, chat=chat, echo=echo))
        yield "[DONE]"
        app.state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    finally:
        if not job.future.done():
            job.cancel()


def _add_info_routes(app: FastAPI, engine: Engine, metrics: ServeMetrics) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((files("dlmoe.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        batcher: Batcher = app.state.batcher
        body = {"status": "shutting_down" if batcher.closing else "ok", "model": engine.model_id,
                "queue_depth": len(batcher.pending), "running": len(batcher.running)}  # fmt: skip
        return JSONResponse(body, status_code=503 if batcher.closing else 200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def model_card(engine: Engine) -> dict[str, Any]:
    """`/v1/models`' entry: OpenAI's fields, and under `dlmoe` what the page and clients need to choose options."""
    config, defaults = engine.config, engine.defaults
    router = None if config.moe is None else config.moe.router
    moe = None if router is None else {
        "router": router.kind, "num_experts": router.num_experts, "experts_per_token": router.num_experts_per_tok,
        "moe_layers": sum(config.is_moe_layer(i) for i in range(config.num_layers)),
    }  # fmt: skip
    sampler = {
        "max_tokens": defaults.gen_length, "block_length": defaults.block_length, "steps": defaults.steps,
        "temperature": defaults.temperature, "threshold": defaults.threshold, "cache": defaults.cache,
        "remasking": defaults.remasking, "cfg_scale": defaults.cfg_scale, "stop_at_eos": defaults.stop_at_eos,
        "block_routing": None if defaults.block_routing is None else
        {"top_p": defaults.block_routing.top_p, "guard": defaults.block_routing.guard},
    }  # fmt: skip
    return {
        "id": engine.model_id, "object": "model", "created": 0, "owned_by": "dlmoe",
        "dlmoe": {"max_seq_len": config.max_seq_len, "vocab_size": config.vocab_size, "moe": moe,
                  "chat": engine.has_chat_template, "batching_rows_interact": engine.rows_interact,
                  "defaults": sampler},
    }  # fmt: skip


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":  # its loc holds the character offset, not a field
            where = first.get("loc", ())[-1]
            reason = (first.get("ctx") or {}).get("error", first.get("msg"))
            message = f"the request body is not valid JSON ({reason} at character {where})"
            return JSONResponse(responses.error_body(message, 400), status_code=400)
        # drop "body" and the union-member tags pydantic puts in the path (BlockRoutingOptions, literal[False])
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not re.match(r"[A-Z]|\w+\[", str(p))]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r} (see /docs for the request schema)"
        return JSONResponse(responses.error_body(message, 400, param), status_code=400)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)} if isinstance(error, QueueFull) else None
        return JSONResponse(responses.error_body(str(error), error.status, error.param), error.status, headers)


class _CountRequests:
    """ASGI middleware counting every HTTP response by path and status (streams included)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
