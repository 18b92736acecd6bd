"""Monte-Carlo ELBO log-likelihood of a continuation given a prompt (LLaDA `get_log_likelihood`).

For a prompt p and an answer a of A tokens the masked-diffusion ELBO is

    log p(a | p) ≥ −E_{l ~ U{1..A}} E_{S ⊂ a, |S| = l} [ (A / l) Σ_{i ∈ S} CE(a_i | p, a with S masked) ]

The prompt is never masked. The expectation equals the continuous-time ELBO over t ~ U(0, 1)
(both are Σ_l h(l), h(l) the mean CE of a masked token when l of the A are masked); this form
masks exactly l tokens, so no draw is wasted on an empty mask.

Each pair gets `mc_num` samples with l stratified as in LLaDA: one k ~ U{1..A}, then
l_i = ((k + round(i·A/N) − 1) mod A) + 1 for i < N (every l_i uniform on 1..A; rounding ties go up,
see `stratified_mask_counts`), and a uniformly random subset of exactly l_i answer positions.
Block-causal models are block-autoregressive: each attention block of the answer gets its own
stratified count and is scored given clean earlier blocks (two-stream forward, `draw_masks`).

A pair's noise comes from a generator seeded by (seed, prompt ids, answer ids) alone, so its
estimate does not depend on the other pairs of the call, their order or the batch size (up to
float rounding; expert-choice routing over a batch pool shares experts across rows, so there the
batch does matter). Rows (pair × sample) of different lengths share forward batches, right-padded
with an attention mask; a prompt longer than the model allows loses its oldest tokens (as in
lm-eval).

Letters: N samples per pair, A answer tokens, R rows of a forward batch, L row length, M scored
positions of a batch, V vocab.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dlmoe._checks import check_int
from dlmoe.sampling.denoiser import unwrap_model

Pair = tuple[Sequence[int], Sequence[int]]  # (prompt ids, answer ids)


@dataclass(frozen=True)
class LikelihoodEstimate:
    """MC-ELBO of one (prompt, answer) pair: a lower bound on log p(answer | prompt), in nats."""

    log_likelihood: float  # −mean over samples of (A / l) Σ_masked CE (per block for block-causal models)
    std_error: float  # of that mean, from the samples as if independent (stratified: an over-estimate)
    num_tokens: int  # A, the scored answer tokens
    num_samples: int


def stratified_mask_counts(answer_length: int, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """[N] int64 numbers of answer tokens to mask: LLaDA's stratified draw, each marginally U{1..A}.

    One k ~ U{1..A}; l_i = ((k + round(i·A/N) − 1) mod A) + 1, i.e. LLaDA's round(k + i·A/N) with
    the offset rounded half up, independently of k: every l_i is k plus a constant mod A, hence
    uniform, and with N a multiple of A every count appears exactly N/A times. (LLaDA's torch.round
    rounds ties to even, so where i·A/N is a half-integer — A = 2, 4 or 8 with 16 rows — row i only
    takes every other count and the estimate is biased.)"""
    check_int("answer_length", answer_length, low=1)
    check_int("num_samples", num_samples, low=1)
    k = torch.randint(1, answer_length + 1, (), generator=generator)
    index = torch.arange(num_samples)
    offsets = (2 * index * answer_length + num_samples) // (2 * num_samples)  # round(i·A/N), ties up, exact
    return (k + offsets - 1) % answer_length + 1


def random_masks(counts_N: Tensor, answer_length: int, generator: torch.Generator | None = None) -> Tensor:
    """[N, A] bool: row i masks a uniformly random subset of exactly counts_N[i] positions."""
    ranks_NA = torch.rand(counts_N.shape[0], answer_length, generator=generator).argsort(1).argsort(1)
    return ranks_NA < counts_N[:, None]


def pair_generator(seed: int, prompt: Sequence[int], answer: Sequence[int]) -> torch.Generator:
    """A CPU generator seeded by (seed, prompt, answer) only: a pair's noise ignores its neighbours."""
    digest = hashlib.blake2b(repr((seed, list(prompt), list(answer))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@torch.no_grad()
def mc_log_likelihood(
    model: object,
    pairs: Sequence[Pair],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> list[LikelihoodEstimate]:
    """MC-ELBO of each answer given its prompt (token ids; the prompt may be empty, the answer not).

    model: a `DiffusionTransformer` or `DlmoeForDiffusionLM` (run in eval mode, restored after).
    mc_num: samples per pair (LLaDA uses 128). batch_size: rows per forward, across pairs.
    """
    transformer = diffusion_transformer(model)
    check_int("mc_num", mc_num, low=1)
    check_int("batch_size", batch_size, low=1)
    check_int("seed", seed)
    pairs = _fit_pairs(transformer, pairs)
    config = transformer.config
    block_size = config.attention_block_size if config.block_causal else None
    losses = [torch.zeros(mc_num, dtype=torch.float64) for _ in pairs]

    def row_groups() -> Iterator[_Rows]:
        for index in _longest_first(pairs):
            prompt, answer = pairs[index]
            generator = pair_generator(seed, prompt, answer)
            yield _Rows(index, 0, *draw_masks(len(prompt), len(answer), mc_num, generator, block_size))

    for rows, loss_n, _ in _score_rows(transformer, pairs, row_groups(), batch_size, len(pairs) * mc_num, progress):
        losses[rows.pair][rows.start : rows.start + rows.size] = loss_n
    estimates = []
    for (_, answer), loss_N in zip(pairs, losses, strict=True):
        std = float(loss_N.std()) / mc_num**0.5 if mc_num > 1 else float("nan")
        estimates.append(LikelihoodEstimate(-float(loss_N.mean()), std, len(answer), mc_num))
    return estimates


def draw_masks(
    prompt_length: int,
    answer_length: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """([N, A] bool masks, [N, A] float64 weights) of N samples over the answer.

    Bidirectional models (block_size None): one stratified count l per sample over the whole
    answer, weight A / l. Block-causal models are block-autoregressive, log p(a | p) = Σ_b
    log p(a_b | p, a_<b), so each attention block b of the answer (columns // block_size) gets its
    own stratified count l_b and weight A_b / l_b, and is scored against clean earlier blocks."""
    spans = [(0, answer_length)]
    if block_size is not None:
        blocks_A = (torch.arange(answer_length) + prompt_length) // block_size
        edges = [0, *((blocks_A[1:] != blocks_A[:-1]).nonzero().squeeze(1) + 1).tolist(), answer_length]
        spans = list(itertools.pairwise(edges))
    masked_NA = torch.zeros(num_samples, answer_length, dtype=torch.bool)
    weight_NA = torch.zeros(num_samples, answer_length, dtype=torch.float64)
    for start, end in spans:
        counts_N = stratified_mask_counts(end - start, num_samples, generator)
        masked_NA[:, start:end] = random_masks(counts_N, end - start, generator)
        weight_NA[:, start:end] = ((end - start) / counts_N.double())[:, None]
    return masked_NA, weight_NA


@torch.no_grad()
def greedy_matches(model: object, pairs: Sequence[Pair], *, batch_size: int = 32, progress: bool = False) -> list[bool]:
    """Per pair: with every answer token masked, does one forward's argmax reproduce the whole answer?

    The cheap single-step form of lm-eval's `is_greedy` (LLaDA unmasks one token per forward instead;
    a block-causal model sees clean earlier answer blocks)."""
    transformer = diffusion_transformer(model)
    check_int("batch_size", batch_size, low=1)
    pairs = _fit_pairs(transformer, pairs)
    groups = (_Rows(i, 0, *_all_masked(len(pairs[i][1]))) for i in _longest_first(pairs))
    hits = [False] * len(pairs)
    for rows, _, hit_n in _score_rows(transformer, pairs, groups, batch_size, len(pairs), progress):
        hits[rows.pair] = bool(hit_n[0])
    return hits


def _all_masked(answer_length: int) -> tuple[Tensor, Tensor]:
    return torch.ones(1, answer_length, dtype=torch.bool), torch.ones(1, answer_length, dtype=torch.float64)


# ----------------------------------------------------------------------------- rows and batches


@dataclass(frozen=True)
class _Rows:
    """Rows start .. start + n of one pair: the answer with masked_nA[i] masked, after the prompt;
    a row's loss is Σ over its masked positions of weight_nA · CE."""

    pair: int
    start: int
    masked_nA: Tensor  # [n, A] bool
    weight_nA: Tensor  # [n, A] float64

    @property
    def size(self) -> int:
        return self.masked_nA.shape[0]

    def split(self, size: int) -> tuple[_Rows, _Rows]:
        head = _Rows(self.pair, self.start, self.masked_nA[:size], self.weight_nA[:size])
        tail = _Rows(self.pair, self.start + head.size, self.masked_nA[head.size :], self.weight_nA[head.size :])
        return head, tail


def _score_rows(
    transformer: nn.Module, pairs: list[Pair], groups: Iterator[_Rows], batch_size: int, total: int, progress: bool
) -> Iterator[tuple[_Rows, Tensor, Tensor]]:
    """Forward the rows `batch_size` at a time (a pair's rows may span batches); yield each piece with
    its rows' weighted masked CE [n] float64 and whether argmax hit every masked token [n] bool."""
    with eval_mode(transformer), tqdm(total=total, disable=not progress, desc="likelihood", unit="row") as bar:
        batch: list[_Rows] = []
        room = batch_size
        for rows in groups:
            while rows.size:
                piece, rows = rows.split(room)
                batch.append(piece)
                room -= piece.size
                if room == 0:
                    yield from _score_batch(transformer, pairs, batch)
                    bar.update(batch_size)
                    batch, room = [], batch_size
        if batch:
            yield from _score_batch(transformer, pairs, batch)
            bar.update(batch_size - room)


def _score_batch(
    transformer: nn.Module, pairs: list[Pair], batch: list[_Rows]
) -> Iterator[tuple[_Rows, Tensor, Tensor]]:
    mask_id = transformer.config.mask_id
    device = next(transformer.parameters()).device
    noisy, clean, rows_M, positions_M, targets_M, weights_M = [], [], [], [], [], []
    offset = 0
    for rows in batch:
        prompt, answer = pairs[rows.pair]
        clean_nL = torch.as_tensor([*prompt, *answer], dtype=torch.long).expand(rows.size, -1)
        noisy_nL = clean_nL.clone()
        noisy_nL[:, len(prompt) :] = noisy_nL[:, len(prompt) :].masked_fill(rows.masked_nA, mask_id)
        noisy.append(noisy_nL)
        clean.append(clean_nL)
        row_m, position_m = rows.masked_nA.nonzero(as_tuple=True)
        rows_M.append(row_m + offset)
        positions_M.append(position_m + len(prompt))
        targets_M.append(torch.as_tensor(answer, dtype=torch.long)[position_m])
        weights_M.append(rows.weight_nA[row_m, position_m])
        offset += rows.size
    two_streams = transformer.config.block_causal
    logits_RLV = padded_logits(transformer, noisy, clean if two_streams else None)
    rows_M, positions_M, targets_M = (torch.cat(t).to(device) for t in (rows_M, positions_M, targets_M))
    logits_MV = logits_RLV[rows_M, positions_M].float()
    ce_M = F.cross_entropy(logits_MV, targets_M, reduction="none").double() * torch.cat(weights_M).to(device)
    misses_M = (logits_MV.argmax(-1) != targets_M).long()
    loss_R = torch.zeros(offset, dtype=torch.float64, device=device).index_add_(0, rows_M, ce_M).cpu()
    misses_R = torch.zeros(offset, dtype=torch.long, device=device).index_add_(0, rows_M, misses_M).cpu()
    offset = 0
    for rows in batch:
        yield rows, loss_R[offset : offset + rows.size], misses_R[offset : offset + rows.size] == 0
        offset += rows.size


def padded_logits(transformer: nn.Module, rows: list[Tensor], clean_rows: list[Tensor] | None = None) -> Tensor:
    """[R, L, V] logits of row groups [n_i, L_i] (int64) of any lengths, right-padded and masked out
    of attention (positions count real tokens, so a row's logits do not depend on the padding).
    `clean_rows` (x_0 of each row): the two-stream forward of block-causal models."""
    config = transformer.config
    pad_id = next((i for i in (config.pad_id, config.eos_id) if i is not None), 0)
    length = max(group.shape[1] for group in rows)

    def padded(groups: list[Tensor]) -> Tensor:
        return torch.cat([F.pad(group, (0, length - group.shape[1]), value=pad_id) for group in groups])

    valid_RL = torch.cat([torch.arange(length).expand(group.shape[0], -1) < group.shape[1] for group in rows])
    device = next(transformer.parameters()).device
    attention = None if bool(valid_RL.all()) else valid_RL.to(device)
    extra = {} if clean_rows is None else {"clean_input_ids": padded(clean_rows).to(device)}
    return transformer(padded(rows).to(device), attention_mask=attention, **extra).logits


def _longest_first(pairs: list[Pair]) -> list[int]:
    """Pair order that keeps rows of similar length together (less padding); results are per pair."""
    return sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))


# ----------------------------------------------------------------------------- checks


def diffusion_transformer(model: object) -> nn.Module:
    """The `DiffusionTransformer` inside `model`; a ValueError for anything else."""
    transformer = unwrap_model(model)
    if transformer is None:
        raise ValueError(f"model must be a DiffusionTransformer or DlmoeForDiffusionLM, got {type(model).__name__}")
    return transformer


def _fit_pairs(transformer: nn.Module, pairs: Sequence[Pair]) -> list[Pair]:
    """Validated (prompt, answer) id lists; prompts cut from the left to fit `max_seq_len`."""
    config = transformer.config
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"pairs must be a non-empty sequence of (prompt_ids, answer_ids), got {type(pairs).__name__}")
    fitted = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"pairs[{index}] must be a (prompt_ids, answer_ids) pair, got {pair!r}")
        prompt, answer = (_ids(f"pairs[{index}][{j}]", part, config) for j, part in enumerate(pair))
        if not answer:
            raise ValueError(f"pairs[{index}] has an empty answer; at least one answer token is needed")
        if len(answer) > config.max_seq_len:
            raise ValueError(
                f"pairs[{index}] answer has {len(answer)} tokens, more than model.max_seq_len={config.max_seq_len}"
            )
        overflow = len(prompt) + len(answer) - config.max_seq_len
        fitted.append((prompt[overflow:] if overflow > 0 else prompt, answer))
    return fitted


def _ids(name: str, value: object, config: object) -> list[int]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of token ids, got {type(value).__name__}")
    ids = list(value)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < config.vocab_size]
    if bad:
        raise ValueError(f"{name} holds ids outside [0, {config.vocab_size}) or non-ints: {bad[:5]}")
    if config.mask_id in ids:
        raise ValueError(f"{name} must not contain mask_id={config.mask_id} (it is the noise, not text)")
    return ids


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the scoring (training mode would add router losses and count expert loads)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
