"""The checks of a generation that need the model (a `SamplerConfig` checks itself alone): the
special ids resolved from the model's config, what a plain callable cannot do, context length,
prompt ids in the vocabulary, exact cache, routers, suppressed ids in the vocabulary. All run
before the first forward, except a plain callable's vocabulary (known from its first logits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe._checks import check_int
from dlmoe.sampling.canvas import Canvas
from dlmoe.sampling.config import SamplerConfig


@dataclass(frozen=True)
class SpecialIds:
    """The ids one generation uses: the sampler's, else the model config's."""

    mask_id: int
    eos_id: int | None
    pad_id: int


def resolve_ids(sampler: SamplerConfig, config: object, generator: object, callback: object) -> SpecialIds:
    """Mask / EOS / pad ids (a plain callable has no config: mask_id is then required), checked
    with stop_at_eos, `generator` and `callback`."""
    mask_id = sampler.mask_id
    if mask_id is None:
        if config is None:
            raise ValueError("mask_id is required when the model is a plain callable")
        mask_id = check_int("mask_id", config.mask_id, low=0)
    eos_id = sampler.eos_id if sampler.eos_id is not None or config is None else config.eos_id
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    if eos_id is None and sampler.stop_at_eos:
        raise ValueError("stop_at_eos=True needs eos_id, got eos_id=None")
    if eos_id is not None:
        check_int("eos_id", eos_id, low=0)
        if eos_id == mask_id:
            raise ValueError(f"eos_id must differ from mask_id, got eos_id={eos_id}, mask_id={mask_id}")
    return SpecialIds(mask_id, eos_id, _pad_id(sampler.pad_id, config, eos_id, mask_id))


def _pad_id(pad_id: int | None, config: object, eos_id: int | None, mask_id: int) -> int:
    """Padding is invisible to the model, so any non-mask id works; prefer the model's pad, then EOS."""
    for candidate in (pad_id, getattr(config, "pad_id", None), eos_id):
        if candidate is not None:
            return check_int("pad_id", candidate, low=0)
    return 1 if mask_id == 0 else 0


def check_model_kind(model: object, transformer: object, sampler: SamplerConfig) -> None:
    """A dlmoe model takes every option; a plain callable only those that need no model internals."""
    if transformer is not None:
        return
    if not callable(model):
        raise ValueError(f"model must be a dlmoe model or a callable, got {type(model).__name__}")
    needs = {
        "cache": sampler.cache != "none",
        "block_routing": sampler.block_routing is not None,
        "capacity": sampler.capacity is not None,
    }
    used = [name for name, on in needs.items() if on]
    if used:
        raise ValueError(f"{', '.join(used)} need a dlmoe model (DiffusionTransformer); got a plain callable")


def check_model_fit(transformer: object, canvas: Canvas, sampler: SamplerConfig) -> None:
    """Checks that need the model: context length, exact cache, routers, vocabulary."""
    if transformer is None:
        if canvas.padded:
            raise ValueError("prompts of different lengths (left padding) need a dlmoe model, not a plain callable")
        return
    config = transformer.config
    if canvas.length > config.max_seq_len:
        longest = int(canvas.valid[:, : canvas.gen_start].sum(1).max())
        raise ValueError(
            f"prompt ({longest} tokens) + gen_length={canvas.length - canvas.gen_start} exceeds the model's "
            f"max_seq_len={config.max_seq_len}"
        )
    real = canvas.tokens[canvas.valid]
    if bool((real >= config.vocab_size).any()) or bool((real < 0).any()):
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={config.vocab_size})")
    if sampler.cache == "exact" and not config.block_causal:
        raise ValueError(
            f"cache='exact' needs a block-causal model (model.attention='block_causal'), this one is "
            f"{config.attention!r}; use cache='prefix' or 'dual' (approximate) instead"
        )
    _check_routers(config, sampler)


def _check_routers(config: object, sampler: SamplerConfig) -> None:
    router = None if config.moe is None else config.moe.router
    block_routing, capacity = sampler.block_routing, sampler.capacity
    if block_routing is not None:
        if router is None:
            raise ValueError("block_routing needs an MoE model; this one is dense")
        if block_routing.guard > router.num_experts:
            raise ValueError(f"block_routing.guard={block_routing.guard} must be <= num_experts={router.num_experts}")
    if capacity is not None:
        if router is None or router.kind != "expert_choice":
            raise ValueError("capacity (an inference capacity policy) needs an expert-choice model")
        if capacity.k_max > router.num_experts:
            raise ValueError(f"capacity.k_max={capacity.k_max} must be <= num_experts={router.num_experts}")


def suppressed_ids(sampler: SamplerConfig, mask_id: int, vocab_size: int | None) -> tuple[Tensor | None, Tensor | None]:
    """(never-proposed ids, committed-last ids) as sorted int64 tensors, None where not given or
    empty. Ids lie in [0, vocab_size) (unchecked while the vocabulary is unknown), are not the mask
    id, and leave at least one non-mask token to propose."""
    p = sampler.section
    lists: list[list[int] | None] = []
    for name in ("suppress_tokens", "suppress_commit_tokens"):
        ids = getattr(sampler, name)
        if ids is None:
            lists.append(None)
            continue
        if vocab_size is not None:
            for i, v in enumerate(ids):
                check_int(f"{p}.{name}[{i}]", v, low=0, high=vocab_size - 1)
        if mask_id in ids:
            raise ValueError(
                f"{p}.{name} must not hold mask_id={mask_id} (the mask token is never proposed anyway), got {ids}"
            )
        lists.append(sorted(set(ids)) or None)  # an empty list suppresses nothing
    never, last = lists
    if never is not None and vocab_size is not None and len(set(never) | {mask_id}) >= vocab_size:
        raise ValueError(f"{p}.suppress_tokens leaves no token to propose (vocab_size={vocab_size}, mask_id={mask_id})")
    return tuple(None if ids is None else torch.tensor(ids, dtype=torch.int64) for ids in (never, last))
