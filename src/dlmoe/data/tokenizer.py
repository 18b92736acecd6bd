"""Byte-level BPE tokenizer trained on a corpus, stored as a `transformers` tokenizer directory.

Byte level means every string encodes (no unknown token) and decode(encode(text)) == text. The
three special tokens take ids 0, 1, 2 in the order of `SPECIAL_TOKENS`:
  <|mask|>       the absorbing state of masked diffusion (what noised positions become)
  <|endoftext|>  eos: separates documents when they are packed into fixed-length sequences
  <|pad|>        fills ragged batches at evaluation / sampling time
Training is deterministic: the same documents in the same order give the same vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dlmoe._checks import check_int

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (MASK_TOKEN, EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet must fit, or some text cannot be encoded

DocumentEncoder = Callable[[list[str]], list[list[int]]]


def train_tokenizer(documents: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with at most `vocab_size` tokens (specials included).

    The result may be smaller than `vocab_size` when the corpus runs out of pairs seen at least
    `min_frequency` times. Save it with `tokenizer.save_pretrained(directory)`.
    """
    check_int("vocab_size", vocab_size, low=MIN_VOCAB_SIZE)
    check_int("min_frequency", min_frequency, low=1)
    backend = Tokenizer(models.BPE())
    # No prefix space: a document's first word would otherwise decode with a space it never had.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        mask_token=MASK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # The default clean-up rewrites " ." to "." on decode, which breaks the exact round trip.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `save_pretrained` from a local directory (never the hub)."""
    directory = Path(directory).expanduser()
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"directory must hold a saved tokenizer (tokenizer.json), got {str(directory)!r}")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # a damaged file: tokenizers / json raise several exception types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"tokenizer {str(directory)!r} cannot be read ({first_line}): its files are damaged; restore them, "
            "or in a run folder start over with --overwrite (a run's copy is also in <run_dir>/model)"
        ) from None
    special_ids(tokenizer)  # fail at load time, not at the first masked batch
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int, int]:
    """(mask_id, eos_id, pad_id); a ValueError names any special token the tokenizer lacks."""
    ids = (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    missing = [name for name, i in zip(("mask_token", "eos_token", "pad_token"), ids, strict=True) if i is None]
    if missing:
        raise ValueError(f"tokenizer must define mask_token, eos_token and pad_token; missing {missing}")
    if ids[0] in ids[1:]:  # pad may equal eos (LLaDA2's tokenizer); the mask must be its own token
        raise ValueError(f"tokenizer mask id must differ from the eos and pad ids, got mask/eos/pad = {ids}")
    return ids  # type: ignore[return-value]


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """Hex digest of the full tokenizer definition (vocab, merges, specials, normalization).

    Equal before `save_pretrained` and after `load_tokenizer`, so token caches survive a reload.
    """
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def document_encoder(tokenizer: PreTrainedTokenizerFast) -> DocumentEncoder:
    """A function that encodes a batch of documents to token ids, in parallel and without specials.

    Special-token strings that occur in the text itself (a document quoting "<|endoftext|>") are
    encoded as ordinary bytes: only packing may insert the real eos, so document boundaries in the
    token stream are exactly the boundaries between documents. Works on a private copy, so the
    caller's tokenizer is not changed.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True

    def encode(documents: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in backend.encode_batch(documents, add_special_tokens=False)]

    return encode
