"""Text in, token batches out: corpora, a byte-level BPE tokenizer, packing and a token cache.

    corpus = resolve_corpus("shakespeare")             # or a file, folder, "data.jsonl:field"
    tokenizer = train_tokenizer(corpus, vocab_size=4096)
    tokenizer.save_pretrained(run_dir / "tokenizer")   # load_tokenizer(run_dir / "tokenizer")
    splits = cached_token_splits(corpus, tokenizer, cache_dir, validation_fraction=0.05)
    batches = BatchIterator(splits.train, seq_len=256, batch_size=16, seed=0)   # [B, L] int64
    mask_id, eos_id, pad_id = special_ids(tokenizer)

Everything is deterministic given the corpus files and the seeds, and nothing touches the network.
"""

from dlmoe.data.cache import TokenSplits, cached_token_splits, token_dtype
from dlmoe.data.corpus import BUNDLED_CORPORA, Corpus, python_stdlib_corpus, resolve_corpus, shakespeare_corpus
from dlmoe.data.packing import (
    BatchIterator,
    TokenSequenceDataset,
    as_sequences,
    pack_documents,
    packed_length,
    split_documents,
)
from dlmoe.data.tokenizer import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    document_encoder,
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "BUNDLED_CORPORA",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "BatchIterator",
    "Corpus",
    "TokenSequenceDataset",
    "TokenSplits",
    "as_sequences",
    "cached_token_splits",
    "document_encoder",
    "load_tokenizer",
    "pack_documents",
    "packed_length",
    "python_stdlib_corpus",
    "resolve_corpus",
    "shakespeare_corpus",
    "special_ids",
    "split_documents",
    "token_dtype",
    "tokenizer_hash",
    "train_tokenizer",
]
