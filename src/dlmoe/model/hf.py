"""Hugging Face integration: `DlmoeConfig` (PretrainedConfig) and `DlmoeForDiffusionLM` (PreTrainedModel).

The dataclass `ModelConfig` stays the single source of truth; `DlmoeConfig` is its serialised
form (config.json), and `to_model_config()` rebuilds — and re-validates — the dataclass.
Registered with AutoConfig / AutoModel / AutoModelForMaskedLM under model_type "dlmoe", so
`save_pretrained` / `from_pretrained` (safetensors) work with no remote code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from dlmoe.config import ModelConfig
from dlmoe.model.transformer import DiffusionTransformer, ModelOutput

_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class DlmoeConfig(PretrainedConfig):
    """config.json form of `ModelConfig` (router type, capacity schedule and all MoE knobs included).

    Field names avoid generation settings transformers treats specially (no `top_k`: routers
    use `num_experts_per_tok`).
    """

    model_type = "dlmoe"

    def __init__(self, **kwargs: Any) -> None:
        model_kwargs = {name: kwargs.pop(name) for name in list(kwargs) if name in _FIELDS}
        defaults = dataclasses.asdict(ModelConfig())
        for name, value in (defaults | model_kwargs).items():
            setattr(self, name, value)
        kwargs.setdefault("tie_word_embeddings", bool(getattr(self, "tie_embeddings", False)))
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> DlmoeConfig:
        return cls(**dataclasses.asdict(config), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in _FIELDS})


class DlmoeForDiffusionLM(PreTrainedModel):
    """A `DiffusionTransformer` as a transformers model: forward(input_ids, mask_ratio, attention_mask)."""

    config_class = DlmoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DlmoeConfig) -> None:
        super().__init__(config)
        self.model = DiffusionTransformer(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: Any) -> None:  # weights are initialised by DiffusionTransformer
        return

    def forward(
        self,
        input_ids: Tensor,
        mask_ratio: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> ModelOutput:
        """See `DiffusionTransformer.forward` (position_ids, block_ids, routing, kv_cache, ...)."""
        return self.model(input_ids, mask_ratio=mask_ratio, attention_mask=attention_mask, **kwargs)


AutoConfig.register("dlmoe", DlmoeConfig, exist_ok=True)
AutoModel.register(DlmoeConfig, DlmoeForDiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(DlmoeConfig, DlmoeForDiffusionLM, exist_ok=True)
