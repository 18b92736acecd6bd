"""Helpers shared by the checkpoint formats: config reading with clear errors, special token ids."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dlmoe.model.convert.files import CheckpointError

MASK_TOKEN = "<|mask|>"


def require(config: dict[str, Any], keys: Iterable[str]) -> None:
    missing = [key for key in keys if config.get(key) is None]
    if missing:
        raise CheckpointError(f"config.json lacks {missing} (these must be read from the checkpoint, not assumed)")


def config_int(config: dict[str, Any], key: str, *, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"config.json: {key} must be a non-negative integer, got {value!r}")
    return value


def leading_dense_layers(pattern: Any, num_layers: int, key: str) -> int:
    """Number of dense layers before the first MoE layer; dense layers elsewhere are not supported."""
    if not isinstance(pattern, list) or len(pattern) != num_layers or any(v not in (0, 1) for v in pattern):
        raise CheckpointError(f"config.json: {key} must list 0 (dense) or 1 (MoE) for each of the {num_layers} layers")
    first = pattern.index(1) if 1 in pattern else num_layers
    if any(v == 0 for v in pattern[first:]):
        raise CheckpointError(
            f"config.json: {key}={pattern} puts a dense layer after an MoE layer; dlmoe supports dense layers "
            "only before the first MoE layer"
        )
    return first


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def special_ids(
    config: dict[str, Any], folder: Path, mask_id: int | None, *, eos_is_pad: bool = False
) -> tuple[int, int | None, int | None]:
    """(mask, eos, pad) ids: mask from the argument, config.json's `mask_token_id`, or the folder's
    tokenizer (`<|mask|>`, LLaDA's mask token); eos / pad from config.json. `eos_is_pad`: without an
    `eos_token_id`, eos is the pad id (LLaDA2's config lists only pad_token_id = its eos)."""
    eos, pad = _first_id(config.get("eos_token_id")), _first_id(config.get("pad_token_id"))
    if eos is None and eos_is_pad:
        eos = pad
    if mask_id is None:
        mask_id = _first_id(config.get("mask_token_id"))
    if mask_id is None:
        mask_id = _tokenizer_token_id(folder, MASK_TOKEN)
    if mask_id is None:
        raise CheckpointError(
            f"the mask token id of {folder} is unknown: config.json has no mask_token_id and no tokenizer.json "
            f"defines {MASK_TOKEN!r}; pass it (mask_id=..., `dlmoe convert --mask-id`)"
        )
    return mask_id, eos, pad


def _tokenizer_token_id(folder: Path, token: str) -> int | None:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        added = json.loads(path.read_text()).get("added_tokens", [])
    except (OSError, ValueError):
        return None
    return next((t.get("id") for t in added if isinstance(t, dict) and t.get("content") == token), None)


__all__ = ["CheckpointError", "config_int", "leading_dense_layers", "require", "special_ids"]
