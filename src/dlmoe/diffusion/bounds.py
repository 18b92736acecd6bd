"""An ELBO in nats per token, restated as bits per byte and as a perplexity bound.

One formula each, shared by every estimator that reports them (the validation ELBO of training and
`dlmoe eval --validation`, and `eval.perplexity.text_elbo`), so their numbers stay comparable:

    bits/byte = (nats/token) / ln 2 / (bytes/token)        ppl ≤ exp(nats/token)
"""

from __future__ import annotations

import math

from dlmoe._checks import check_float

MAX_EXP_NATS = 700.0  # exp overflows a float past ~709.8: the perplexity bound is capped at exp(700)


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte of an ELBO of `nats_per_token`, for text at `bytes_per_token` bytes per token."""
    _check_number("nats_per_token", nats_per_token)
    check_float("bytes_per_token", bytes_per_token, low=0.0, low_open=True)
    return nats_per_token / math.log(2) / bytes_per_token


def perplexity_bound(nats_per_token: float) -> float:
    """exp(ELBO): an upper bound on the perplexity (an ELBO bounds the NLL from above); capped at exp(700)."""
    _check_number("nats_per_token", nats_per_token)
    return math.exp(min(nats_per_token, MAX_EXP_NATS))


def _check_number(name: str, value: object) -> None:
    # a diverged model's ELBO may be inf or NaN: reported as such, not refused
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
