"""The diffusion transformer: shapes, mask-ratio plumbing, padding, GQA, dense vs MoE layers, HF round trip."""

import dataclasses
import os

import pytest
import torch
from transformers import AutoConfig, AutoModel

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model import DiffusionTransformer, DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.moe import MoELayer, SwiGLU

MASK = 63


def tiny(router: RouterConfig | None = None, **overrides) -> ModelConfig:
    router = router or RouterConfig(num_experts=4, num_experts_per_tok=2)
    moe = MoEConfig(router=router, expert_hidden=16, num_shared_experts=1)
    base = dict(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=24, dense_hidden=48, moe=moe, mask_id=MASK
    )
    return ModelConfig(**(base | overrides))


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    x = torch.randint(0, MASK, (batch, length))
    x[:, ::3] = MASK
    return x


def test_logits_shape_and_one_dispatch_per_moe_layer() -> None:
    model = DiffusionTransformer(tiny(first_k_dense=1)).eval()
    out = model(ids())
    assert out.logits.shape == (2, 12, 64)
    assert len(out.dispatches) == 1
    assert isinstance(model.layers[0].ffn, SwiGLU) and isinstance(model.layers[1].ffn, MoELayer)


def test_dense_model_has_no_routers() -> None:
    model = DiffusionTransformer(tiny(moe=None))
    out = model(ids())
    assert out.dispatches == [] and float(out.aux_loss) == 0.0


def test_mask_ratio_defaults_to_mask_fraction_and_reaches_expert_choice_capacity() -> None:
    router = RouterConfig(
        kind="expert_choice", num_experts=4, num_experts_per_tok=2, capacity_schedule="linear_reverse", k_min=1, k_max=4
    )
    model = DiffusionTransformer(tiny(router)).eval()
    x = torch.randint(0, MASK, (2, 12))
    x[0, :] = MASK  # r = 1 → k_min = 1 → C = max(12·1//4, 1) = 3
    x[1, :1] = MASK  # r = 1/12 → k = round(1 + 3·11/12) = 4 → C = 12
    out = model(x)
    assert out.dispatches[0].counts.tolist() == [15] * 4
    explicit = model(x, mask_ratio=torch.tensor([0.0, 0.0]))  # k_max for both rows: C = 12 each
    assert explicit.dispatches[0].counts.tolist() == [24] * 4


def test_bidirectional_attention_sees_the_future() -> None:
    model = DiffusionTransformer(tiny(moe=None)).eval()
    x = ids(1)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % MASK
    assert not torch.allclose(model(x).logits[0, 0], model(y).logits[0, 0])


def test_padding_mask_makes_padded_keys_invisible() -> None:
    model = DiffusionTransformer(tiny(moe=None)).eval()
    x = ids(1, 8)
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    attn = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], dim=1)
    full = model(x).logits
    masked = model(padded, mask_ratio=torch.tensor([(x == MASK).float().mean().item()]), attention_mask=attn).logits
    torch.testing.assert_close(masked[:, :8], full, rtol=1e-5, atol=1e-5)


def test_gqa_partial_rope_and_tied_embeddings_run_and_backprop() -> None:
    model = DiffusionTransformer(tiny(num_kv_heads=2, partial_rotary_factor=0.5, tie_embeddings=True, qk_norm=False))
    assert model.lm_head.weight is model.embed_tokens.weight
    out = model(ids())
    (out.logits.square().mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_too_long_input_and_bad_dtype_are_clear_errors() -> None:
    model = DiffusionTransformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 4))


@pytest.mark.parametrize(
    "router",
    [
        RouterConfig(
            kind="expert_choice", num_experts=4, num_experts_per_tok=2, capacity_schedule="cosine", k_min=1, k_max=3
        ),
        RouterConfig(num_experts=4, num_experts_per_tok=2, score="sigmoid", expert_bias=True, n_group=2, topk_group=1),
    ],
    ids=["ec-schedule", "tc-bias-groups"],
)
def test_save_pretrained_round_trip_is_exact(tmp_path, router: RouterConfig) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = tiny(router, tie_embeddings=True, num_kv_heads=2)
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config)).eval()
    for module in model.modules():  # non-trivial persistent router state must survive too
        if getattr(module, "expert_bias", None) is not None:
            module.expert_bias.normal_()
    x = ids()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dlmoe"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DlmoeForDiffusionLM)
    assert loaded.config.to_model_config() == config
    saved_router = dataclasses.asdict(loaded.config.to_model_config())["moe"]["router"]
    assert saved_router.get("capacity_schedule") == router.capacity_schedule  # absent: a token-choice config
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    assert "top_k" not in (tmp_path / "config.json").read_text()
