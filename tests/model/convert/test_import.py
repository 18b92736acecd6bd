"""Importing LLaDA-MoE and LLaDA2.0-mini checkpoints: format detection, the imported forward equals a
step-by-step reference written from the spec, and the imported config carries the checkpoint's ids
and routing knobs.

Checkpoints are tiny random ones in the exact layouts (tiny_checkpoints.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlmoe.model.convert import FORMATS, CheckpointError, detect_format, import_checkpoint
from tests.model.convert import reference as ref
from tests.model.convert import tiny_checkpoints as tiny
from tests.model.convert.helpers import (
    LLADA2_VARIANTS,
    LLADAMOE_VARIANTS,
    assert_same_routing,
    dense_from_dispatch,
    dense_from_topk,
    token_ids,
    write,
)

# --------------------------------------------------------------------------- detection


def test_formats_registry_and_detection(tmp_path: Path) -> None:
    assert set(FORMATS) == {"lladamoe", "llada2_moe"}
    assert detect_format(write("lladamoe", tmp_path / "a")) == "lladamoe"
    assert detect_format(write("lladamoe", tmp_path / "b", model_type="llada")) == "lladamoe"  # the Hub's spelling
    assert detect_format(write("llada2_moe", tmp_path / "c")) == "llada2_moe"


def test_dense_llada_config_is_not_taken_for_llada_moe(tmp_path: Path) -> None:
    """model_type "llada" is also dense LLaDA's: without num_experts it is not LLaDA-MoE."""
    folder = write("lladamoe", tmp_path, model_type="llada")
    config = json.loads((folder / "config.json").read_text())
    del config["num_experts"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lladamoe") as error:
        detect_format(folder)
    assert "llada2_moe" in str(error.value)
    with pytest.raises(CheckpointError):
        import_checkpoint(folder)


# --------------------------------------------------------------------------- forward = reference


def check_forward(folder: Path, ids: torch.Tensor, **import_kwargs) -> None:
    """Deterministic, equal to the reference logits (1e-5, fp32), same experts and gates in every MoE layer."""
    imported = import_checkpoint(folder, **import_kwargs)
    model = imported.model
    assert not model.training
    with torch.no_grad():
        out, again = model(ids), model(ids)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, again.logits), "two forwards differ"
    want_logits, want_routing = ref.reference_forward(folder, ids, import_kwargs.get("block_size", 32))
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-5, atol=1e-5)
    assert len(out.dispatches) == len(want_routing)
    num_experts = imported.source_config["num_experts"]
    for layer, (dispatch, routing) in enumerate(zip(out.dispatches, want_routing, strict=True)):
        assert_same_routing(
            dense_from_dispatch(dispatch, num_experts), dense_from_topk(*routing, num_experts), f"MoE layer {layer}"
        )


@pytest.mark.parametrize("variant", list(LLADAMOE_VARIANTS))
def test_lladamoe_forward_matches_reference(tmp_path: Path, variant: str) -> None:
    folder = write("lladamoe", tmp_path, **LLADAMOE_VARIANTS[variant])
    check_forward(folder, token_ids())


@pytest.mark.parametrize("variant", list(LLADA2_VARIANTS))
@pytest.mark.parametrize("block_size", [32, 4])
def test_llada2_forward_matches_reference(tmp_path: Path, variant: str, block_size: int) -> None:
    folder = write("llada2_moe", tmp_path, **LLADA2_VARIANTS[variant])
    check_forward(folder, token_ids(length=40), block_size=block_size)  # 40 > 32: two blocks at the default


def test_llada2_default_block_size_is_32(tmp_path: Path) -> None:
    folder = write("llada2_moe", tmp_path)
    ids = token_ids(length=40)
    with torch.no_grad():
        default = import_checkpoint(folder).model(ids).logits
        explicit = import_checkpoint(folder, block_size=32).model(ids).logits
    assert torch.equal(default, explicit)


