"""Text → token ids for evaluation: (context, continuation) pairs split the way lm-eval splits them.

Special-token strings inside evaluated text (a question quoting "<|mask|>") stay plain bytes, as in
training data: only the evaluator inserts the real mask token.
"""

from __future__ import annotations

from collections.abc import Callable

from dlmoe.data.tokenizer import document_encoder

TextEncoder = Callable[[str], list[int]]


def text_encoder(tokenizer: object) -> TextEncoder:
    """encode(text) → ids, no specials added, special-token strings encoded as text."""
    encode_batch = document_encoder(tokenizer)
    return lambda text: encode_batch([text])[0] if text else []


def encode_pair(encode: TextEncoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), the context's trailing whitespace moved to the continuation.

    A byte-level BPE attaches a space to the word after it (" Paris"), so "… is " + "Paris" must be
    scored as "… is" + " Paris" — what lm-eval's `_encode_pair` does too."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    return encode(stripped), encode(continuation)
