"""Response bodies in OpenAI's shapes (completion, chat completion, their stream chunks), with the
generation's cost under `dlmoe`."""

from __future__ import annotations

import time
from typing import Any

from dlmoe.serve.jobs import Job, Outcome


def generation_stats(outcome: Outcome) -> dict[str, Any] | None:
    """The generate call's figures (forwards, unique experts per block, active FLOPs per token, ...),
    rounded, with the rows of the call that produced them."""
    if outcome.stats is None:
        return None
    stats = {k: round(v, 4) if isinstance(v, float) else v for k, v in outcome.stats.as_dict().items()}
    if stats.get("unique_experts_by_layer") is not None:
        stats["unique_experts_by_layer"] = [round(v, 3) for v in stats["unique_experts_by_layer"]]
    return stats | {"batch_rows": outcome.batch_rows}


def usage(job: Job, outcome: Outcome) -> dict[str, int]:
    prompt = sum(len(ids) for ids in job.prompt_ids)
    completion = sum(outcome.completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def texts(job: Job, outcome: Outcome, echo: bool) -> list[str]:
    return [p + t for p, t in zip(job.prompts, outcome.texts, strict=True)] if echo else list(outcome.texts)


def completion(job: Job, outcome: Outcome, model: str, *, chat: bool, echo: bool = False) -> dict[str, Any]:
    """The whole response of a finished, non-streamed job."""
    choices = []
    for index, (text, reason) in enumerate(zip(texts(job, outcome, echo), outcome.finish_reasons, strict=True)):
        body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        choices.append({"index": index} | body | {"finish_reason": reason})
    return {
        "id": _id(job, chat), "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": model, "choices": choices, "usage": usage(job, outcome),
        "dlmoe": {"stats": generation_stats(outcome)},
    }  # fmt: skip


def step_chunk(job: Job, event: dict[str, Any], model: str, *, chat: bool) -> dict[str, Any]:
    """A stream chunk carrying one sampler event (`dlmoe.serve.stream`): empty text, the event under `dlmoe`."""
    index = event.get("index", 0)
    empty = {"delta": {"role": "assistant", "content": ""}} if chat else {"text": ""}
    return _chunk(job, model, chat, [{"index": index} | empty | {"finish_reason": None, "dlmoe": event}])


def final_chunk(job: Job, outcome: Outcome, model: str, *, chat: bool, echo: bool = False) -> dict[str, Any]:
    """The last chunk: every row's whole text (the only text a plain OpenAI client accumulates), its
    finish reason, the usage and the generation's stats."""
    choices = []
    for index, (text, reason) in enumerate(zip(texts(job, outcome, echo), outcome.finish_reasons, strict=True)):
        body = {"delta": {"content": text}} if chat else {"text": text}
        choices.append({"index": index} | body | {"finish_reason": reason, "dlmoe": {"event": "done"}})
    chunk = _chunk(job, model, chat, choices)
    return chunk | {"usage": usage(job, outcome), "dlmoe": {"stats": generation_stats(outcome)}}


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error", 499: "cancelled", 503: "overloaded"}
    return {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param, "code": status}}


def _chunk(job: Job, model: str, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": _id(job, chat), "object": kind, "created": int(time.time()), "model": model, "choices": choices}


def _id(job: Job, chat: bool) -> str:
    return job.id.replace("cmpl-", "chatcmpl-") if chat else job.id
