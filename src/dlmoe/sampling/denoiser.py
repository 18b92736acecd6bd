"""How the sampler gets the current block's logits: which canvas columns each forward feeds
(KV cache mode), classifier-free guidance, and per-forward routing options.

Cache modes (DESIGN.md §6, Fast-dLLM; see `dlmoe.model.kv_cache`):
- none:   every step runs the whole canvas;
- prefix: each block's first step runs the whole canvas and keeps its K/V; later steps run the
          block and everything after it against the cached prefix (approximate);
- dual:   as prefix, but later steps run the block only, against cached prefix and suffix
          (approximate);
- exact:  block-causal models only. Finished blocks never change nor see later ones, so their
          K/V are cached once: each block's first step runs the not-yet-cached columns up to the
          block end, later steps the block only. Identical to `none` for token-choice and
          block-routed models (plain expert choice picks among the fed tokens, so its pool — and
          its routing — follows what is fed).

CFG (LLaDA): the unconditional branch is the canvas with the prompt masked; both branches run as
one batch of 2B rows (with their own cache rows) and ℓ = ℓ_u + (s + 1)(ℓ_c − ℓ_u).

Letters: B batch, R = B or 2B model rows, L canvas length, W block length, V vocab, F fed length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.routing.context import RoutingContext
from dlmoe.sampling.canvas import Canvas
from dlmoe.sampling.config import CapacityPolicy
from dlmoe.sampling.stats import StatsRecorder
from dlmoe.sampling.step_routing import StepRouting

if TYPE_CHECKING:  # dlmoe.config imports dlmoe.sampling: no dlmoe.config / dlmoe.model import at import time
    from dlmoe.config import ModelConfig
    from dlmoe.model.kv_cache import KVCache

__all__ = ["CapacityPolicy", "Denoiser", "unwrap_model"]  # CapacityPolicy lives in dlmoe.sampling.config


def unwrap_model(model: object) -> nn.Module | None:
    """The `DiffusionTransformer` inside `model` (itself or a `DlmoeForDiffusionLM`), else None."""
    from dlmoe.model.transformer import DiffusionTransformer

    inner = getattr(model, "model", model)
    return inner if isinstance(inner, DiffusionTransformer) else None


class Denoiser:
    """Runs the model for the sampler and records what each call cost (`StatsRecorder`).

    `routing`: the last forward's `StepRouting` (references only, computed when asked for; None for a
    plain callable or a dense model), for the step's callback.
    """

    def __init__(
        self,
        model: object,
        canvas: Canvas,
        *,
        mask_id: int,
        cache: str,
        cfg_scale: float,
        block_routing: BlockRoutingConfig | None,
        capacity: CapacityPolicy | None,
        stats: StatsRecorder,
    ) -> None:
        self.transformer = unwrap_model(model)
        self.config: ModelConfig | None = None if self.transformer is None else self.transformer.config
        self.plain: Callable[[Tensor, Tensor], object] | None = None if self.transformer is not None else model
        self.canvas, self.mask_id, self.cache_mode, self.cfg_scale = canvas, mask_id, cache, cfg_scale
        self.block_routing, self.capacity, self.stats = block_routing, capacity, stats
        self.cache: KVCache | None = None
        self.routing: StepRouting | None = None
        rows = 2 if cfg_scale > 0 else 1
        self.valid_RL = canvas.valid.repeat(rows, 1)
        self.positions_RL = canvas.positions.repeat(rows, 1)
        prompt_RL = torch.zeros_like(self.valid_RL)
        if cfg_scale > 0:  # the unconditional rows: the prompt (real tokens only) is masked
            prompt_RL[canvas.batch_size :, : canvas.gen_start] = canvas.valid[:, : canvas.gen_start]
        self.uncond_prompt_RL = prompt_RL

    # ------------------------------------------------------------------ public

    def block_logits(self, block: int, first_step: bool) -> Tensor:
        """[B, W, V] logits of the block's columns for this step (CFG-combined)."""
        canvas = self.canvas
        start, end = canvas.block_span(block)
        x_RL = canvas.tokens.repeat(2 if self.cfg_scale > 0 else 1, 1)
        x_RL = x_RL.masked_fill(self.uncond_prompt_RL, self.mask_id)
        if self.plain is not None:
            logits_RLV = self._plain_forward(x_RL)
            logits_RWV = logits_RLV[:, start:end]
        else:
            logits_RWV = self._cached_forward(x_RL, start, end, first_step)
        if self.cfg_scale > 0:
            cond, uncond = logits_RWV.float().chunk(2)
            return uncond + (self.cfg_scale + 1) * (cond - uncond)
        return logits_RWV

    # ------------------------------------------------------------------ forwards

    def _plain_forward(self, x_RL: Tensor) -> Tensor:
        """A bare callable model(x, mask_ratio) -> logits [R, L, V] (no padding, caches, routing)."""
        output = self.plain(x_RL, self._mask_ratio(x_RL))
        logits = getattr(output, "logits", output)
        rows, length = x_RL.shape
        if not isinstance(logits, Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != (rows, length):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape [B={rows}, L={length}, V], got {got}")
        if not logits.is_floating_point():
            raise ValueError(f"model must return floating-point logits, got dtype {logits.dtype}")
        self.stats.record(
            rows=rows, fed_length=length, flops=0.0, dispatches=[], fed_valid_BL=self.valid_RL,
            block_columns_BL=None, num_rows=self.canvas.batch_size,
        )  # fmt: skip
        return logits

    def _cached_forward(self, x_RL: Tensor, start: int, end: int, first_step: bool) -> Tensor:
        mode, length = self.cache_mode, self.canvas.length
        if mode == "none" or (mode in ("prefix", "dual") and first_step):
            fed_start, fed_end, use_cache = 0, length, False
        elif mode == "prefix":
            fed_start, fed_end, use_cache = start, length, True
        elif mode == "dual" or not first_step:  # dual, or exact after the block's first step
            fed_start, fed_end, use_cache = start, end, True
        else:  # exact, first step of a block: everything not cached yet, up to the block end
            fed_start = 0 if self.cache is None else self.cache.length
            fed_end, use_cache = end, self.cache is not None
        keep_kv = (mode in ("prefix", "dual") and first_step) or (mode == "exact" and first_step)
        output = self._model_forward(x_RL, fed_start, fed_end, use_cache, keep_kv, start, end)
        if keep_kv:
            if mode == "exact":  # cache the finished columns [fed_start, start); the block is still changing
                finished = output.kv.truncate(start - fed_start)
                self.cache = finished if self.cache is None else self.cache.write(fed_start, finished)
            else:
                self.cache = output.kv
        return output.logits[:, start - fed_start : end - fed_start]

    def _model_forward(
        self, x_RL: Tensor, fed_start: int, fed_end: int, use_cache: bool, keep_kv: bool, start: int, end: int
    ) -> object:
        from dlmoe.model.flops import forward_flops

        canvas = self.canvas
        rows = x_RL.shape[0]
        fed = slice(fed_start, fed_end)
        routing = RoutingContext(
            block=self.block_routing,
            experts_per_token=None if self.capacity is None else self._capacity_k(rows),
        )
        output = self.transformer(
            x_RL[:, fed],
            mask_ratio=self._mask_ratio(x_RL),
            attention_mask=self.valid_RL[:, fed],
            position_ids=self.positions_RL[:, fed],
            block_ids=canvas.block_ids[fed],
            routing=routing,
            kv_cache=self.cache if use_cache else None,
            cache_start=fed_start if use_cache else 0,
            return_kv=keep_kv,
        )
        fed_length = fed_end - fed_start
        key_length = max(self.cache.length, fed_end) if use_cache else fed_length
        columns = torch.arange(fed_start, fed_end, device=x_RL.device)
        block_BF = ((columns >= start) & (columns < end))[None, :] & self.valid_RL[:, fed]
        self.stats.record(
            rows=rows,
            fed_length=fed_length,
            flops=forward_flops(
                self.config,
                batch=rows,
                query_length=fed_length,
                key_length=key_length,
                slots_per_moe_layer=[d.num_slots for d in output.dispatches],
            ),
            dispatches=output.dispatches,
            fed_valid_BL=self.valid_RL[:, fed],
            block_columns_BL=block_BF,
            num_rows=canvas.batch_size,
        )
        if output.dispatches:
            block = (start - canvas.gen_start) // canvas.block_length
            self.routing = StepRouting(tuple(output.dispatches), block_BF, start - fed_start, canvas.batch_size, block)
        return output

    # ------------------------------------------------------------------ routing inputs

    def _mask_ratio(self, x_RL: Tensor) -> Tensor:
        """[R] fraction of mask tokens among each row's real canvas tokens (the routers' timestep)."""
        masked = ((x_RL == self.mask_id) & self.valid_RL).sum(1).float()
        return masked / self.valid_RL.sum(1).float()

    def _capacity_k(self, rows: int) -> Tensor:
        generated = self.canvas.generated
        remaining_B = (generated == self.mask_id).float().mean(1)
        k_B = self.capacity.experts_per_token(remaining_B)
        return k_B.repeat(rows // self.canvas.batch_size)
