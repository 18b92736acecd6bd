"""Loading a run's model with its routed experts left on disk (`--expert-memory SIZE`).

The model is built with every parameter on the meta device (no memory: constructing a 3 GB model
first would put 3 GB in the process's peak RSS, the number offloading exists to keep down), each
MoE layer's `Experts` is replaced by an `OffloadedExperts` reading from one shared `ExpertStore`,
and only then are the remaining (dense) parameters allocated and read from the safetensors files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from dlmoe.offload.experts import OffloadedExperts
from dlmoe.offload.files import read_tensor
from dlmoe.offload.store import ExpertStore

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes from "512MiB", "2GiB", "1.5GB", "800M" or a plain int (binary units with i, decimal without)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"expert memory {text!r} is not a size: expected e.g. 512MiB, 2GiB, 1.5GB or a byte count")
        unit = (match.group(2) or "").upper().rstrip("B")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"expert memory must be a positive size, got {text!r}")
    return size


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Inside the block, every nn.Parameter registered is created on the meta device (buffers and
    plain tensors are not touched, so config-derived tables stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load_offloaded(
    model_dir: str | Path, budget: int, *, prefetch: bool = True, policy: str = "cyclic"
) -> tuple[nn.Module, ExpertStore]:
    """(the model in eval mode with offloaded routed experts, its store) from a saved model folder;
    `prefetch`: read the next layer's last experts ahead; `policy`: what the cache evicts first."""
    from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
    from dlmoe.moe.layer import MoELayer
    from dlmoe.runtime import release_large_blocks

    model_dir = Path(model_dir)
    release_large_blocks()  # evicted experts go back to the OS: the RSS follows the budget
    config = DlmoeConfig.from_pretrained(model_dir)
    with _parameters_on_meta():
        model = DlmoeForDiffusionLM(config)
    moe = {i: block.ffn for i, block in enumerate(model.model.layers) if isinstance(block.ffn, MoELayer)}
    if not moe:
        raise ValueError(f"{model_dir} is a dense model: it has no routed experts to offload")
    store = ExpertStore(model_dir, budget, sorted(moe), prefetch=prefetch, policy=policy)
    try:
        for index, layer in moe.items():
            old = layer.experts
            layer.experts = OffloadedExperts(store, index, old.num_experts, old.dim, old.hidden, old.backend)
        model.to_empty(device="cpu")
        state = {name: read_tensor(t) for name, t in store.dense_tensors().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(DlmoeForDiffusionLM._tied_weights_keys) if config.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"{model_dir} does not match its config: missing {sorted(set(missing) - tied)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )
        if tied:
            model.model.lm_head.weight = model.model.embed_tokens.weight
    except BaseException:
        store.close()
        raise
    return model.eval(), store


def expert_store_of(model: nn.Module) -> ExpertStore | None:
    """The store a model's offloaded experts read from (None for a resident model)."""
    for module in model.modules():
        if isinstance(module, OffloadedExperts):
            return module.store
    return None


__all__ = ["expert_store_of", "load_offloaded", "parse_size"]
