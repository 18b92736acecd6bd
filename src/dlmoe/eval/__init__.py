"""Evaluation: MC-ELBO likelihood (LLaDA), perplexity bounds on text, multiple-choice accuracy.

The lm-eval-harness adapter lives in `dlmoe.eval.lm_eval_adapter` and is imported only on demand
(it needs the optional `eval` extra).
"""

from dlmoe.eval.encoding import encode_pair, text_encoder
from dlmoe.eval.likelihood import (
    LikelihoodEstimate,
    greedy_matches,
    mc_log_likelihood,
    random_masks,
    stratified_mask_counts,
)
from dlmoe.eval.mcq_file import McqData, McqItem, read_mcq_jsonl
from dlmoe.eval.multiple_choice import (
    METHODS,
    LetterTokens,
    McqResult,
    elbo_prompt,
    letter_prompt,
    letter_tokens,
    mcq_elbo,
    mcq_letter,
    score_mcq,
    wilson_interval,
)
from dlmoe.eval.perplexity import TextBound, read_text_file, text_elbo

__all__ = [
    "METHODS",
    "LetterTokens",
    "LikelihoodEstimate",
    "McqData",
    "McqItem",
    "McqResult",
    "TextBound",
    "elbo_prompt",
    "encode_pair",
    "greedy_matches",
    "letter_prompt",
    "letter_tokens",
    "mc_log_likelihood",
    "mcq_elbo",
    "mcq_letter",
    "random_masks",
    "read_mcq_jsonl",
    "read_text_file",
    "score_mcq",
    "stratified_mask_counts",
    "text_elbo",
    "text_encoder",
    "wilson_interval",
]
