"""How a request body becomes a `SamplerConfig`: server defaults, overrides, turning defaults off."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dlmoe[serve]')")

from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.sampling import CapacityPolicy, SamplerConfig
from dlmoe.serve.protocol import CompletionRequest, RequestError, sampler_for

DEFAULTS = SamplerConfig(gen_length=64, block_length=32, steps=32, temperature=0.0)


def test_a_request_without_options_gets_the_server_defaults():
    sampler = sampler_for(CompletionRequest(prompt="x"), DEFAULTS)
    assert (sampler.gen_length, sampler.block_length, sampler.steps, sampler.block_routing) == (64, 32, 32, None)


def test_max_tokens_alone_keeps_the_servers_tokens_per_step_and_fits_the_block():
    sampler = sampler_for(CompletionRequest(prompt="x", max_tokens=128), DEFAULTS)
    assert (sampler.gen_length, sampler.block_length, sampler.steps) == (128, 32, 64)  # 2 tokens per step
    short = sampler_for(CompletionRequest(prompt="x", max_tokens=16), DEFAULTS)
    assert (short.gen_length, short.block_length, short.steps) == (16, 16, 8)


def test_block_routing_guard_defaults_to_the_models_and_false_turns_the_server_default_off():
    sampler = sampler_for(CompletionRequest(prompt="x", block_routing={"top_p": 0.5}), DEFAULTS, default_guard=4)
    assert sampler.block_routing == BlockRoutingConfig(top_p=0.5, guard=4)
    routed = SamplerConfig(gen_length=64, block_length=32, steps=32, block_routing=BlockRoutingConfig(guard=2))
    assert sampler_for(CompletionRequest(prompt="x"), routed).block_routing == BlockRoutingConfig(guard=2)
    assert sampler_for(CompletionRequest(prompt="x", block_routing=False), routed).block_routing is None


def test_capacity_false_turns_the_server_default_off():
    policy = CapacityPolicy(schedule="linear_reverse", k_min=1, k_max=3)
    defaults = SamplerConfig(gen_length=64, block_length=32, steps=32, capacity=policy)
    assert sampler_for(CompletionRequest(prompt="x"), defaults).capacity == policy
    assert sampler_for(CompletionRequest(prompt="x", capacity=False), defaults).capacity is None


def test_a_threshold_makes_the_steps_adaptive_and_errors_name_the_request_field():
    assert sampler_for(CompletionRequest(prompt="x", threshold=0.9), DEFAULTS).steps is None
    with pytest.raises(RequestError) as error:
        sampler_for(CompletionRequest(prompt="x", steps=3), DEFAULTS)
    assert error.value.param == "steps" and "request.steps=3" in str(error.value)
    with pytest.raises(RequestError) as error:
        sampler_for(CompletionRequest(prompt="x", block_routing={"top_p": 1.5}), DEFAULTS)
    assert error.value.param == "block_routing.top_p"
