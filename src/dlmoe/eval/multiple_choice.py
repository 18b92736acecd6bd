"""Multiple-choice accuracy two ways, with a Wilson 95% interval.

elbo: the MC-ELBO log-likelihood of each choice after the question, argmax over choices (also
    reported length-normalised, argmax of log-likelihood / characters of the choice, lm-eval's
    acc_norm). Prompt and continuation (lm-eval's ARC template):

        Question: {question}
        Answer:| {choice}

letter: one forward per question (the DESIGN's cheap "Answer: [MASK]" scoring). The choices are
    listed with letters and the prompt ends with one mask token; the prediction is the letter
    whose token has the largest logit there (among the question's letters):

        Question: {question}
        A. {choice 0}
        B. {choice 1}
        Answer:[MASK]

    The mask stands for " A", " B", … when the tokenizer has each as one token; otherwise the
    prompt ends with a space token and the mask stands for "A", "B", … (a byte-level BPE always
    has those). A tokenizer with neither is refused with a clear error.

A question the model cannot take (a choice longer than max_seq_len) is skipped and counted;
prompts that are too long lose their oldest tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from dlmoe._checks import check_choice, check_int
from dlmoe.eval.encoding import encode_pair, text_encoder
from dlmoe.eval.likelihood import diffusion_transformer, eval_mode, mc_log_likelihood, padded_logits
from dlmoe.eval.mcq_file import LETTERS, McqItem

METHODS = ("elbo", "letter")
Z_95 = 1.959963984540054  # standard normal quantile at 0.975


def elbo_prompt(item: McqItem) -> tuple[str, list[str]]:
    """(context, continuations) of the likelihood method."""
    return f"Question: {item.question}\nAnswer:", [f" {choice}" for choice in item.choices]


def letter_prompt(item: McqItem) -> str:
    """The letter method's prompt, without the final mask token."""
    lines = [f"Question: {item.question}"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


@dataclass(frozen=True)
class LetterTokens:
    """How the answer letter is written after "Answer:": one token per letter, after `prefix_ids`."""

    prefix_ids: list[int]  # [] for " A"-style tokens, [space id] for bare letters
    letter_ids: list[int]  # one per letter, A first
    form: str  # " A" or "A"


def letter_tokens(tokenizer: object, num_letters: int) -> LetterTokens:
    """The first `num_letters` answer letters as single tokens (" A" preferred, else " " + "A")."""
    check_int("num_letters", num_letters, low=1, high=len(LETTERS))
    encode = text_encoder(tokenizer)
    letters = LETTERS[:num_letters]
    spaced = [encode(f" {letter}") for letter in letters]
    if _distinct_single_tokens(spaced):
        return LetterTokens([], [ids[0] for ids in spaced], " A")
    space, bare = encode(" "), [encode(letter) for letter in letters]
    if len(space) == 1 and _distinct_single_tokens(bare):
        return LetterTokens(space, [ids[0] for ids in bare], "A")
    raise ValueError(
        f"letter scoring needs each of ' A'..' {letters[-1]}' (or ' ' and 'A'..'{letters[-1]}') to be a "
        f"distinct single token; this tokenizer gives {dict(zip(letters, spaced, strict=True))} — use method 'elbo'"
    )


def _distinct_single_tokens(encoded: list[list[int]]) -> bool:
    return all(len(ids) == 1 for ids in encoded) and len({ids[0] for ids in encoded}) == len(encoded)


@dataclass(frozen=True)
class McqResult:
    """Accuracy of one method on one set of questions."""

    method: str
    n: int  # questions scored
    correct: int
    accuracy: float | None  # None when nothing was scored
    ci95: tuple[float, float] | None  # Wilson score interval
    chance: float | None  # expected accuracy of a uniform guess: mean of 1 / #choices
    skipped: int  # questions the model could not take (file-level skipped lines are counted by the reader)
    accuracy_norm: float | None = None  # elbo only: argmax of log-likelihood / choice characters
    predictions: list[int] = field(default_factory=list)  # per scored question, -1 where skipped

    def as_dict(self, *, predictions: bool = False) -> dict[str, object]:
        out = asdict(self)
        if not predictions:
            del out["predictions"]
        if self.accuracy_norm is None:
            del out["accuracy_norm"]
        return out


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sensible at 0, n and small n, unlike p ± z·se)."""
    check_int("n", n, low=1)
    check_int("correct", correct, low=0, high=n)
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if correct == 0 else max(0.0, center - half)  # exact ends: float rounding would miss 0 and 1
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def mcq_elbo(
    model: object,
    tokenizer: object,
    items: Sequence[McqItem],
    *,
    mc_num: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> McqResult:
    """Accuracy of argmax over choices of the MC-ELBO log p(choice | question); all choices of all
    questions share forward batches."""
    max_len = diffusion_transformer(model).config.max_seq_len
    encode = text_encoder(tokenizer)
    pairs, owners, kept = [], [], []
    for index, item in enumerate(items):
        context, continuations = elbo_prompt(item)
        encoded = [encode_pair(encode, context, c) for c in continuations]
        if any(len(answer) > max_len for _, answer in encoded):
            continue
        kept.append(index)
        pairs += encoded
        owners += [index] * len(encoded)
    scores: dict[int, list[float]] = {i: [] for i in kept}
    if pairs:
        estimates = mc_log_likelihood(model, pairs, mc_num=mc_num, batch_size=batch_size, seed=seed, progress=progress)
        for owner, estimate in zip(owners, estimates, strict=True):
            scores[owner].append(estimate.log_likelihood)
    predictions, normalised = [-1] * len(items), []
    for index in kept:
        lengths = [len(c) for c in items[index].choices]
        predictions[index] = _argmax(scores[index])
        normalised.append(_argmax([s / n for s, n in zip(scores[index], lengths, strict=True)]))
    result = _result("elbo", items, predictions)
    norm_correct = sum(items[i].answer == p for i, p in zip(kept, normalised, strict=True))
    accuracy_norm = norm_correct / len(kept) if kept else None
    return dataclasses.replace(result, accuracy_norm=accuracy_norm)


@torch.no_grad()
def mcq_letter(
    model: object, tokenizer: object, items: Sequence[McqItem], *, batch_size: int = 16, progress: bool = False
) -> McqResult:
    """Accuracy of the single-forward letter scoring (see the module docstring for the prompt)."""
    transformer = diffusion_transformer(model)
    check_int("batch_size", batch_size, low=1)
    if not items:
        return _result("letter", items, [])
    letters = letter_tokens(tokenizer, max(len(item.choices) for item in items))
    encode, config = text_encoder(tokenizer), transformer.config
    room = config.max_seq_len - len(letters.prefix_ids) - 1
    predictions = []
    with eval_mode(transformer), tqdm(total=len(items), disable=not progress, desc="letter", unit="q") as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            prompts = [encode(letter_prompt(item)) for item in batch]
            rows = [ids[max(0, len(ids) - room) :] + letters.prefix_ids + [config.mask_id] for ids in prompts]
            logits_RLV = padded_logits(transformer, [torch.tensor([row]) for row in rows])
            for r, (item, row) in enumerate(zip(batch, rows, strict=True)):
                candidates = logits_RLV[r, len(row) - 1, letters.letter_ids[: len(item.choices)]]
                predictions.append(int(candidates.float().argmax()))
            bar.update(len(batch))
    return _result("letter", items, predictions)


def score_mcq(
    model: object,
    tokenizer: object,
    items: Sequence[McqItem],
    method: str,
    *,
    mc_num: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> McqResult:
    """`mcq_elbo` or `mcq_letter` by name."""
    check_choice("method", method, METHODS)
    if method == "elbo":
        return mcq_elbo(model, tokenizer, items, mc_num=mc_num, batch_size=batch_size, seed=seed, progress=progress)
    return mcq_letter(model, tokenizer, items, batch_size=batch_size, progress=progress)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first


def _result(method: str, items: Sequence[McqItem], predictions: list[int]) -> McqResult:
    scored = [(item, p) for item, p in zip(items, predictions, strict=True) if p >= 0]
    n = len(scored)
    correct = sum(item.answer == p for item, p in scored)
    return McqResult(
        method=method,
        n=n,
        correct=correct,
        accuracy=correct / n if n else None,
        ci95=wilson_interval(correct, n) if n else None,
        chance=sum(1 / len(item.choices) for item, _ in scored) / n if n else None,
        skipped=len(items) - n,
        predictions=list(predictions),
    )
