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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_float, check_int
from dlmoe.config import BlockRoutingConfig
from dlmoe.sampling.canvas import Prompts, build_canvas
from dlmoe.sampling.denoiser import CapacityPolicy, Denoiser, unwrap_model
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
from dlmoe.vocab import CACHE_MODES


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
    *,
    gen_length: int,
    block_length: int,
    steps: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    cache: str = "none",
    cfg_scale: float = 0.0,
    block_routing: BlockRoutingConfig | None = None,
    capacity: CapacityPolicy | None = None,
    attention_mask: Tensor | None = None,
    mask_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    stop_at_eos: bool = False,
    suppress_tokens: Sequence[int] | None = None,
    suppress_commit_tokens: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> GenerationResult:
    """Generate `gen_length` tokens after each prompt.

    model: a `DiffusionTransformer` / `DlmoeForDiffusionLM` (all options), or any callable
        `model(x [B, L], mask_ratio [B]) -> logits [B, L, V]` (or an object with `.logits`):
        same-length prompts, `cache="none"`, no block routing or capacity policy. Eval mode.
    prompt_ids: [B, P] int tensor (with `attention_mask` for left padding), or a list of token-id
        lists of any lengths (left-padded here). No mask token, no empty prompt.
    gen_length, block_length: gen_length a multiple of block_length; blocks go left to right.
    steps: forwards over the whole generation, split evenly over blocks (a multiple of the number
        of blocks, ≤ gen_length). Optional with `threshold` (then the minimum commits per step
        follow the quota; without it, at least one).
    temperature: 0 is greedy; > 0 draws by float64 Gumbel-max from softmax(logits / T).
    remasking: "low_confidence" (commit the most probable proposals) or "random".
    threshold: τ in (0, 1]: also commit every proposal with confidence ≥ τ (Fast-dLLM); a block
        then takes as many steps as it needs.
    cache: "none", "prefix", "dual" (approximate, Fast-dLLM) or "exact" (block-causal models).
    cfg_scale: classifier-free guidance s ≥ 0 (0 = off).
    block_routing: dMoE block routing for this generation (top_p, guard; the blocks are the
        decoding blocks, so `block_routing.block_size` is not used). Token- or expert-choice models.
    capacity: expert-choice compute per step (`CapacityPolicy`), overriding the trained schedule.
    mask_id, eos_id, pad_id: default to the model config's (mask_id is required for callables).
    stop_at_eos: a row finishes once it holds an EOS with no mask before it; its remaining masks
        become EOS. The loop ends when every row is finished.
    suppress_tokens: token ids never proposed: their logits are −inf before the Gumbel-max /
        argmax and the confidence (LLaDA's `logits_eos_inf`, e.g. EOS so an instruct model fills
        the whole length). Ints in [0, vocab), not the mask id (never proposed anyway).
    suppress_commit_tokens: token ids that may be proposed but get confidence −inf: they rank
        below every other candidate of the block, so a step commits them only where its quota
        (or the threshold's minimum of one) is not met by other proposals, never by the threshold
        itself (LLaDA's `confidence_eos_eot_inf` for EOS / EoT). Same checks; no id in both.
        With a plain callable, ids ≥ its vocabulary are refused at the first forward.
    generator: random source for Gumbel noise and random remasking.
    callback: called after every step with a `StepInfo`.
    """
    transformer = unwrap_model(model)
    config = None if transformer is None else transformer.config
    mask_id = _resolve_id("mask_id", mask_id, config)
    eos_id = eos_id if eos_id is not None or config is None else config.eos_id
    _check_eos(eos_id, stop_at_eos, mask_id, generator, callback)
    pad_id = _resolve_pad(pad_id, config, eos_id, mask_id)
    _check_options(model, transformer, temperature, remasking, threshold, cache, cfg_scale, block_routing, capacity)
    vocab_size = None if config is None else config.vocab_size
    suppressed = _suppressed_ids(suppress_tokens, suppress_commit_tokens, mask_id, vocab_size)
    device = next(transformer.parameters()).device if transformer is not None else None
    canvas = build_canvas(
        prompt_ids, attention_mask, gen_length=gen_length, block_length=block_length, mask_id=mask_id,
        pad_id=pad_id, device=device,
    )  # fmt: skip
    steps_per_block = _steps_per_block(steps, gen_length, canvas.num_blocks, threshold)
    never_K, last_K = (None if ids is None else ids.to(canvas.tokens.device) for ids in suppressed or (None, None))
    _check_model_fit(transformer, canvas, cache, block_routing, capacity)
    stats = StatsRecorder()
    denoiser = Denoiser(
        model, canvas, mask_id=mask_id, cache=cache, cfg_scale=cfg_scale, block_routing=block_routing,
        capacity=capacity, stats=stats,
    )  # fmt: skip
    confidence_fn = REMASKING_RULES[remasking]
    x_BL = canvas.tokens
    finished_B = torch.zeros(canvas.batch_size, dtype=torch.bool, device=x_BL.device)
    started, step, stopped_early = time.perf_counter(), 0, False
    for block in range(canvas.num_blocks):
        start, end = canvas.block_span(block)
        num_masked_B = (x_BL[:, start:end] == mask_id).sum(1)
        quota_BS = None if steps_per_block is None else commit_schedule(num_masked_B, steps_per_block)
        max_steps = steps_per_block if steps_per_block is not None else block_length
        for block_step in range(max_steps):
            window_BW = x_BL[:, start:end]
            candidates_BW = window_BW == mask_id
            if not bool(candidates_BW.any()):
                break  # threshold mode: the block is done (or every row finished at EOS)
            logits_BWV = denoiser.block_logits(block, first_step=block_step == 0)
            if vocab_size is None:  # a plain callable: its vocabulary is known from the first logits
                vocab_size = logits_BWV.shape[-1]
                _suppressed_ids(suppress_tokens, suppress_commit_tokens, mask_id, vocab_size)
            if never_K is not None:
                logits_BWV = suppress_logits(logits_BWV, never_K)
            tokens_BW = propose_tokens(logits_BWV, temperature=temperature, mask_id=mask_id, generator=generator)
            confidence_BW = confidence_fn(logits_BWV, tokens_BW, generator)
            if last_K is not None:
                confidence_BW = suppress_commits(confidence_BW, tokens_BW, last_K)
            if threshold is None:
                commit_BW = select_commits(confidence_BW, candidates_BW, quota_BS[:, block_step])
            else:
                minimum_B = (
                    quota_BS[:, block_step].clamp_min(1) if quota_BS is not None else torch.ones_like(num_masked_B)
                )
                commit_BW = threshold_commits(confidence_BW, candidates_BW, threshold, minimum_B)
            x_BL[:, start:end] = torch.where(commit_BW, tokens_BW, window_BW)
            if stop_at_eos:  # freeze rows that reached EOS: fill their masks, nothing left to commit
                finished_B |= finished_at_eos(canvas.generated, mask_id=mask_id, eos_id=eos_id)
                x_BL.masked_fill_(finished_B[:, None] & (x_BL == mask_id), eos_id)
            if callback is not None:
                committed_BL = torch.zeros_like(x_BL, dtype=torch.bool)
                committed_BL[:, start:end] = commit_BW
                callback(
                    StepInfo(step, block, block_step, canvas.num_blocks, committed_BL, x_BL.clone(),
                             finished_B.clone(), canvas.gen_start)
                )  # fmt: skip
            step += 1
            if stop_at_eos and bool(finished_B.all()):
                stopped_early = block + 1 < canvas.num_blocks or block_step + 1 < max_steps
                break
        if stop_at_eos and bool(finished_B.all()):
            break
    stats_out = stats.finish(generated_tokens=canvas.batch_size * gen_length, seconds=time.perf_counter() - started)
    return GenerationResult(
        x_BL, canvas.valid, canvas.gen_start, canvas.num_blocks, steps_per_block, stopped_early, stats_out
    )


