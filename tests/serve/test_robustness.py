"""The server under trouble: clients that go away, a request whose generation fails, a shutdown
with requests in flight; the command's errors and help; nothing outside `dlmoe.serve` imports it."""

from __future__ import annotations

import ast
import copy
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from sse_starlette.sse import AppStatus

from dlmoe.cli import main
from dlmoe.serve import BatchSettings, Engine, create_app
from dlmoe.serve.background import ServerThread
from tests.serve.conftest import serve
from tests.serve.helpers import LAYOUT, PROMPTS, Held, complete, concurrently, direct, metric, metrics, varied, wait_for

SRC = Path(__file__).resolve().parents[2] / "src" / "dlmoe"
MARKER = "Poison pill"
BODY = {"prompt": PROMPTS[0], **LAYOUT}


@pytest.fixture(scope="module")
def engine(tc_engine: Engine) -> Engine:
    return varied(tc_engine)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dlmoe-generate") and t.is_alive()]


# ---------------------------------------------------------------------- clients that go away


def test_a_stream_whose_client_leaves_is_cancelled_at_the_next_step(engine) -> None:
    held = Held(engine)  # the batch waits after its first step until its jobs are cancelled
    body = {"prompt": PROMPTS[0], **LAYOUT, "stream": True}
    with serve(held.engine, max_batch_rows=4, max_wait_ms=0) as running, httpx.Client(base_url=running.url) as client:
        with client.stream("POST", "/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if '"event": "step"' in line:
                    break  # leave after the first step event: closing the stream drops the connection
        wait_for(lambda: metric(metrics(running.url), "dlmoe_requests_cancelled_total") == 1, what="the cancel")
        assert held.steps == [0]  # step 1's callback stopped `generate`: 2 forwards of 16 ran
        assert client.get("/health").json()["running"] == 0
        after = complete(client, {"prompt": PROMPTS[1], **LAYOUT})
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == direct(engine, PROMPTS[1])
    assert held.steps[1:] == list(range(16))  # the following request ran to the end


def test_a_plain_request_whose_client_leaves_is_cancelled(engine) -> None:
    held = Held(engine)
    with serve(held.engine, max_batch_rows=4, max_wait_ms=0) as running:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.url}/v1/completions", json={"prompt": PROMPTS[0], **LAYOUT}, timeout=1.0)
        wait_for(lambda: metric(metrics(running.url), "dlmoe_requests_cancelled_total") == 1, what="the cancel")
        assert held.steps == [0]
        assert post(running.url, {"prompt": "The", **LAYOUT}).status_code == 200


# ---------------------------------------------------------------------- a failing generation


def failing(engine: Engine) -> Engine:
    """A copy whose `generate` call raises for any batch holding the marker prompt."""
    broken = copy.copy(engine)
    run = engine._generate

    def generate_or_fail(jobs: list) -> list:
        if any(MARKER in prompt for job in jobs for prompt in job.prompts):
            raise RuntimeError("the model broke on the marker")
        return run(jobs)

    broken._generate = generate_or_fail
    return broken


def test_a_failing_request_does_not_take_its_batch_mates_or_the_server_down(engine) -> None:
    prompts = [PROMPTS[0], MARKER, PROMPTS[1], PROMPTS[3]]
    running = serve(failing(engine), max_batch_rows=4, max_wait_ms=5000)
    with running, httpx.Client(base_url=running.url) as client:
        answers = concurrently([lambda p=p: complete(client, {"prompt": p, **LAYOUT}) for p in prompts])
        samples = metrics(running.url)
        # n=4: a full batch on its own (no wait for batch-mates)
        events = _stream_lines(client, {"prompt": MARKER, **LAYOUT, "n": 4})
        after = complete(client, {"prompt": PROMPTS[2], **LAYOUT, "n": 4})
        assert client.get("/health").status_code == 200
    bad = answers.pop(1)
    assert bad.status_code == 500
    assert bad.json()["error"]["type"] == "server_error" and "the model broke on the marker" in bad.text
    for prompt, answer in zip([PROMPTS[0], PROMPTS[1], PROMPTS[3]], answers, strict=True):
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == direct(engine, prompt)
        assert answer.json()["dlmoe"]["stats"]["batch_rows"] == 1  # retried alone after the batch failed
    assert metric(samples, "dlmoe_batch_rows_count") == 1 and metric(samples, "dlmoe_batch_rows_sum") == 4
    assert metric(samples, "dlmoe_batch_failures_total") == 1
    assert metric(samples, "dlmoe_requests_total", endpoint="/v1/completions", status="500") == 1
    assert '"code": 500' in events[-2] and "the model broke on the marker" in events[-2]
    assert events[-1] == "data: [DONE]"
    assert after.status_code == 200
    assert [c["text"] for c in after.json()["choices"]] == [direct(engine, PROMPTS[2])] * 4


def _stream_lines(client: httpx.Client, body: dict) -> list[str]:
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}, timeout=30) as response:
        return [line for line in response.iter_lines() if line.startswith("data:")]


# ---------------------------------------------------------------------- shutdown


def start(engine: Engine, *, uvicorn_grace_s: float, batcher_grace_s: float) -> tuple[ServerThread, object]:
    app = create_app(engine, BatchSettings(max_batch_rows=4, max_wait_ms=0), shutdown_grace_s=batcher_grace_s)
    return ServerThread(app, grace_s=uvicorn_grace_s).start(), app


