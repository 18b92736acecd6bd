"""LLaDA semi-autoregressive sampling with low-confidence remasking (DESIGN.md §6).

The canvas x = [prompt | mask × G] is denoised block by block, left to right. Each block of W
positions gets S = steps / num_blocks forwards. Step j of a block with n masked positions commits
base + [j < rem] of them (base = n // S, rem = n % S: front-loaded, as LLaDA's
`get_num_transfer_tokens`). One step is three swappable parts:

1. propose: x̂ = argmax of the logits, or a Gumbel-max draw at temperature > 0 (`propose_tokens`);
2. score:   a confidence per proposal, chosen by the remasking rule            (`REMASKING_RULES`);
3. commit:  the top-quota masked positions of the current block, per row       (`select_commits`).

Later samplers change one part and keep the loop: Fast-dLLM threshold decoding is another commit
rule, KV caches and CFG wrap the forward (`_window_logits`), left padding changes only the canvas
and the masked counts (quotas are already counted per row from the canvas).

Letters: B batch, P prompt length, G generated length, L = P + G canvas length,
W block length (the decoding window), S steps per block, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_float, check_int, check_tensor

# model(x [B, L] int64, mask_ratio [B] float32) -> logits [B, L, V] (or an object with `.logits`)
ModelFn = Callable[[Tensor, Tensor], object]


@dataclass(frozen=True)
class StepInfo:
    """What one denoising step did; passed to `generate(callback=...)` for progress or streaming."""

    step: int  # global step index, 0-based
    block: int  # block index, 0-based
    block_step: int  # step index inside the block
    committed: Tensor  # [B, L] bool: positions the commit rule unmasked at this step
    tokens: Tensor  # [B, L] int64: a copy of the canvas after this step (EOS fills included)
    finished: Tensor  # [B] bool: rows stopped at EOS (only with stop_at_eos)

    def committed_positions(self) -> list[Tensor]:
        """Per row, the canvas positions committed at this step (int64, ascending)."""
        return [row.nonzero().squeeze(1) for row in self.committed]


@dataclass(frozen=True)
class GenerationResult:
    """Output of `generate`."""

    tokens: Tensor  # [B, P + G] int64: prompt followed by the generated tokens
    prompt_length: int
    num_forwards: int  # model calls made
    num_blocks: int
    steps_per_block: int
    stopped_early: bool  # True when stop_at_eos ended the loop before the last scheduled step

    @property
    def generated(self) -> Tensor:
        """[B, G] int64: the generated part of `tokens`."""
        return self.tokens[:, self.prompt_length :]


@dataclass(frozen=True)
class _Plan:
    prompt_length: int
    block_length: int
    num_blocks: int
    steps_per_block: int

    @property
    def num_steps(self) -> int:
        return self.num_blocks * self.steps_per_block

    def block_span(self, block: int) -> tuple[int, int]:
        start = self.prompt_length + block * self.block_length
        return start, start + self.block_length


# ----------------------------------------------------------------------------- strategy parts


def commit_schedule(num_masked_B: Tensor, steps: int) -> Tensor:
    """[B, S] int64 tokens to commit at each of `steps` steps: the masked count n of each row spread
    as n // S per step, plus one more for the first n % S steps (LLaDA's front-loaded split)."""
    base_B = num_masked_B // steps
    remainder_B = num_masked_B % steps
    extra_BS = torch.arange(steps, device=num_masked_B.device)[None, :] < remainder_B[:, None]
    return base_B[:, None] + extra_BS.long()


def propose_tokens(
    logits_BWV: Tensor, *, temperature: float, mask_id: int, generator: torch.Generator | None = None
) -> Tensor:
    """[B, W] int64 proposal x̂ per position: argmax at temperature 0, else a Gumbel-max draw from
    softmax(logits / T), i.e. argmax(logits / T + g) with g ~ Gumbel(0, 1).

    The mask token is never proposed (its logit is set to −inf), so a committed position is always
    unmasked; LLaDA leaves this to the model, which should give the mask ~0 probability anyway."""
    scores_BWV = logits_BWV
    if temperature > 0:
        # float64 throughout: −log(−log u) from fp32/bf16 u is coarse in the tails, which biases
        # the draw (LLaDA notes low-precision Gumbel-max hurts generation quality).
        u_BWV = torch.rand(scores_BWV.shape, dtype=torch.float64, device=scores_BWV.device, generator=generator)
        scores_BWV = scores_BWV.double() / temperature - torch.log(-torch.log(u_BWV))  # u = 0 gives −inf
    if 0 <= mask_id < scores_BWV.shape[-1]:
        scores_BWV = scores_BWV.index_fill(-1, torch.tensor([mask_id], device=scores_BWV.device), float("-inf"))
    return scores_BWV.argmax(dim=-1)