# ----------------------------------------------------------------------------- validation


def _resolve_id(name: str, value: int | None, config: object) -> int:
    if value is None:
        if config is None:
            raise ValueError(f"{name} is required when the model is a plain callable")
        value = getattr(config, name)
    return check_int(name, value, low=0)


def _resolve_pad(pad_id: int | None, config: object, eos_id: int | None, mask_id: int) -> int:
    """Padding is invisible to the model, so any non-mask id works; prefer the model's pad, then EOS."""
    for candidate in (pad_id, getattr(config, "pad_id", None), eos_id):
        if candidate is not None:
            return check_int("pad_id", candidate, low=0)
    return 1 if mask_id == 0 else 0


def _steps_per_block(steps: int | None, gen_length: int, num_blocks: int, threshold: float | None) -> int | None:
    if steps is None:
        if threshold is None:
            raise ValueError("steps is required without a threshold (e.g. steps=gen_length)")
        return None
    check_int("steps", steps, low=1, high=gen_length)  # > gen_length would leave steps with nothing to commit
    if steps % num_blocks:
        raise ValueError(
            f"steps={steps} must be a multiple of the number of blocks (gen_length // block_length = {num_blocks})"
        )
    return steps // num_blocks


def _check_options(
    model: object,
    transformer: object,
    temperature: float,
    remasking: str,
    threshold: float | None,
    cache: str,
    cfg_scale: float,
    block_routing: object,
    capacity: object,
) -> None:
    if transformer is None and not callable(model):
        raise ValueError(f"model must be a dlmoe model or a callable, got {type(model).__name__}")
    check_float("temperature", temperature, low=0.0)
    check_choice("remasking", remasking, REMASKING_RULES)
    if threshold is not None:
        check_float("threshold", threshold, low=0.0, high=1.0, low_open=True)
    check_choice("cache", cache, CACHE_MODES)
    check_float("cfg_scale", cfg_scale, low=0.0)
    if block_routing is not None and not isinstance(block_routing, BlockRoutingConfig):
        raise ValueError(f"block_routing must be a BlockRoutingConfig or None, got {type(block_routing).__name__}")
    if capacity is not None and not isinstance(capacity, CapacityPolicy):
        raise ValueError(f"capacity must be a CapacityPolicy or None, got {type(capacity).__name__}")
    if transformer is None:
        needs = {"cache": cache != "none", "block_routing": block_routing is not None, "capacity": capacity is not None}
        used = [name for name, on in needs.items() if on]
        if used:
            raise ValueError(f"{', '.join(used)} need a dlmoe model (DiffusionTransformer); got a plain callable")