def test_shutdown_lets_an_in_flight_request_finish(engine) -> None:
    held = Held(engine)
    running, _ = start(held.engine, uvicorn_grace_s=10, batcher_grace_s=10)
    answer: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answer.append(post(running.url, BODY)))
    client.start()
    stopping = threading.Thread(target=running.stop)
    try:
        assert held.reached.wait(30)
        stopping.start()
        wait_for(lambda: not running.server.servers[0].is_serving(), what="the server to stop listening")
        try:  # uvicorn no longer accepts connections: a /health 503 cannot be observed from outside
            status = httpx.get(f"{running.url}/health", timeout=2).status_code
        except httpx.TransportError:
            status = None
        assert status in (None, 503)
        time.sleep(0.3)
        assert stopping.is_alive()  # waiting for the request in flight
    finally:
        held.release()
        client.join(30)
        stopping.join(30)
    assert not stopping.is_alive() and not running.thread.is_alive()
    assert answer[0].status_code == 200 and answer[0].json()["choices"][0]["text"] == direct(engine, PROMPTS[0])
    assert held.steps == list(range(16)) and workers_alive() == []


def test_shutdown_past_the_grace_period_cancels_the_request_and_ends(engine) -> None:
    held = Held(engine)  # never released: only a cancel ends its batch
    running, app = start(held.engine, uvicorn_grace_s=1, batcher_grace_s=30)
    answer: list[object] = []

    def ask() -> None:
        try:
            answer.append(post(running.url, BODY).status_code)
        except httpx.TransportError as error:
            answer.append(error)

    client = threading.Thread(target=ask)
    client.start()
    assert held.reached.wait(30)
    started = time.monotonic()
    running.stop(timeout_s=20)
    # uvicorn cancels the handler after its grace period; that cancels the job at its next step,
    # without waiting for the batcher's own (longer) grace period
    assert time.monotonic() - started < 10 and not running.thread.is_alive()
    client.join(30)
    assert answer and answer[0] != 200
    assert held.steps == [0] and workers_alive() == []
    assert b"dlmoe_requests_cancelled_total 1.0" in generate_latest(app.state.metrics.registry)


def test_a_closing_batcher_makes_health_and_new_requests_503(tc_engine) -> None:
    """The state `Batcher.close` puts the server in (uvicorn stops listening before its lifespan
    shutdown runs, so over the network this is not seen during `stop()`; set here directly)."""
    with serve(tc_engine, max_batch_rows=1, max_wait_ms=0) as running:
        running.server.config.app.state.batcher.closing = True
        health = httpx.get(f"{running.url}/health", timeout=10)
        refused = post(running.url, BODY)
        samples = metrics(running.url)
    assert health.status_code == 503 and health.json()["status"] == "shutting_down"
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert "shutting down" in refused.json()["error"]["message"]
    assert metric(samples, "dlmoe_requests_rejected_total", reason="shutting_down") == 1


def test_sigterm_lets_a_stream_in_flight_finish(engine, monkeypatch) -> None:
    held = Held(engine)
    running, _ = start(held.engine, uvicorn_grace_s=10, batcher_grace_s=10)
    monkeypatch.setattr(AppStatus, "should_exit", False)  # sse-starlette's process-wide flag, restored after
    lines: list[str] = []

    def read() -> None:
        with httpx.Client(base_url=running.url) as http:
            lines.extend(_stream_lines(http, BODY))

    client = threading.Thread(target=read)
    client.start()
    assert held.reached.wait(30)
    running.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls (sse-starlette patches it)
    assert AppStatus.should_exit
    time.sleep(1.0)  # sse-starlette's shutdown watcher polls every 0.5 s
    held.release()
    client.join(30)
    running.thread.join(30)
    assert not running.thread.is_alive()
    assert lines[-1] == "data: [DONE]" and held.steps == list(range(16))
    assert f'"text": {json.dumps(direct(engine, PROMPTS[0]))}' in lines[-2]


# ---------------------------------------------------------------------- the command


def test_the_command_refuses_a_bad_port_in_one_line(capsys, tc_run) -> None:
    code = main(["serve", "--run", str(tc_run), "--port", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("dlmoe: error:") and "--port" in err


def test_the_command_refuses_a_bad_batch_size_in_one_line(capsys, tc_run) -> None:
    code = main(["serve", "--run", str(tc_run), "--max-batch-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_batch_rows" in err


def test_the_command_help_lists_the_batching_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--max-batch-size", "--max-wait-ms", "--max-queue", "--shutdown-timeout", "--run", "--port"):
        assert flag in out


def test_nothing_outside_serve_imports_it_at_module_level() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "serve" and path.parent.parent == SRC:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: imports inside functions are loaded on use
            for name in _imported(node):
                if name == "dlmoe.serve" or name.startswith("dlmoe.serve."):
                    offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert offenders == []
    serve_cli = ast.parse((SRC / "cli_serve.py").read_text(encoding="utf-8"))
    inner = [n for n in ast.walk(serve_cli) if isinstance(n, ast.ImportFrom) and n.module == "dlmoe.serve"]
    assert inner, "cli_serve.py loads dlmoe.serve inside its command"


def _imported(node: ast.AST) -> list[str]:
    """Modules a module-level statement imports, also under `if` / `try` / a class body, not in functions."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        return []  # loaded when called
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [] if node.level or not node.module else [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [name for child in ast.iter_child_nodes(node) for name in _imported(child)]
