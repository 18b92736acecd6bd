"""Perplexity upper bound and bits per byte of arbitrary text (a held-out file), from the MC-ELBO.

The text is encoded as one document (special-token strings in it stay plain bytes) and cut into
consecutive chunks of `seq_len` tokens (`dlmoe eval`: the run's training length), each scored
unconditionally, as training rows are: bound = Σ_chunks −ELBO(chunk) ≥ Σ_chunks −log p(chunk),
each chunk with `mc_num` stratified noise draws from a fixed seed (`likelihood.mc_log_likelihood`
with an empty prompt). This is a different estimator on purpose (any text, a standard error from
the MC draws): the validation ELBO of training and `dlmoe.inference.eval_ppl`
(`diffusion.validation_elbo`) draws t ~ U(0, 1) instead and weights by the realised mask ratio:
close to the same bound, on the run's own validation split. Both report through the same formulas
(`diffusion.bounds`), so their numbers compare:

    nats/token = bound / tokens, ppl ≤ exp(nats/token), bits/byte = (nats/token) / ln 2 / (bytes/token)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dlmoe._checks import check_int
from dlmoe.data.tokenizer import document_encoder
from dlmoe.diffusion.bounds import bits_per_byte, perplexity_bound
from dlmoe.eval.likelihood import diffusion_transformer, mc_log_likelihood


@dataclass(frozen=True)
class TextBound:
    """ELBO bound of a text under the model."""

    nelbo_nats_per_token: float
    ppl_upper_bound: float
    bits_per_byte: float
    std_error_nats_per_token: float  # chunks' standard errors combined (independent draws)
    tokens: int
    bytes: int
    chunks: int
    mc_num: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def text_elbo(
    model: object,
    tokenizer: object,
    text: str,
    *,
    seq_len: int | None = None,
    mc_num: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> TextBound:
    """Bound the negative log-likelihood of `text` (chunks of `seq_len` tokens, default max_seq_len)."""
    transformer = diffusion_transformer(model)
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    max_len = transformer.config.max_seq_len
    seq_len = max_len if seq_len is None else check_int("seq_len", seq_len, low=1, high=max_len)
    ids = document_encoder(tokenizer)([text])[0]
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    estimates = mc_log_likelihood(
        model, [([], chunk) for chunk in chunks], mc_num=mc_num, batch_size=batch_size, seed=seed, progress=progress
    )
    nll = -sum(e.log_likelihood for e in estimates)
    std = math.sqrt(sum(e.std_error**2 for e in estimates)) if mc_num > 1 else float("nan")
    num_bytes = len(text.encode("utf-8"))
    per_token = nll / len(ids)
    return TextBound(
        nelbo_nats_per_token=per_token,
        ppl_upper_bound=perplexity_bound(per_token),
        bits_per_byte=bits_per_byte(per_token, num_bytes / len(ids)),
        std_error_nats_per_token=std / len(ids),
        tokens=len(ids),
        bytes=num_bytes,
        chunks=len(chunks),
        mc_num=mc_num,
    )


def read_text_file(path: str | Path, name: str = "path") -> str:
    """A UTF-8 text file's content; a clear ValueError when it is missing, empty or not UTF-8."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{name} {str(file)!r} does not exist or is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} {str(file)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text:
        raise ValueError(f"{name} {str(file)!r} is empty")
    return text