def _check_model_fit(transformer: object, canvas: object, cache: str, block_routing: object, capacity: object) -> None:
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
    if cache == "exact" and not config.block_causal:
        raise ValueError(
            f"cache='exact' needs a block-causal model (model.attention='block_causal'), this one is "
            f"{config.attention!r}; use cache='prefix' or 'dual' (approximate) instead"
        )
    router = None if config.moe is None else config.moe.router
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


def _suppressed_ids(
    suppress_tokens: object, suppress_commit_tokens: object, mask_id: int, vocab_size: int | None
) -> tuple[Tensor | None, Tensor | None] | None:
    """(never-proposed ids, committed-last ids) as int64 tensors (None where not given or empty),
    or None when neither is. Ids: ints in [0, vocab_size) (upper bound unchecked while unknown), not
    the mask id, in one list only, and at least one non-mask token left to propose."""
    lists: list[list[int] | None] = []
    for name, value in (("suppress_tokens", suppress_tokens), ("suppress_commit_tokens", suppress_commit_tokens)):
        if value is None:
            lists.append(None)
            continue
        if isinstance(value, Tensor) and value.ndim == 1:
            value = value.tolist()  # float / bool entries are refused below
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list of int token ids, got {value!r}")
        high = None if vocab_size is None else vocab_size - 1
        ids = [check_int(f"{name}[{i}]", v, low=0, high=high) for i, v in enumerate(value)]
        if mask_id in ids:
            raise ValueError(
                f"{name} must not hold mask_id={mask_id} (the mask token is never proposed anyway), got {list(value)}"
            )
        lists.append(sorted(set(ids)) or None)  # an empty list suppresses nothing
    never, last = lists
    if never is None and last is None:
        return None
    if never is not None and last is not None and set(never) & set(last):
        raise ValueError(
            f"token ids {sorted(set(never) & set(last))} are in both suppress_tokens and suppress_commit_tokens; "
            "use one (suppress_tokens: never proposed, suppress_commit_tokens: committed last)"
        )
    if never is not None and vocab_size is not None and len(set(never) | {mask_id}) >= vocab_size:
        raise ValueError(f"suppress_tokens leaves no token to propose (vocab_size={vocab_size}, mask_id={mask_id})")
    never_K = None if never is None else torch.tensor(never, dtype=torch.int64)
    last_K = None if last is None else torch.tensor(last, dtype=torch.int64)
    return never_K, last_K


def _check_eos(eos_id: int | None, stop_at_eos: bool, mask_id: int, generator: object, callback: object) -> None:
    if not isinstance(stop_at_eos, bool):
        raise ValueError(f"stop_at_eos must be a bool, got {stop_at_eos!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    if eos_id is None:
        if stop_at_eos:
            raise ValueError("stop_at_eos=True needs eos_id, got eos_id=None")
        return
    check_int("eos_id", eos_id, low=0)
    if eos_id == mask_id:
        raise ValueError(f"eos_id must differ from mask_id, got eos_id={eos_id}, mask_id={mask_id}")
