"""`generate`: LLaDA semi-autoregressive sampling and its fast variants, in one loop.

The canvas [prompt | mask × G] (left-padded rows, `canvas`) is denoised block by block, left to
right. At each step the `Denoiser` returns the current block's logits (full forward or KV cache,
CFG, block routing, EC capacity policy); the step then proposes a token per position, scores it
(remasking rule) and commits per row either its quota (LLaDA: the block's masked count spread
over the block's steps) or every proposal above a threshold τ (Fast-dLLM, at least the quota or
one). Rows never interact, so a row's tokens do not depend on the batch it runs in.

Letters: B batch, L canvas length, G generated length, W block length, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dlmoe.sampling.canvas import Canvas, Prompts, build_canvas
from dlmoe.sampling.checks import SpecialIds, check_model_fit, check_model_kind, resolve_ids, suppressed_ids
from dlmoe.sampling.config import SamplerConfig, sampler_from_keywords
from dlmoe.sampling.denoiser import Denoiser, unwrap_model
from dlmoe.sampling.rules import (
    REMASKING_RULES,
    commit_schedule,
    finished_at_eos,
    propose_tokens,
    select_commits,
    suppress_commits,
    suppress_logits,
    threshold_commits,
)
from dlmoe.sampling.stats import GenerationStats, StatsRecorder
from dlmoe.sampling.step_routing import StepRouting

if TYPE_CHECKING:
    from dlmoe.offload.store import ExpertStore


@dataclass(frozen=True)
class StepInfo:
    """What one denoising step did; passed to `generate(callback=...)` for progress or streaming."""

    step: int  # global step index, 0-based
    block: int  # block index, 0-based
    block_step: int  # step index inside the block
    num_blocks: int
    committed: Tensor  # [B, L] bool: positions the commit rule unmasked at this step
    tokens: Tensor  # [B, L] int64: a copy of the canvas after this step (EOS fills included)
    finished: Tensor  # [B] bool: rows stopped at EOS (only with stop_at_eos)
    gen_start: int  # first generated column
    routing: StepRouting | None = None  # experts used for the block by this step's forward (None: no MoE)

    def committed_positions(self) -> list[Tensor]:
        """Per row, the canvas positions committed at this step (int64, ascending)."""
        return [row.nonzero().squeeze(1) for row in self.committed]


@dataclass(frozen=True)
class GenerationResult:
    """Output of `generate`: the canvas (left-padded prompts, then the generation) and its cost."""

    tokens: Tensor  # [B, P + G] int64
    attention_mask: Tensor  # [B, P + G] bool: False = left padding
    prompt_length: int  # P, the padded prompt width: generated tokens start at this column
    num_blocks: int
    steps_per_block: int | None  # None with a threshold (adaptive)
    stopped_early: bool  # True when stop_at_eos ended the loop before the last scheduled step
    stats: GenerationStats

    @property
    def generated(self) -> Tensor:
        """[B, G] int64: the generated part of `tokens`."""
        return self.tokens[:, self.prompt_length :]

    @property
    def num_forwards(self) -> int:
        return self.stats.num_forwards


@torch.no_grad()
def generate(
    model: object,
    prompt_ids: Prompts,
    sampler: SamplerConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    **keywords: object,
) -> GenerationResult:
    """Generate `sampler.gen_length` tokens after each prompt.

    model: a `DiffusionTransformer` / `DlmoeForDiffusionLM` (all options), or any callable
        `model(x [B, L], mask_ratio [B]) -> logits [B, L, V]` (or an object with `.logits`):
        same-length prompts, `cache="none"`, no block routing or capacity policy. Eval mode.
    prompt_ids: [B, P] int tensor (with `attention_mask` for left padding), or a list of token-id
        lists of any lengths (left-padded here). No mask token, no empty prompt.
    sampler: every generation option (`SamplerConfig`: lengths, steps, temperature, remasking,
        threshold, cache, CFG, block routing, capacity, ids, EOS stop, token suppression).
        The older keyword form `generate(model, ids, gen_length=..., block_length=..., steps=...)`
        still works: the keywords are a `SamplerConfig`'s fields (not together with `sampler`).
    generator: random source for Gumbel noise and random remasking.
    callback: called after every step with a `StepInfo`.
    All input is checked before the first forward (a plain callable's vocabulary: at its first).
    """
    sampler = sampler_from_keywords(sampler, keywords, "generate")
    return _prepare(model, prompt_ids, sampler, attention_mask, generator, callback).run()


def check_generation(model: object, prompt_ids: Prompts, sampler: SamplerConfig) -> None:
    """Every check `generate(model, prompt_ids, sampler)` makes before its first forward, without
    running the model (a server checks each request before it queues it)."""
    _prepare(model, prompt_ids, sampler, None, None, None)


def _prepare(
    model: object,
    prompt_ids: Prompts,
    sampler: SamplerConfig,
    attention_mask: Tensor | None,
    generator: torch.Generator | None,
    callback: Callable[[StepInfo], None] | None,
) -> _Loop:
    """Every check, the canvas and the denoiser of one call."""
    steps_per_block = sampler.check()
    transformer = unwrap_model(model)
    check_model_kind(model, transformer, sampler)
    config = None if transformer is None else transformer.config
    ids = resolve_ids(sampler, config, generator, callback)
    vocab_size = None if config is None else config.vocab_size
    never_K, last_K = suppressed_ids(sampler, ids.mask_id, vocab_size)
    device = next(transformer.parameters()).device if transformer is not None else None
    canvas = build_canvas(
        prompt_ids, attention_mask, gen_length=sampler.gen_length, block_length=sampler.block_length,
        mask_id=ids.mask_id, pad_id=ids.pad_id, device=device,
    )  # fmt: skip
    check_model_fit(transformer, canvas, sampler)
    from dlmoe.offload.load import expert_store_of  # offload imports the model: not at sampling's import

    stats = StatsRecorder()
    store = None if transformer is None else expert_store_of(transformer)
    denoiser = Denoiser(
        model, canvas, mask_id=ids.mask_id, cache=sampler.cache, cfg_scale=sampler.cfg_scale,
        block_routing=sampler.block_routing, capacity=sampler.capacity, stats=stats,
    )  # fmt: skip
    device = canvas.tokens.device
    return _Loop(
        sampler, ids, canvas, denoiser, stats, steps_per_block, vocab_size,
        None if never_K is None else never_K.to(device), None if last_K is None else last_K.to(device),
        generator, callback, store,
    )  # fmt: skip


@dataclass
class _Loop:
    """The block / step loop of one `generate` call; the canvas tokens are its state."""

    sampler: SamplerConfig
    ids: SpecialIds
    canvas: Canvas
    denoiser: Denoiser
    stats: StatsRecorder
    steps_per_block: int | None  # None: adaptive (threshold)
    vocab_size: int | None  # None: a plain callable's, known at its first forward
    never_K: Tensor | None  # suppress_tokens
    last_K: Tensor | None  # suppress_commit_tokens
    generator: torch.Generator | None
    callback: Callable[[StepInfo], None] | None
    store: ExpertStore | None  # the model's expert store when its routed experts are offloaded
    step: int = 0
    stopped_early: bool = False
    finished_B: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.finished_B = torch.zeros(self.canvas.batch_size, dtype=torch.bool, device=self.canvas.tokens.device)

    def run(self) -> GenerationResult:
        started = time.perf_counter()
        offload = None if self.store is None else self.store.measure()
        for block in range(self.canvas.num_blocks):
            if self._block(block):
                break
        canvas = self.canvas
        stats = self.stats.finish(
            generated_tokens=canvas.batch_size * self.sampler.gen_length, seconds=time.perf_counter() - started,
            offload=None if offload is None else offload(),
        )  # fmt: skip
        return GenerationResult(
            canvas.tokens, canvas.valid, canvas.gen_start, canvas.num_blocks, self.steps_per_block,
            self.stopped_early, stats,
        )  # fmt: skip

    def _block(self, block: int) -> bool:
        """Denoise one block; True when every row has finished at EOS (the loop ends)."""
        start, end = self.canvas.block_span(block)
        num_masked_B = (self.canvas.tokens[:, start:end] == self.ids.mask_id).sum(1)
        per_block = self.steps_per_block
        quota_BS = None if per_block is None else commit_schedule(num_masked_B, per_block)
        max_steps = per_block if per_block is not None else self.sampler.block_length
        for block_step in range(max_steps):
            if not self._step(block, block_step, quota_BS, num_masked_B):
                break  # threshold mode: the block is done (or every row finished at EOS)
            if self._all_finished():
                self.stopped_early = block + 1 < self.canvas.num_blocks or block_step + 1 < max_steps
                return True
        return self._all_finished()

    def _step(self, block: int, block_step: int, quota_BS: Tensor | None, num_masked_B: Tensor) -> bool:
        """One forward and its commits; False when the block has nothing left to commit."""
        x_BL, mask_id = self.canvas.tokens, self.ids.mask_id
        start, end = self.canvas.block_span(block)
        window_BW = x_BL[:, start:end]
        candidates_BW = window_BW == mask_id
        if not bool(candidates_BW.any()):
            return False
        tokens_BW, confidence_BW = self._propose(block, first_step=block_step == 0)
        if self.sampler.threshold is None:
            commit_BW = select_commits(confidence_BW, candidates_BW, quota_BS[:, block_step])
        else:
            minimum_B = quota_BS[:, block_step].clamp_min(1) if quota_BS is not None else torch.ones_like(num_masked_B)
            commit_BW = threshold_commits(confidence_BW, candidates_BW, self.sampler.threshold, minimum_B)
        x_BL[:, start:end] = torch.where(commit_BW, tokens_BW, window_BW)
        if self.sampler.stop_at_eos:  # freeze rows that reached EOS: fill their masks, nothing left to commit
            self.finished_B |= finished_at_eos(self.canvas.generated, mask_id=mask_id, eos_id=self.ids.eos_id)
            x_BL.masked_fill_(self.finished_B[:, None] & (x_BL == mask_id), self.ids.eos_id)
        if self.callback is not None:
            committed_BL = torch.zeros_like(x_BL, dtype=torch.bool)
            committed_BL[:, start:end] = commit_BW
            self.callback(
                StepInfo(self.step, block, block_step, self.canvas.num_blocks, committed_BL, x_BL.clone(),
                         self.finished_B.clone(), self.canvas.gen_start, self.denoiser.routing)
            )  # fmt: skip
        self.step += 1
        return True

    def _propose(self, block: int, first_step: bool) -> tuple[Tensor, Tensor]:
        """[B, W] proposals and their confidences (remasking rule, token suppression)."""
        logits_BWV = self.denoiser.block_logits(block, first_step=first_step)
        if self.vocab_size is None:  # a plain callable: its vocabulary is known from the first logits
            self.vocab_size = logits_BWV.shape[-1]
            suppressed_ids(self.sampler, self.ids.mask_id, self.vocab_size)
        if self.never_K is not None:
            logits_BWV = suppress_logits(logits_BWV, self.never_K)
        sampler = self.sampler
        tokens_BW = propose_tokens(
            logits_BWV, temperature=sampler.temperature, mask_id=self.ids.mask_id, generator=self.generator
        )
        confidence_BW = REMASKING_RULES[sampler.remasking](logits_BWV, tokens_BW, self.generator)
        if self.last_K is not None:
            confidence_BW = suppress_commits(confidence_BW, tokens_BW, self.last_K)
        return tokens_BW, confidence_BW

    def _all_finished(self) -> bool:
        return self.sampler.stop_at_eos and bool(self.finished_B.all())
