"""An imported checkpoint as a dlmoe run folder, so every command that takes `--run` / `--from` works.

<run_dir>/config.json     RunConfig: the imported model config, default data / train / sample
<run_dir>/model/          the model (dlmoe layout, `save_pretrained`) + the tokenizer
<run_dir>/tokenizer/      the checkpoint's tokenizer, its mask / eos / pad tokens set from the model's ids
<run_dir>/imported.json   where it came from: folder, format, the original config.json (for export)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from dlmoe.config import DataConfig, RunConfig, SampleConfig
from dlmoe.config_io import save_run_config
from dlmoe.model.convert import CheckpointError, ImportedCheckpoint
from dlmoe.model.convert.files import staged_folder

IMPORTED_FILE = "imported.json"


def write_run_folder(imported: ImportedCheckpoint, source: Path, run_dir: str | os.PathLike) -> Path:
    """Write the run folder (refused when `run_dir` exists and is not empty)."""
    run = Path(run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise CheckpointError(f"run folder {str(run)!r} exists and is not empty; choose a new one")
    with staged_folder(run) as scratch:
        _write(imported, source, run, scratch)
    return run


def _write(imported: ImportedCheckpoint, source: Path, run: Path, scratch: Path) -> None:
    model_config = imported.model.config.to_model_config()
    tokenizer = _tokenizer(source, model_config)
    gen_length = max(1, min(64, model_config.max_seq_len // 2))
    block = min(model_config.attention_block_size, gen_length)
    sample = SampleConfig(prompt="The", gen_length=gen_length, block_length=block, steps=gen_length)
    config = RunConfig(
        run_dir=str(run),
        model=model_config,
        # the data section is only used by a fine-tune (retrofit, block routing); vocab: the model's rows
        data=DataConfig(
            vocab_size=min(max(model_config.vocab_size, 260), 1 << 20), seq_len=min(256, model_config.max_seq_len)
        ),
        sample=sample,
    )
    save_run_config(config, scratch / "config.json")
    imported.model.save_pretrained(scratch / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(scratch / "model")
        tokenizer.save_pretrained(scratch / "tokenizer")
    record: dict[str, Any] = {"source": str(source), "format": imported.format, "source_config": imported.source_config}
    (scratch / IMPORTED_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _tokenizer(source: Path, model_config) -> PreTrainedTokenizerFast | None:
    """The checkpoint's tokenizer with mask / eos / pad tokens named after the model's ids (None if it has none)."""
    if not (source / "tokenizer.json").is_file():
        return None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source), local_files_only=True)
    for role, token_id in (("mask_token", model_config.mask_id), ("eos_token", model_config.eos_id)):
        if token_id is not None:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    pad = model_config.pad_id if model_config.pad_id is not None else model_config.eos_id
    if pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    return tokenizer


def imported_record(run_dir: str | os.PathLike, *, max_depth: int = 16) -> dict[str, Any] | None:
    """The import record of a run, or of the run it was fine-tuned from (`train.init_from`, followed back)."""
    run = Path(run_dir)
    for _ in range(max_depth):
        path = run / IMPORTED_FILE
        if path.is_file():
            return json.loads(path.read_text())
        try:
            source = json.loads((run / "config.json").read_text())["train"].get("init_from")
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not source:
            return None
        run = Path(source)
    return None


__all__ = ["IMPORTED_FILE", "imported_record", "write_run_folder"]
