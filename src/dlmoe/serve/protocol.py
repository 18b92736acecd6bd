"""The HTTP request bodies (OpenAI's shape plus the diffusion options) and how they become a `SamplerConfig`.

OpenAI clients send their extra options at the top level of the body (`extra_body=` in the
official client), so the DLM options live there too, under the names of `dlmoe sample`'s flags:
`block_length`, `steps`, `threshold`, `cache`, `remasking`, `cfg_scale`, `block_routing`
(`{"top_p", "guard"}`; `false` turns the server's default off), `capacity` (`{"schedule", "k_min",
"k_max", "sigma"}`; `false`: off), `stop_at_eos`;
`max_tokens` is the generated length. `return_routing` adds, to each streamed step, the experts the
current block used per layer. Unknown fields are refused by name; OpenAI fields a diffusion sampler
has no meaning for (`stop`, `logprobs`, `top_p`, penalties) are refused unless left at their neutral value.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.sampling import CapacityPolicy, SamplerConfig

MAX_N = 16  # completions per prompt in one request


class RequestSampler(SamplerConfig):
    """A `SamplerConfig` whose errors name the request's fields (`request.steps must be ...`)."""

    section = "request"


class BlockRoutingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_p: float = 0.6
    guard: int | None = None  # None: min(num_experts, 2k), as `dlmoe sample` suggests


class CapacityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: str
    k_min: int
    k_max: int
    sigma: float | None = None


class SamplingOptions(BaseModel):
    """Fields shared by both endpoints; None = the server's default (`dlmoe serve` flags, else the run's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, description="generated tokens (the canvas length after the prompt)")
    temperature: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    seed: int | None = None
    user: str | None = None
    # diffusion sampler options (`dlmoe sample` flags)
    block_length: int | None = None
    steps: int | None = None
    threshold: float | None = None
    cache: str | None = None
    remasking: str | None = None
    cfg_scale: float | None = None
    block_routing: BlockRoutingOptions | Literal[False] | None = None
    capacity: CapacityOptions | Literal[False] | None = None
    stop_at_eos: bool | None = None
    return_routing: bool = False
    # OpenAI fields with no meaning for a masked diffusion sampler: accepted only at their neutral value
    stop: str | list[str] | None = None
    logprobs: int | bool | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class CompletionRequest(SamplingOptions):
    prompt: str | list[str]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingOptions):
    messages: list[ChatMessage] = Field(min_length=1)


class RequestError(ValueError):
    """A request the server refuses: 400 with `param` naming the field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


NEUTRAL = {"stop": (None, [], ""), "logprobs": (None, False, 0), "top_p": (None, 1.0), "presence_penalty": (None, 0.0),
           "frequency_penalty": (None, 0.0)}  # fmt: skip
WHY = {
    "stop": "stop strings are not supported (a diffusion canvas is not written left to right); use stop_at_eos",
    "logprobs": "logprobs are not returned by the diffusion sampler",
    "top_p": "nucleus sampling is not implemented (temperature only); block routing's top_p is block_routing.top_p",
    "presence_penalty": "penalties are not implemented by the diffusion sampler",
    "frequency_penalty": "penalties are not implemented by the diffusion sampler",
}


def sampler_for(request: SamplingOptions, defaults: SamplerConfig, default_guard: int = 16) -> RequestSampler:
    """The request's `SamplerConfig`: the server's defaults with the request's options; a RequestError
    naming the field when an option is out of range or the options do not fit together.
    `default_guard`: block routing's guard when the request gives none (the model's min(E, 2k))."""
    for name, neutral in NEUTRAL.items():
        if getattr(request, name) not in neutral:
            raise RequestError(f"{name}={getattr(request, name)!r}: {WHY[name]}", param=name)
    fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(SamplerConfig)}
    given = {
        "gen_length": request.max_tokens, "block_length": request.block_length, "steps": request.steps,
        "temperature": request.temperature, "threshold": request.threshold, "cache": request.cache,
        "remasking": request.remasking, "cfg_scale": request.cfg_scale, "stop_at_eos": request.stop_at_eos,
    }  # fmt: skip
    fields |= {name: value for name, value in given.items() if value is not None}
    if request.threshold is not None and request.steps is None:
        fields["steps"] = None  # a threshold makes the steps adaptive (as `dlmoe sample --threshold`)
    fields = _fit_layout(fields, request, defaults)
    try:
        if request.block_routing is False:
            fields["block_routing"] = None
        elif request.block_routing is not None:
            options = request.block_routing.model_dump()
            options["guard"] = default_guard if options["guard"] is None else options["guard"]
            fields["block_routing"] = BlockRoutingConfig(**options)
        if request.capacity is False:
            fields["capacity"] = None
        elif request.capacity is not None:
            options = {k: v for k, v in request.capacity.model_dump().items() if v is not None}
            fields["capacity"] = CapacityPolicy(**options)
        return RequestSampler(**fields)
    except ValueError as error:
        raise RequestError(str(error), param=_param_of(str(error))) from None


def _fit_layout(fields: dict[str, Any], request: SamplingOptions, defaults: SamplerConfig) -> dict[str, Any]:
    """A request that changes only `max_tokens` keeps working: the server's block length is shrunk to
    it when longer, and the server's tokens per step carry over to the new length."""
    if request.max_tokens is not None and request.block_length is None and fields["block_length"] > request.max_tokens:
        fields["block_length"] = request.max_tokens
    if request.max_tokens is not None and request.steps is None and fields["steps"] is not None:
        fields["steps"] = _scaled_steps(fields["block_length"], request.max_tokens, defaults)
    gen, block = fields["gen_length"], fields["block_length"]
    if isinstance(gen, int) and isinstance(block, int) and block > 0 and gen > 0 and gen % block:
        param = "max_tokens" if request.max_tokens is not None else "block_length"
        raise RequestError(
            f"max_tokens={gen} must be a multiple of block_length={block} (e.g. max_tokens={-(-gen // block) * block})",
            param=param,
        )
    return fields


def _scaled_steps(block: object, max_tokens: int, defaults: SamplerConfig) -> int:
    """The server's tokens per step kept for a new length: steps = max_tokens · default steps /
    default gen_length, rounded to a multiple of the number of blocks (at least one step per block)."""
    if not isinstance(block, int) or block < 1 or max_tokens < 1 or max_tokens % block:
        return max_tokens  # the layout check names the problem
    blocks = max_tokens // block
    per_block = max(1, round(max_tokens * defaults.steps / defaults.gen_length / blocks))
    return min(per_block, block) * blocks


def _param_of(message: str) -> str | None:
    """The request field a `RequestSampler` / router-config error names (`request.steps` → `steps`)."""
    found = re.search(r"\b(request|block|capacity)\.(\w+)", message)
    if found is None:
        return None
    head, name = found.groups()
    if head == "request":
        return "max_tokens" if name == "gen_length" else name
    return f"{'block_routing' if head == 'block' else 'capacity'}.{name}"