def test_llada2_is_block_causal_and_lladamoe_is_bidirectional(tmp_path: Path) -> None:
    ids = token_ids(1, 12)
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % tiny.EOS_ID  # a token in block 2 (block size 4)
    llada2 = import_checkpoint(write("llada2_moe", tmp_path / "b"), block_size=4).model
    lladamoe = import_checkpoint(write("lladamoe", tmp_path / "a")).model
    with torch.no_grad():
        before, after = llada2(ids).logits, llada2(changed).logits
        # blocks 0-1 do not see block 2 (equal up to GEMM rounding: experts batch other tokens)
        torch.testing.assert_close(before[:, :8], after[:, :8], rtol=1e-6, atol=1e-6)
        assert (before[:, 8:] - after[:, 8:]).abs().amax() > 0.1
        assert not torch.allclose(lladamoe(ids).logits[:, 0], lladamoe(changed).logits[:, 0])


# --------------------------------------------------------------------------- what the config carries


def test_lladamoe_config_carries_ids_and_routing(tmp_path: Path) -> None:
    folder = write("lladamoe", tmp_path, **LLADAMOE_VARIANTS["all_options"])
    imported = import_checkpoint(folder)
    _, tensors = ref.load_checkpoint(folder)
    config = imported.model.model.config
    assert imported.format == "lladamoe"
    assert imported.source_config == json.loads((folder / "config.json").read_text())
    assert (config.mask_id, config.eos_id, config.pad_id) == (tiny.MASK_ID, tiny.EOS_ID, tiny.LLADAMOE_PAD_ID)
    assert config.attention == "bidirectional"
    assert config.first_k_dense == 1 and config.dense_hidden == 24
    assert (config.num_heads, config.kv_heads, config.head_size) == (4, 2, 8)
    assert config.partial_rotary_factor == 0.5 and config.rope_theta == 50000.0 and config.norm_eps == 1e-5
    moe = config.moe
    assert moe.expert_hidden == 16 and moe.num_shared_experts == 1 and moe.shared_width == 12
    router = moe.router
    assert (router.kind, router.score, router.renormalize) == ("token_choice", "softmax", False)
    assert (router.num_experts, router.num_experts_per_tok) == (8, 3)
    assert router.expert_bias and router.n_group is None and router.routed_scaling_factor == 1.0
    for i in (1, 2):
        module = imported.model.model.layers[i].ffn.router
        assert torch.equal(module.expert_bias, tensors[f"model.layers.{i}.mlp.expert_bias"])


def test_llada2_config_carries_ids_and_routing(tmp_path: Path) -> None:
    folder = write("llada2_moe", tmp_path)
    imported = import_checkpoint(folder, block_size=8)
    _, tensors = ref.load_checkpoint(folder)
    config = imported.model.model.config
    assert imported.format == "llada2_moe"
    assert imported.source_config == json.loads((folder / "config.json").read_text())
    # config.json has only pad_token_id (= eos); the mask is the tokenizer's <|mask|>
    assert (config.mask_id, config.eos_id, config.pad_id) == (tiny.MASK_ID, tiny.EOS_ID, tiny.EOS_ID)
    assert config.attention == "block_causal" and config.attention_block_size == 8
    assert config.first_k_dense == 1 and config.dense_hidden == 24
    assert (config.num_heads, config.kv_heads, config.head_size) == (4, 2, 8)
    assert config.partial_rotary_factor == 0.5 and config.rope_theta == 600000 and config.norm_eps == 1e-6
    moe = config.moe
    assert moe.expert_hidden == 8 and moe.num_shared_experts == 1 and moe.shared_width == 8
    router = moe.router
    assert (router.kind, router.score, router.renormalize) == ("token_choice", "sigmoid", True)
    assert (router.num_experts, router.num_experts_per_tok) == (8, 2)
    assert (router.n_group, router.topk_group, router.routed_scaling_factor) == (4, 2, 2.5)
    assert router.expert_bias
    for i in (1, 2):
        module = imported.model.model.layers[i].ffn.router
        assert torch.equal(module.expert_bias, tensors[f"model.layers.{i}.mlp.gate.expert_bias"])


def test_mask_id_comes_from_the_tokenizer_or_an_argument(tmp_path: Path) -> None:
    """Neither config.json names the mask id; without tokenizer files the import asks for it."""
    folder = write("lladamoe", tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError, match="mask"):
        import_checkpoint(folder)
    assert import_checkpoint(folder, mask_id=62).model.model.config.mask_id == 62


def test_dtype_argument_converts_the_weights(tmp_path: Path) -> None:
    model = import_checkpoint(write("llada2_moe", tmp_path), dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(token_ids()).logits).all()