def low_confidence(logits_BWV: Tensor, tokens_BW: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[B, W] float32 p(x̂) under softmax(logits): noise- and temperature-free, as LLaDA.

    Upcast to fp32 because bf16 probabilities tie often and the ranking is what matters."""
    logits_BWV = logits_BWV.float()
    chosen_BW = logits_BWV.gather(-1, tokens_BW.unsqueeze(-1)).squeeze(-1)
    return (chosen_BW - logits_BWV.logsumexp(dim=-1)).exp()


def random_confidence(logits_BWV: Tensor, tokens_BW: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[B, W] float32 uniform noise: commit masked positions in random order (LLaDA 'random')."""
    return torch.rand(tokens_BW.shape, device=tokens_BW.device, generator=generator)


# remasking name -> confidence(logits [B, W, V], proposals [B, W], generator) -> [B, W] float
REMASKING_RULES: dict[str, Callable[[Tensor, Tensor, torch.Generator | None], Tensor]] = {
    "low_confidence": low_confidence,
    "random": random_confidence,
}


def select_commits(confidence_BW: Tensor, candidates_BW: Tensor, quota_B: Tensor) -> Tensor:
    """[B, W] bool: per row, the `quota_B[b]` most confident candidate positions (fewer if the row
    has fewer candidates). Non-candidates rank at −inf; ties go to the leftmost position."""
    score_BW = confidence_BW.masked_fill(~candidates_BW, float("-inf"))
    order_BW = score_BW.argsort(dim=1, descending=True, stable=True)
    positions_BW = torch.arange(score_BW.shape[1], device=score_BW.device).expand_as(order_BW)
    rank_BW = torch.empty_like(order_BW).scatter_(1, order_BW, positions_BW)
    return (rank_BW < quota_B[:, None]) & candidates_BW


def finished_at_eos(x_BL: Tensor, prompt_length: int, *, mask_id: int, eos_id: int) -> Tensor:
    """[B] bool: rows whose generated part holds an EOS with no mask before the first one.

    Such a row cannot change up to its first EOS any more, so the rest may be filled with EOS."""
    generated_BG = x_BL[:, prompt_length:]
    is_eos_BG = generated_BG == eos_id
    first_eos_B = is_eos_BG.int().argmax(dim=1)  # first True; 0 for rows without EOS (masked below)
    before_BG = torch.arange(generated_BG.shape[1], device=x_BL.device)[None, :] < first_eos_B[:, None]
    masked_before_B = ((generated_BG == mask_id) & before_BG).any(dim=1)
    return is_eos_BG.any(dim=1) & ~masked_before_B


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def generate(
    model: ModelFn,
    prompt_ids: Tensor,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> GenerationResult:
    """Generate `gen_length` tokens after each prompt row by LLaDA semi-autoregressive remasking.

    model: callable `model(x [B, L] int64, mask_ratio [B] float32)` returning logits [B, L, V]
        (or an object with `.logits`, e.g. `DlmoeTransformer`'s output). mask_ratio is the
        fraction of mask tokens in each full row of x, the timestep MoE routers see. Put the
        model in eval mode; rows must not interact for batch results to equal single-row ones.
    prompt_ids: [B, P] integer, B >= 1, no mask token. P = 0 (unconditional) is allowed.
    gen_length, block_length: gen_length must be a multiple of block_length; blocks are
        denoised left to right.
    steps: total forwards, split evenly over the blocks (a multiple of the number of blocks),
        at most gen_length so every step commits at least one token (no clamping, unlike LLaDA2).
    temperature: 0 is greedy; > 0 samples each proposal by float64 Gumbel-max from
        softmax(logits / T). Confidence always uses the untempered logits.
    remasking: "low_confidence" commits the most probable proposals first, "random" a random
        subset. Random draws per step: Gumbel noise (T > 0), then random confidence.
    stop_at_eos: needs eos_id. A row is finished once it holds an EOS in its generated part and
        no mask precedes the first one; its remaining masks (all after that EOS) are then filled
        with eos_id and it commits nothing more. Tokens committed after the EOS before that
        moment are kept (trim at the first EOS). The loop ends once every row is finished, so a
        row's result does not depend on the other rows of the batch.
    generator: random source for Gumbel noise and random remasking, on the logits' device.
    callback: called after every step with a `StepInfo`.
    """
    plan = _make_plan(prompt_ids, gen_length, block_length, steps, temperature, remasking, mask_id)
    _check_options(eos_id, stop_at_eos, mask_id, generator, callback)
    batch = prompt_ids.shape[0]
    x_BL = torch.cat([prompt_ids.long(), prompt_ids.new_full((batch, gen_length), mask_id).long()], dim=1)
    finished_B = torch.zeros(batch, dtype=torch.bool, device=x_BL.device)
    confidence_fn = REMASKING_RULES[remasking]
    num_forwards = 0
    for step in range(plan.num_steps):
        block, block_step = divmod(step, plan.steps_per_block)
        start, end = plan.block_span(block)
        if block_step == 0:  # quotas are counted from the canvas, per row, when the block opens
            quota_BS = commit_schedule((x_BL[:, start:end] == mask_id).sum(dim=1), plan.steps_per_block)
        # 1. forward, keeping only the current block: positions outside it are never committed
        logits_BWV = _window_logits(model, x_BL, mask_id, start, end)
        num_forwards += 1
        # 2. propose a token and score it at every position of the block
        tokens_BW = propose_tokens(logits_BWV, temperature=temperature, mask_id=mask_id, generator=generator)
        confidence_BW = confidence_fn(logits_BWV, tokens_BW, generator)
        # 3. commit the most confident masked positions, quota per row
        window_BW = x_BL[:, start:end]
        commit_BW = select_commits(confidence_BW, window_BW == mask_id, quota_BS[:, block_step])
        x_BL[:, start:end] = torch.where(commit_BW, tokens_BW, window_BW)
        # 4. freeze rows that reached EOS: fill their masks, so they have nothing left to commit
        if stop_at_eos:
            finished_B |= finished_at_eos(x_BL, plan.prompt_length, mask_id=mask_id, eos_id=eos_id)
            x_BL.masked_fill_(finished_B[:, None] & (x_BL == mask_id), eos_id)
        if callback is not None:
            committed_BL = torch.zeros_like(x_BL, dtype=torch.bool)
            committed_BL[:, start:end] = commit_BW
            callback(StepInfo(step, block, block_step, committed_BL, x_BL.clone(), finished_B.clone()))
        if stop_at_eos and bool(finished_B.all()):
            break
    stopped_early = step + 1 < plan.num_steps
    return GenerationResult(
        x_BL, plan.prompt_length, num_forwards, plan.num_blocks, plan.steps_per_block, stopped_early
    )


def _window_logits(model: ModelFn, x_BL: Tensor, mask_id: int, start: int, end: int) -> Tensor:
    """[B, W, V] logits of positions start:end from one full forward over the canvas."""
    mask_ratio_B = (x_BL == mask_id).float().mean(dim=1)
    output = model(x_BL, mask_ratio_B)
    logits = getattr(output, "logits", output)
    batch, length = x_BL.shape
    if not isinstance(logits, Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != (batch, length):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape [B={batch}, L={length}, V], got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"model must return floating-point logits, got dtype {logits.dtype}")
    return logits[:, start:end]


# ----------------------------------------------------------------------------- validation


def _make_plan(
    prompt_ids: Tensor,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float,
    remasking: str,
    mask_id: int,
) -> _Plan:
    check_int("gen_length", gen_length, low=1)
    check_int("block_length", block_length, low=1)
    check_int("steps", steps, low=1, high=gen_length)  # > gen_length would leave steps with nothing to commit
    check_float("temperature", temperature, low=0.0)
    check_choice("remasking", remasking, REMASKING_RULES)
    check_int("mask_id", mask_id, low=0)
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps={steps} must be a multiple of the number of blocks "
            f"(gen_length // block_length = {gen_length} // {block_length} = {num_blocks})"
        )
    _check_prompt(prompt_ids, mask_id)
    return _Plan(prompt_ids.shape[1], block_length, num_blocks, steps // num_blocks)


def _check_prompt(prompt_ids: Tensor, mask_id: int) -> None:
    check_tensor("prompt_ids", prompt_ids, ndim=2, floating=False)
    if prompt_ids.shape[0] < 1:
        raise ValueError(f"prompt_ids must have at least one row, got shape {tuple(prompt_ids.shape)}")
    masked = (prompt_ids == mask_id).nonzero()
    if len(masked):
        row, col = masked[0].tolist()
        raise ValueError(f"prompt_ids must not contain mask_id={mask_id}, found at row {row}, position {col}")


def _check_options(eos_id: int | None, stop_at_eos: bool, mask_id: int, generator: object, callback: object) -> None:
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
