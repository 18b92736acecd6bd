"""Batching: concurrent requests share one left-padded `generate` call and get exactly the texts
each prompt gets alone; batches never mix settings; a full queue answers 503 with Retry-After."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from dlmoe.serve import Engine
from tests.serve.conftest import serve
from tests.serve.helpers import (
    LAYOUT,
    PROMPTS,
    Held,
    concurrently,
    direct,
    health,
    metric,
    metrics,
    varied,
    wait_for,
)

ROUTING = {"top_p": 0.6, "guard": 1}
WAIT_MS = 5000  # a batch closes when its rows are all there; this only bounds a straggling thread


@pytest.fixture(scope="module")
def engines(tc_engine: Engine, ec_run: Path) -> dict[str, Engine]:
    return {"tc": varied(tc_engine), "ec": varied(Engine.from_run(ec_run))}


def ask(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("name", "options"),
    [("tc", {}), ("ec", {}), ("tc", {"block_routing": ROUTING}), ("ec", {"block_routing": ROUTING})],
    ids=["tc", "ec", "tc-block-routing", "ec-block-routing"],
)
def test_concurrent_requests_are_batched_and_get_their_texts_alone(engines, name, options) -> None:
    engine = engines[name]
    assert not engine.rows_interact
    # four prompts of different lengths (left padding), one of them with n=2: 5 rows in one call
    bodies = [{"prompt": p, **LAYOUT, **options, "n": 2 if i == 1 else 1} for i, p in enumerate(PROMPTS)]
    with serve(engine, max_batch_rows=5, max_wait_ms=WAIT_MS) as running:
        answers = concurrently([lambda b=b: ask(running.url, b) for b in bodies])
        samples = metrics(running.url)
    expected = [direct(engine, p, **options) for p in PROMPTS]
    assert len(set(expected)) == len(PROMPTS)  # the prompts' texts differ: equality below means something
    for body, answer, text in zip(bodies, answers, expected, strict=True):
        assert [c["text"] for c in answer["choices"]] == [text] * body["n"]
        assert answer["dlmoe"]["stats"]["batch_rows"] == 5
    assert metric(samples, "dlmoe_batch_rows_count") == 1 and metric(samples, "dlmoe_batch_rows_sum") == 5
    assert metric(samples, "dlmoe_batch_requests_sum") == 4
    assert metric(samples, "dlmoe_generated_tokens_total") == 5 * 16


def test_an_expert_choice_model_takes_a_capacity_policy_and_checks_it(engines) -> None:
    engine, capacity = engines["ec"], {"schedule": "linear", "k_min": 1, "k_max": 3}
    bodies = [{"prompt": p, **LAYOUT, "capacity": capacity} for p in PROMPTS[:2]]
    with serve(engine, max_batch_rows=2, max_wait_ms=WAIT_MS) as running:
        answers = concurrently([lambda b=b: ask(running.url, b) for b in bodies])
        refused = httpx.post(f"{running.url}/v1/completions", json=bodies[0] | {"capacity": capacity | {"k_max": 5}})
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["choices"][0]["text"] == direct(engine, body["prompt"], capacity=capacity)
        assert answer["dlmoe"]["stats"]["batch_rows"] == 2
    assert answers[0]["choices"][0]["text"] != direct(engine, PROMPTS[0])  # the policy changed the computation
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "capacity.k_max" and "num_experts=4" in refused.text


def test_max_batch_rows_1_runs_every_request_alone(engines) -> None:
    engine = engines["tc"]
    with serve(engine, max_batch_rows=1, max_wait_ms=50) as running:
        answers = concurrently([lambda p=p: ask(running.url, {"prompt": p, **LAYOUT}) for p in PROMPTS[:3]])
        samples = metrics(running.url)
    assert [a["choices"][0]["text"] for a in answers] == [direct(engine, p) for p in PROMPTS[:3]]
    assert [a["dlmoe"]["stats"]["batch_rows"] for a in answers] == [1, 1, 1]
    assert metric(samples, "dlmoe_batch_rows_count") == 3 and metric(samples, "dlmoe_batch_rows_sum") == 3
    assert metric(samples, "dlmoe_batch_rows_bucket", le="1.0") == 3


def test_requests_with_different_settings_are_not_batched_together(engines) -> None:
    engine = engines["tc"]
    settings = [16, 8, 16, 8]  # steps: two pairs that may share a call, never across pairs
    bodies = [{"prompt": p, **LAYOUT, "steps": s} for p, s in zip(PROMPTS, settings, strict=True)]
    with serve(engine, max_batch_rows=2, max_wait_ms=WAIT_MS) as running:
        answers = concurrently([lambda b=b: ask(running.url, b) for b in bodies])
        samples = metrics(running.url)
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["choices"][0]["text"] == direct(engine, body["prompt"], steps=body["steps"])
        assert answer["dlmoe"]["stats"]["num_forwards"] == body["steps"]
        assert answer["dlmoe"]["stats"]["batch_rows"] == 2
    assert metric(samples, "dlmoe_batch_rows_count") == 2 and metric(samples, "dlmoe_batch_rows_sum") == 4


def test_a_seeded_sampled_request_runs_alone_and_repeats(engines) -> None:
    engine = engines["tc"]
    seeded = {"prompt": PROMPTS[0], **LAYOUT, "temperature": 1.5, "seed": 11}
    greedy = {"prompt": PROMPTS[2], **LAYOUT}
    with serve(engine, max_batch_rows=16, max_wait_ms=200) as running:
        answers = concurrently([lambda b=b: ask(running.url, b) for b in (seeded, seeded, greedy, greedy)])
    texts = [a["choices"][0]["text"] for a in answers]
    assert texts[0] == texts[1] == direct(engine, PROMPTS[0], temperature=1.5, seed=11)
    assert texts[2] == texts[3] == direct(engine, PROMPTS[2])
    assert [a["dlmoe"]["stats"]["batch_rows"] for a in answers[:2]] == [1, 1]  # the seed alone decides its draws


def test_a_full_queue_answers_503_with_retry_after(engines) -> None:
    held = Held(engines["tc"])  # its batches stop at their first step until released
    body = {"prompt": PROMPTS[0], **LAYOUT}
    results: list[dict] = []
    with serve(held.engine, max_batch_rows=1, max_wait_ms=0, max_queue=1) as running:
        clients = [threading.Thread(target=lambda: results.append(ask(running.url, body))) for _ in range(2)]
        try:
            clients[0].start()
            assert held.reached.wait(30)  # the first request runs (held): the queue is empty
            clients[1].start()
            wait_for(lambda: health(running.url)["queue_depth"] == 1, what="the second request to queue")
            refused = httpx.post(f"{running.url}/v1/completions", json=body, timeout=30)
            assert health(running.url)["status"] == "ok"  # full, not down
        finally:
            held.release()
            for client in clients:
                client.join(60)
        samples = metrics(running.url)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit() and int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "overloaded" and error["code"] == 503 and "queue is full" in error["message"]
    assert [r["choices"][0]["text"] for r in results] == [direct(engines["tc"], PROMPTS[0])] * 2
    assert metric(samples, "dlmoe_requests_rejected_total", reason="queue_full") == 1
    assert metric(samples, "dlmoe_requests_total", endpoint="/v1/completions", status="503") == 1
