"""Import pretrained MoE diffusion LMs (LLaDA-MoE, LLaDA2) into dlmoe, and export them back.

    imported = import_checkpoint("~/models/LLaDA2.0-mini")           # lazy: memory-mapped shards
    model = imported.model                                             # a DlmoeForDiffusionLM, eval mode
    export_checkpoint(model, "out/", format="llada2_moe", source_config=imported.source_config)

Our own code reads the checkpoint's config.json and safetensors (no remote code, no hub). The
import builds the model on the meta device and fills each tensor from the memory-mapped shards, so
RAM holds the model once. Every check that needs no weights runs first — format, config keys,
tensor names (missing and extra ones listed), shapes (the tensor and both shapes named), complete
shards — so a bad checkpoint raises `CheckpointError` before anything is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from dlmoe.model.convert import llada2_moe, llada_moe
from dlmoe.model.convert.files import CONFIG_FILE, CheckpointError, CheckpointFiles, staged_folder, write_shards
from dlmoe.model.convert.layout import RowGroup, fill_ours, split_ours
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM

FORMATS: dict[str, ModuleType] = {llada_moe.NAME: llada_moe, llada2_moe.NAME: llada2_moe}
DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass
class ImportedCheckpoint:
    model: DlmoeForDiffusionLM
    format: str
    source_config: dict[str, Any]


def detect_format(folder: str | os.PathLike) -> str:
    """The format name of a checkpoint folder, from its config.json `model_type`."""
    return _detect(CheckpointFiles.open(folder).config, Path(folder))


def _detect(config: dict[str, Any], folder: Path) -> str:
    for name, fmt in FORMATS.items():
        if fmt.is_this_format(config):
            return name
    supported = sorted({t for fmt in FORMATS.values() for t in fmt.MODEL_TYPES})
    raise CheckpointError(
        f"{folder}/config.json has model_type={config.get('model_type')!r}; supported: {supported} "
        "('llada' only for LLaDA-MoE, i.e. with num_experts)"
    )


def import_checkpoint(
    folder: str | os.PathLike, *, dtype: torch.dtype | None = None, block_size: int = 32, mask_id: int | None = None
) -> ImportedCheckpoint:
    """Load a LLaDA-MoE or LLaDA2 checkpoint folder as a dlmoe model with the same forward.

    `dtype`: convert the weights (default: the checkpoint's; its widest float dtype if it mixes).
    `block_size`: LLaDA2's attention block (its sampler's block length). `mask_id`: when neither
    config.json nor tokenizer.json says."""
    folder = Path(folder)
    with CheckpointFiles.open(folder) as files:
        name = _detect(files.config, folder)
        fmt = FORMATS[name]
        config = fmt.model_config(files.config, block_size=block_size, mask_id=mask_id, folder=folder)
        groups = fmt.layout(config)
        _check_tensors(files, groups, folder)
        with torch.device("meta"):
            model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config))
        our_shapes = {k: v.shape for k, v in model.state_dict().items()}
        weight_dtype = dtype or _checkpoint_dtype(files)
        tensors: dict[str, Tensor] = {}
        for group in groups:
            tensors |= fill_ours(group, our_shapes, files.read, weight_dtype)
    if config.tie_embeddings:
        tensors["model.lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = sorted(our_shapes.keys() - tensors.keys())
    assert not missing, f"the {name} layout does not fill {missing}"
    model.load_state_dict(tensors, strict=True, assign=True)
    _materialise_buffers(model)
    if config.tie_embeddings:
        model.tie_weights()
    return ImportedCheckpoint(model.eval(), name, files.config)


def _check_tensors(files: CheckpointFiles, groups: list[RowGroup], folder: Path) -> None:
    expected = {name: shape for group in groups for name, shape in group.theirs}
    found = {name: info.shape for name, info in files.tensors.items()}
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = [
        f"{name}: checkpoint {found[name]} vs expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    if missing or extra or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors {_listed(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors {_listed(extra)}")
        if reshaped:
            parts.append(f"shape mismatches (config.json vs weights) {_listed(reshaped)}")
        raise CheckpointError(f"checkpoint {folder} does not match its config.json: " + "; ".join(parts))


def _listed(names: list[str], limit: int = 20) -> str:
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def _checkpoint_dtype(files: CheckpointFiles) -> torch.dtype:
    floats = {info.dtype for info in files.tensors.values() if info.dtype.is_floating_point}
    if len(floats) > 1:  # e.g. fp32 norms beside bf16 matrices: keep the widest, losslessly
        return max(floats, key=lambda d: torch.finfo(d).bits)
    return floats.pop() if floats else torch.float32


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (e.g. the expert-bias counters) are not in a checkpoint: zeros on the CPU."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def export_checkpoint(
    model: DlmoeForDiffusionLM,
    out_dir: str | os.PathLike,
    *,
    format: str,
    source_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `model` in the original layout of `format` (config.json + shards + index) to an empty
    or new `out_dir`. `source_config` (an import's) is written back unchanged; without it a
    config.json is generated from the model's config."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; allowed: {sorted(FORMATS)}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    fmt = FORMATS[format]
    config = model.config.to_model_config()
    fmt.check_exportable(config)
    if source_config is not None:
        _check_source_config(fmt, source_config, config, format)
    out = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def tensors():
        for group in fmt.layout(config):
            yield from split_ours(group, state)

    hf_config = source_config if source_config is not None else fmt.hf_config(config)
    with staged_folder(out) as scratch:  # an interrupted export leaves no half-written folder
        write_shards(scratch, tensors(), max_shard_bytes)
        (scratch / CONFIG_FILE).write_text(json.dumps(_with_dtype(hf_config, state), indent=2) + "\n")
    return out


def _with_dtype(hf_config: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Any]:
    """config.json's dtype entry (`torch_dtype`, or v5's `dtype`), where it has one, set to the weights'."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        return hf_config
    name = str(dtypes.pop()).removeprefix("torch.")
    return hf_config | {k: name for k in ("torch_dtype", "dtype") if k in hf_config}


def _check_source_config(fmt: ModuleType, source: dict[str, Any], config, name: str) -> None:
    """The source config must describe this model's weights (sizes), or the export would not load."""
    try:
        described = fmt.model_config(
            source, block_size=config.attention_block_size, mask_id=config.mask_id, folder=None
        )
    except CheckpointError as error:
        raise CheckpointError(f"source_config is not a valid {name} config: {error}") from error
    shapes_ours = [g.theirs for g in fmt.layout(config)]
    shapes_source = [g.theirs for g in fmt.layout(described)]
    if shapes_ours != shapes_source:
        raise CheckpointError(f"source_config describes other weights than this model's (a different {name} size)")


__all__ = [
    "FORMATS",
    "CheckpointError",
    "ImportedCheckpoint",
    "detect_format",
    "export_checkpoint",
    "import_checkpoint",
]
