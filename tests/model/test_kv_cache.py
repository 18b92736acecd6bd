"""Model-level cache and padding semantics: spliced K/V equal a full forward where attention allows it,
left padding and per-row positions change nothing, the block-causal mask is what it says."""

import pytest
import torch

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model import DiffusionTransformer
from dlmoe.model.kv_cache import KVCache

MASK = 63


def model(attention: str = "bidirectional", kind: str = "token_choice", seed: int = 0) -> DiffusionTransformer:
    torch.manual_seed(seed)
    router = RouterConfig(kind=kind, num_experts=8, num_experts_per_tok=2)
    config = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64, dense_hidden=48,
        moe=MoEConfig(router=router, expert_hidden=16, num_shared_experts=1), mask_id=MASK,
        attention=attention, attention_block_size=4,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (batch, length), generator=g)
    x[:, length // 2 :] = MASK
    return x


@torch.no_grad()
def test_block_causal_cached_block_equals_full_forward() -> None:
    m = model("block_causal")
    x = tokens()
    ratio = (x == MASK).float().mean(1)
    full = m(x, mask_ratio=ratio)
    prefix = m(x[:, :8], mask_ratio=ratio, return_kv=True).kv
    block = m(x[:, 8:12], mask_ratio=ratio, kv_cache=prefix, cache_start=8)
    torch.testing.assert_close(block.logits, full.logits[:, 8:12], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_block_causal_queries_never_see_later_blocks() -> None:
    m = model("block_causal")
    x = tokens()
    changed = x.clone()
    changed[:, 12:] = 5  # a later block
    a, b = m(x).logits, m(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@torch.no_grad()
def test_dual_cache_with_fresh_cache_equals_full_forward() -> None:
    """Right after the cache is filled from the same canvas, splicing the block back is exact."""
    m = model()
    x = tokens()
    full = m(x, return_kv=True)
    block = m(x[:, 8:12], mask_ratio=(x == MASK).float().mean(1), kv_cache=full.kv, cache_start=8)
    torch.testing.assert_close(block.logits, full.logits[:, 8:12], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
@torch.no_grad()
def test_left_padding_changes_nothing(kind: str) -> None:
    m = model(kind=kind)
    x = tokens(batch=1, length=12)
    padded = torch.cat([torch.full((1, 5), 7), x], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], dim=1)
    alone = m(x).logits
    inside = m(padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-5)


def test_kv_cache_write_replaces_and_appends_columns() -> None:
    def cache(columns: list[int]) -> KVCache:
        t = torch.tensor(columns, dtype=torch.float32).view(1, 1, -1, 1)
        return KVCache((t,), (t * 10,), torch.ones(1, len(columns), dtype=torch.bool), torch.tensor(columns))

    base = cache([0, 1, 2, 3])
    assert base.write(1, cache([7, 8])).keys[0].flatten().tolist() == [0, 7, 8, 3]
    assert base.write(4, cache([9])).values[0].flatten().tolist() == [0, 10, 20, 30, 90]
    assert base.write(3, cache([5, 6])).block_ids.tolist() == [0, 1, 2, 5, 6]
    assert base.truncate(2).length == 2
    with pytest.raises(ValueError, match="no gap"):
        base.write(5, cache([1]))


@torch.no_grad()
def test_bad_cache_and_position_inputs_raise() -> None:
    m = model()
    x = tokens()
    kv = m(x, return_kv=True).kv
    with pytest.raises(ValueError, match="cache_start must lie in"):
        m(x[:, :4], kv_cache=kv, cache_start=17)
    with pytest.raises(ValueError, match="kv_cache holds 2 rows"):
        m(x[:1, :4], kv_cache=kv, cache_start=0)
    with pytest.raises(ValueError, match="positions must lie in"):
        m(x, position_ids=torch.full_like(x, 64))
    with pytest.raises(ValueError, match="non-decreasing"):
        m(x[:, :3], block_ids=torch.tensor([0, 2, 1]))
