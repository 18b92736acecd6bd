"""The HTTP API end to end on a tiny trained run: every endpoint, OpenAI's shapes, chat, streaming,
the metrics, and the 400s that name the field a request got wrong."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest

from dlmoe.serve import Engine
from tests.serve.conftest import serve
from tests.serve.helpers import LAYOUT, PROMPTS, complete, direct, metric, metrics, sse, varied

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the king?"}]


@pytest.fixture(scope="module")
def engine(tc_engine: Engine) -> Engine:
    return varied(tc_engine)


@pytest.fixture(scope="module")
def chat_engine(engine: Engine) -> Engine:
    """The varied engine with a chat template on a copy of its tokenizer (the runs have none)."""
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return Engine(engine.model, tokenizer, engine.defaults, engine.model_id)


@pytest.fixture(scope="module")
def client(chat_engine: Engine) -> Iterator[httpx.Client]:
    with serve(chat_engine, max_batch_rows=16, max_wait_ms=5) as running, httpx.Client(base_url=running.url) as c:
        yield c


# ---------------------------------------------------------------------- info endpoints


def test_models_lists_the_served_model_with_its_routing_and_defaults(server, tc_engine) -> None:
    body = httpx.get(f"{server.url}/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == tc_engine.model_id == "tc" and card["object"] == "model" and card["owned_by"] == "dlmoe"
    facts = card["dlmoe"]
    assert facts["moe"] == {"router": "token_choice", "num_experts": 4, "experts_per_token": 2, "moe_layers": 2}
    assert facts["max_seq_len"] == 64 and facts["vocab_size"] == tc_engine.config.vocab_size
    assert facts["chat"] is False and facts["batching_rows_interact"] is False
    defaults = facts["defaults"]
    assert (defaults["max_tokens"], defaults["block_length"], defaults["steps"]) == (16, 8, 16)
    assert defaults["cache"] == "none" and defaults["block_routing"] is None


def test_health_is_ok_while_serving(server) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "tc", "queue_depth": 0, "running": 0}


def test_the_page_is_served(server) -> None:
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")


# ---------------------------------------------------------------------- completions


def test_a_string_prompt_gives_an_openai_completion(client, engine) -> None:
    prompt = PROMPTS[1]
    body = complete(client, {"prompt": prompt, **LAYOUT}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tc"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": direct(engine, prompt), "logprobs": None, "finish_reason": "length"}
    given = len(engine.tokenizer.encode(prompt))
    assert body["usage"] == {"prompt_tokens": given, "completion_tokens": 16, "total_tokens": given + 16}
    stats = body["dlmoe"]["stats"]
    assert stats["generated_tokens"] == 16 and stats["num_forwards"] == 16 and 1 <= stats["unique_experts"] <= 4


def test_a_list_prompt_with_n_gives_every_choice_in_prompt_order(client, engine) -> None:
    prompts = [PROMPTS[0], PROMPTS[3]]
    body = complete(client, {"prompt": prompts, "n": 2, **LAYOUT}).json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    expected = [direct(engine, p) for p in prompts]
    assert expected[0] != expected[1]  # the order is visible
    assert [c["text"] for c in choices] == [expected[0], expected[0], expected[1], expected[1]]
    given = 2 * sum(len(engine.tokenizer.encode(p)) for p in prompts)
    assert body["usage"] == {"prompt_tokens": given, "completion_tokens": 64, "total_tokens": given + 64}
    assert body["dlmoe"]["stats"]["batch_rows"] >= 4


def test_echo_puts_the_prompt_before_the_text(client, engine) -> None:
    prompt = PROMPTS[0]
    [choice] = complete(client, {"prompt": prompt, "echo": True, **LAYOUT}).json()["choices"]
    assert choice["text"] == prompt + direct(engine, prompt)


def test_a_seed_makes_a_sampled_completion_reproducible(client, engine) -> None:
    body = {"prompt": PROMPTS[0], **LAYOUT, "temperature": 1.5, "seed": 7}
    first, second = (complete(client, body).json()["choices"][0]["text"] for _ in range(2))
    assert first == second == direct(engine, PROMPTS[0], temperature=1.5, seed=7)
    other = complete(client, body | {"seed": 8}).json()["choices"][0]["text"]
    assert other == direct(engine, PROMPTS[0], temperature=1.5, seed=8) != first


def test_metrics_count_requests_batches_tokens_and_latency(tc_engine) -> None:
    with serve(tc_engine, max_batch_rows=16, max_wait_ms=5) as running, httpx.Client(base_url=running.url) as c:
        before = metrics(running.url)
        assert metric(before, "dlmoe_queue_depth") == 0 and metric(before, "dlmoe_batch_rows_count") == 0
        bodies = [complete(c, {"prompt": p, **LAYOUT, "n": n}).json() for p, n in [("The", 1), ("A king", 2)]]
        assert complete(c, {"prompt": "x", "n": 0}).status_code == 400
        after = metrics(running.url)
    completion_tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    assert completion_tokens == 48
    assert metric(after, "dlmoe_requests_total", endpoint="/v1/completions", status="200") == 2
    assert metric(after, "dlmoe_requests_total", endpoint="/v1/completions", status="400") == 1
    assert metric(after, "dlmoe_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert metric(after, "dlmoe_generated_tokens_total") == completion_tokens
    assert metric(after, "dlmoe_forwards_total") == sum(b["dlmoe"]["stats"]["num_forwards"] for b in bodies)
    assert metric(after, "dlmoe_batch_rows_count") == 2 and metric(after, "dlmoe_batch_rows_sum") == 3
    assert metric(after, "dlmoe_batch_requests_count") == 2
    assert metric(after, "dlmoe_queue_depth") == 0 and metric(after, "dlmoe_running_requests") == 0
    assert metric(after, "dlmoe_request_latency_seconds_count", endpoint="/v1/completions") == 2
    assert metric(after, "dlmoe_request_latency_seconds_sum", endpoint="/v1/completions") > 0
    assert metric(after, "dlmoe_unique_experts_per_block_count") == 2
    assert 2 <= metric(after, "dlmoe_unique_experts_per_block_sum") <= 8  # 1..4 experts per call
    assert metric(after, "dlmoe_batch_failures_total") == 0 and metric(after, "dlmoe_requests_cancelled_total") == 0


# ---------------------------------------------------------------------- chat


def test_chat_is_refused_naming_messages_without_a_chat_template(server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "chat template" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_chat_answers_the_rendered_prompt_with_a_template(client, chat_engine) -> None:
    assert client.get("/v1/models").json()["data"][0]["dlmoe"]["chat"] is True
    body = complete(client, {"messages": MESSAGES, **LAYOUT}, "/v1/chat/completions").json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    rendered = "system: Be brief.\nuser: Who is the king?\nassistant:"
    assert chat_engine.chat_prompt(MESSAGES) == rendered
    assert choice["message"] == {"role": "assistant", "content": direct(chat_engine, rendered)}
    assert choice["finish_reason"] == "length"
    plain = complete(client, {"prompt": rendered, **LAYOUT}).json()
    assert choice["message"]["content"] == plain["choices"][0]["text"]
    assert body["usage"] == plain["usage"]


# ---------------------------------------------------------------------- streaming


def stream(client: httpx.Client, body: dict, path: str = "/v1/completions") -> list:
    with client.stream("POST", path, json=body | {"stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return sse(response)


@pytest.mark.parametrize("steps", [16, 4])
def test_a_stream_sends_start_every_step_then_the_text_and_done(client, engine, steps) -> None:
    prompt = PROMPTS[1]
    events = stream(client, {"prompt": prompt, **LAYOUT, "steps": steps})
    assert events[-1] == "[DONE]"
    *steps_, final = events[:-1]
    start = steps_.pop(0)["choices"][0]["dlmoe"]
    assert start["event"] == "start" and (start["gen_length"], start["block_length"], start["rows"]) == (16, 8, 1)
    assert (start["num_blocks"], start["steps"]) == (2, steps)
    assert all(e["object"] == "text_completion" and e["choices"][0]["text"] == "" for e in steps_)
    infos = [e["choices"][0]["dlmoe"] for e in steps_]
    assert [i["step"] for i in infos] == list(range(steps)) and all(i["event"] == "step" for i in infos)
    assert [i["block"] for i in infos] == [0] * (steps // 2) + [1] * (steps // 2)
    positions = [p for i in infos for p in i["positions"]]
    assert sorted(positions) == list(range(16))  # every generated position, each exactly once
    canvas = dict(zip(positions, (t for i in infos for t in i["tokens"]), strict=True))
    text = complete(client, {"prompt": prompt, **LAYOUT, "steps": steps}).json()["choices"][0]["text"]
    assert engine.tokenizer.decode([canvas[p] for p in range(16)]) == text
    [choice] = final["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length" and choice["dlmoe"] == {"event": "done"}
    assert final["usage"]["completion_tokens"] == 16 and final["dlmoe"]["stats"]["num_forwards"] == steps


def test_a_chat_stream_sends_chunks_with_deltas(client) -> None:
    events = stream(client, {"messages": MESSAGES, **LAYOUT}, "/v1/chat/completions")
    assert events[-1] == "[DONE]" and len(events) == 1 + 16 + 1 + 1
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} for c in chunks[:-1])
    content = complete(client, {"messages": MESSAGES, **LAYOUT}, "/v1/chat/completions").json()["choices"][0]
    assert chunks[-1]["choices"][0]["delta"] == {"content": content["message"]["content"]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------- refused requests

TOO_LONG = "The king is dead, long live the king. " * 8
BAD = [
    ({"foo": 1}, "foo", "unknown field"),
    ({"max_tokens": "many"}, "max_tokens", "integer"),
    ({"max_tokens": 12}, "max_tokens", "multiple of block_length"),
    ({"steps": 17}, "steps", "<= 16"),
    ({"steps": 0}, "steps", ">= 1"),
    ({"steps": 3}, "steps", "multiple of the number of blocks"),
    ({"threshold": 0}, "threshold", "(0.0, 1.0]"),
    ({"threshold": 1.5}, "threshold", "(0.0, 1.0]"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"cache": "exact"}, "cache", "block-causal"),
    ({"cache": "warm"}, "cache", "must be one of"),
    ({"block_routing": {"top_p": 0.6, "guard": 5}}, "block_routing.guard", "guard=5 must be <= num_experts=4"),
    ({"block_routing": {"top_p": 0.6, "bogus": 1}}, "block_routing.bogus", "unknown field"),
    ({"capacity": {"schedule": "linear", "k_min": 1, "k_max": 2}}, "capacity", "expert-choice"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"prompt": []}, "prompt", "non-empty list"),
    ({"prompt": ""}, "prompt", "no tokens"),
    ({"prompt": ["The king", ""]}, "prompt[1]", "no tokens"),
    ({"prompt": TOO_LONG}, "prompt", "max_seq_len=64"),
    ({"prompt": "The <|mask|> king"}, "prompt", "mask token"),
    ({"stop": "\n"}, "stop", "stop_at_eos"),
    ({"stop": ["."]}, "stop", "not supported"),
    ({"logprobs": 1}, "logprobs", "not returned"),
    ({"top_p": 0.5}, "top_p", "block_routing.top_p"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not implemented"),
]


@pytest.mark.parametrize(("fields", "param", "words"), BAD, ids=[f"{p}:{list(f.values())[0]}" for f, p, _ in BAD])
def test_a_bad_request_is_refused_naming_its_field(server, fields, param, words) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The king"} | fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] == 400


def test_neutral_openai_fields_are_accepted(server) -> None:
    neutral = {"stop": None, "logprobs": None, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The king", "user": "me"} | neutral)
    assert response.status_code == 200, response.text


def test_an_unknown_model_is_404_and_a_malformed_body_400(server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The king", "model": "gpt-4"})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model" and "'tc'" in response.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "model": "tc"}).status_code == 200
    response = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x",', headers=JSON)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None and "JSON" in error["message"]
    response = httpx.post(f"{server.url}/v1/completions", json=["The king"])
    assert response.status_code == 400 and "object" in response.json()["error"]["message"]


JSON = {"content-type": "application/json"}
