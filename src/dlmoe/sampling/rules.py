"""The three swappable parts of one denoising step: propose, score, commit.

1. propose: x̂ = argmax of the logits, or a float64 Gumbel-max draw at temperature > 0;
2. score:   a confidence per proposal, chosen by the remasking rule (`REMASKING_RULES`);
3. commit:  per row, the quota's most confident masked positions of the block (LLaDA), or every
            one above a threshold τ with at least the quota (Fast-dLLM parallel decoding).

Token suppression (LLaDA's `logits_eos_inf` / `confidence_eos_eot_inf`, for any ids): ids whose
logits are −inf before 1-2 are never proposed (`suppress_logits`); ids whose proposals get
confidence −inf after 2 are committed only when no other candidate is left (`suppress_commits`).

Letters: B batch, W block length (the decoding window), S steps per block, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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


def suppress_logits(logits_BWV: Tensor, token_ids_K: Tensor) -> Tensor:
    """Logits with the ids `token_ids_K` at −inf: never proposed, and left out of the softmax the
    confidence is taken from (LLaDA's `logits_eos_inf` sets the EOS logit to −inf the same way)."""
    return logits_BWV.index_fill(-1, token_ids_K, float("-inf"))


def suppress_commits(confidence_BW: Tensor, tokens_BW: Tensor, token_ids_K: Tensor) -> Tensor:
    """Confidence −inf where the proposal is one of `token_ids_K` (LLaDA's `confidence_eos_eot_inf`
    for EOS / EoT): such positions are committed only once no other candidate is left (they still
    rank above non-candidates), and never by a threshold."""
    return confidence_BW.masked_fill(torch.isin(tokens_BW, token_ids_K), float("-inf"))


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


def _rank(confidence_BW: Tensor, candidates_BW: Tensor) -> Tensor:
    """[B, W] int64 rank of each position among its row's candidates by descending confidence
    (non-candidates rank last, below candidates of confidence −inf; ties go to the leftmost position)."""
    lowest = torch.finfo(confidence_BW.dtype).min  # a candidate at −inf (`suppress_commits`) stays above −inf
    score_BW = confidence_BW.clamp_min(lowest).masked_fill(~candidates_BW, float("-inf"))
    order_BW = score_BW.argsort(dim=1, descending=True, stable=True)
    positions_BW = torch.arange(score_BW.shape[1], device=score_BW.device).expand_as(order_BW)
    return torch.empty_like(order_BW).scatter_(1, order_BW, positions_BW)


def select_commits(confidence_BW: Tensor, candidates_BW: Tensor, quota_B: Tensor) -> Tensor:
    """[B, W] bool: per row, the `quota_B[b]` most confident candidate positions (fewer if the row
    has fewer candidates). Non-candidates rank last, below any candidate; ties go to the leftmost position."""
    return (_rank(confidence_BW, candidates_BW) < quota_B[:, None]) & candidates_BW


def threshold_commits(confidence_BW: Tensor, candidates_BW: Tensor, threshold: float, min_quota_B: Tensor) -> Tensor:
    """[B, W] bool: every candidate with confidence ≥ `threshold`, and at least the `min_quota_B[b]`
    most confident ones (Fast-dLLM: τ with at least one commit per step, so a block always ends)."""
    above_BW = (confidence_BW >= threshold) & candidates_BW
    return above_BW | select_commits(confidence_BW, candidates_BW, min_quota_B)


def finished_at_eos(generated_BG: Tensor, *, mask_id: int, eos_id: int) -> Tensor:
    """[B] bool: rows whose generated part holds an EOS with no mask before the first one.

    Such a row cannot change up to its first EOS any more, so the rest may be filled with EOS."""
    is_eos_BG = generated_BG == eos_id
    first_eos_B = is_eos_BG.int().argmax(dim=1)  # first True; 0 for rows without EOS (masked below)
    before_BG = torch.arange(generated_BG.shape[1], device=generated_BG.device)[None, :] < first_eos_B[:, None]
    masked_before_B = ((generated_BG == mask_id) & before_BG).any(dim=1)
    return is_eos_BG.any(dim=1) & ~masked_before_B
