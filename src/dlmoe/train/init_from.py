"""Start a run from a finished run's weights and tokenizer (fine-tuning, e.g. dMoE block routing).

`train.init_from=<run_dir>` points at a run folder written by `Trainer.fit()` (`config.json`,
`tokenizer/`, `model/`). The new run keeps the source's architecture — the keys in
`ARCHITECTURE_KEYS` decide the weights' shapes and must match — and may change everything else:
routing (block routing, top-p, guard, router kind), noise range, loss, optimisation, data.
Everything is checked before anything is written; a resumed run reads its own checkpoint and never
the source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlmoe.config import RunConfig
from dlmoe.config_io import read_saved_run_config
from dlmoe.model.convert.files import CheckpointFiles
from dlmoe.model.hf import DlmoeForDiffusionLM

TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"


def _moe(attr: str) -> Callable[[RunConfig], Any]:
    return lambda c: None if c.model.moe is None else getattr(c.model.moe, attr)


def _router(attr: str) -> Callable[[RunConfig], Any]:
    return lambda c: None if c.model.moe is None else getattr(c.model.moe.router, attr)


# config keys that change the parameters' names or shapes (vocab: the tokenizer is the source's)
ARCHITECTURE_KEYS: dict[str, Callable[[RunConfig], Any]] = {
    "data.vocab_size": lambda c: c.data.vocab_size,
    "model.dim": lambda c: c.model.dim,
    "model.num_layers": lambda c: c.model.num_layers,
    "model.num_heads": lambda c: c.model.num_heads,
    "model.num_kv_heads": lambda c: c.model.kv_heads,
    "model.head_dim": lambda c: c.model.head_size,
    "model.qk_norm": lambda c: c.model.qk_norm,
    "model.tie_embeddings": lambda c: c.model.tie_embeddings,
    "model.dense_hidden": lambda c: c.model.dense_hidden,
    "model.first_k_dense": lambda c: c.model.first_k_dense,
    "model.moe": lambda c: "null (dense)" if c.model.moe is None else "an MoE config",
    "model.moe.expert_hidden": _moe("expert_hidden"),
    "model.moe.num_shared_experts": _moe("num_shared_experts"),
    "model.moe.shared_hidden": lambda c: None if c.model.moe is None else c.model.moe.shared_width,
    "model.moe.router.num_experts": _router("num_experts"),
}
OPTIONAL_BUFFERS = ("expert_bias",)  # state a fine-tune may drop or start at zero (see `load_weights`)


class SourceRun:
    """A finished run to start from; `open()` checks that it holds a config, a tokenizer and a model."""

    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path = path
        self.config = config

    @classmethod
    def open(cls, path: str | Path, name: str = "train.init_from") -> SourceRun:
        """`name`: how the user gave the path (the config key, or the CLI's --from), for the errors."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{name}={str(path)!r} is not a run folder (no config.json there)")
        for needed in (path / MODEL_DIR / "config.json", path / TOKENIZER_DIR / "tokenizer.json"):
            if not needed.is_file():
                raise ValueError(
                    f"{name}={str(path)!r} holds no finished run: {str(needed)!r} is missing "
                    "(a run writes it when it completes)"
                )
        try:
            saved = read_saved_run_config(path / "config.json")
        except ValueError as err:
            raise ValueError(f"{name}={str(path)!r}: {err}") from None
        # the run is where it is now: a copied or moved run never points back at its old folder
        return cls(path, dataclasses.replace(saved, run_dir=str(path)))

    def check_target(self, config: RunConfig, run_dir: Path) -> None:
        """The new run must keep the architecture, write elsewhere, and not hold another tokenizer."""
        if run_dir.resolve() == self.path.resolve():
            raise ValueError(
                f"run_dir={str(run_dir)!r} is the source run train.init_from={str(self.path)!r}; starting "
                "there would overwrite it. Choose another run_dir (or --resume to continue that run)"
            )
        for key, value_of in ARCHITECTURE_KEYS.items():
            source, target = value_of(self.config), value_of(config)
            if source != target:
                raise ValueError(
                    f"{key}={target!r} differs from the source run's {key}={source!r} "
                    f"(train.init_from={str(self.path)!r}): it changes the weights' shapes; keep {source!r}"
                )
        existing = run_dir / TOKENIZER_DIR / "tokenizer.json"
        if existing.is_file() and existing.read_bytes() != (self.path / TOKENIZER_DIR / "tokenizer.json").read_bytes():
            raise ValueError(
                f"run_dir={str(run_dir)!r} already holds another run's tokenizer; a run started from "
                f"train.init_from={str(self.path)!r} uses the source's. Choose a new run_dir"
            )

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def load_weights(self, model: DlmoeForDiffusionLM) -> None:
        """Fill `model` with the source's trained parameters and persistent buffers, in place.

        `model` may live on the meta device (it is materialised on the CPU first) and may hold only
        this rank's experts (`ShardedExperts`: only their rows are read). The source's safetensors
        are memory-mapped, so RAM holds the model once. Loss-free expert biases only steer
        selection, so they may be switched off (dropped) or on (starting at zero) by a fine-tune,
        e.g. to move a biased token-choice model to expert choice. Names and shapes are checked
        before anything is copied."""
        with CheckpointFiles.open(self.path / MODEL_DIR) as files:
            target = model.state_dict()
            rows = _expert_rows(model)
            tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
            target = {k: t for k, t in target.items() if k not in tied}  # save_pretrained stores one copy
            missing = sorted(k for k in target if k not in files.tensors and not _optional(k))
            unexpected = sorted(k for k in files.tensors if k not in target and not _optional(k))
            reshaped = [
                f"{k}: saved {files.tensors[k].shape}"
                for k, t in target.items()
                if k in files.tensors and _saved_shape(files.tensors[k].shape, rows.get(k)) != tuple(t.shape)
            ]
            if missing or unexpected or reshaped:
                raise ValueError(
                    f"train.init_from={str(self.path)!r}: the saved model does not fit this architecture "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {reshaped[:3]})"
                )
            if any(t.is_meta for t in target.values()):
                model.to_empty(device="cpu")
                _zero_buffers(model)
                target = {k: t for k, t in model.state_dict().items() if k not in tied}
            with torch.no_grad():
                for name, tensor in target.items():
                    if name not in files.tensors:  # an optional buffer the source lacks: starts at zero
                        tensor.zero_()
                        continue
                    tensor.copy_(files.read(name, rows.get(name)))  # EP: only this rank's experts
            if tied:
                model.tie_weights()


def _expert_rows(model: nn.Module) -> dict[str, slice]:
    """name → the rows of the saved [E, ...] stack this model's `ShardedExperts` hold."""
    rows = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "first_expert") and hasattr(module, "num_global_experts"):  # ShardedExperts
            for param_name, _ in module.named_parameters(recurse=False):
                rows[f"{module_name}.{param_name}"] = slice(
                    module.first_expert, module.first_expert + module.num_experts
                )
    return rows


def _saved_shape(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    return tuple(shape) if rows is None else (rows.stop - rows.start, *shape[1:])


def _zero_buffers(model: nn.Module) -> None:
    """Buffers `to_empty` left uninitialised and no checkpoint holds (e.g. expert-bias counters)."""
    for buffer in model.buffers():
        buffer.zero_()


def _optional(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in OPTIONAL_BUFFERS
